"""Rank a folder of images for a text query with an ALBEF checkpoint: ITC similarity, then ITM re-rank.

    python -m tools.search --checkpoint output/demo/checkpoint_13.pth --config configs/Pretrain_tiny.yaml \
        --images data/synthetic/images --query "a red circle left of a blue square" --top 5
"""
from __future__ import annotations

import argparse
import glob
import os
from typing import List, Tuple

import torch

from models import load_model
from models.tokenizer import tokenize
from dataset.images import load_rgb
from dataset.text import pre_caption

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@torch.no_grad()
def search(model, paths: List[str], query: str, k_test: int = 16, batch_size: int = 64, device="cpu"
           ) -> List[Tuple[str, float, float]]:
    """Returns ``(path, itm_score, itc_similarity)`` for the ``k_test`` best images by ITC, sorted by ITM."""
    feats, embeds = [], []
    for i in range(0, len(paths), batch_size):
        images = torch.stack([model.transform(load_rgb(p)) for p in paths[i:i + batch_size]])
        out = model.encode_image(images.to(device))
        feats.append(out.feat)
        embeds.append(out.embeds)
    feats, embeds = torch.cat(feats), torch.cat(embeds)
    enc = tokenize(model.tokenizer, [pre_caption(query)], max_length=30, padding="max_length")
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    txt = model.encode_text(ids, mask)
    sim = (txt.feat @ feats.T)[0]
    top_sim, top = sim.topk(min(k_test, len(paths)))
    k = len(top)
    fused = model.fuse(txt.embeds.expand(k, -1, -1), mask.expand(k, -1), embeds[top])
    itm = model.itm_logits(fused)[:, 1]
    order = itm.argsort(descending=True)
    return [(paths[top[j]], float(itm[j]), float(top_sim[j])) for j in order.tolist()]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--config", required=True, help="any task YAML with the model keys (bert_config, vit, ...)")
    p.add_argument("--images", required=True, help="a folder of images")
    p.add_argument("--query", required=True)
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--k_test", type=int, default=16, help="ITC candidates re-ranked by ITM")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    paths = sorted(f for f in glob.glob(os.path.join(args.images, "*")) if f.lower().endswith(EXTENSIONS))
    if not paths:
        raise SystemExit(f"no images ({', '.join(EXTENSIONS)}) in {args.images}")
    model = load_model(args.checkpoint, args.config, args.device)
    results = search(model, paths, args.query, args.k_test, device=args.device)
    print(f"query: {args.query!r} over {len(paths)} images")
    for rank, (path, itm, itc) in enumerate(results[:args.top], 1):
        print(f"{rank:2d}. {path}  itm {itm:+.3f}  itc {itc:.3f}")
    return results


if __name__ == "__main__":
    main()
