"""Loading any ALBEF checkpoint into any ALBEF model, through the checked key mappings of ``models/layouts.py``.

Layouts (reference §4.1): ``pretrain`` (``ALBEF.pth``, ``ALBEF_4M.pth``, Pretrain.py checkpoints), ``retrieval``
(``mscoco.pth``, ``flickr30k.pth``, grounding; ``refcoco.pth`` is a raw state dict without the ``'model'``
wrapper), ``vqa`` (``vqa.pth``), ``ve``, ``nlvr_ta`` (``pretrain_model_nlvr.pth``) and ``nlvr``. A model loads its
own layout and the layouts it is fine-tuned from (see :data:`models.layouts.TRANSITIONS`).

Every load states what it dropped and what the model kept at its initial value; anything beyond what the
mapping expects raises (no silent ``strict=False``). Position embeddings are resized to the model's resolution.
"""
from __future__ import annotations

import re
from typing import Dict, Union

import torch
from torch import nn

from models.layouts import FRESH_KEYS, TASK_HEADS, LayoutError, detect_layout, map_layout
from models.pretrained import load_state_dict_file
from models.vit import interpolate_pos_embed

POS_EMBED_KEYS = ("visual_encoder.pos_embed", "visual_encoder_m.pos_embed")
QUEUE_KEYS = ("image_queue", "text_queue", "queue_ptr", "idx_queue")


def resize_pos_embeds(sd: Dict[str, torch.Tensor], num_patches: int) -> Dict[str, torch.Tensor]:
    """Resize the online and momentum ViT position embeddings in ``sd`` (in place) to ``num_patches``."""
    for k in POS_EMBED_KEYS:
        if k in sd:
            sd[k] = interpolate_pos_embed(sd[k], num_patches)
    return sd


def strip_wrappers(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Remove ``module.`` (DDP) and ``_orig_mod.`` (torch.compile) prefixes."""
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            if k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def _group(key: str) -> str:
    """``text_encoder.cls.predictions.bias -> text_encoder.cls``, ``vision_proj.weight -> vision_proj``."""
    parts = key.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and parts[1] == "cls" else parts[0]


def _is_momentum_key(key: str) -> bool:
    return key.split(".")[0].endswith("_m")


def _is_headless(sd: Dict[str, torch.Tensor], source: str, target: str, expected: Dict[str, torch.Tensor]) -> bool:
    """``sd`` is the ``target`` model's state dict without the heads it trains from scratch (and perhaps without its
    momentum copies): ``tools.convert_checkpoint --to ve | nlvr_ta | nlvr`` writes such files, which
    :func:`detect_layout` takes for retrieval ones (no head to tell them by)."""
    heads = TASK_HEADS.get(target)
    if source != "retrieval" or not heads or not set(sd) <= set(expected):
        return False
    return all(k.startswith(heads) or _is_momentum_key(k) for k in set(expected) - set(sd))


def _layer_counts(keys) -> Dict[str, int]:
    """``{"vit.depth": ViT blocks, "text layers": BERT layers of text_encoder}`` found in ``keys``."""
    out = {}
    for what, pattern in (("vit.depth", r"visual_encoder\.blocks\.(\d+)\."),
                          ("text layers", r"text_encoder\.(?:bert\.)?encoder\.layer\.(\d+)\.")):
        found = [int(m.group(1)) for k in keys for m in [re.match(pattern, k)] if m]
        if found:
            out[what] = max(found) + 1
    return out


def _depth_hint(sd: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor]) -> str:
    """What to set when the checkpoint's layer counts are not the model's."""
    have, want = _layer_counts(sd), _layer_counts(expected)
    hints = []
    if have.get("vit.depth") not in (None, want.get("vit.depth")):
        hints.append(f"the checkpoint's ViT has {have['vit.depth']} blocks (set vit.depth: {have['vit.depth']})")
    if have.get("text layers") not in (None, want.get("text layers")):
        hints.append(f"its text encoder has {have['text layers']} BERT layers, the model {want.get('text layers')} "
                     "(set num_hidden_layers and fusion_layer in bert_config to the checkpoint's)")
    return f"; {'; '.join(hints)}" if hints else ""


def load_checkpoint(model: nn.Module, checkpoint: Union[str, Dict[str, torch.Tensor]], verbose: bool = True
                    ) -> Dict[str, object]:
    """Load ``checkpoint`` (a path or a state dict, any layout the model accepts) into ``model``.

    * The checkpoint's layout is detected from its keys and mapped to ``model.layout``.
    * Momentum weights: taken from the checkpoint's momentum weights when it has them; when it has none at all
      (``refcoco.pth``, ``pretrain_model_nlvr.pth``) they are copied from the loaded online weights afterwards (the
      original's NLVR.py copied them *before* loading, leaving its teacher at the initialisation: bug 8.3-4). A
      model without momentum copies drops the checkpoint's.
    * Allowed to stay at their initial values: the task heads the target trains from scratch
      (:data:`models.layouts.FRESH_KEYS`), and the queues of a raw retrieval state dict that has none.

    Returns a report ``{"source", "target", "dropped", "missing", "momentum_from_online"}``.
    """
    name = checkpoint if isinstance(checkpoint, str) else "<state dict>"
    sd = load_state_dict_file(checkpoint) if isinstance(checkpoint, str) else checkpoint
    sd = strip_wrappers(sd)
    source, target = detect_layout(sd), model.layout
    expected = model.state_dict()
    has_momentum = any(_is_momentum_key(k) for k in expected)
    headless = _is_headless(sd, source, target, expected)
    if headless:  # the target model's own keys but the heads it trains from scratch: load it as the target's
        source = target
    try:
        sd, dropped = map_layout(sd, source, target, fusion_layer=model.cfg.bert.fusion_layer,
                                 distill=has_momentum)
    except ValueError as e:
        raise LayoutError(f"{name}: {e}") from None
    if not has_momentum:  # e.g. a retrieval/pretrain checkpoint into a distill=False model that has no copies
        dropped += [k for k in sd if _is_momentum_key(k)]
        sd = {k: v for k, v in sd.items() if not _is_momentum_key(k)}
    resize_pos_embeds(sd, model.visual_encoder.patch_embed.num_patches)
    for k, v in sd.items():
        if k in expected and expected[k].shape != v.shape:
            hint = ""
            if k in ("image_queue", "text_queue"):  # [embed_dim, queue_size]
                which = [f"{name}: {a}" for name, a, b in zip(("embed_dim", "queue_size"), v.shape, expected[k].shape)
                         if a != b]
                hint = f" (set {' and '.join(which)}, the checkpoint's)"
            elif k == "idx_queue":
                hint = " (set queue_size to the checkpoint's)"
            raise LayoutError(f"{name}: {k} has shape {tuple(v.shape)}, the {target} model expects "
                             f"{tuple(expected[k].shape)}{hint}")
    missing, unexpected = model.load_state_dict(sd, strict=False)

    momentum_from_online = has_momentum and not any(_is_momentum_key(k) for k in sd)
    if momentum_from_online:
        model.copy_params()
    fresh = FRESH_KEYS.get((source, target), ()) + (TASK_HEADS[target] if headless else ())
    if target == "retrieval" and not any(k in sd for k in QUEUE_KEYS):
        fresh += QUEUE_KEYS  # raw fine-tuned weights without queues: fresh queues
    bad_missing = [k for k in missing if not k.startswith(fresh)
                   and not (momentum_from_online and _is_momentum_key(k))]
    if bad_missing or unexpected:
        raise LayoutError(f"{name} ({source} layout) does not fit the {target} model: missing {bad_missing[:10]}"
                          f"{' ...' if len(bad_missing) > 10 else ''}, unexpected {list(unexpected)[:10]}"
                          f"{' ...' if len(unexpected) > 10 else ''}{_depth_hint(sd, expected)}")
    report = {"source": source, "target": target, "dropped": dropped,
              "missing": [k for k in missing if not (momentum_from_online and _is_momentum_key(k))],
              "momentum_from_online": momentum_from_online}
    if verbose:
        fresh_note = sorted({k.split(".")[0] for k in report["missing"]}) or "nothing"
        print(f"loaded {name} ({source} -> {target}): dropped {len(dropped)} keys"
              f"{' (' + ', '.join(sorted({_group(k) for k in dropped})) + ')' if dropped else ''}; "
              f"initial values kept for {fresh_note}"
              f"{'; momentum weights copied from the online ones' if momentum_from_online else ''}")
    return report
