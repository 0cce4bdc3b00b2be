r"""The paper's Table 1 (the objectives ablation) in miniature: pre-train one model per objective row and seed, then
tabulate the zero-shot retrieval of every row as mean and standard deviation over the seeds.

    python -m tools.ablation --config configs/Pretrain_tiny_ablation.yaml --seeds 0 1 2 --out output/ablation \
        [--rows all|MLM+ITM,full] [--epochs N] [--device cpu] [--jobs N] [--options key=value ...] \
        [--dry-run] [--report]

The rows are :data:`models.albef.OBJECTIVE_ROWS` (ITM without "hard": random in-batch negatives; MoD: momentum
distillation of that loss)::

    MLM+ITM               itc=false itm_hard_negatives=false itc_distill=false mlm_distill=false
    ITC+MLM+ITM           itc=true  itm_hard_negatives=false itc_distill=false mlm_distill=false
    ITC+MLM+ITM_hard      itc=true  itm_hard_negatives=true  itc_distill=false mlm_distill=false
    ITC_MoD+MLM+ITM_hard  itc=true  itm_hard_negatives=true  itc_distill=true  mlm_distill=false
    full                  itc=true  itm_hard_negatives=true  itc_distill=true  mlm_distill=true  (the default model)

Each run is a subprocess ``Pretrain.py --config C --output_dir OUT/<row>/seed<k> --device D --seed k --overwrite
--options <switches> [scheduler.epochs=N] [--options of this command]``, its output in ``OUT/<row>/seed<k>/run.log``.
A run whose folder already holds ``eval_test.json`` (written by Pretrain.py after its last epoch) and a
``config.yaml`` with the row's switches (and ``--epochs``) is skipped, so an interrupted ablation continues where it
stopped. All runs in ``OUT`` share one setting (the config's YAML content, ``--options``, ``--epochs``), stamped in
``OUT/ablation_setting.json`` by the first run; another setting is refused (a fresh ``--out`` is needed). The
metrics are Pretrain.py's zero-shot ITC retrieval on ``test_file`` (the paper reports fine-tuned retrieval, VQA and
NLVR2 instead). Writes
``OUT/ablation.json`` (every run's metrics, each row's mean and std), ``OUT/ablation.md`` (a table) and
``OUT/ablation.png`` (bars with the std as error bars).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional, Sequence

import yaml

from models.albef import OBJECTIVE_ROWS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS_FILE = "eval_test.json"  # Pretrain.py's final zero-shot metrics
MAIN_METRICS = ("img_r1", "txt_r1", "r_mean")  # always tabulated (and plotted)
EXTRA_METRICS = ("consistent_at_1",)  # tabulated when the metrics files have them, as every "*ceiling*" key
SWITCHES = ("itc", "itm_hard_negatives", "itc_distill", "mlm_distill")


def select_rows(spec: str) -> List[str]:
    """``all`` or comma-separated row names -> the rows in Table 1 order."""
    if spec.strip() == "all":
        return list(OBJECTIVE_ROWS)
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in OBJECTIVE_ROWS]
    if unknown or not names:
        raise ValueError(f"--rows: unknown row(s) {unknown or spec!r}; the rows are {', '.join(OBJECTIVE_ROWS)} "
                         "(or all)")
    return [n for n in OBJECTIVE_ROWS if n in names]


def run_dir(out: str, row: str, seed: int) -> str:
    return os.path.join(out, row, f"seed{seed}")


def run_options(row: str, epochs: Optional[int] = None, extra: Sequence[str] = ()) -> List[str]:
    """The ``--options`` of one run: every switch of the row (explicitly), the epochs, then ``extra``."""
    opts = [f"{k}={str(v).lower()}" for k, v in OBJECTIVE_ROWS[row].items()]
    if epochs is not None:
        opts.append(f"scheduler.epochs={epochs}")
    return opts + list(extra)


def build_command(config: str, out: str, row: str, seed: int, device: str = "cpu", epochs: Optional[int] = None,
                  extra: Sequence[str] = (), python: str = sys.executable) -> List[str]:
    """The Pretrain.py command line of one run (run from the current folder, as the config's paths are)."""
    script = os.path.relpath(os.path.join(ROOT, "Pretrain.py"))
    return [python, script, "--config", config, "--output_dir", run_dir(out, row, seed), "--device", device,
            "--seed", str(seed), "--overwrite", "--options", *run_options(row, epochs, extra)]


def read_metrics(path: str) -> Optional[Dict[str, float]]:
    """The final metrics of the run in folder ``path`` (None if it has not finished)."""
    try:
        with open(os.path.join(path, METRICS_FILE)) as f:
            return {k: float(v) for k, v in json.load(f).items() if isinstance(v, (int, float))}
    except (OSError, ValueError):
        return None


def is_done(path: str, row: str, epochs: Optional[int] = None) -> bool:
    """The run in ``path`` has its final metrics and was trained with ``row``'s switches (and ``epochs``)."""
    if read_metrics(path) is None:
        return False
    try:
        with open(os.path.join(path, "config.yaml")) as f:
            cfg = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError):
        return False
    if any(cfg.get(k, True) != v for k, v in OBJECTIVE_ROWS[row].items()):
        return False
    return epochs is None or (cfg.get("scheduler") or {}).get("epochs") == epochs


def metric_columns(runs: Dict[str, Dict[int, Dict[str, float]]]) -> List[str]:
    """:data:`MAIN_METRICS`, then the extra metrics any run reports (``consistent_at_1``, and the R@1 ceilings
    such as ``ceiling_img_r1``; the other ceilings stay in ablation.json only)."""
    present = {k for per_seed in runs.values() for m in per_seed.values() for k in m}
    extra = [k for k in EXTRA_METRICS if k in present]
    extra += sorted(k for k in present if "ceiling" in k and ("_r1_" in k or k.endswith("_r1")) and k not in extra)
    return list(MAIN_METRICS) + extra


def _mean_std(values: List[float]):
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def aggregate(runs: Dict[str, Dict[int, Dict[str, float]]]) -> Dict[str, Dict]:
    """Per row: its switches, the seeds' metrics, and mean / std (sample std, ddof 1; 0 for one seed) of every
    metric column over the seeds that report it. Rows keep Table 1 order; rows without a finished run are left out."""
    columns = metric_columns(runs)
    summary: Dict[str, Dict] = {}
    for row in [r for r in OBJECTIVE_ROWS if r in runs] + [r for r in runs if r not in OBJECTIVE_ROWS]:
        per_seed = runs[row]
        if not per_seed:
            continue
        mean, std = {}, {}
        for k in columns:
            values = [m[k] for m in per_seed.values() if k in m]
            if values:
                mean[k], std[k] = _mean_std(values)
        summary[row] = {"switches": dict(OBJECTIVE_ROWS.get(row, {})), "seeds": sorted(per_seed),
                        "runs": {str(s): per_seed[s] for s in sorted(per_seed)}, "mean": mean, "std": std}
    return summary


def markdown_table(summary: Dict[str, Dict], title: str = "") -> str:
    """One line per row: switches, seeds, ``mean ± std`` of every metric column (``-`` where absent)."""
    runs = {row: {int(s): m for s, m in r["runs"].items()} for row, r in summary.items()}
    columns = metric_columns(runs)
    yes = {True: "✓", False: "-"}
    lines = [f"# {title}", ""] if title else []
    lines += ["| row | ITC | ITM hard | ITC MoD | MLM MoD | seeds | " + " | ".join(columns) + " |",
              "|---|:-:|:-:|:-:|:-:|--:|" + "--:|" * len(columns)]
    for row, r in summary.items():
        sw = r["switches"]
        cells = [f"{r['mean'][k]:.2f} ± {r['std'][k]:.2f}" if k in r["mean"] else "-" for k in columns]
        lines.append(f"| {row} | " + " | ".join(yes[bool(sw.get(k, True))] for k in SWITCHES)
                     + f" | {len(r['seeds'])} | " + " | ".join(cells) + " |")
    lines += ["", "Recall in percent, mean ± sample std over the seeds. ITM without *hard*: random in-batch negatives;"
              " MoD: momentum distillation. The metrics are zero-shot ITC retrieval, so the MLM+ITM row (no ITC loss) "
              "ranks by untrained projections: expect chance there. The paper's Table 1 reports fine-tuned "
              "retrieval, VQA and NLVR2 instead."]
    return "\n".join(lines) + "\n"


def plot(summary: Dict[str, Dict], path: str, metrics: Sequence[str] = MAIN_METRICS) -> None:
    """Grouped bars: one group per row, one bar per metric, the std over seeds as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(summary)
    width = 0.8 / max(len(metrics), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(rows) + 2), 4.5))
    for j, k in enumerate(metrics):
        xs = [i + (j - (len(metrics) - 1) / 2) * width for i in range(len(rows))]
        means = [summary[r]["mean"].get(k, float("nan")) for r in rows]
        stds = [summary[r]["std"].get(k, 0.0) for r in rows]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=k)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(rows, rotation=15, ha="right")
    ax.set_ylabel("recall (%)")
    ax.set_title("objectives ablation: zero-shot ITC retrieval (mean ± std over seeds)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(summary: Dict[str, Dict], out: str, info: Dict) -> List[str]:
    """``ablation.json``, ``ablation.md`` and ``ablation.png`` in ``out``; returns their paths."""
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, f"ablation.{ext}") for ext in ("json", "md", "png")]
    with open(paths[0], "w") as f:
        json.dump({**info, "rows": summary}, f, indent=2)
    with open(paths[1], "w") as f:
        f.write(markdown_table(summary, f"Objectives ablation ({info.get('config', '')})"))
    plot(summary, paths[2])
    return paths


STAMP_FILE = "ablation_setting.json"


def check_setting(out: str, config: str, options: Sequence[str], epochs: Optional[int]) -> None:
    """Every run in ``out`` must come from one setting: the config's YAML content (comments aside), ``--options``
    and ``--epochs``. The first call writes it to ``out/ablation_setting.json``; a later call with another setting
    raises ``SystemExit`` naming what differs (finished runs of the old setting would otherwise be mixed in)."""
    with open(config) as f:
        setting = {"config": yaml.safe_load(f), "options": sorted(options), "epochs": epochs}
    path = os.path.join(out, STAMP_FILE)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old != json.loads(json.dumps(setting)):
            keys = sorted(k for k in set(old["config"]) | set(setting["config"])
                          if old["config"].get(k) != setting["config"].get(k))
            what = ([f"config keys {', '.join(keys)}"] if keys else []) + [
                name for name in ("options", "epochs") if old[name] != json.loads(json.dumps(setting[name]))]
            raise SystemExit(f"{out} holds runs of another setting ({'; '.join(what)} differ from {path}): give a "
                             f"fresh --out, or delete {out} to start over")
        return
    os.makedirs(out, exist_ok=True)
    with open(path, "w") as f:
        json.dump(setting, f, indent=2)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/Pretrain_tiny_ablation.yaml",
                   help="the Pretrain.py config every run uses")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--out", default="output/ablation")
    p.add_argument("--rows", default="all", help=f"all, or comma-separated names of: {', '.join(OBJECTIVE_ROWS)}")
    p.add_argument("--epochs", type=int, default=None, help="epochs per run (default: the config's)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--jobs", type=int, default=1, help="runs at a time (e.g. several on one GPU)")
    p.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE",
                   help="more Pretrain.py config overrides, the same for every run")
    p.add_argument("--dry-run", action="store_true", help="print the commands of the runs still to do and stop")
    p.add_argument("--report", action="store_true", help="only write the report of the runs already finished")
    args = p.parse_args(argv)
    try:
        args.rows = select_rows(args.rows)
    except ValueError as e:
        p.error(str(e))
    if args.epochs is not None and args.epochs < 1:
        p.error("--epochs must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    runs: Dict[str, Dict[int, Dict[str, float]]] = {row: {} for row in args.rows}
    failed = []
    pending = []
    for row in args.rows:
        for seed in args.seeds:
            path = run_dir(args.out, row, seed)
            cmd = build_command(args.config, args.out, row, seed, args.device, args.epochs, args.options)
            if is_done(path, row, args.epochs):
                print(f"[{row} seed {seed}] done already ({os.path.join(path, METRICS_FILE)})")
                runs[row][seed] = read_metrics(path)
            elif args.dry_run:
                print(" ".join(cmd))
            else:
                pending.append((row, seed, path, cmd))
    # --jobs runs at a time, each with its share of the CPU threads
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 1) // args.jobs)))

    def run(job):
        row, seed, path, cmd = job
        os.makedirs(path, exist_ok=True)
        stale = os.path.join(path, METRICS_FILE)
        if os.path.exists(stale):  # another setting's result: never read it as this run's
            os.remove(stale)
        print(f"[{row} seed {seed}] training ... (log: {os.path.join(path, 'run.log')})", flush=True)
        t0 = time.time()
        with open(os.path.join(path, "run.log"), "w") as log:
            rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env=env if args.jobs > 1 else None)
        if rc != 0 or read_metrics(path) is None:
            print(f"[{row} seed {seed}] FAILED (exit code {rc}); see {os.path.join(path, 'run.log')}", flush=True)
            failed.append(f"{row}/seed{seed}")
            return
        print(f"[{row} seed {seed}] finished in {time.time() - t0:.0f} s", flush=True)
        runs[row][seed] = read_metrics(path)

    if args.report and pending:
        print(f"--report: {len(pending)} run(s) not finished, left out: "
              + ", ".join(f"{row}/seed{seed}" for row, seed, _, _ in pending))
        pending = []
    if pending and not args.dry_run:
        from concurrent.futures import ThreadPoolExecutor

        check_setting(args.out, args.config, args.options, args.epochs)
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(run, pending))
    if args.dry_run:
        return 0
    summary = aggregate(runs)
    if summary:
        info = {"config": args.config, "seeds": args.seeds, "epochs": args.epochs, "options": args.options,
                "failed": failed}
        paths = write_report(summary, args.out, info)
        print(markdown_table(summary))
        print("written: " + ", ".join(paths))
    if failed:
        print(f"{len(failed)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
