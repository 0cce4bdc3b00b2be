"""Grad-CAM of ALBEF's image-text matching on the image patches (the original's weakly-supervised grounding and
``visualization.ipynb``): the cross-attention map of one fusion layer, weighted by the positive part of its
gradient with respect to the ITM "match" logit, averaged over heads."""
from __future__ import annotations

import math

import torch


def itm_gradcam(model, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                block_num: int = 8) -> torch.Tensor:
    """Per-token Grad-CAM maps ``[B, L, h, w]`` over the ``h x w`` image patches.

    ``model`` is a pre-training or retrieval/grounding ALBEF; ``block_num`` indexes the whole BERT stack (8 =
    the third fusion layer of ALBEF, the original's default for grounding). For each text token the map is
    ``mean_heads(A * relu(dA))`` with ``A`` the cross-attention from that token to the patches and ``dA`` its
    gradient of the summed ITM positive logits; padding tokens get zero maps. The original's grounding score
    averages these maps over the tokens. Model weights get no ``.grad``.
    """
    bert = model._bert(model.text_encoder)
    layer = bert.encoder.layer[block_num]
    if not layer.has_cross_attention:
        raise ValueError(f"block_num {block_num} is a text-only layer (fusion layers start at "
                         f"{bert.config.fusion_layer})")
    attn = layer.crossattention.self
    attn.save_attention = True
    try:
        with torch.enable_grad():
            img = model.encode_image(image)
            txt = model.encode_text(input_ids, attention_mask)
            score = model.itm_logits(model.fuse(txt.embeds, attention_mask, img.embeds))[:, 1]
            amap = attn.attention_map  # [B, heads, L, 1 + patches]
            grad = torch.autograd.grad(score.sum(), amap)[0]
    finally:
        attn.save_attention = False
        attn.attention_map = attn.attention_gradients = None
    amap, grad = amap[..., 1:].detach(), grad[..., 1:].clamp(min=0)  # drop the image [CLS] column
    cam = (amap * grad).mean(dim=1) * attention_mask[:, :, None].to(amap.dtype)
    side = int(math.isqrt(cam.shape[-1]))
    if side * side != cam.shape[-1]:
        raise ValueError(f"{cam.shape[-1]} image patches do not form a square grid")
    return cam.view(*cam.shape[:2], side, side)
