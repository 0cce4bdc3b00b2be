"""A/B runner for the original ALBEF code (salesforce/ALBEF) checked out in a scratch folder outside this repository.

Only glue lives here: nothing of the original's code. ``build(root, spec, batch)`` imports the original's
``models.model_pretrain``, ``models.vit``, ``models.xbert`` and ``optim`` from ``root`` and builds its pre-training
``ALBEF`` at the size ``spec`` (``bench/specs.py``, the same dimensions as ours), then returns ``step()``: one fp32
training step as the original's ``Pretrain.py`` takes it (``loss_mlm + loss_ita + loss_itm``, backward, the
original's ``create_optimizer`` AdamW with its two weight-decay groups, ``optimizer.step()``), returning the loss.

What the glue replaces, in the original module's namespace only (the files are not edited):

* ``VisionTransformer``: the original hard-codes ViT-B/16; a factory builds the original ``models.vit`` class at
  the spec's resolution, patch, width, depth and heads (qkv bias, LayerNorm eps 1e-6, as the original).
* ``BertForMaskedLM.from_pretrained`` / ``BertConfig.from_json_file``: no download; the original ``models.xbert``
  class is built from a ``BertConfig`` with the spec's sizes, random init (``init_deit=False``: no DeiT download).
* ``concat_all_gather``: identity (one process, no process group; all_gather over one rank is the identity).
* the tokenizer: only its ``pad/cls/mask_token_id`` are read (masking), given from the spec.

The original imports internals of transformers 4.x; the scratch copy needs a few minimal patches to import under
transformers 5 (see the README's "Performance" section): helper imports moved to ``transformers.pytorch_utils``,
a no-op for ``add_code_sample_docstrings``, and v4's ``init_weights`` / ``get_head_mask`` /
``invert_attention_mask`` on ``BertPreTrainedModel``. The runner checks that those helpers import.

    python bench/ab.py --a /tmp/albef_orig --runner bench/runner_original.py --b . --sizes small-issue
"""
from __future__ import annotations

import sys
import types
import warnings
from functools import partial


def build(root: str, spec: dict, batch: dict):
    if root not in sys.path:
        sys.path.insert(0, root)
    warnings.filterwarnings("ignore", category=FutureWarning)  # timm's deprecated import paths in the original
    import torch
    from torch import nn

    try:
        import models.model_pretrain as mp
        from models.vit import VisionTransformer
        from models.xbert import BertConfig, BertForMaskedLM
        from optim import create_optimizer
    except ImportError as e:
        raise SystemExit(f"{root}: the original ALBEF does not import ({e}); patch its models/xbert.py for this "
                         "transformers version (see bench/runner_original.py)") from e

    s = spec

    def vit_factory(**kwargs):  # the original passes ViT-B/16 arguments; the spec decides
        return VisionTransformer(img_size=s["image_res"], patch_size=s["patch_size"], embed_dim=s["vit_width"],
                                 depth=s["vit_depth"], num_heads=s["vit_heads"], mlp_ratio=s["mlp_ratio"],
                                 qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6))

    bert_config = BertConfig(vocab_size=s["vocab_size"], hidden_size=s["text_width"],
                             num_hidden_layers=s["text_layers"], num_attention_heads=s["text_heads"],
                             intermediate_size=s["intermediate_size"], hidden_act="gelu",
                             hidden_dropout_prob=s["hidden_dropout_prob"],
                             attention_probs_dropout_prob=s["attention_probs_dropout_prob"],
                             max_position_embeddings=s["max_position_embeddings"], type_vocab_size=2,
                             initializer_range=0.02, layer_norm_eps=s["layer_norm_eps"], pad_token_id=0,
                             fusion_layer=s["fusion_layer"], encoder_width=s["vit_width"])
    mp.VisionTransformer = vit_factory
    mp.BertConfig = types.SimpleNamespace(from_json_file=lambda path: bert_config)
    mp.BertForMaskedLM = types.SimpleNamespace(from_pretrained=lambda name, config: BertForMaskedLM(config=config))
    mp.concat_all_gather = lambda t: t
    tokenizer = types.SimpleNamespace(pad_token_id=s["pad_token_id"], cls_token_id=s["cls_token_id"],
                                      mask_token_id=s["mask_token_id"])
    config = dict(image_res=s["image_res"], vision_width=s["vit_width"], embed_dim=s["embed_dim"], temp=s["temp"],
                  mlm_probability=s["mlm_probability"], queue_size=s["queue_size"], momentum=s["momentum"],
                  bert_config="(built by the runner)")

    torch.manual_seed(0)
    model = mp.ALBEF(text_encoder="bert-base-uncased", tokenizer=tokenizer, config=config, init_deit=False)
    model.train()
    opt = create_optimizer(types.SimpleNamespace(opt="adamW", lr=1e-4, weight_decay=0.02), model)  # Pretrain.yaml
    text = types.SimpleNamespace(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    image, alpha = batch["image"], batch["alpha"]

    def step() -> float:
        opt.zero_grad()
        loss_mlm, loss_ita, loss_itm = model(image, text, alpha=alpha)
        loss = loss_mlm + loss_ita + loss_itm
        loss.backward()
        opt.step()
        return float(loss.detach())

    return step
