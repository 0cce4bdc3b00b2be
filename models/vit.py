"""ViT image encoder (timm's ``VisionTransformer``) with the original ALBEF layout and weight handling.

ALBEF uses ViT-B/16 without a classifier: pre-norm blocks, LayerNorm eps 1e-6, GELU, ``qkv_bias``, a final
LayerNorm, and returns every token ``[B, 1 + N, D]`` (token 0 = [CLS]). timm's parameter names
(``cls_token``, ``pos_embed``, ``patch_embed.proj``, ``blocks.{i}.attn.qkv``, ``norm``) are the original
checkpoint's, so no key mapping is needed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn


@dataclass
class VisionConfig:
    """ViT size; the defaults are ViT-B/16."""

    patch_size: int = 16
    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    mlp_ratio: float = 4.0
    drop_path_rate: float = 0.0  # stochastic depth (0 in the original)
    grad_checkpointing: bool = False  # recompute blocks in the backward pass to save memory

    def __post_init__(self):
        for key in ("patch_size", "embed_dim", "depth", "num_heads"):
            if getattr(self, key) < 1:
                raise ValueError(f"vit.{key} must be at least 1, got {getattr(self, key)}")
        if not self.mlp_ratio > 0 or not 0 <= self.drop_path_rate < 1:
            raise ValueError(f"vit.mlp_ratio must be > 0 and vit.drop_path_rate in [0, 1), got {self.mlp_ratio} and "
                             f"{self.drop_path_rate}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"vit.embed_dim {self.embed_dim} is not a multiple of vit.num_heads {self.num_heads}")


class ImageEncoder(VisionTransformer):
    """timm ViT whose forward returns every token after the final norm (no pooling, no head)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


def create_vit(cfg: VisionConfig, image_res: int) -> ImageEncoder:
    """A timm ViT that maps [B, 3, image_res, image_res] to all tokens [B, 1 + N, embed_dim]."""
    if image_res % cfg.patch_size:
        raise ValueError(f"image_res {image_res} is not a multiple of vit.patch_size {cfg.patch_size}")
    vit = ImageEncoder(
        img_size=image_res, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim, depth=cfg.depth,
        num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True, num_classes=0, global_pool="",
        norm_layer=partial(nn.LayerNorm, eps=1e-6), drop_path_rate=cfg.drop_path_rate,
    )
    vit.set_grad_checkpointing(cfg.grad_checkpointing)
    return vit


def interpolate_pos_embed(pos_embed: torch.Tensor, num_patches: int, num_extra_tokens: int = 1) -> torch.Tensor:
    """Resize a [1, extra + n*n, D] position embedding to ``num_patches`` patch positions.

    As the original ALBEF: the extra ([CLS]) tokens are kept, the patch grid is resized bicubically with
    ``align_corners=False`` and no anti-aliasing. Identity when the size already matches.
    """
    old_patches = pos_embed.shape[1] - num_extra_tokens
    if old_patches == num_patches:
        return pos_embed
    old, new = math.isqrt(old_patches), math.isqrt(num_patches)
    if old * old != old_patches or new * new != num_patches:
        raise ValueError(f"position embedding grid is not square: {old_patches} -> {num_patches} patches")
    extra, grid = pos_embed[:, :num_extra_tokens], pos_embed[:, num_extra_tokens:]
    dim = pos_embed.shape[-1]
    grid = grid.reshape(1, old, old, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).flatten(1, 2).to(pos_embed.dtype)
    return torch.cat([extra, grid], dim=1)
