"""Grad-CAM maps of ALBEF on the image patches: the original's weakly-supervised grounding (``Grounding.py``
``val()``) and ``visualization.ipynb``.

Two modes, as the original's ``--gradcam_mode``:

* ``itm`` (the default there, the paper's best): the cross-attention map of one fusion layer (text tokens over
  image patches), weighted by the positive part of its gradient with respect to the ITM "match" logit,
  averaged over heads (:func:`itm_gradcam`, one map per text token).
* ``itc``: the self-attention map of one ViT block (the image [CLS] query over the patches), weighted by the
  positive part of its gradient with respect to the image-text contrastive similarity, averaged over heads
  (:func:`itc_gradcam`).

:func:`grounding_cam` gives the one map per sample that the original's grounding evaluation scores boxes with.

All functions compute gradients with ``torch.autograd.grad`` with respect to the attention map only: model
weights get no ``.grad`` and the model is left as it was found. They do not change the model's mode: the
caller puts it in ``eval()`` (as the original's ``val()`` does), otherwise dropout is active in the forward
whose map is read. They run on whatever device the model and inputs are on, and need an eager (not
``torch.compile``-d) model: ``itc`` mode switches one ViT block to timm's explicit-softmax attention for the
call, which a compiled block would not see.
"""
from __future__ import annotations

import math

import torch


def _square(cam: torch.Tensor) -> torch.Tensor:
    """``[..., N]`` patch scores -> ``[..., h, w]`` with ``h = w = sqrt(N)``."""
    side = int(math.isqrt(cam.shape[-1]))
    if side * side != cam.shape[-1]:
        raise ValueError(f"{cam.shape[-1]} image patches do not form a square grid")
    return cam.view(*cam.shape[:-1], side, side)


def itm_gradcam(model, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                block_num: int = 8) -> torch.Tensor:
    """Per-token Grad-CAM maps ``[B, L, h, w]`` over the ``h x w`` image patches.

    ``model`` is a pre-training or retrieval/grounding ALBEF; ``block_num`` indexes the whole BERT stack (8 =
    the third fusion layer of ALBEF, the original's default for grounding). For each text token the map is
    ``mean_heads(A * relu(dA))`` with ``A`` the cross-attention from that token to the patches and ``dA`` its
    gradient of the summed ITM positive logits; padding tokens get zero maps. The original's grounding score
    averages these maps over the tokens (:func:`grounding_cam`). Model weights get no ``.grad``.
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
    return _square(cam)


def itc_gradcam(model, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                block_num: int = 8) -> torch.Tensor:
    """Grad-CAM maps ``[B, h, w]`` of the image-text contrastive score on ViT block ``block_num``.

    As the original's ``itc`` mode: ``loss = sum_b sim[b, b]`` with ``sim = image_feat @ text_feat.T / temp``
    (the L2-normalised ``vision_proj`` / ``text_proj`` of the two [CLS] states, the online encoders, and the
    model's stored ``temp`` as it is, unclamped); the map is ``mean_heads(A * relu(dA))`` with ``A`` the
    self-attention probabilities of the image [CLS] query over the patch keys in that block (read after the
    attention dropout, where the original saves them) and ``dA`` their gradient. No text mask enters.

    timm's fused attention keeps no probabilities, so for this call only the block runs timm's explicit-softmax
    path (``attn.fused_attn = False``; same result to float32 rounding) with a forward hook on its
    ``attn_drop``, and ViT gradient checkpointing is off; both are restored afterwards.
    """
    vit = model.visual_encoder
    attn = vit.blocks[block_num].attn
    kept = {}

    def keep_map(module, inputs, output):
        kept["map"] = output  # [B, heads, 1 + patches, 1 + patches]

    fused, checkpointing = attn.fused_attn, getattr(vit, "grad_checkpointing", False)
    attn.fused_attn, vit.grad_checkpointing = False, False
    handle = attn.attn_drop.register_forward_hook(keep_map)
    try:
        with torch.enable_grad():
            img = model.encode_image(image)
            txt = model.encode_text(input_ids, attention_mask)
            sim = img.feat @ txt.feat.t() / model.temp
            amap = kept["map"]
            grad = torch.autograd.grad(sim.diag().sum(), amap)[0]
    finally:
        handle.remove()
        attn.fused_attn, vit.grad_checkpointing = fused, checkpointing
    amap, grad = amap[:, :, 0, 1:].detach(), grad[:, :, 0, 1:].clamp(min=0)  # [CLS] query row, patch keys
    return _square((amap * grad).mean(dim=1))


def grounding_cam(model, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  mode: str = "itm", block_num: int = 8) -> torch.Tensor:
    """The map ``[B, h, w]`` the original grounding evaluation scores proposals with.

    ``itm``: :func:`itm_gradcam` averaged over **all** ``L`` text positions of the batch, padding included (its
    maps are zero), exactly as the original (``mean(1).mean(1)``: heads, then tokens). A sample's map is thus
    scaled by ``1 / L`` of its batch, which moves every proposal score of that sample by the same factor and
    never changes which box wins. ``itc``: :func:`itc_gradcam`. ``block_num`` is a BERT layer for ``itm``
    (must be a fusion layer) and a ViT block for ``itc``; the original passes the same ``--block_num`` (8) to
    both.
    """
    if mode == "itm":
        return itm_gradcam(model, image, input_ids, attention_mask, block_num).mean(dim=1)
    if mode == "itc":
        return itc_gradcam(model, image, input_ids, attention_mask, block_num)
    raise ValueError(f"mode must be 'itm' or 'itc', got {mode!r}")
