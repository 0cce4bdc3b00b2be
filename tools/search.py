r"""Rank a folder of images for text queries with an ALBEF checkpoint: ITC similarity, then ITM re-rank.

    python -m tools.search --checkpoint output/demo/checkpoint_05.pth --config configs/Pretrain_tiny.yaml \
        --images data/synthetic/images --query "a red circle left of a blue square" "two green triangles" \
        --top 5 [--save_grid grid.png]

The images are encoded once for all queries. ``--save_grid`` writes the top images of every query as one PNG: one
row per query, titled with the query, each thumbnail captioned with its rank and ITM score.
"""
from __future__ import annotations

import argparse
import glob
import os
from typing import List, Optional, Sequence, Tuple

import torch

from models import load_model
from models.tokenizer import tokenize
from dataset.images import load_rgb
from dataset.text import pre_caption
from utils.pictures import grid_layout, save_ranking_grid  # noqa: F401 (grid_layout: the picture's layout)

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


@torch.no_grad()
def encode_images(model, paths: List[str], batch_size: int = 64, device="cpu") -> Tuple[torch.Tensor, torch.Tensor]:
    """ITC features ``[N, E]`` and token states ``[N, 1 + patches, D]`` of the images at ``paths``."""
    feats, embeds = [], []
    for i in range(0, len(paths), batch_size):
        images = torch.stack([model.transform(load_rgb(p)) for p in paths[i:i + batch_size]])
        out = model.encode_image(images.to(device))
        feats.append(out.feat)
        embeds.append(out.embeds)
    return torch.cat(feats), torch.cat(embeds)


@torch.no_grad()
def search(model, paths: List[str], query: str, k_test: int = 16, batch_size: int = 64, device="cpu",
           encoded: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> List[Tuple[str, float, float]]:
    """Returns ``(path, itm_score, itc_similarity)`` for the ``k_test`` best images by ITC, sorted by ITM.
    ``encoded``: :func:`encode_images` of ``paths``, to reuse across queries."""
    feats, embeds = encoded if encoded is not None else encode_images(model, paths, batch_size, device)
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


def save_grid(rankings: Sequence[Tuple[str, Sequence[Tuple[str, float, float]]]], out: str, thumb: int = 160
              ) -> None:
    """Write ``[(query, [(path, itm, itc), ...]), ...]`` as one PNG (``utils.pictures``): a row per query titled
    with it, then its images in rank order, letterboxed to ``thumb`` pixels and captioned with rank and ITM score."""
    rows = [(query, [(path, f"#{rank}  itm {itm:+.2f}" if thumb >= 100 else f"#{rank} {itm:+.2f}", None)
                     for rank, (path, itm, _itc) in enumerate(results, 1)]) for query, results in rankings]
    save_ranking_grid(rows, out, thumb)


def main(argv=None):
    """Prints the ranking of each query; returns it (a list of ``(path, itm, itc)``), or one per query when
    several are given."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--config", required=True, help="any task YAML with the model keys (bert_config, vit, ...)")
    p.add_argument("--images", required=True, help="a folder of images")
    p.add_argument("--query", required=True, nargs="+", help="one or more queries (quote each)")
    p.add_argument("--top", type=int, default=5)
    p.add_argument("--k_test", type=int, default=16, help="ITC candidates re-ranked by ITM")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--save_grid", default=None, metavar="PNG",
                   help="write the top images of each query as one picture (a row per query)")
    p.add_argument("--thumb", type=int, default=160, help="thumbnail size in pixels for --save_grid")
    args = p.parse_args(argv)
    paths = sorted(f for f in glob.glob(os.path.join(args.images, "*")) if f.lower().endswith(EXTENSIONS))
    if not paths:
        raise SystemExit(f"no images ({', '.join(EXTENSIONS)}) in {args.images}")
    model = load_model(args.checkpoint, args.config, args.device)
    encoded = encode_images(model, paths, device=args.device)
    rankings = []
    for query in args.query:
        results = search(model, paths, query, args.k_test, device=args.device, encoded=encoded)
        print(f"query: {query!r} over {len(paths)} images")
        for rank, (path, itm, itc) in enumerate(results[:args.top], 1):
            print(f"{rank:2d}. {path}  itm {itm:+.3f}  itc {itc:.3f}")
        rankings.append(results)
    if args.save_grid:
        save_grid([(q, r[:args.top]) for q, r in zip(args.query, rankings)], args.save_grid, args.thumb)
        print(f"wrote {args.save_grid}")
    return rankings[0] if len(rankings) == 1 else rankings


if __name__ == "__main__":
    main()
