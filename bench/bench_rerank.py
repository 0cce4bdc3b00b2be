"""Time of the retrieval ITM re-rank evaluation: batched (many query rows per fusion call) against the original's
one-row-at-a-time loop, on the synthetic world's test split with a given checkpoint.

    python bench/bench_rerank.py --checkpoint output/demo/checkpoint_05.pth --config configs/Retrieval_tiny.yaml
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from dataset.caption_dataset import RetrievalEvalDataset  # noqa: E402
from dataset.transforms import eval_transform  # noqa: E402
from engine.retrieval import itm_rerank_scores  # noqa: E402
from models import load_model  # noqa: E402
from utils.config import yaml_load  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--config", default="configs/Retrieval_tiny.yaml")
    p.add_argument("--k_test", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    with open(args.config) as f:
        raw = yaml_load(f)
    k = args.k_test or raw.get("k_test", 256)
    model = load_model(args.checkpoint, args.config, args.device)
    ds = RetrievalEvalDataset(raw["test_file"], eval_transform(raw.get("image_res", 384)), raw.get("image_root"))
    loader = torch.utils.data.DataLoader(ds, batch_size=64)
    rows = []
    for name, pairs in (("one row per fusion call (original)", k), ("batched, 256 pairs per call", 256),
                        ("batched, 1024 pairs per call", 1024)):
        t0 = time.perf_counter()
        scores = itm_rerank_scores(model, loader, ds.text, model.tokenizer, torch.device(args.device), k,
                                   pairs_per_call=pairs)
        rows.append((name, time.perf_counter() - t0, scores))
    ref = rows[0][2]
    print(f"\nre-rank evaluation, {len(ds)} images x {len(ds.text)} texts, k_test {k}, {args.device}\n")
    print("| mode | seconds | max abs diff vs original loop |\n|---|---|---|")
    for name, sec, s in rows:
        diff = max((s["i2t"] - ref["i2t"]).abs().max().item(), (s["t2i"] - ref["t2i"]).abs().max().item())
        print(f"| {name} | {sec:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
