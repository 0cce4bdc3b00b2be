"""Resume that never lies: which checkpoint a run continues from, whether the run it continues is the one asked
for, and what a new run may do with a folder that already holds another run.

* Rank 0 decides which checkpoint to resume and broadcasts its path; every rank checks it can read that file, and
  one that cannot stops every rank with a message naming its host and the path (no shared filesystem).
* The checkpoint's resolved config is compared with the current one. Any difference that changes the run's
  mathematics (model shape, data files, batch size, learning rate and schedule, queue, precision, world size, seed)
  stops the run with the list of differences, unless ``--resume_changes apply`` is given; then the new values take
  effect (see :meth:`engine.trainer.Trainer.resume`). Keys that only change bookkeeping (logging, workers,
  checkpoint cadence, evaluation files) may change freely.
* A new run refuses an output folder holding another run's checkpoints unless ``--resume`` or ``--overwrite``.
"""
from __future__ import annotations

import os
import socket
from typing import Any, Dict, Iterable, List, Optional, Tuple

from engine import checkpoint as ckpt
from utils import distributed as du

# Config keys that do not change what a run computes: free to differ on resume (dotted names; a prefix matches).
HARMLESS_KEYS = (
    "num_workers", "print_freq", "keep_checkpoints", "checkpoint_every_steps", "checkpoint_every_minutes",
    "max_bad_steps", "dist_timeout_minutes", "compile", "test_file", "val_file", "batch_size_test", "k_test",
    "rerank_score", "rerank_itc_weight", "test_every", "first_token_twice", "answer_list", "on_bad_image",
    "max_image_pixels", "persistent_workers", "prefetch_factor", "max_bad_image_fraction",
    # evaluation only (pre-training's zero-shot test, grounding's Grad-CAM evaluation)
    "test_world", "examples", "gradcam_mode", "block_num", "score_alpha", "det_file", "refcoco_data", "coco_file",
)


def _same(va: Any, vb: Any) -> bool:
    """Equal values; numbers by value (1 == 1.0) and a file as a string or a one-element list (``train_file: a.json``
    is ``train_file: [a.json]``)."""
    if isinstance(va, (int, float)) and isinstance(vb, (int, float)) and not isinstance(va, bool):
        return float(va) == float(vb)
    if isinstance(va, str) and isinstance(vb, list) and len(vb) == 1:
        return [va] == vb
    if isinstance(vb, str) and isinstance(va, list) and len(va) == 1:
        return va == [vb]
    return va == vb


class ResumeError(RuntimeError):
    """A resume that would not continue the run the user thinks it does."""


class OutputDirError(ResumeError):
    """A new run in a folder that holds another run's checkpoints."""


def flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _harmless(key: str, harmless: Iterable[str]) -> bool:
    return any(key == h or key.startswith(h + ".") for h in harmless)


def config_changes(old: Dict[str, Any], new: Dict[str, Any], harmless: Iterable[str] = HARMLESS_KEYS,
                   defaults: Optional[Dict[str, Any]] = None) -> List[Tuple[str, Any, Any]]:
    """``(dotted key, checkpoint value, current value)`` for every key that differs and matters. A key the checkpoint's
    config lacks (written before the key existed) counts as its default from ``defaults``."""
    a, b = flatten(old or {}), flatten(new or {})
    d = flatten(defaults or {})
    out = []
    for key in sorted(set(a) | set(b)):
        if _harmless(key, harmless):
            continue
        va, vb = a.get(key, d.get(key, "<absent>")), b.get(key, "<absent>")
        if not _same(va, vb):
            out.append((key, va, vb))
    return out


def format_changes(changes: List[Tuple[str, Any, Any]]) -> str:
    return "\n".join(f"  {k}: {a!r} -> {b!r}" for k, a, b in changes)


def resolve_resume_path(resume: Optional[str], output_dir: str) -> Optional[str]:
    """Rank 0 resolves ``--resume`` (``latest`` = the newest checkpoint of ``output_dir``) and broadcasts the path;
    every rank checks it can read it. Returns None when ``latest`` finds nothing."""
    path, error = None, None
    if du.is_main_process():
        try:
            path = ckpt.latest_checkpoint(output_dir) if resume == "latest" else resume
        except ResumeError as e:  # every rank raises it: the others must not wait in the broadcast for a path
            error = str(e)
    path, error = du.broadcast_object((path, error))
    if error is not None:
        raise ResumeError(error)
    if path is None:
        return None
    ok, err = True, ""
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        ok, err = False, str(e)
    reports = du.all_gather_object((ok, socket.gethostname(), du.get_rank(), err))
    bad = [r for r in reports if not r[0]]
    if bad:
        if len(reports) == 1:
            raise ResumeError(f"cannot resume from {path}: {bad[0][3]}")
        lines = "; ".join(f"rank {rank} on host {host}: {err}" for _, host, rank, err in bad)
        raise ResumeError(f"cannot resume from {path}: not readable by every rank ({lines}). Resume needs the "
                          "checkpoint on a filesystem every node sees (or copy it to the same path on each node).")
    return path


def prepare_output_dir(output_dir: str, resuming: bool, overwrite: bool) -> None:
    """A new run (no ``--resume``) refuses a folder that holds another run's checkpoints, unless ``overwrite``, which
    deletes them and the old ``log.txt`` first (rank 0; every rank waits)."""
    if resuming:
        return
    existing = du.broadcast_object(ckpt.run_checkpoints(output_dir) if du.is_main_process() else None)
    if existing and not overwrite:
        names = ", ".join(os.path.basename(p) for p in existing[:4]) + (" ..." if len(existing) > 4 else "")
        raise OutputDirError(f"{output_dir} already holds another run's checkpoints ({names}). Pass --resume to continue "
                          "that run, --overwrite to delete them and start anew, or another --output_dir.")
    if existing and du.is_main_process():
        for p in existing + [os.path.join(output_dir, n) for n in ("log.txt", "checkpoint_best.pth")]:
            if os.path.exists(p):
                os.remove(p)
        print(f"--overwrite: removed {len(existing)} checkpoint(s) and log.txt of the previous run in {output_dir}",
              flush=True)
    du.barrier()
