"""A/B runner for this repository's layout (the working tree, or any revision of it checked out elsewhere).

``build(root, spec, batch)`` imports ``models.albef`` and ``optim`` from ``root`` (not from this file's checkout),
builds the pre-training model at ``spec`` (``bench/specs.py``) and returns ``step()``: one fp32 training step on
``batch`` (forward of ITC + ITM + MLM with the momentum model, backward, AdamW step), returning the loss.
``bench/bench_pretrain.py`` builds its models with :func:`albef_config` too, so both measure the same model.
"""
from __future__ import annotations

import sys


def albef_config(s: dict, **overrides):
    """``models.albef.ALBEFConfig`` of the spec, from whichever ``models`` package is importable."""
    from models.albef import ALBEFConfig
    from models.bert import BertConfig
    from models.vit import VisionConfig

    bert = BertConfig(vocab_size=s["vocab_size"], hidden_size=s["text_width"], num_hidden_layers=s["text_layers"],
                      num_attention_heads=s["text_heads"], intermediate_size=s["intermediate_size"],
                      fusion_layer=s["fusion_layer"], encoder_width=s["vit_width"],
                      max_position_embeddings=s["max_position_embeddings"],
                      hidden_dropout_prob=s["hidden_dropout_prob"],
                      attention_probs_dropout_prob=s["attention_probs_dropout_prob"], layer_norm_eps=s["layer_norm_eps"])
    vit = VisionConfig(patch_size=s["patch_size"], embed_dim=s["vit_width"], depth=s["vit_depth"],
                       num_heads=s["vit_heads"], mlp_ratio=s["mlp_ratio"])
    kw = dict(image_res=s["image_res"], vision_width=s["vit_width"], embed_dim=s["embed_dim"], temp=s["temp"],
              mlm_probability=s["mlm_probability"], queue_size=s["queue_size"], momentum=s["momentum"], vit=vit,
              bert=bert, pad_token_id=s["pad_token_id"], cls_token_id=s["cls_token_id"],
              mask_token_id=s["mask_token_id"])
    kw.update(overrides)
    return ALBEFConfig(**kw)


def build(root: str, spec: dict, batch: dict):
    if root not in sys.path:
        sys.path.insert(0, root)
    import torch
    from models.albef import ALBEF
    from optim import OptimizerConfig, create_optimizer

    torch.manual_seed(0)
    model = ALBEF(albef_config(spec))
    model.train()
    opt = create_optimizer(model, OptimizerConfig())  # AdamW, the original's two weight-decay groups

    def step() -> float:
        losses = model(batch["image"], batch["input_ids"], batch["attention_mask"], alpha=batch["alpha"])
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step
