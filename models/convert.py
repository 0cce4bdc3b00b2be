"""Mapping ALBEF checkpoints between model layouts (reference: the original's per-script key surgery).

Layouts handled so far:

* ``pretrain``: ``text_encoder.bert.*`` + ``text_encoder.cls.*`` (MLM head), queues (``ALBEF.pth``, ``ALBEF_4M.pth``,
  checkpoints of ``Pretrain.py``);
* ``retrieval``: ``text_encoder.*`` without ``bert.``, no MLM head, plus ``idx_queue`` (``mscoco.pth``,
  ``flickr30k.pth``, ``refcoco.pth`` — the latter a raw state dict without the ``'model'`` wrapper).

Every mapping states exactly which keys it drops and which the target may lack; anything else is an error
(no silent ``strict=False``).
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
from torch import nn

from models.pretrained import load_state_dict_file
from models.vit import interpolate_pos_embed

POS_EMBED_KEYS = ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed")


def resize_pos_embeds(sd: Dict[str, torch.Tensor], num_patches: int) -> Dict[str, torch.Tensor]:
    """Resize the online and momentum ViT position embeddings in ``sd`` (in place) to ``num_patches``."""
    for k in POS_EMBED_KEYS:
        if k in sd:
            sd[k] = interpolate_pos_embed(sd[k], num_patches)
    return sd


def detect_layout(sd: Dict[str, torch.Tensor]) -> str:
    if any(k.startswith("text_encoder.bert.") for k in sd):
        return "pretrain"
    if any(k.startswith("text_encoder.encoder.layer.") for k in sd):
        return "retrieval"
    raise ValueError("unrecognised checkpoint layout: no text_encoder.bert.* or text_encoder.encoder.* keys")


def pretrain_to_retrieval(sd: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """``text_encoder(_m).bert.X -> text_encoder(_m).X``; the MLM heads are dropped. Returns (state, dropped)."""
    out, dropped = {}, []
    for k, v in sd.items():
        if k.startswith(("text_encoder.cls.", "text_encoder_m.cls.")):
            dropped.append(k)
            continue
        out[k.replace("text_encoder.bert.", "text_encoder.").replace("text_encoder_m.bert.", "text_encoder_m.")] = v
    return out, dropped


def strip_wrappers(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Remove ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes."""
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def load_into_retrieval(model: nn.Module, path: str, verbose: bool = True) -> Dict[str, List[str]]:
    """Load a pre-training or retrieval checkpoint into :class:`models.albef.ALBEFRetrieval`.

    Position embeddings are resized to the model's resolution (e.g. 256 -> 384 px). From a pre-training
    checkpoint the MLM heads are dropped and ``idx_queue`` starts at -100 (the original's behaviour: the
    pre-training queues are kept as negatives whose ids never match). A checkpoint without momentum weights
    (``refcoco.pth``-style) gets them copied from the online weights. Any other mismatch raises.
    """
    sd = strip_wrappers(load_state_dict_file(path))
    layout = detect_layout(sd)
    dropped: List[str] = []
    if layout == "pretrain":
        sd, dropped = pretrain_to_retrieval(sd)
    resize_pos_embeds(sd, model.visual_encoder.patch_embed.num_patches)
    expected = model.state_dict()
    for k, v in sd.items():
        if k in expected and expected[k].shape != v.shape:
            raise ValueError(f"{path}: {k} has shape {tuple(v.shape)}, the model expects {tuple(expected[k].shape)}"
                             + (" (set queue_size to the checkpoint's)" if "queue" in k else ""))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    allowed_missing = {"idx_queue"} if layout == "pretrain" else set()
    momentum_missing = [k for k in missing if k.split(".")[0].endswith("_m")]
    if momentum_missing and len(momentum_missing) == sum(1 for k in expected if k.split(".")[0].endswith("_m")):
        model.copy_params()  # no momentum weights at all: start them from the online ones
        missing = [k for k in missing if k not in momentum_missing]
    queue_missing = [k for k in missing if k in ("image_queue", "text_queue", "queue_ptr", "idx_queue")]
    if queue_missing and layout == "retrieval" and not any("queue" in k for k in sd):
        allowed_missing |= set(queue_missing)  # raw fine-tuned weights without queues: fresh queues
    bad_missing = [k for k in missing if k not in allowed_missing]
    if bad_missing or unexpected:
        raise ValueError(f"{path} ({layout} layout) does not fit the retrieval model: missing {bad_missing[:10]}, "
                         f"unexpected {list(unexpected)[:10]}")
    report = {"layout": [layout], "dropped": dropped, "missing": list(missing)}
    if verbose:
        print(f"loaded {path} ({layout} layout): dropped {len(dropped)} keys (MLM heads), "
              f"kept defaults for {sorted(missing) or 'nothing'}")
    return report
