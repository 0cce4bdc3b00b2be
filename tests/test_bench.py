"""The benchmark tools: FLOP counting, the A/B bookkeeping (ratios, medians, starved runs), and a bench_pretrain run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

import ab  # noqa: E402
import specs  # noqa: E402


def run(median_s, cpu_ratio, wait_frac=None, error=None):
    r = {"median_s": median_s, "cpu_ratio": cpu_ratio}
    if wait_frac is not None:
        r["wait_frac"] = wait_frac
    if error:
        r["error"] = error
    return r


def test_flop_count_positive_and_scales_with_batch():
    import bench_pretrain
    from models.albef import ALBEF
    from runner_ours import albef_config

    s = specs.spec("tiny")
    torch.manual_seed(0)
    model = ALBEF(albef_config(s))
    model.train()
    flops = {b: bench_pretrain.count_flops(model, specs.make_inputs(s, b), "fp32", torch.device("cpu"))
             for b in (2, 4)}
    assert flops[2]["total"] > 0
    # per-sample work dominates: doubling the batch about doubles the step's FLOPs (ITC adds B x (B + queue))
    assert 1.9 < flops[4]["total"] / flops[2]["total"] < 2.1
    # the momentum teacher is counted: forward only, i.e. well under half of the step
    teacher = flops[4]["visual_encoder_m"] + flops[4]["text_encoder_m"]
    assert flops[4]["text_encoder_m"] > 0 and 0.05 < teacher / flops[4]["total"] < 0.4
    assert all(p.grad is None for p in model.parameters())  # counting leaves no gradients behind


def test_peak_table():
    import bench_pretrain

    assert bench_pretrain.peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989
    assert bench_pretrain.peak_tflops("NVIDIA H200", "fp32") == 67
    assert bench_pretrain.peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5
    assert bench_pretrain.peak_tflops("Tesla V100-SXM2-16GB", "fp16") == 125
    assert bench_pretrain.peak_tflops("Tesla V100-SXM2-16GB", "bf16") is None
    assert bench_pretrain.peak_tflops("NVIDIA H100 PCIe", "bf16") is None
    assert bench_pretrain.peak_tflops("Some GPU", "bf16") is None


def test_starved_reason():
    assert ab.starved_reason(run(1.0, 1.9), threads=2, min_cpu_share=0.7, max_wait=0.15) is None
    assert "CPU/wall 0.60" in ab.starved_reason(run(1.0, 0.6), 2, 0.7, 0.15)
    assert "run-queue wait 40%" in ab.starved_reason(run(1.0, 1.9, wait_frac=0.4), 2, 0.7, 0.15)
    assert ab.starved_reason(run(1.0, 0.9), threads=1, min_cpu_share=0.7, max_wait=0.15) is None
    assert ab.starved_reason(run(None, None, error="exit 1"), 2, 0.7, 0.15).startswith("failed")


def test_pair_ratios_median_and_discards():
    runs_a = [run(2.0, 1.9), run(2.2, 1.9), run(2.0, 0.5), run(1.9, 1.95, wait_frac=0.01), run(2.0, 1.9)]
    runs_b = [run(1.0, 1.9), run(1.21, 1.8), run(1.0, 1.9), run(1.14, 1.9), run(1.0, 1.9, wait_frac=0.5)]
    rows = ab.pair_ratios(runs_a, runs_b, threads=2, min_cpu_share=0.7, max_wait=0.15)
    assert [r["pair"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0]["ratio"] == pytest.approx(0.5)
    assert rows[2]["discarded"].startswith("a: CPU/wall")  # a starved: pair 3 out
    assert rows[4]["discarded"].startswith("b: run-queue wait")  # b waited in the run queue: pair 5 out
    s = ab.summarize(rows)
    assert (s["pairs"], s["kept"], s["discarded"]) == (5, 3, 2)
    assert s["median_ratio"] == pytest.approx(0.55)  # median of 0.5, 0.55, 0.6
    assert (s["min_ratio"], s["max_ratio"]) == (pytest.approx(0.5), pytest.approx(0.6))
    assert s["median_a_s"] == pytest.approx(2.0) and s["median_b_s"] == pytest.approx(1.14)
    assert ab.summarize([])["median_ratio"] is None


def test_time_steps_flags_a_process_without_cpu():
    """A step that sleeps uses no CPU: the worker's CPU/wall ratio shows it, and the run counts as starved."""
    out = ab.time_steps(lambda: time.sleep(0.02), steps=3, warmup=1)
    assert len(out["step_s"]) == 3 and out["median_s"] >= 0.02
    assert out["cpu_ratio"] < 0.5
    assert ab.starved_reason(out, threads=1, min_cpu_share=0.7, max_wait=0.15)


def test_bench_pretrain_cli_writes_json(tmp_path):
    path = tmp_path / "f.json"
    subprocess.run([sys.executable, os.path.join(BENCH, "bench_pretrain.py"), "--sizes", "tiny", "--steps", "2",
                    "--warmup", "1", "--batch-size", "4", "--json", str(path)], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL, timeout=300)
    rows = json.loads(path.read_text())
    assert len(rows) == 1
    r = rows[0]
    for key in ("size", "params_M", "batch", "precision", "mode", "s_per_step", "steps_per_s", "samples_per_s",
                "peak_mem", "flops_per_step", "gflops_per_sample", "teacher_flops_per_step", "tflops_per_s", "mfu",
                "cpu_per_wall"):
        assert key in r, key
    assert (r["size"], r["batch"], r["mode"], r["precision"]) == ("tiny", 4, "bare", "fp32")
    assert r["s_per_step"] > 0 and r["gflops_per_sample"] > 0
    assert r["mfu"] is None  # no GPU, no --peak_tflops


def test_starved_run_stops_early():
    """A run whose threads wait in the run queue is stopped after the first step and counts as starved."""
    calls = []
    real = ab._schedstat

    def fake():  # 10 s of run-queue wait per call: far above any threshold
        calls.append(1)
        return 0.0, 10.0 * len(calls)

    ab._schedstat = fake
    try:
        out = ab.time_steps(lambda: None, steps=5, warmup=2, threads=2, abort_wait=0.3)
    finally:
        ab._schedstat = real
    assert out["aborted"] == "warm-up" and out["median_s"] is None
    reason = ab.starved_reason(out, 2, 0.7, 0.15)
    assert reason.startswith("stopped early (warm-up)")
    rows = ab.pair_ratios([out], [{"skipped": "a was starved"}], 2, 0.7, 0.15)
    assert rows[0]["ratio"] is None and "b: not run" in rows[0]["discarded"]
    assert ab.summarize(rows)["kept"] == 0
