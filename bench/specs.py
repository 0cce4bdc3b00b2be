"""Model sizes and synthetic inputs shared by every benchmark and every A/B runner.

Plain dicts, no import of the project: the A/B runners build the same sizes in another revision of this repository,
or in the original ALBEF code, from these numbers (see ``bench/ab.py``).
"""
from __future__ import annotations

from typing import Dict

_BASE = dict(  # the paper's model: ViT-B/16 at 256 px, BERT-base split 6 text + 6 fusion layers
    image_res=256, patch_size=16, vit_width=768, vit_depth=12, vit_heads=12,
    vocab_size=30522, text_width=768, text_layers=12, text_heads=12, intermediate_size=3072, fusion_layer=6,
    max_position_embeddings=512, embed_dim=256, queue_size=65536, momentum=0.995, text_len=25,
    batch_cpu=2, batch_gpu=64,
)

SIZES: Dict[str, dict] = {
    "tiny": dict(image_res=64, patch_size=8, vit_width=128, vit_depth=4, vit_heads=4,
                 vocab_size=512, text_width=128, text_layers=4, text_heads=4, intermediate_size=512, fusion_layer=2,
                 max_position_embeddings=64, embed_dim=64, queue_size=1024, momentum=0.995, text_len=20,
                 batch_cpu=32, batch_gpu=256),
    "small": dict(image_res=128, patch_size=16, vit_width=384, vit_depth=6, vit_heads=6,
                  vocab_size=30522, text_width=384, text_layers=6, text_heads=6, intermediate_size=1536,
                  fusion_layer=3, max_position_embeddings=512, embed_dim=256, queue_size=4096, momentum=0.995,
                  text_len=25, batch_cpu=8, batch_gpu=128),
    # ViT 192 wide x 4 blocks at 96 px (patch 16: 36 patches), BERT 192 wide x 4 layers (2 text + 2 fusion)
    "small-issue": dict(image_res=96, patch_size=16, vit_width=192, vit_depth=4, vit_heads=3,
                        vocab_size=30522, text_width=192, text_layers=4, text_heads=3, intermediate_size=768,
                        fusion_layer=2, max_position_embeddings=512, embed_dim=256, queue_size=4096, momentum=0.995,
                        text_len=25, batch_cpu=16, batch_gpu=256),
    "base": dict(_BASE),
    "base-lite": dict(_BASE, batch_cpu=2, batch_gpu=2),  # the base model at batch 2 (what a 2-core CPU can time)
}

# shared by every size: dropout as BERT's config (active in training, also in the momentum model), MLM rate
COMMON = dict(hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1, layer_norm_eps=1e-12, mlp_ratio=4.0,
              temp=0.07, mlm_probability=0.15, alpha=0.4, pad_token_id=0, cls_token_id=101, mask_token_id=103)


def spec(name: str) -> dict:
    """The full description of size ``name``: its own keys plus :data:`COMMON`."""
    if name not in SIZES:
        raise SystemExit(f"unknown size {name!r}; choose from {', '.join(SIZES)}")
    return {**COMMON, **SIZES[name], "name": name}


def default_batch(s: dict, gpu: bool) -> int:
    return s["batch_gpu" if gpu else "batch_cpu"]


def make_inputs(s: dict, batch: int, device="cpu", seed: int = 0) -> dict:
    """A fixed synthetic batch: ``{'image', 'input_ids', 'attention_mask', 'alpha'}``. Half the captions are padded
    after two thirds of the length, as real batches padded to the longest caption."""
    import torch

    g = torch.Generator().manual_seed(seed)
    L = s["text_len"]
    image = torch.randn(batch, 3, s["image_res"], s["image_res"], generator=g)
    ids = torch.randint(5, s["vocab_size"], (batch, L), generator=g)
    ids[ids == s["cls_token_id"]] = 5  # special ids only where they belong
    ids[ids == s["mask_token_id"]] = 5
    ids[:, 0] = s["cls_token_id"]
    mask = torch.ones_like(ids)
    mask[: batch // 2, L * 2 // 3:] = 0
    ids[mask == 0] = s["pad_token_id"]
    return {"image": image.to(device), "input_ids": ids.to(device), "attention_mask": mask.to(device),
            "alpha": s["alpha"]}
