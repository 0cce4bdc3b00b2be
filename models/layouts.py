"""Pure state-dict key mappings from an ALBEF pre-training checkpoint to the task layouts of the original
fine-tuning scripts (reference: ``original-albef.md`` §4.1 key layouts, §4.4-§4.6 per-script surgery).

Every mapping is a function ``sd -> (mapped, dropped_keys)``: it never touches a model, never resizes position
embeddings (do that with :func:`models.convert.resize_pos_embeds` on the result) and never copies tensors (a
tensor that lands under several names, e.g. a duplicated NLVR fusion layer, is the same object under each;
``load_state_dict`` copies it into distinct parameters). Keys are parsed component by component
(``<owner>.bert.encoder.layer.<L>.<rest>``), never by substring tests like the original's ``'bert' in key`` /
``'layer' in key``; anything the mapping does not know raises :class:`ValueError` (no silent ``strict=False``),
and so does feeding a dict that is not in the mapping's source layout (e.g. converting twice, the original's
issue #101).

Mappings (``fusion_layer`` = first layer with cross-attention, 6 for the released checkpoints):

* :func:`pretrain_to_vqa` (``VQA.py``): ``text_encoder`` = the full pre-trained BERT body; ``text_decoder.bert``
  = pre-trained embeddings + the fusion layers ``L >= fusion_layer`` renumbered from 0; ``text_decoder.cls`` =
  the MLM head. Momentum copies likewise when ``distill``.
* :func:`pretrain_to_ve` (``VE.py``): ``bert.`` stripped; MLM heads dropped. Target lacks ``cls_head(_m).*``.
* :func:`pretrain_to_nlvr_ta` (``Pretrain_nlvr.py``): ``bert.`` stripped, every fusion layer duplicated
  (layers ``2(L-f)+f`` and ``2(L-f)+f+1``); no momentum weights. Target lacks ``ta_head.*``.
* :func:`nlvr_ta_to_nlvr` (``NLVR.py``, from the TA checkpoint): encoders kept, TA-only weights dropped.
  Target lacks ``cls_head.*`` and all momentum weights: the caller must build the momentum copies from the
  **loaded** online weights (``copy_params()`` after loading). The original called ``copy_params()`` before
  loading, so its NLVR teacher kept the random/BERT initialisation (bug 8.3-4, issue #67).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, or holding what the model cannot load (the message names the
    file)."""


class LayoutError(CheckpointError):
    """A checkpoint that cannot be loaded into the model: another task's layout, or other sizes (the message says
    which keys and what to set)."""


StateDict = Dict[str, torch.Tensor]
Mapping = Tuple[StateDict, List[str]]

# Pre-training weights no fine-tuning layout here keeps (except NLVR TA: projections and temp).
_PROJ = ("vision_proj", "text_proj")
_PROJ_M = ("vision_proj_m", "text_proj_m")
_QUEUES = ("image_queue", "text_queue", "queue_ptr")
_TEXT = ("text_encoder", "text_encoder_m")
_VISUAL = ("visual_encoder", "visual_encoder_m")
_PRETRAIN_TOPS = set(_PROJ + _PROJ_M + _QUEUES + _TEXT + _VISUAL + ("temp", "itm_head"))


LAYOUTS = ("pretrain", "retrieval", "vqa", "ve", "nlvr_ta", "nlvr")


def detect_layout(sd: StateDict) -> str:
    """Which model a state dict belongs to (reference §4.1), from its keys alone:

    ``vqa`` (``text_decoder.*``), ``nlvr_ta`` (``ta_head.*``), ``nlvr`` / ``ve`` (``cls_head.*`` with 2 / 3 classes),
    ``pretrain`` (``text_encoder.bert.*``), ``retrieval`` (``text_encoder.encoder.*``: also grounding, ``refcoco.pth``).
    """
    tops = {k.split(".")[0] for k in sd}
    if "text_decoder" in tops:
        return "vqa"
    if "ta_head" in tops:
        return "nlvr_ta"
    if "cls_head" in tops:
        head = sd.get("cls_head.2.weight")
        classes = None if head is None else head.shape[0]
        if classes not in (2, 3):
            raise LayoutError(f"unrecognised checkpoint layout: cls_head.2.weight should have 2 (NLVR2) or 3 (SNLI-VE) "
                             f"rows, got {None if head is None else tuple(head.shape)}")
        return "nlvr" if classes == 2 else "ve"
    if any(k.startswith("text_encoder.bert.") for k in sd):
        return "pretrain"
    if any(k.startswith("text_encoder.encoder.layer.") for k in sd):
        return "retrieval"
    raise LayoutError("unrecognised checkpoint layout: none of text_decoder.*, ta_head.*, cls_head.*, "
                     "text_encoder.bert.* or text_encoder.encoder.layer.* is present")


def infer_fusion_layer(sd: StateDict, owner: str = "text_encoder") -> int:
    """The first BERT layer of ``owner`` with cross-attention (6 in every released checkpoint)."""
    cross = [int(k.split(".")[k.split(".").index("layer") + 1]) for k in sd
             if k.startswith(owner + ".") and ".crossattention." in k and ".layer." in k]
    if not cross:
        raise ValueError(f"no {owner} layer has cross-attention: cannot tell the fusion layer")
    return min(cross)


def pretrain_to_retrieval(sd: StateDict) -> Mapping:
    """Pre-training -> retrieval / grounding layout (reference §4.3): ``text_encoder(_m).bert.X ->
    text_encoder(_m).X``; the MLM heads ``text_encoder(_m).cls.*`` are dropped; everything else (projections,
    ``temp``, ``itm_head``, momentum weights and the pre-training queues) is kept. The target lacks ``idx_queue``."""
    _check_pretrain(sd, "pretrain_to_retrieval")
    out: StateDict = {}
    dropped: List[str] = []
    for k, v in sd.items():
        if k.split(".")[0] in _TEXT:
            owner, kind, layer, rest = _parse_text_key(k)
            if kind == "cls":
                dropped.append(k)
            else:
                out[_bert_key(owner, kind, layer, rest, bert=False)] = v
        else:
            out[k] = v
    return out, dropped


def _is_momentum(top: str) -> bool:
    return top.endswith("_m")


def _parse_text_key(key: str) -> Tuple[str, str, Optional[int], str]:
    """Split a pre-training text key into ``(owner, kind, layer, rest)``.

    ``kind`` is ``'layer'`` (``<owner>.bert.encoder.layer.<L>.<rest>``), ``'embeddings'``
    (``<owner>.bert.embeddings.<rest>``) or ``'cls'`` (``<owner>.cls.<rest>``); anything else raises.
    """
    parts = key.split(".")
    owner = parts[0]
    if len(parts) >= 3 and parts[1] == "cls":
        return owner, "cls", None, ".".join(parts[2:])
    if len(parts) >= 4 and parts[1] == "bert" and parts[2] == "embeddings":
        return owner, "embeddings", None, ".".join(parts[3:])
    if (len(parts) >= 6 and parts[1] == "bert" and parts[2] == "encoder" and parts[3] == "layer"
            and parts[4].isdigit()):
        return owner, "layer", int(parts[4]), ".".join(parts[5:])
    raise ValueError(f"unexpected text-encoder key in a pre-training checkpoint: {key!r} (expected "
                     f"{owner}.bert.embeddings.*, {owner}.bert.encoder.layer.<L>.* or {owner}.cls.*)")


def _check_pretrain(sd: StateDict, name: str) -> None:
    """Refuse anything that is not a pre-training state dict (e.g. an already converted one)."""
    try:
        layout = detect_layout(sd)
    except ValueError as e:
        raise ValueError(f"{name}: {e}") from None
    if layout != "pretrain":
        raise ValueError(f"{name} expects a pre-training state dict (text_encoder.bert.* keys), got the "
                         f"{layout!r} layout: was it converted already?")
    unknown = sorted({k.split(".")[0] for k in sd} - _PRETRAIN_TOPS)
    if unknown:
        raise ValueError(f"{name}: unexpected top-level entries for a pre-training checkpoint: {unknown}")
    for k in sd:
        if k.split(".")[0] in _TEXT:
            _parse_text_key(k)  # raises on text_encoder.X without bert./cls. (a mixed layout)


def _check_fusion(sd: StateDict, fusion_layer: int, owner: str = "text_encoder") -> int:
    """Number of BERT layers under ``owner``; checks that exactly the layers ``>= fusion_layer`` have
    cross-attention, so a wrong ``fusion_layer`` fails loudly instead of producing a mis-wired model."""
    layers, cross = set(), set()
    for k in sd:
        if k.split(".")[0] != owner:
            continue
        _, kind, layer, rest = _parse_text_key(k)
        if kind == "layer":
            layers.add(layer)
            if rest.split(".")[0] == "crossattention":
                cross.add(layer)
    n = len(layers)
    if layers != set(range(n)):
        raise ValueError(f"{owner} layer indices are not contiguous from 0: {sorted(layers)}")
    if not 0 <= fusion_layer <= n:
        raise ValueError(f"fusion_layer {fusion_layer} must lie in [0, {n}] ({owner} has {n} layers)")
    if cross != set(range(fusion_layer, n)):
        raise ValueError(f"fusion_layer={fusion_layer} does not match the checkpoint: {owner} has cross-attention "
                         f"in layers {sorted(cross)}, expected {list(range(fusion_layer, n))}")
    return n


def _check_momentum(sd: StateDict, name: str) -> None:
    if not any(k.split(".")[0] == "text_encoder_m" for k in sd):
        raise ValueError(f"{name}(distill=True): the checkpoint has no momentum (text_encoder_m.*) weights; "
                         f"use distill=False")


def _bert_key(owner: str, kind: str, layer: Optional[int], rest: str, bert: bool) -> str:
    """Rebuild a BERT-body key, with (``bert=True``) or without the ``bert.`` component."""
    body = f"embeddings.{rest}" if kind == "embeddings" else f"encoder.layer.{layer}.{rest}"
    return f"{owner}.bert.{body}" if bert else f"{owner}.{body}"


def _dropped_for_task(top: str, distill: bool) -> bool:
    """Top-level modules a task model (VQA, VE) does not take from a pre-training checkpoint."""
    return top in _PROJ + _PROJ_M + _QUEUES + ("temp", "itm_head") or (_is_momentum(top) and not distill)


def pretrain_to_vqa(sd: StateDict, fusion_layer: int = 6, distill: bool = True) -> Mapping:
    """Pre-training -> VQA layout (reference §4.4).

    * ``text_encoder(_m).bert.X -> text_encoder(_m).X`` (the full encoder, all layers);
    * ``text_encoder(_m).bert.encoder.layer.L.* -> text_decoder(_m).bert.encoder.layer.{L - fusion_layer}.*``
      for ``L >= fusion_layer`` (self-attention, cross-attention and FFN of the fusion layers);
    * ``text_encoder(_m).bert.embeddings.* -> text_decoder(_m).bert.embeddings.*`` (incl. ``position_ids``);
    * ``text_encoder(_m).cls.* -> text_decoder(_m).cls.*`` (the MLM head becomes the answer LM head);
    * ``visual_encoder(_m).*`` kept.

    Dropped: projections, ``temp``, ``itm_head``, queues, and every momentum (``*_m``) key unless ``distill``.
    The decoder is ``num_layers - fusion_layer`` layers deep with cross-attention in every layer (its config has
    ``fusion_layer=0``); its cross-attention reads question states, so ``hidden_size`` must equal the
    checkpoint's ``encoder_width`` (768 = 768 for ALBEF).
    """
    _check_pretrain(sd, "pretrain_to_vqa")
    n = _check_fusion(sd, fusion_layer)
    if fusion_layer >= n:
        raise ValueError(f"pretrain_to_vqa: fusion_layer {fusion_layer} leaves no fusion layers for the decoder "
                         f"({n} layers)")
    if distill:
        _check_momentum(sd, "pretrain_to_vqa")
        _check_fusion(sd, fusion_layer, "text_encoder_m")
    out: StateDict = {}
    dropped: List[str] = []
    for k, v in sd.items():
        top = k.split(".")[0]
        if _dropped_for_task(top, distill):
            dropped.append(k)
        elif top in _VISUAL:
            out[k] = v
        else:  # text_encoder(_m)
            owner, kind, layer, rest = _parse_text_key(k)
            dec = owner.replace("text_encoder", "text_decoder")
            if kind == "cls":
                out[f"{dec}.cls.{rest}"] = v
                continue
            out[_bert_key(owner, kind, layer, rest, bert=False)] = v
            if kind == "embeddings":
                out[_bert_key(dec, kind, None, rest, bert=True)] = v
            elif layer >= fusion_layer:
                out[_bert_key(dec, kind, layer - fusion_layer, rest, bert=True)] = v
    return out, dropped


def pretrain_to_ve(sd: StateDict, distill: bool = True) -> Mapping:
    """Pre-training -> SNLI-VE layout (reference §4.6): ``text_encoder(_m).bert.X -> text_encoder(_m).X``;
    ``visual_encoder(_m)`` kept (online from online, momentum from momentum).

    Dropped: MLM heads ``text_encoder(_m).cls.*``, projections, ``temp``, ``itm_head``, queues, and every
    momentum key unless ``distill``. The target's ``cls_head(_m).*`` is not in the checkpoint (fresh init).
    """
    _check_pretrain(sd, "pretrain_to_ve")
    if distill:
        _check_momentum(sd, "pretrain_to_ve")
    out: StateDict = {}
    dropped: List[str] = []
    for k, v in sd.items():
        top = k.split(".")[0]
        if _dropped_for_task(top, distill):
            dropped.append(k)
        elif top in _VISUAL:
            out[k] = v
        else:
            owner, kind, layer, rest = _parse_text_key(k)
            if kind == "cls":
                dropped.append(k)
            else:
                out[_bert_key(owner, kind, layer, rest, bert=False)] = v
    return out, dropped


def pretrain_to_nlvr_ta(sd: StateDict, fusion_layer: int = 6) -> Mapping:
    """Pre-training -> NLVR text-assignment (``Pretrain_nlvr.py``) layout (reference §4.5).

    ``text_encoder.bert.X -> text_encoder.X``; text layers ``L < fusion_layer`` keep their index; every fusion
    layer ``L >= fusion_layer`` is written twice, to ``2(L - f) + f`` and ``2(L - f) + f + 1`` (the two images
    of a pair are cross-attended by alternating layers), giving ``f + 2(n - f)`` layers (18 for ALBEF).
    Kept: ``visual_encoder.*``, ``vision_proj.*``, ``text_proj.*``, ``temp``.

    Dropped: every momentum key, MLM head ``text_encoder.cls.*``, ``itm_head``, queues. The target's
    ``ta_head.*`` (3-way head) is not in the checkpoint (fresh init).
    """
    _check_pretrain(sd, "pretrain_to_nlvr_ta")
    _check_fusion(sd, fusion_layer)
    out: StateDict = {}
    dropped: List[str] = []
    for k, v in sd.items():
        top = k.split(".")[0]
        if _is_momentum(top) or top in _QUEUES + ("itm_head",):
            dropped.append(k)
        elif top in _VISUAL + _PROJ + ("temp",):
            out[k] = v
        else:  # text_encoder
            owner, kind, layer, rest = _parse_text_key(k)
            if kind == "cls":
                dropped.append(k)
            elif kind == "embeddings" or layer < fusion_layer:
                out[_bert_key(owner, kind, layer, rest, bert=False)] = v
            else:
                first = 2 * (layer - fusion_layer) + fusion_layer
                out[_bert_key(owner, kind, first, rest, bert=False)] = v
                out[_bert_key(owner, kind, first + 1, rest, bert=False)] = v
    return out, dropped


def nlvr_ta_to_nlvr(sd: StateDict) -> Mapping:
    """NLVR text-assignment checkpoint -> NLVR layout (reference §4.6): ``visual_encoder.*`` and
    ``text_encoder.*`` kept as they are (the TA layout already has the doubled fusion layers).

    Dropped: ``vision_proj``, ``text_proj``, ``temp``, ``ta_head`` (and momentum keys, should a TA checkpoint
    carry any: the released one has none). The target lacks ``cls_head.*`` (fresh init) and **all momentum
    weights**: with distillation the caller must create them from the loaded online weights, i.e. call
    ``copy_params()`` *after* ``load_state_dict``. This fixes the original's bug 8.3-4, whose ``copy_params()``
    ran before loading and left the NLVR teacher at its pre-load initialisation.
    """
    name = "nlvr_ta_to_nlvr"
    if any(k.startswith(("text_encoder.bert.", "text_encoder_m.bert.")) for k in sd):
        raise ValueError(f"{name} expects a text-assignment (Pretrain_nlvr) checkpoint, got a pre-training one: "
                         f"map it with pretrain_to_nlvr_ta first")
    if not any(k.startswith("text_encoder.encoder.layer.") for k in sd):
        raise ValueError(f"{name}: no text_encoder.encoder.layer.* keys; not a text-assignment checkpoint")
    if not any(k.split(".")[0] == "ta_head" for k in sd):
        raise ValueError(f"{name} expects a text-assignment checkpoint (with ta_head.*); this one has none "
                         f"(already converted, or not a TA checkpoint)")
    known = set(_VISUAL + _TEXT + _PROJ + _PROJ_M + ("temp", "ta_head"))
    unknown = sorted({k.split(".")[0] for k in sd} - known)
    if unknown:
        raise ValueError(f"{name}: unexpected top-level entries for a text-assignment checkpoint: {unknown}")
    out: StateDict = {}
    dropped: List[str] = []
    for k, v in sd.items():
        top = k.split(".")[0]
        if top in ("visual_encoder", "text_encoder"):
            out[k] = v
        else:
            dropped.append(k)
    return out, dropped


# Checkpoint -> model transitions (``(source, target)``) and the mapping each one runs.
TRANSITIONS = {
    ("pretrain", "retrieval"): lambda sd, f, d: pretrain_to_retrieval(sd),
    ("pretrain", "vqa"): lambda sd, f, d: pretrain_to_vqa(sd, f, d),
    ("pretrain", "ve"): lambda sd, f, d: pretrain_to_ve(sd, d),
    ("pretrain", "nlvr_ta"): lambda sd, f, d: pretrain_to_nlvr_ta(sd, f),
    ("nlvr_ta", "nlvr"): lambda sd, f, d: nlvr_ta_to_nlvr(sd),
}

# What a model may lack after loading a checkpoint of another layout: the heads it trains from scratch
# (prefixes). ``nlvr`` from ``nlvr_ta`` also lacks every momentum weight; loaders copy them from the online ones.
FRESH_KEYS = {
    ("pretrain", "retrieval"): ("idx_queue",),
    ("pretrain", "ve"): ("cls_head.", "cls_head_m."),
    ("pretrain", "nlvr_ta"): ("ta_head.",),
    ("nlvr_ta", "nlvr"): ("cls_head.", "cls_head_m."),
}


# The heads a task model trains from scratch, by layout: a state dict of that model without them (what
# tools.convert_checkpoint writes for ve / nlvr_ta / nlvr) has no key to tell its layout by.
TASK_HEADS = {target: heads for (_, target), heads in FRESH_KEYS.items() if target != "retrieval"}


def map_layout(sd: StateDict, source: str, target: str, fusion_layer: Optional[int] = None,
               distill: bool = True) -> Mapping:
    """Map a state dict of layout ``source`` to ``target`` (identity when equal). ``fusion_layer`` defaults to
    the checkpoint's own; ``distill=False`` drops the momentum weights of task layouts."""
    if source == target:
        out, dropped = dict(sd), []
        if not distill and target in ("vqa", "ve", "nlvr"):
            dropped = [k for k in sd if _is_momentum(k.split(".")[0])]
            out = {k: v for k, v in sd.items() if k not in set(dropped)}
        return out, dropped
    fn = TRANSITIONS.get((source, target))
    if fn is None:
        hint = {"nlvr": ": NLVR2 starts from a text-assignment checkpoint: run the text-assignment pre-training "
                        "(Pretrain_nlvr.py --checkpoint <the pre-trained one>) first, as the paper, and pass its "
                        "checkpoint to NLVR.py"}.get(target, "")
        sources = sorted(s for s, t in TRANSITIONS if t == target) + [target]
        raise LayoutError(f"cannot map a {source} checkpoint to the {target} layout (a {target} model loads "
                         f"{' or '.join(sources)} checkpoints){hint}")
    if fusion_layer is None and source == "pretrain":
        fusion_layer = infer_fusion_layer({k: v for k, v in sd.items() if k.startswith("text_encoder.")})
    return fn(sd, fusion_layer, distill)

