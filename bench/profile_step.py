"""Where one pre-training step spends its time: ``torch.profiler`` over a few steps of the bare step of
``bench_pretrain`` (synthetic batch), top operators by self CPU time and by device time, host-device syncs, and
the device's busy share of the wall time (a step whose device is idle much of the time is launch- or sync-bound).

    python bench/profile_step.py --size base --batch-size 64 --precision bf16      # on a GPU
    python bench/profile_step.py --size tiny --batch-size 8                        # on the CPU
    python bench/profile_step.py --size base --batch-size 64 --precision bf16 --teacher-casts-per-call   # A/B

``--out DIR`` also writes the tables and a Chrome trace (``trace.json``, open in ui.perfetto.dev).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from engine.trainer import autocast_context  # noqa: E402
from models.albef import ALBEF  # noqa: E402
from optim import OptimizerConfig, create_optimizer  # noqa: E402
from runner_ours import albef_config  # noqa: E402
from specs import make_inputs, spec  # noqa: E402

# runtime and driver calls that launch a kernel (cuBLAS and cuDNN launch through cuLaunchKernelEx)
LAUNCH_OPS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")
SYNC_OPS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "aten::_local_scalar_dense",
            "aten::nonzero", "aten::item")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="tiny")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--precision", default=None)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--rows", type=int, default=30)
    p.add_argument("--out", default=None)
    p.add_argument("--teacher-casts-per-call", dest="precast_momentum", action="store_false",
                   help="under autocast, cast the momentum teacher's weights at every layer call (the A/B baseline of "
                        "MomentumMixin.momentum_weights)")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    precision = args.precision or ("bf16" if gpu else "fp32")
    s = spec(args.size)
    torch.manual_seed(0)
    model = ALBEF(albef_config(s)).to(device).train()
    model.precast_momentum = args.precast_momentum
    opt = create_optimizer(model, OptimizerConfig())
    batch = make_inputs(s, args.batch_size, device)

    def step():
        with autocast_context(precision, device):
            losses = model(batch["image"], batch["input_ids"], batch["attention_mask"], alpha=batch["alpha"])
        loss = sum(losses.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def sync():
        if gpu:
            torch.cuda.synchronize(device)

    for _ in range(3):
        step()
    sync()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if gpu else [])
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync()
        wall = (time.perf_counter() - t0) / args.steps
    events = prof.key_averages()
    casts = "" if args.precast_momentum else ", teacher cast per call"
    where = torch.cuda.get_device_name(device) if gpu else "cpu"
    out = [f"{args.size} batch {args.batch_size} {precision}{casts} on {where}"
           f", torch {torch.__version__}: {wall * 1e3:.1f} ms/step (profiled)"]
    if gpu:
        kernel_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
        launches = sum(e.count for e in events if e.key in LAUNCH_OPS)
        out.append(f"device busy {kernel_us / 1e3 / args.steps:.1f} ms/step = "
                   f"{100 * kernel_us / 1e6 / args.steps / wall:.0f} % of the wall time; "
                   f"{launches / args.steps:.0f} kernel launches/step")
    syncs = {e.key: e.count // args.steps for e in events if e.key in SYNC_OPS}
    out.append(f"per step: {syncs}")
    out.append(events.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if gpu:
        out.append(events.table(sort_by="self_device_time_total", row_limit=args.rows))
    text = "\n".join(out)
    print(text, flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "profile.txt"), "w") as f:
            f.write(text + "\n")
        prof.export_chrome_trace(os.path.join(args.out, "trace.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
