"""A/B step-time comparison of two implementations, in alternating fresh processes.

    python bench/ab.py --a 2cd5ad9 --b HEAD --sizes tiny small --batch-size 8 --pairs 5
    python bench/ab.py --a 2cd5ad9 --b . --sizes small-issue --batch-size 16          # . = the working tree
    python bench/ab.py --a /tmp/albef_orig --runner bench/runner_original.py --b . --sizes small-issue base-lite

``--a`` / ``--b`` are git revisions of this repository (checked out into temporary worktrees, removed afterwards) or
directories. Each side is run by a *runner*, a Python file that defines ``build(root, spec, batch) -> step``:
``bench/runner_ours.py`` for this repository's layout (the default), ``--runner FILE`` for a side that is not this
repository (no ``models/albef.py``, e.g. the original ALBEF with ``bench/runner_original.py``), or
``--runner-a`` / ``--runner-b`` explicitly. Sizes come from ``bench/specs.py``; both sides get the same fixed
synthetic batch.

Per size, ``--pairs`` pairs of processes run a, b, a, b, ...; each process builds the model, takes ``--warmup``
steps, then times ``--steps`` steps and reports their median. A pair gives the ratio b/a (below 1: b is faster); the
summary is the median ratio over the clean pairs.

A run is *starved* when other processes held the CPU during its timed steps: its CPU time / wall time falls below
``--min-cpu-share`` x threads, or (where ``/proc/<pid>/task/*/schedstat`` exists) its threads spent more than
``--max-wait`` of the wall time waiting in the run queue. A pair with a starved run is printed, marked and left out
of the median; up to ``--retries`` extra pairs replace discarded ones. To spend little time on runs that will be
discarded anyway, a run stops early once its run-queue wait passes ``--abort-wait`` (default twice ``--max-wait``),
and b is not run when a was starved. ``--quiet-wait S`` waits up to S seconds before each run for the machine's idle
CPU to cover the run's threads.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DEFAULT_RUNNER = os.path.join(HERE, "runner_ours.py")


# ------------------------------------------------------------------------------------------- pure functions
def median(xs: Sequence[float]) -> Optional[float]:
    return statistics.median(xs) if len(xs) else None


def starved_reason(run: dict, threads: int, min_cpu_share: float, max_wait: float) -> Optional[str]:
    """Why ``run`` counts as starved (None: it had the CPU). ``run`` holds ``cpu_ratio`` (process CPU time / wall
    time over the timed steps) and optionally ``wait_frac`` (run-queue wait / (wall x threads))."""
    if run.get("error"):
        return f"failed: {run['error']}"
    if run.get("skipped"):
        return f"not run: {run['skipped']}"
    reasons = []
    if run.get("aborted"):
        reasons.append(f"stopped early ({run['aborted']})")
    if run.get("cpu_ratio") is not None and run["cpu_ratio"] < min_cpu_share * threads:
        reasons.append(f"CPU/wall {run['cpu_ratio']:.2f} < {min_cpu_share:g} x {threads} threads")
    wait = run.get("wait_frac")
    if wait is not None and wait > max_wait:
        reasons.append(f"run-queue wait {wait:.0%} > {max_wait:.0%}")
    return "; ".join(reasons) or None


def pair_ratios(runs_a: List[dict], runs_b: List[dict], threads: int, min_cpu_share: float, max_wait: float
                ) -> List[dict]:
    """One row per pair: both medians, b/a, and why it is discarded (None: kept)."""
    rows = []
    for i, (a, b) in enumerate(zip(runs_a, runs_b)):
        why = [f"{side}: {r}" for side, r in (("a", starved_reason(a, threads, min_cpu_share, max_wait)),
                                             ("b", starved_reason(b, threads, min_cpu_share, max_wait))) if r]
        ratio = b["median_s"] / a["median_s"] if a.get("median_s") and b.get("median_s") else None
        rows.append({"pair": i + 1, "a_s": a.get("median_s"), "b_s": b.get("median_s"), "ratio": ratio,
                     "a_cpu": a.get("cpu_ratio"), "b_cpu": b.get("cpu_ratio"), "a_wait": a.get("wait_frac"),
                     "b_wait": b.get("wait_frac"), "discarded": "; ".join(why) or None})
    return rows


def summarize(rows: List[dict]) -> dict:
    """Median b/a over the kept pairs, with the per-side medians and the counts."""
    kept = [r for r in rows if not r["discarded"]]
    return {"pairs": len(rows), "kept": len(kept), "discarded": len(rows) - len(kept),
            "median_ratio": median([r["ratio"] for r in kept]),
            "min_ratio": min((r["ratio"] for r in kept), default=None),
            "max_ratio": max((r["ratio"] for r in kept), default=None),
            "median_a_s": median([r["a_s"] for r in kept]), "median_b_s": median([r["b_s"] for r in kept])}


def idle_cores(interval: float = 1.0) -> float:
    """Idle CPU cores over ``interval`` seconds, from /proc/stat (all cores if unreadable)."""
    def snap():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v)  # idle + iowait, total
    try:
        i0, t0 = snap()
        time.sleep(interval)
        i1, t1 = snap()
    except OSError:
        return float(os.cpu_count() or 1)
    return (os.cpu_count() or 1) * (i1 - i0) / max(t1 - t0, 1)


# ------------------------------------------------------------------------------------------------- worker
def _schedstat() -> Optional[tuple]:
    """(on-CPU s, run-queue wait s) summed over this process's threads; None where schedstat is missing."""
    run = wait = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    for t in tasks:
        try:
            with open(f"/proc/self/task/{t}/schedstat") as f:
                a = f.read().split()
        except OSError:
            continue
        run, wait = run + int(a[0]), wait + int(a[1])
    return run / 1e9, wait / 1e9


def _loadavg() -> Optional[float]:
    try:
        with open("/proc/loadavg") as f:
            return float(f.read().split()[0])
    except OSError:
        return None


def load_runner(path: str):
    spec = importlib.util.spec_from_file_location("ab_runner", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    if not hasattr(mod, "build"):
        raise SystemExit(f"{path} defines no build(root, spec, batch)")
    return mod


def time_steps(step, steps: int, warmup: int, threads: int = 1, abort_wait: float = 0.0) -> dict:
    """Warm-up, then ``steps`` timed steps: per-step wall times, their median, and CPU/wall (and run-queue wait) over
    the timed part. With ``abort_wait`` > 0 the run stops early, marked ``aborted``, as soon as its threads have
    waited in the run queue for more than that share of the wall time since the warm-up began (it is starved; the
    remaining steps would only cost time)."""
    sa = _schedstat()
    wa = time.perf_counter()

    def waited(now_s, now_w):
        return (now_s[1] - sa[1]) / ((now_w - wa) * threads) if sa and now_s else None

    def check() -> Optional[float]:
        if abort_wait <= 0 or not sa:
            return None
        frac = waited(_schedstat(), time.perf_counter())
        return frac if frac is not None and frac > abort_wait else None

    for _ in range(warmup):
        step()
        frac = check()
        if frac is not None:
            return {"aborted": "warm-up", "step_s": [], "median_s": None, "cpu_ratio": None, "wait_frac": frac}
    s0, c0, w0 = _schedstat(), time.process_time(), time.perf_counter()
    times = []
    for i in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
        frac = check() if i + 1 < steps else None
        if frac is not None:
            break
    s1, c1, w1 = _schedstat(), time.process_time(), time.perf_counter()
    wall = w1 - w0
    out = {"step_s": times, "median_s": median(times), "wall_s": wall, "cpu_s": c1 - c0,
           "cpu_ratio": (c1 - c0) / wall}
    if s0 and s1:
        out["wait_frac"] = (s1[1] - s0[1]) / (wall * threads)
    if len(times) < steps:
        out["aborted"] = f"after {len(times)} of {steps} timed steps"
    return out


def count_step_flops(step) -> float:
    """FLOPs of one more step under ``FlopCounterMode`` (matmuls, convolutions, attention: the optimizer's elementwise
    update counts nothing), with the math attention kernel so that CPU attention is seen, masking seeded."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    torch.manual_seed(0)
    with sdpa_kernel(SDPBackend.MATH), counter:
        step()
    return float(counter.get_total_flops())


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, HERE)
    from specs import make_inputs, spec

    s = spec(args.size)
    batch = make_inputs(s, args.batch_size)
    load0 = _loadavg()
    t0 = time.perf_counter()
    step = load_runner(args.runner).build(args.root, s, batch)
    built = time.perf_counter() - t0
    out = time_steps(step, args.steps, args.warmup, torch.get_num_threads(), args.abort_wait or 0.0)
    if args.flops and not out.get("aborted"):
        out["gflops_per_sample"] = count_step_flops(step) / args.batch_size / 1e9
    out.update(size=args.size, batch=args.batch_size, threads=torch.get_num_threads(), build_s=built,
               loadavg=[load0, _loadavg()], torch=torch.__version__)
    print("AB_RESULT " + json.dumps(out), flush=True)


# ------------------------------------------------------------------------------------------------- driver
class Side:
    def __init__(self, label: str, ref: str, runner: Optional[str], fallback_runner: Optional[str]):
        self.label, self.ref = label, ref
        self.worktree = None
        if os.path.isdir(ref):
            self.root = os.path.abspath(ref)
        else:
            rev = subprocess.run(["git", "-C", REPO, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}"],
                                 capture_output=True, text=True)
            if rev.returncode:
                raise SystemExit(f"--{label} {ref}: neither a directory nor a git revision of {REPO}")
            self.worktree = tempfile.mkdtemp(prefix=f"ab_{label}_{ref[:12].replace('/', '_')}_")
            os.rmdir(self.worktree)
            subprocess.run(["git", "-C", REPO, "worktree", "add", "--detach", "--quiet", self.worktree,
                            rev.stdout.strip()], check=True)
            self.root = self.worktree
        ours = os.path.exists(os.path.join(self.root, "models", "albef.py"))
        self.runner = os.path.abspath(runner or (DEFAULT_RUNNER if ours else fallback_runner or ""))
        if not os.path.isfile(self.runner):
            raise SystemExit(f"--{label} {ref} is not this repository's layout: give --runner FILE "
                             "(e.g. bench/runner_original.py)")

    def cleanup(self):
        if self.worktree:
            subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", self.worktree], check=False)
            shutil.rmtree(self.worktree, ignore_errors=True)


def run_one(side: Side, size: str, args, flops: bool = False) -> dict:
    waited = 0.0
    if args.quiet_wait > 0:
        t0 = time.time()
        while time.time() - t0 < args.quiet_wait and idle_cores() < 0.9 * args.threads:
            pass
        waited = time.time() - t0
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--root", side.root, "--runner", side.runner,
           "--size", size, "--batch-size", str(args.batch_size_of(size)), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads), "--abort-wait", str(args.abort_wait)]
    cmd += ["--flops"] if flops else []
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads),
               PYTHONWARNINGS="ignore")
    p = subprocess.run(cmd, cwd=side.root, env=env, capture_output=True, text=True, timeout=args.timeout)
    for line in p.stdout.splitlines():
        if line.startswith("AB_RESULT "):
            out = json.loads(line[len("AB_RESULT "):])
            out["quiet_wait_s"] = waited
            return out
    tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {p.returncode}: {' | '.join(tail)}", "quiet_wait_s": waited}


def fmt(x, spec=".3f"):
    return "-" if x is None else format(x, spec)


def compare_size(a: Side, b: Side, size: str, args) -> dict:
    runs_a: List[dict] = []
    runs_b: List[dict] = []
    rows: List[dict] = []
    budget = args.pairs + args.retries
    flops: Dict[str, Optional[float]] = {"a": None, "b": None}
    while len(runs_a) < budget:
        ra = run_one(a, size, args, args.flops and flops["a"] is None)
        if starved_reason(ra, args.threads, args.min_cpu_share, args.max_wait):  # the pair is lost: save b's time
            rb = {"skipped": "a was starved"}
        else:
            rb = run_one(b, size, args, args.flops and flops["b"] is None)
        for side, r in (("a", ra), ("b", rb)):
            flops[side] = flops[side] if flops[side] is not None else r.get("gflops_per_sample")
        runs_a.append(ra)
        runs_b.append(rb)
        rows = pair_ratios(runs_a, runs_b, args.threads, args.min_cpu_share, args.max_wait)
        r = rows[-1]
        print(f"  [{size}] pair {r['pair']}: a {fmt(r['a_s'])} s (cpu {fmt(r['a_cpu'], '.2f')}, wait "
              f"{fmt(r['a_wait'], '.0%')})  b {fmt(r['b_s'])} s (cpu {fmt(r['b_cpu'], '.2f')}, wait "
              f"{fmt(r['b_wait'], '.0%')})  b/a {fmt(r['ratio'])}" + (f"  DISCARDED ({r['discarded']})"
                                                                       if r["discarded"] else ""), flush=True)
        kept = sum(1 for x in rows if not x["discarded"])
        if kept >= args.pairs:
            break
    return {"size": size, "batch": args.batch_size_of(size), "rows": rows, "summary": summarize(rows),
            "gflops_per_sample": flops, "runs_a": runs_a, "runs_b": runs_b}


def print_report(results: List[dict], a: Side, b: Side, args) -> None:
    print(f"\nA = {a.ref} ({a.root}, runner {os.path.relpath(a.runner, REPO)})")
    print(f"B = {b.ref} ({b.root}, runner {os.path.relpath(b.runner, REPO)})")
    print(f"{args.threads} threads, {args.warmup} warm-up + {args.steps} timed steps per process; median step time "
          f"per process; starved: CPU/wall < {args.min_cpu_share:g} x threads or run-queue wait > {args.max_wait:.0%}")
    for res in results:
        print(f"\n### {res['size']} (batch {res['batch']})\n")
        print("| pair | A s/step | A CPU/wall | A wait | B s/step | B CPU/wall | B wait | B/A | kept |")
        print("|---|---|---|---|---|---|---|---|---|")
        for r in res["rows"]:
            print(f"| {r['pair']} | {fmt(r['a_s'])} | {fmt(r['a_cpu'], '.2f')} | {fmt(r['a_wait'], '.0%')} | "
                  f"{fmt(r['b_s'])} | {fmt(r['b_cpu'], '.2f')} | {fmt(r['b_wait'], '.0%')} | {fmt(r['ratio'])} | "
                  + ("yes" if not r["discarded"] else f"no: {r['discarded']}") + " |")
        s = res["summary"]
        print(f"\nmedian B/A {fmt(s['median_ratio'])} over {s['kept']} clean pair(s) (range {fmt(s['min_ratio'])}"
              f"-{fmt(s['max_ratio'])}); median A {fmt(s['median_a_s'])} s, B {fmt(s['median_b_s'])} s; "
              f"{s['discarded']} pair(s) discarded")
        fl = res.get("gflops_per_sample") or {}
        if any(v is not None for v in fl.values()):
            print(f"GFLOP per sample (one step's forward + backward, FlopCounterMode): A {fmt(fl.get('a'), '.3f')}, "
                  f"B {fmt(fl.get('b'), '.3f')}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", help="git revision or directory (the baseline)")
    p.add_argument("--b", help="git revision or directory (the candidate)")
    p.add_argument("--sizes", nargs="+", default=["tiny", "small"])
    p.add_argument("--batch-size", type=int, default=None, help="default: each size's CPU batch (bench/specs.py)")
    p.add_argument("--pairs", type=int, default=5)
    p.add_argument("--retries", type=int, default=None, help="extra pairs to replace discarded ones (default pairs)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per process")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--runner", default=None, help="runner for a side that is not this repository's layout")
    p.add_argument("--runner-a", default=None)
    p.add_argument("--runner-b", default=None)
    p.add_argument("--min-cpu-share", type=float, default=0.7, help="starved below this x threads of CPU/wall")
    p.add_argument("--max-wait", type=float, default=0.15, help="starved above this run-queue wait share")
    p.add_argument("--quiet-wait", type=float, default=0.0, help="seconds to wait for idle CPU before each run")
    p.add_argument("--abort-wait", type=float, default=None,
                   help="stop a run early once its run-queue wait share exceeds this (default 2 x --max-wait; 0: "
                        "never)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per process")
    p.add_argument("--flops", action="store_true",
                   help="also count each side's FLOPs per sample (one extra step in the first clean run)")
    p.add_argument("--json", default=None)
    # worker mode (one process = one side, one size)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.abort_wait is None:
        args.abort_wait = 2 * args.max_wait
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # kill the running worker, remove the worktrees
    if not (args.a and args.b):
        p.error("--a and --b are required")
    if args.retries is None:
        args.retries = args.pairs
    sys.path.insert(0, HERE)
    from specs import default_batch, spec

    args.batch_size_of = lambda size: args.batch_size or default_batch(spec(size), gpu=False)
    a = Side("a", args.a, args.runner_a, args.runner)
    try:
        b = Side("b", args.b, args.runner_b, args.runner)
    except BaseException:
        a.cleanup()
        raise
    try:
        results = []
        for size in args.sizes:
            spec(size)
            results.append(compare_size(a, b, size, args))
        print_report(results, a, b, args)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"a": {"ref": a.ref, "root": a.root, "runner": a.runner},
                           "b": {"ref": b.ref, "root": b.root, "runner": b.runner},
                           "threads": args.threads, "steps": args.steps, "warmup": args.warmup,
                           "min_cpu_share": args.min_cpu_share, "max_wait": args.max_wait,
                           "results": results}, f, indent=2)
        return results
    finally:
        a.cleanup()
        b.cleanup()


if __name__ == "__main__":
    main()
