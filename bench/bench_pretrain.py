"""Pre-training step benchmark: steps/s, samples/s and peak memory of a full ALBEF step
(forward of ITC + ITM + MLM with the momentum model, backward, AdamW step) on random inputs.

    python bench/bench_pretrain.py                                  # tiny, small, base on the best device
    python bench/bench_pretrain.py --sizes base --batch-size 64 --precision bf16 --steps 20   # on a GPU
    python bench/bench_pretrain.py --compile                        # with torch.compile

Prints a markdown table; add ``--json FILE`` to keep the numbers.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from engine.trainer import autocast_context  # noqa: E402
from models.albef import ALBEF, ALBEFConfig  # noqa: E402
from models.bert import BertConfig  # noqa: E402
from models.vit import VisionConfig  # noqa: E402
from optim import OptimizerConfig, create_optimizer  # noqa: E402

SIZES = {
    # name: (model config, default batch on CPU, default batch on GPU, text length)
    "tiny": (ALBEFConfig(image_res=64, vision_width=128, embed_dim=64, queue_size=1024,
                         vit=VisionConfig(patch_size=8, embed_dim=128, depth=4, num_heads=4),
                         bert=BertConfig(vocab_size=512, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                         intermediate_size=512, fusion_layer=2, encoder_width=128,
                                         max_position_embeddings=64)), 32, 256, 20),
    "small": (ALBEFConfig(image_res=128, vision_width=384, embed_dim=256, queue_size=4096,
                          vit=VisionConfig(patch_size=16, embed_dim=384, depth=6, num_heads=6),
                          bert=BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6,
                                          num_attention_heads=6, intermediate_size=1536, fusion_layer=3,
                                          encoder_width=384)), 8, 128, 25),
    "base": (ALBEFConfig(), 2, 64, 25),  # the paper's model: ViT-B/16 @ 256 px, BERT-base split 6/6
}


def bench(name: str, batch: int, steps: int, warmup: int, precision: str, device: torch.device,
          compile_model: bool) -> dict:
    cfg, _, _, text_len = SIZES[name]
    torch.manual_seed(0)
    model = ALBEF(cfg).to(device)
    model.train()
    opt = create_optimizer(model, OptimizerConfig())
    module = torch.compile(model) if compile_model else model
    image = torch.randn(batch, 3, cfg.image_res, cfg.image_res, device=device)
    ids = torch.randint(5, cfg.bert.vocab_size, (batch, text_len), device=device)
    ids[:, 0] = cfg.cls_token_id
    mask = torch.ones_like(ids)
    mask[: batch // 2, text_len * 2 // 3:] = 0  # some padding, as real batches
    ids[mask == 0] = cfg.pad_token_id

    def step():
        with autocast_context(precision, device):
            losses = module(image, ids, mask, alpha=0.4)
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = step()
    loss.item()  # wait for the device
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / steps
    if device.type == "cuda":
        mem = f"{torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    else:
        mem = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process RSS)"
    params = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
    return {"size": name, "params_M": round(params, 1), "batch": batch, "precision": precision,
            "s_per_step": dt, "steps_per_s": 1 / dt, "samples_per_s": batch / dt, "peak_mem": mem}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="tiny,small,base")
    p.add_argument("--batch-size", type=int, default=None, help="default: per size and device")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10 on GPU, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--precision", default=None, help="fp32 | bf16 | fp16 (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    precision = args.precision or ("bf16" if gpu else "fp32")
    rows = []
    for name in args.sizes.split(","):
        batch = args.batch_size or SIZES[name][2 if gpu else 1]
        steps = args.steps or (10 if gpu else 3)
        warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
        rows.append(bench(name, batch, steps, warmup, precision, device, args.compile))
        print(f"done {name}", file=sys.stderr, flush=True)
    dev = torch.cuda.get_device_name(device) if gpu else f"CPU ({platform.processor() or platform.machine()}, " \
                                                         f"{torch.get_num_threads()} threads)"
    print(f"\nALBEF pre-training step on {dev}, torch {torch.__version__}, compile={args.compile}\n")
    print("| size | params (M) | batch | precision | s/step | steps/s | samples/s | peak memory |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['params_M']} | {r['batch']} | {r['precision']} | {r['s_per_step']:.3f} | "
              f"{r['steps_per_s']:.2f} | {r['samples_per_s']:.1f} | {r['peak_mem']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
