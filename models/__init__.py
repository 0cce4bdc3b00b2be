"""ALBEF models and a one-call loader for inference.

    from models import load_model
    model = load_model("ALBEF.pth", config="configs/Retrieval_coco.yaml")  # any supported layout; eval mode
    img = model.encode_image(images)                     # .embeds [B, 1+N, D], .feat [B, E] (normalised)
    txt = model.encode_text(input_ids, attention_mask)   # .embeds [B, L, D] (text layers), .feat [B, E]
    fused = model.fuse(txt.embeds, attention_mask, img.embeds)   # [B, L, D]
    logits = model.itm_logits(fused)                     # [B, 2]
    logits = model.mlm_logits(input_ids, attention_mask, img.embeds)   # [B, L, vocab], pre-training layout only
    model.tokenizer, model.transform                     # tokenizer; test-time image transform
"""
from __future__ import annotations

from typing import Optional, Union

import torch

from models.albef import ALBEF, ALBEFConfig, ALBEFRetrieval, Encoded

__all__ = ["ALBEF", "ALBEFConfig", "ALBEFRetrieval", "Encoded", "load_model"]


def load_model(checkpoint: str, config: str, device: Union[str, torch.device] = "cpu",
               tokenizer: Optional[str] = None) -> Union[ALBEF, ALBEFRetrieval]:
    """Build the model that fits ``checkpoint``'s layout (pre-training -> :class:`ALBEF`, retrieval ->
    :class:`ALBEFRetrieval`), sized by the model keys of ``config`` (any task YAML), load the weights with the
    checked mapping, and return it in eval mode with ``.tokenizer`` and ``.transform`` attached.

    The queue length is taken from the checkpoint; position embeddings are resized to the config's ``image_res``.
    """
    from dataset.transforms import eval_transform
    from engine.recipe import ModelKeys
    from models.convert import detect_layout, load_into_retrieval, resize_pos_embeds, strip_wrappers
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
    if layout == "pretrain":
        model = ALBEF(model_cfg)
        model.load_state_dict(resize_pos_embeds(sd, model.visual_encoder.patch_embed.num_patches), strict=True)
    else:
        model = ALBEFRetrieval(model_cfg)
        load_into_retrieval(model, checkpoint, verbose=False)
    model.tokenizer = tok
    model.transform = eval_transform(cfg.image_res)
    return model.to(device).eval()
