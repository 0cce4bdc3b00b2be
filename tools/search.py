"""Rank a folder of images for text queries with an ALBEF checkpoint: ITC similarity, then ITM re-rank.

    python -m tools.search --checkpoint output/demo/checkpoint_13.pth --config configs/Pretrain_tiny.yaml \
        --images data/synthetic/images --query "a red circle left of a blue square" "two green triangles" \
        --top 5 [--save_grid grid.png]

The images are encoded once for all queries. ``--save_grid`` writes the top images of every query as one PNG: one
row per query, titled with the query, each thumbnail captioned with its rank and ITM score.
"""
from __future__ import annotations

import argparse
import glob
import os
import textwrap
from typing import List, Optional, Sequence, Tuple

import torch

from models import load_model
from models.tokenizer import tokenize
from dataset.images import load_rgb
from dataset.text import pre_caption

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
GRID_TITLE_PX, GRID_CAPTION_PX, GRID_PAD_PX, GRID_DPI = 26, 20, 6, 100  # --save_grid layout in pixels


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
    """Write ``[(query, [(path, itm, itc), ...]), ...]`` as one PNG (see :func:`grid_layout`): a row per query
    titled with it, then its images in rank order, letterboxed to ``thumb`` pixels and captioned with rank and
    ITM score."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import ImageOps

    cols = max(1, max(len(r) for _, r in rankings))
    (fig_w, fig_h), boxes = grid_layout(len(rankings), cols, thumb)
    fig = plt.figure(figsize=(fig_w / GRID_DPI, fig_h / GRID_DPI), dpi=GRID_DPI, facecolor="white")
    try:
        for row, (query, results) in enumerate(rankings):
            title_y = boxes[row][0][1] - GRID_TITLE_PX / 2
            fig.text(GRID_PAD_PX / fig_w, 1 - title_y / fig_h,
                     textwrap.shorten(f"{row + 1}. {query}", width=max(10, fig_w // 8), placeholder="..."),
                     ha="left", va="center", fontsize=11, fontweight="bold")
            for rank, (path, itm, _itc) in enumerate(results, 1):
                left, y, w, h = boxes[row][rank - 1]
                ax = fig.add_axes((left / fig_w, 1 - (y + h) / fig_h, w / fig_w, h / fig_h))
                ax.set_axis_off()
                ax.imshow(ImageOps.pad(load_rgb(path), (thumb, thumb), color=(255, 255, 255)))
                label = f"#{rank}  itm {itm:+.2f}" if thumb >= 100 else f"#{rank} {itm:+.2f}"
                ax.text(0.5, -0.02, label, transform=ax.transAxes, ha="center", va="top", fontsize=9)
        fig.savefig(out, dpi=GRID_DPI, facecolor="white")
    finally:
        plt.close(fig)


def grid_layout(rows: int, cols: int, thumb: int = 160
                ) -> Tuple[Tuple[int, int], List[List[Tuple[int, int, int, int]]]]:
    """Picture size ``(width, height)`` in pixels and, per row, each thumbnail's box ``(left, top, width, height)``
    in pixels from the top-left corner: every row is a title band, ``cols`` thumbnails and a caption band."""
    row_h = GRID_TITLE_PX + thumb + GRID_CAPTION_PX + GRID_PAD_PX
    col_w = thumb + GRID_PAD_PX
    boxes = [[(GRID_PAD_PX + c * col_w, r * row_h + GRID_TITLE_PX, thumb, thumb) for c in range(cols)]
             for r in range(rows)]
    return (GRID_PAD_PX + cols * col_w, rows * row_h), boxes


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
