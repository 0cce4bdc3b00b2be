"""Write a plain state dict of a given layout from an ALBEF checkpoint (any wrapper, DDP/compile prefixes removed).

    python -m tools.convert_checkpoint ALBEF.pth albef_retrieval.pth --to retrieval [--image_res 384]
    python -m tools.convert_checkpoint ALBEF.pth albef_vqa.pth --to vqa --image_res 384
    python -m tools.convert_checkpoint ALBEF.pth albef_ta.pth --to nlvr_ta
    python -m tools.convert_checkpoint pretrain_model_nlvr.pth nlvr_init.pth --to nlvr --image_res 384

Layouts (reference §4.1): ``pretrain``, ``retrieval``, ``vqa``, ``ve``, ``nlvr_ta``, ``nlvr``. The mappings are the
original fine-tuning scripts' key surgery (``models/layouts.py``): pre-training -> retrieval / vqa / ve / nlvr_ta,
and nlvr_ta -> nlvr. What a mapping drops is listed. Heads a task trains from scratch (``cls_head``, ``ta_head``)
are not in the output (the task scripts load such a file as their own layout, the head at its initial values);
neither are an NLVR2 model's momentum weights when converting from ``nlvr_ta`` (the loaders create those from the
online weights). Pre-training -> retrieval adds ``idx_queue`` = -100, as the original's
Retrieval.py does on load. ``--image_res`` resizes the position embeddings. ``--no_momentum`` drops the momentum
weights of vqa / ve / nlvr outputs. The output is ``{'model': state_dict}`` (``--raw`` for a bare state dict) and
loads with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import argparse
from typing import Optional

import torch

from models.convert import resize_pos_embeds, strip_wrappers
from models.layouts import LAYOUTS, detect_layout, map_layout
from models.pretrained import load_state_dict_file


def convert(sd: dict, to: str, image_res: Optional[int] = None, distill: bool = True, verbose: bool = False) -> dict:
    sd = strip_wrappers(sd)
    source = detect_layout(sd)
    try:
        out, dropped = map_layout(sd, source, to, distill=distill)
    except ValueError as e:
        raise ValueError(f"cannot convert: {e}") from None
    if source == "pretrain" and to == "retrieval" and "image_queue" in out:
        out["idx_queue"] = torch.full((1, out["image_queue"].shape[1]), -100, dtype=torch.long)
    if image_res is not None:
        patch = out["visual_encoder.patch_embed.proj.weight"].shape[-1]
        resize_pos_embeds(out, (image_res // patch) ** 2)
    if verbose:
        tops = sorted({k.split(".")[0] for k in dropped})
        print(f"{source} -> {to}: kept {len(out)} tensors, dropped {len(dropped)}"
              f"{' (' + ', '.join(tops) + ')' if tops else ''}")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--to", required=True, choices=LAYOUTS)
    p.add_argument("--image_res", type=int, default=None, help="resize position embeddings to this resolution")
    p.add_argument("--no_momentum", action="store_true", help="drop momentum weights (vqa / ve / nlvr outputs)")
    p.add_argument("--raw", action="store_true", help="write the bare state dict, without {'model': ...}")
    args = p.parse_args(argv)
    try:
        out = convert(load_state_dict_file(args.input), args.to, args.image_res, not args.no_momentum, verbose=True)
    except ValueError as e:
        raise SystemExit(f"error: {args.input}: {e}")
    torch.save(out if args.raw else {"model": out}, args.output)
    print(f"wrote {args.output}: {args.to} layout, {len(out)} tensors")


if __name__ == "__main__":
    main()
