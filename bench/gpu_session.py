"""One prepared GPU session: the base config's training step at several batch sizes, with and without regional
compilation and gradient checkpointing, and fed by the real loader from JSON + JPEG and from shards.

    python bench/gpu_session.py --out OUT --tokenizer data/synthetic/tokenizer [--budget 420] [--workers 14]

Every row is :func:`bench_pretrain.bench` in this process (the model is rebuilt per row; compiled graphs are
reused across rows). Rows run in order of importance until ``--budget`` seconds have passed; after each row the
results so far are written to ``OUT/gpu_rows.json`` and ``OUT/gpu_table.md``, so a run cut short keeps what it
measured. A failing row (e.g. out of memory) is recorded with its error and the session goes on.

The loader rows use ``--photos`` natural photos (``bench_loader.make_photos``: 640x480 and 1024x768 JPEGs,
scikit-image's sample photos), as one JSON file and as shards pre-resized to 384 px (``tools.make_shards``).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402

import bench_pretrain  # noqa: E402


def prepare_photos(folder: str, n: int, workers: int) -> dict:
    """``n`` photos, their JSON file, and pre-resized shards; returns the paths."""
    from bench_loader import make_photos
    from tools.make_shards import make_shards

    os.makedirs(folder, exist_ok=True)
    ann = os.path.join(folder, "pretrain.json")
    with open(ann, "w") as f:
        json.dump(make_photos(folder, n), f)
    summary = make_shards([ann], os.path.join(folder, "shards", "photos-%06d.tar"), samples_per_shard=64,
                          max_side=384, workers=workers)
    return {"json": ann, "shards": summary["pattern"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--tokenizer", required=True, help="tokenizer folder for the loader rows")
    p.add_argument("--size", default="base")
    p.add_argument("--budget", type=float, default=420.0, help="seconds; no row starts after this")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2), help="loader workers")
    p.add_argument("--photos", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batches", default="64,128,256")
    p.add_argument("--work", default="/tmp/albef_gpu_session", help="where the photos and shards go")
    args = p.parse_args(argv)
    t0 = time.time()
    os.makedirs(args.out, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    precision = "bf16"
    name = torch.cuda.get_device_name(device) if gpu else "cpu"
    peak = bench_pretrain.peak_tflops(name, precision) if gpu else None
    info = {"device": name, "torch": torch.__version__, "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d"),
            "workers": args.workers}
    try:
        import timm
        import transformers
        info.update(timm=timm.__version__, transformers=transformers.__version__)
    except Exception:  # noqa: BLE001
        pass
    if gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        try:
            info["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                                                 "--format=csv,noheader"], capture_output=True, text=True,
                                                timeout=20).stdout.strip()
        except Exception:  # noqa: BLE001
            pass
    print(json.dumps(info), flush=True)
    batches = [int(b) for b in args.batches.split(",")]
    b0 = batches[0]
    data = {}
    # (label, kwargs of bench_pretrain.bench), most important first
    rows_plan = [("eager", dict(batch=b0, engine=True))]
    rows_plan += [("eager, teacher cast per call", dict(batch=b0, precast=False))]  # A/B of the pre-cast teacher
    rows_plan += [("eager", dict(batch=b)) for b in batches[1:]]
    rows_plan += [("compile", dict(batch=b0, compile_model=True)),
                  ("data json", dict(batch=b0, data="json")),
                  ("data shards-384", dict(batch=b0, data="shards")),
                  ("grad ckpt", dict(batch=b0, grad_ckpt=True)),
                  ("compile", dict(batch=batches[-1], compile_model=True)),
                  ("grad ckpt", dict(batch=batches[-1], grad_ckpt=True)),
                  ("data json compile", dict(batch=b0, data="json", compile_model=True)),
                  ("data shards-384 compile", dict(batch=b0, data="shards", compile_model=True)),
                  # normalize_on_device (the shipped configs' setting): uint8 batches, normalised on the GPU
                  ("data json uint8", dict(batch=b0, data="json", uint8=True)),
                  ("data shards-384 uint8 compile", dict(batch=b0, data="shards", compile_model=True, uint8=True)),
                  ("data shards-384 uint8 compile, 4 workers", dict(batch=b0, data="shards", compile_model=True,
                                                                   uint8=True, workers=4))]
    results = []

    def save():
        with open(os.path.join(args.out, "gpu_rows.json"), "w") as f:
            json.dump({"info": info, "rows": results}, f, indent=2)
        lines = [f"{info['device']}, torch {info['torch']}, {info['date']}, {args.size}, {precision}, "
                 f"{args.workers} loader workers", "",
                 "| row | batch | s/step | samples/s | GFLOP/sample | TFLOP/s | MFU | peak memory | data wait | "
                 "first step (s) |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in results:
            if "error" in r:
                lines.append(f"| {r['label']} | {r['batch']} | error: {r['error']} | | | | | | | |")
                continue
            mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") else "-"
            wait = f"{r['data_wait_pct']:.1f} %" if "data_wait_pct" in r else "-"
            label = r["label"] + (" (engine)" if r["mode"] == "engine" else "")
            over = f" ({r['engine_overhead_pct']:+.1f} %)" if "engine_overhead_pct" in r else ""
            lines.append(f"| {label} | {r['batch']} | {r['s_per_step']:.4f}{over} | {r['samples_per_s']:.0f} | "
                         f"{r.get('gflops_per_sample', 0):.1f} | {r.get('tflops_per_s', 0):.1f} | {mfu} | "
                         f"{r['peak_mem']} | {wait} | {r['first_step_s']:.1f} |")
        with open(os.path.join(args.out, "gpu_table.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        print("\n".join(lines), flush=True)

    for label, kw in rows_plan:
        if time.time() - t0 > args.budget:
            print(f"budget spent: skipping {label} b{kw['batch']}", flush=True)
            results.append({"label": label, "batch": kw["batch"], "error": "skipped (budget)"})
            continue
        t_row = time.time()
        try:
            source = None
            if "data" in kw:
                if not data:
                    t = time.time()
                    data.update(prepare_photos(args.work, args.photos, args.workers))
                    info["photos_prep_s"] = round(time.time() - t, 1)
                source = [kw["data"], data[kw["data"]]]
            steps = args.steps if source is None else max(args.steps, 40)
            rows = bench_pretrain.bench(args.size, kw["batch"], steps, 3 if source is None else 8, precision, device,
                                        kw.get("compile_model", False), kw.get("engine", False), True, source,
                                        kw.get("workers", args.workers), peak, kw.get("grad_ckpt", False),
                                        args.tokenizer, kw.get("uint8", False), kw.get("precast", True))
            for r in rows:
                r.update(label=label, row_s=round(time.time() - t_row, 1))
                r.pop("step_times_s", None)
            results.extend(rows)
        except (Exception, SystemExit) as e:  # noqa: BLE001
            traceback.print_exc()
            results.append({"label": label, "batch": kw["batch"], "error": f"{type(e).__name__}: {str(e)[:200]}"})
        gc.collect()
        if gpu:
            torch.cuda.empty_cache()
        save()
    print(f"session {time.time() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
