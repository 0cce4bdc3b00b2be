"""ALBEF models and a one-call loader for inference.

    from models import load_model
    model = load_model("ALBEF.pth", config="configs/Retrieval_coco.yaml")  # any supported layout; eval mode
    img = model.encode_image(images)                     # .embeds [B, 1+N, D], .feat [B, E] (normalised)
    txt = model.encode_text(input_ids, attention_mask)   # .embeds [B, L, D] (text layers), .feat [B, E]
    fused = model.fuse(txt.embeds, attention_mask, img.embeds)   # [B, L, D]
    logits = model.itm_logits(fused)                     # [B, 2]
    logits = model.mlm_logits(input_ids, attention_mask, img.embeds)   # [B, L, vocab], pre-training layout only
    model.tokenizer, model.transform                     # tokenizer; test-time image transform

Task checkpoints give their task model: ``vqa`` -> :class:`ALBEFVQA` (``.answer``), ``ve`` / ``nlvr`` ->
:class:`ALBEFVE` / :class:`ALBEFNLVR` (``.classify``), ``nlvr_ta`` -> :class:`ALBEFTextAssignment`.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from models.albef import ALBEF, ALBEFConfig, ALBEFRetrieval, Encoded
from models.classifiers import ALBEFNLVR, ALBEFTextAssignment, ALBEFVE
from models.vqa import ALBEFVQA

__all__ = ["ALBEF", "ALBEFConfig", "ALBEFRetrieval", "ALBEFVQA", "ALBEFVE", "ALBEFNLVR", "ALBEFTextAssignment",
           "Encoded", "MODEL_FOR_LAYOUT", "load_model"]

MODEL_FOR_LAYOUT = {"pretrain": ALBEF, "retrieval": ALBEFRetrieval, "vqa": ALBEFVQA, "ve": ALBEFVE,
                    "nlvr": ALBEFNLVR, "nlvr_ta": ALBEFTextAssignment}


def load_model(checkpoint: str, config: str, device: Union[str, torch.device] = "cpu",
               tokenizer: Optional[str] = None) -> nn.Module:
    """Build the model that fits ``checkpoint``'s layout (:data:`MODEL_FOR_LAYOUT`), sized by the model keys of
    ``config`` (any task YAML), load the weights with the checked mapping, and return it in eval mode with
    ``.tokenizer`` and ``.transform`` attached.

    The queue length is taken from the checkpoint; position embeddings are resized to the config's ``image_res``;
    task models get momentum copies only if the checkpoint has momentum weights.
    """
    from dataset.transforms import eval_transform
    from engine.recipe import ModelKeys
    from models.convert import load_checkpoint, strip_wrappers
    from models.layouts import detect_layout
    from models.pretrained import load_state_dict_file
    from models.tokenizer import load_tokenizer
    from utils.config import from_dict, yaml_load

    with open(config) as f:
        raw = yaml_load(f) or {}
    keys = {k: v for k, v in raw.items() if k in ModelKeys.__dataclass_fields__}
    cfg = from_dict(ModelKeys, keys, f"{config}:")
    sd = strip_wrappers(load_state_dict_file(checkpoint))
    if "image_queue" in sd:
        cfg.queue_size = sd["image_queue"].shape[1]
    tok = load_tokenizer(tokenizer or cfg.tokenizer or cfg.text_encoder)
    model_cfg = cfg.albef_config(tok, config)
    layout = detect_layout(sd)
    cls = MODEL_FOR_LAYOUT[layout]
    if cls in (ALBEFVQA, ALBEFVE, ALBEFNLVR):
        model = cls(model_cfg, distill=any(k.split(".")[0].endswith("_m") for k in sd))
    else:
        model = cls(model_cfg)
    load_checkpoint(model, sd, verbose=False)
    model.tokenizer = tok
    model.transform = eval_transform(cfg.image_res)
    return model.to(device).eval()
