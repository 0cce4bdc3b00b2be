"""Pre-training step benchmark: time, throughput, FLOPs, MFU and peak memory of a full ALBEF step (forward of
ITC + ITM + MLM with the momentum model, backward, AdamW step).

    python bench/bench_pretrain.py                                  # tiny, small, base, base-lite on the best device
    python bench/bench_pretrain.py --sizes base --batch-size 64 --precision bf16 --steps 20   # on a GPU
    python bench/bench_pretrain.py --sizes small-issue --engine     # also through engine.trainer.Trainer._step
    python bench/bench_pretrain.py --sizes tiny --data synthetic_world data/synthetic   # real loader, data wait
    python bench/bench_pretrain.py --compile                        # with torch.compile

Per size (``bench/specs.py``: tiny, small, small-issue, base, and base-lite = base at batch 2) it reports:

* s/step and samples/s: median over the timed steps (``--steps``, after ``--warmup``), on a fixed synthetic batch;
* GFLOP/sample: one full training step's forward + backward (student and momentum teacher; the optimizer is not
  counted) under ``torch.utils.flop_counter.FlopCounterMode``, divided by the batch (the MLM head runs at the masked
  positions only, so the count follows the masking draw: seed 0). The counter sees matmuls,
  convolutions and attention only (elementwise work is not counted, as usual for MFU); on the CPU the count runs
  with the math attention kernel, whose matmuls it sees (the fused CPU kernel has no FLOP formula);
* TFLOP/s achieved = FLOPs per step / s per step, and MFU on a GPU against the peak dense TFLOP/s of the precision
  (table :data:`PEAK_TFLOPS` by ``torch.cuda.get_device_name()``, or ``--peak_tflops``);
* peak memory: ``torch.cuda.max_memory_allocated`` over the timed steps, or the process's peak RSS on the CPU (each
  size runs in its own process when several are asked, so the RSS is that size's);
* ``--engine``: the same step through ``engine.trainer.Trainer._step`` (divergence guard, gradient norm, scheduler),
  interleaved with the bare step in blocks, and the engine's overhead;
* ``--data synthetic_world DIR``: batches from the engine's real loader (``dataset.sampling.create_train_loader``
  over ``DIR/pretrain.json``, the original augmentation, ``DIR/tokenizer``) instead of the synthetic batch, and
  the share of the wall time spent waiting for the loader.

Prints a markdown table; ``--json FILE`` keeps the rows.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import torch  # noqa: E402

from engine.trainer import autocast_context, move_to  # noqa: E402
from models.albef import ALBEF  # noqa: E402
from optim import OptimizerConfig, create_optimizer  # noqa: E402
from runner_ours import albef_config  # noqa: E402
from specs import SIZES, default_batch, make_inputs, spec  # noqa: E402

# Peak dense tensor-core TFLOP/s (no sparsity): (name pattern, bf16/fp16, fp32). V100 has no bf16: its 125 is fp16.
PEAK_TFLOPS = [
    ("H200", 989.0, 67.0),
    ("H100", 989.0, 67.0),  # SXM
    ("A100", 312.0, 19.5),
    ("L40S", 362.0, 91.6),
    ("RTX 4090", 165.0, 82.6),
    ("V100", 125.0, 15.7),
]


def peak_tflops(device_name: str, precision: str) -> Optional[float]:
    """Peak dense TFLOP/s of a known GPU at ``precision`` (None when unknown: give ``--peak_tflops``)."""
    name = device_name.upper()
    if "H100" in name and ("PCIE" in name or "NVL" in name):
        return None  # other clocks and SM counts than the SXM part in the table
    for pattern, half, single in PEAK_TFLOPS:
        if pattern.upper() in name:
            if precision == "fp32":
                return single
            if pattern == "V100" and precision == "bf16":
                return None
            return half
    return None


def count_flops(model, batch: dict, precision: str, device: torch.device) -> Dict[str, float]:
    """FLOPs of one training step's forward + backward (no optimizer step): total, and the momentum teacher's modules."""
    from torch.utils.flop_counter import FlopCounterMode

    attn = contextlib.nullcontext()
    if device.type == "cpu":  # the fused CPU attention kernel has no FLOP formula; the math one is matmuls
        from torch.nn.attention import SDPBackend, sdpa_kernel

        attn = sdpa_kernel(SDPBackend.MATH)
    counter = FlopCounterMode(display=False)
    torch.manual_seed(0)  # the sparse MLM head's cost follows the masking draw: count one fixed draw
    with attn, counter:
        with autocast_context(precision, device):
            losses = model(batch["image"], batch["input_ids"], batch["attention_mask"], alpha=batch["alpha"])
        sum(losses.values()).backward()
    model.zero_grad(set_to_none=True)
    out = {"total": float(counter.get_total_flops())}
    # Per module only for the momentum teacher: it runs forward only, so its count is its own (the counter's module
    # attribution of backward FLOPs overlaps between the student's encoders).
    prefix = type(model).__name__ + "."
    for key, ops in counter.get_flop_counts().items():
        name = key[len(prefix):] if key.startswith(prefix) else None
        if name and "." not in name and name.endswith("_m"):
            out[name] = float(sum(ops.values()))
    return out


class RealBatches:
    """Endless batches of the engine's training loader; ``wait_s`` sums the time spent in ``next()``.

    ``kind``: ``synthetic_world`` (``source`` a folder with ``pretrain.json`` and ``tokenizer/``), ``json`` (a
    pre-training JSON file) or ``shards`` (a brace pattern of ``tools.make_shards`` tar shards); the last two take
    the tokenizer folder from ``tokenizer``."""

    def __init__(self, kind: str, source: str, image_res: int, batch: int, text_len: int, num_workers: int, device,
                 tokenizer: Optional[str] = None, uint8: bool = False):
        from dataset import CaptionCollator
        from dataset.caption_dataset import PretrainDataset
        from dataset.sampling import create_train_loader
        from dataset.transforms import AugmentConfig, train_transform, uint8_output
        from models.tokenizer import load_tokenizer

        if kind == "synthetic_world":
            tokenizer, source = os.path.join(source, "tokenizer"), os.path.join(source, "pretrain.json")
        elif kind not in ("json", "shards"):
            raise SystemExit(f"--data {kind}: choose synthetic_world, json or shards")
        elif not tokenizer:
            raise SystemExit(f"--data {kind} needs --tokenizer DIR")
        self.tokenizer = load_tokenizer(tokenizer)
        transform = train_transform(image_res, AugmentConfig())
        if uint8:  # normalize_on_device: uint8 images from the workers, normalised after the copy (as the trainer)
            transform = uint8_output(transform)
        self.uint8 = uint8
        collate = CaptionCollator(self.tokenizer, text_len)
        if kind == "shards":
            from dataset.shards import create_shard_loader

            self.loader, self.sampler = create_shard_loader(source, transform, 30, batch, num_workers, 0,
                                                            batch * 10 ** 6, collate, prefetch_factor=4)
        else:
            dataset = PretrainDataset(source, transform)
            self.loader, self.sampler = create_train_loader(dataset, batch, num_workers, 0, collate,
                                                            prefetch_factor=4)
        self.device, self.epoch, self.wait_s = device, 0, 0.0
        self.it = iter(self.loader)

    def next(self) -> dict:
        t = time.perf_counter()
        try:
            b = next(self.it)
        except StopIteration:
            self.epoch += 1
            self.sampler.set_epoch(self.epoch)
            self.it = iter(self.loader)
            b = next(self.it)
        b = move_to({k: v for k, v in b.items() if k != "bad_images"}, self.device)
        self.wait_s += time.perf_counter() - t
        if self.uint8:  # part of the step, as in the trainer (not of the wait for data)
            from dataset.transforms import normalize_images

            b["image"] = normalize_images(b["image"])
        return b


def bench(name: str, batch: int, steps: int, warmup: int, precision: str, device: torch.device,
          compile_model: bool, engine: bool = False, flops: bool = True, data: Optional[List[str]] = None,
          num_workers: int = 2, peak: Optional[float] = None, grad_ckpt: bool = False,
          tokenizer: Optional[str] = None, uint8: bool = False, precast_momentum: bool = True) -> List[dict]:
    s = spec(name)
    real = None
    overrides = {}
    if data:
        kind, source = data
        real = RealBatches(kind, source, s["image_res"], batch, s["text_len"], num_workers, device, tokenizer, uint8)
        tok = real.tokenizer
        if len(tok) > s["vocab_size"]:
            raise SystemExit(f"the tokenizer has {len(tok)} entries, more than size {name}'s vocabulary")
        overrides = dict(pad_token_id=tok.pad_token_id, cls_token_id=tok.cls_token_id, mask_token_id=tok.mask_token_id)
    torch.manual_seed(0)
    cfg = albef_config(s, **overrides)
    if grad_ckpt:  # recompute every ViT block and BERT layer in the backward pass
        cfg.vit.grad_checkpointing = cfg.bert.grad_checkpointing = True
    model = ALBEF(cfg).to(device)
    model.train()
    model.precast_momentum = precast_momentum  # False: autocast casts the teacher's weights at every layer call
    opt = create_optimizer(model, OptimizerConfig())
    compile_s = 0.0
    if compile_model:  # regional, as the engine's ``compile: true`` (engine.trainer.compile_regions)
        from engine.trainer import compile_regions

        compile_regions(model)
    module = model
    fixed = make_inputs(s, batch, device)
    alpha = fixed["alpha"]

    def next_batch() -> dict:
        return fixed if real is None else {**real.next(), "alpha": alpha}

    def bare_step():
        b = next_batch()
        with autocast_context(precision, device):
            losses = module(b["image"], b["input_ids"], b["attention_mask"], alpha=b["alpha"])
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    modes = {"bare": bare_step}
    tmp = None
    if engine:
        from engine.trainer import StepContext, TrainOptions, Trainer
        from scheduler import SchedulerConfig, create_scheduler

        tmp = tempfile.TemporaryDirectory(prefix="bench_engine_")
        total = warmup + steps
        trainer = Trainer(model, opt, create_scheduler(SchedulerConfig(), opt, total), TrainOptions(
            precision=precision, compile=compile_model), tmp.name, {}, device, steps_per_epoch=total, batch_size=batch)

        def train_step(mod, b, ctx):
            return mod(b["image"], b["input_ids"], b["attention_mask"], alpha=b["alpha"])

        # Trainer._step takes one batch, or a list of micro-batches where the engine accumulates gradients
        micro = next(iter(inspect.signature(trainer._step).parameters)) == "batches"

        def engine_step():
            ctx = StepContext(0, trainer.global_step, total, trainer.global_step)
            b = next_batch()
            losses, _ = trainer._step([b] if micro else b, ctx, train_step)
            return losses["loss_mlm"]

        modes["engine"] = engine_step

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for fn in modes.values():
        t = time.perf_counter()
        for i in range(warmup):
            fn()
            if i == 0:
                sync()
                compile_s = max(compile_s, time.perf_counter() - t)  # the first step (compilation, if any)
        sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    # timed: rounds of one block per mode (bare, engine, bare, engine, ...), so drift hits both alike
    rounds = min(3, steps) if engine else 1
    per_block = [steps // rounds + (1 if r < steps % rounds else 0) for r in range(rounds)]
    times: Dict[str, List[float]] = {m: [] for m in modes}
    waits: Dict[str, float] = {m: 0.0 for m in modes}
    walls: Dict[str, float] = {m: 0.0 for m in modes}
    cpus: Dict[str, float] = {m: 0.0 for m in modes}
    for n in per_block:
        for m, fn in modes.items():
            w0 = real.wait_s if real else 0.0
            c_block = time.process_time()
            t_block = time.perf_counter()
            for _ in range(n):
                t = time.perf_counter()
                loss = fn()
                if device.type != "cuda":
                    loss.detach().item()  # free on the CPU; on CUDA steps stay queued (block times below)
                times[m].append(time.perf_counter() - t)
            sync()
            walls[m] += time.perf_counter() - t_block
            cpus[m] += time.process_time() - c_block
            waits[m] += (real.wait_s - w0) if real else 0.0
    if device.type == "cuda":
        mem = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
    else:
        mem = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (process RSS)"
    fl = count_flops(model, fixed if real is None else {**real.next(), "alpha": alpha}, precision, device) \
        if flops else None
    params = sum(p.numel() for p in model.parameters() if p.requires_grad) / 1e6
    rows = []
    for m in modes:
        # CPU: median of per-step times; CUDA: the blocks' mean (steps are queued asynchronously)
        dt = statistics.median(times[m]) if device.type != "cuda" else walls[m] / steps
        row = {"size": name, "params_M": round(params, 1), "batch": batch, "precision": precision, "mode": m,
               "s_per_step": dt, "steps_per_s": 1 / dt, "samples_per_s": batch / dt, "peak_mem": mem,
               "step_times_s": times[m] if device.type != "cuda" else None, "device": str(device),
               "threads": torch.get_num_threads(), "cpu_per_wall": cpus[m] / walls[m],
               "data": "synthetic" if real is None else f"{data[0]} {data[1]}" + (" uint8" if uint8 else ""),
               "grad_ckpt": grad_ckpt,
               "compile": compile_model, "first_step_s": compile_s,
               "num_workers": num_workers if real is not None else None}
        if fl is not None:
            row["flops_per_step"] = fl["total"]
            row["gflops_per_sample"] = fl["total"] / batch / 1e9
            row["teacher_flops_per_step"] = sum(v for k, v in fl.items() if k != "total")
            row["teacher_flops_by_module"] = {k: v for k, v in fl.items() if k != "total"}
            row["tflops_per_s"] = fl["total"] / dt / 1e12
            row["mfu"] = row["tflops_per_s"] / peak if peak else None
            row["peak_tflops"] = peak
        if real is not None:
            row["data_wait_pct"] = 100 * waits[m] / walls[m]
        if m == "engine":
            row["engine_overhead_pct"] = 100 * (dt / rows[0]["s_per_step"] - 1)
        rows.append(row)
    if tmp is not None:
        tmp.cleanup()
    return rows


def _child_argv(args, size: str, json_path: str) -> List[str]:
    argv = [sys.executable, os.path.abspath(__file__), "--sizes", size, "--in-process", "--json", json_path,
            "--device", args.device]
    for flag in ("batch_size", "steps", "warmup", "precision", "peak_tflops", "num_workers", "threads", "tokenizer"):
        v = getattr(args, flag)
        if v is not None:
            argv += [f"--{flag.replace('_', '-')}" if flag != "peak_tflops" else "--peak_tflops", str(v)]
    argv += ["--compile"] * args.compile + ["--engine"] * args.engine + ["--no-flops"] * (not args.flops)
    argv += ["--grad-ckpt"] * args.grad_ckpt + ["--normalize-on-device"] * args.normalize_on_device
    argv += ["--teacher-casts-per-call"] * (not args.precast_momentum)
    if args.data:
        argv += ["--data", *args.data]
    return argv


def print_table(rows: List[dict], header: str) -> None:
    print(f"\n{header}\n")
    print("| size | params (M) | batch | precision | step | s/step | samples/s | GFLOP/sample | TFLOP/s | MFU | "
          "peak memory | data wait |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        gf = f"{r['gflops_per_sample']:.2f}" if "gflops_per_sample" in r else "-"
        tf = f"{r['tflops_per_s']:.3f}" if "tflops_per_s" in r else "-"
        mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") else "-"
        wait = f"{r['data_wait_pct']:.1f} %" if "data_wait_pct" in r else "-"
        step = r["mode"] + (f" ({r['engine_overhead_pct']:+.1f} %)" if "engine_overhead_pct" in r else "")
        print(f"| {r['size']} | {r['params_M']} | {r['batch']} | {r['precision']} | {step} | {r['s_per_step']:.3f} | "
              f"{r['samples_per_s']:.1f} | {gf} | {tf} | {mfu} | {r['peak_mem']} | {wait} |")
    starved = [f"{r['size']} {r['mode']} ({r['cpu_per_wall']:.2f})" for r in rows
               if r.get("device") == "cpu" and r["cpu_per_wall"] < 0.7 * r["threads"]]
    if starved:
        print(f"\nwarning: other processes held the CPU (CPU time / wall time below 0.7 x threads): "
              f"{', '.join(starved)}; these times are not the step's")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["tiny,small,base,base-lite"],
                   help=f"comma- or space-separated, of {', '.join(SIZES)}")
    p.add_argument("--batch-size", type=int, default=None, help="default: per size and device (bench/specs.py)")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 10 on GPU, 3 on CPU)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--precision", default=None, help="fp32 | bf16 | fp16 (default bf16 on GPU, fp32 on CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="regional torch.compile (each transformer block)")
    p.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing in the ViT and BERT")
    p.add_argument("--engine", action="store_true", help="also time the step through engine.trainer.Trainer._step")
    p.add_argument("--no-flops", dest="flops", action="store_false", help="skip the FLOP count")
    p.add_argument("--peak_tflops", type=float, default=None, help="peak TFLOP/s for MFU (default: known GPUs)")
    p.add_argument("--data", nargs=2, metavar=("KIND", "SOURCE"), default=None,
                   help="batches from the engine's loader: synthetic_world DIR (DIR/pretrain.json), json FILE, or "
                        "shards PATTERN (these two with --tokenizer)")
    p.add_argument("--tokenizer", default=None, help="tokenizer folder for --data json / shards")
    p.add_argument("--normalize-on-device", action="store_true",
                   help="with --data: uint8 images from the loader, normalised on the device (normalize_on_device)")
    p.add_argument("--teacher-casts-per-call", dest="precast_momentum", action="store_false",
                   help="under autocast, cast the momentum teacher's weights at every layer call (as before "
                        "MomentumMixin.momentum_weights): the A/B baseline of the pre-cast teacher")
    p.add_argument("--num-workers", type=int, default=None, help="loader workers with --data (default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--in-process", action="store_true", help="run every size in this process (RSS accumulates)")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [x for s in args.sizes for x in s.split(",") if x]
    for name in sizes:
        spec(name)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    precision = args.precision or ("bf16" if gpu else "fp32")
    dev = torch.cuda.get_device_name(device) if gpu else f"CPU ({platform.processor() or platform.machine()}, " \
                                                         f"{torch.get_num_threads()} threads)"
    peak = args.peak_tflops if args.peak_tflops else (peak_tflops(dev, precision) if gpu else None)
    rows: List[dict] = []
    if len(sizes) > 1 and not args.in_process:  # one process per size: a clean peak RSS / allocator per size
        with tempfile.TemporaryDirectory() as tmp:
            for name in sizes:
                path = os.path.join(tmp, f"{name}.json")
                subprocess.run(_child_argv(args, name, path), check=True, stdout=subprocess.DEVNULL)
                with open(path) as f:
                    rows += json.load(f)
    else:
        for name in sizes:
            s = spec(name)
            batch = args.batch_size or default_batch(s, gpu)
            steps = args.steps or (10 if gpu else 3)
            warmup = args.warmup if args.warmup is not None else (3 if gpu else 1)
            rows += bench(name, batch, steps, warmup, precision, device, args.compile, args.engine, args.flops,
                          args.data, args.num_workers if args.num_workers is not None else 2, peak,
                          args.grad_ckpt, args.tokenizer, args.normalize_on_device, args.precast_momentum)
            print(f"done {name}", file=sys.stderr, flush=True)
    peak_txt = f", MFU against {peak:g} TFLOP/s" if peak else ""
    print_table(rows, f"ALBEF pre-training step on {dev}, torch {torch.__version__}, compile={args.compile}"
                      f"{peak_txt}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return rows


if __name__ == "__main__":
    main()
