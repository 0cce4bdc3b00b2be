"""Write a plain state dict of a given layout from an ALBEF checkpoint (any wrapper, DDP/compile prefixes removed).

    python -m tools.convert_checkpoint ALBEF.pth albef_retrieval.pth --to retrieval [--image_res 384]
    python -m tools.convert_checkpoint output/pretrain/checkpoint_29.pth weights.pth --to pretrain

Layouts: ``pretrain`` (``text_encoder.bert.*`` + MLM heads) and ``retrieval`` (``text_encoder.*``, no MLM heads,
``idx_queue``). Pre-training -> retrieval drops the MLM heads and adds ``idx_queue`` = -100 (what the
original's Retrieval.py does on load); ``--image_res`` resizes the position embeddings. The output is
``{'model': state_dict}`` (``--raw`` for a bare state dict) and loads with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import argparse
from typing import Optional
import torch

from models.convert import detect_layout, pretrain_to_retrieval, resize_pos_embeds, strip_wrappers
from models.pretrained import load_state_dict_file


def convert(sd: dict, to: str, image_res: Optional[int] = None) -> dict:
    sd = strip_wrappers(sd)
    layout = detect_layout(sd)
    if layout == to:
        out = dict(sd)
    elif layout == "pretrain" and to == "retrieval":
        out, _ = pretrain_to_retrieval(sd)
        if "image_queue" in out and "idx_queue" not in out:
            out["idx_queue"] = torch.full((1, out["image_queue"].shape[1]), -100, dtype=torch.long)
    else:
        raise ValueError(f"cannot convert a {layout} checkpoint to {to} (supported: pretrain -> retrieval)")
    if image_res is not None:
        patch = out["visual_encoder.patch_embed.proj.weight"].shape[-1]
        resize_pos_embeds(out, (image_res // patch) ** 2)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--to", required=True, choices=["pretrain", "retrieval"])
    p.add_argument("--image_res", type=int, default=None, help="resize position embeddings to this resolution")
    p.add_argument("--raw", action="store_true", help="write the bare state dict, without {'model': ...}")
    args = p.parse_args(argv)
    out = convert(load_state_dict_file(args.input), args.to, args.image_res)
    torch.save(out if args.raw else {"model": out}, args.output)
    print(f"wrote {args.output}: {args.to} layout, {len(out)} tensors")


if __name__ == "__main__":
    main()
