"""Training-state checkpoints: one layout, written atomically, found again for ``--resume``.

A checkpoint is a dict with the keys below. ``model`` is the plain state dict of the unwrapped model in the
original ALBEF layout, so a pre-training checkpoint written here is also a valid ``{'model': ...}`` file for
code that reads the released checkpoints.

Two kinds share the layout: ``checkpoint_XX.pth`` at the end of epoch XX (``epoch`` = XX, no position inside the
epoch), and ``checkpoint_last.pth`` written inside an epoch (every ``checkpoint_every_steps`` / ``_minutes``, and on
SIGTERM / SIGUSR1), whose ``position`` says how many batches of ``epoch`` are done. ``--resume`` takes whichever
holds the highest global ``step``.
"""
from __future__ import annotations

import glob
import os
import random
import re
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

FORMAT_VERSION = 2
MODEL, OPTIMIZER, SCHEDULER, SCALER = "model", "optimizer", "lr_scheduler", "scaler"
CONFIG, EPOCH, STEP, RNG, VERSION = "config", "epoch", "step", "rng_state", "version"
# new in version 2
POSITION = "position"  # checkpoint_last.pth: {"step_in_epoch", "steps_per_epoch", "batch_size", "world_size", sums}
GUARD = "guard"  # divergence-guard counters {"bad_steps", "consecutive_bad"}
CHECKSUMS = "param_checksums"  # one float64 [n_params, 2] tensor (sum, sum of squares) per rank
RUN = "run"  # {"seed", "world_size"}: what the run was launched with besides the config
SEQ = "save_seq"  # 1, 2, ... in the order checkpoints are written into an output_dir (over resumes and rollbacks)
LAST_NAME = "checkpoint_last.pth"
# what a training checkpoint of this framework holds at least (Trainer.resume reads them all)
TRAINING_KEYS = (MODEL, OPTIMIZER, SCHEDULER, SCALER, EPOCH, STEP, RNG)


def rng_state() -> Dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states as tensors and plain types (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():  # this process's device only: a rank may see 8 GPUs (torchrun) or 1 (srun)
        state["cuda_device"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if not torch.cuda.is_available():
        return
    if "cuda_device" in state:
        torch.cuda.set_rng_state(state["cuda_device"])
    elif "cuda" in state:  # checkpoints before: every visible GPU's, of which this rank's is the current device's
        states, current = state["cuda"], torch.cuda.current_device()
        if current < len(states):
            torch.cuda.set_rng_state(states[current])


class CheckpointWriteError(OSError):
    """A checkpoint could not be written (disk full, read-only or vanished folder, quota): the message names the file
    and the operating system's reason; the checkpoints written before are intact."""


def _os_reason(e: BaseException) -> str:
    """The operating system's reason behind ``e`` (torch.save wraps ENOSPC in a RuntimeError about zip offsets)."""
    seen = e
    while seen is not None:
        if isinstance(seen, OSError):
            return str(seen)
        seen = seen.__cause__ or seen.__context__
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"


def atomic_save(obj: Any, path: str) -> None:
    """Write to ``path + '.tmp'``, flush to disk, then rename: a crash never leaves a half-written file. A failed
    write (disk full, read-only folder) removes the temporary file and raises :class:`CheckpointWriteError`."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise CheckpointWriteError(f"writing {path} failed: {_os_reason(e)}. The checkpoints written before are "
                                   "intact: free space (or fix the folder) and continue with --resume") from e


def checkpoint_path(output_dir: str, epoch: int) -> str:
    return os.path.join(output_dir, f"checkpoint_{epoch:02d}.pth")


def last_path(output_dir: str) -> str:
    return os.path.join(output_dir, LAST_NAME)


def epoch_checkpoints(output_dir: str) -> List[str]:
    """``checkpoint_XX.pth`` files of ``output_dir``, by epoch."""
    found = []
    for p in glob.glob(os.path.join(output_dir, "checkpoint_*.pth")):
        m = re.fullmatch(r"checkpoint_(\d+)\.pth", os.path.basename(p))
        if m:
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def run_checkpoints(output_dir: str) -> List[str]:
    """Every training checkpoint of a run in ``output_dir`` (epoch ones and ``checkpoint_last.pth``)."""
    paths = epoch_checkpoints(output_dir)
    return paths + ([last_path(output_dir)] if os.path.isfile(last_path(output_dir)) else [])


def _order_of(path: str) -> Optional[Tuple[int, int]]:
    """``(save sequence number, global step)`` of a checkpoint (-1 for a sequence number it predates), None when it is
    unreadable: read with ``mmap``, so the tensors are not."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        return int(state.get(SEQ, -1)), int(state.get(STEP, -1))
    except Exception:  # an unreadable file is never the one to resume from
        return None


def _step_of(path: str) -> int:
    order = _order_of(path)
    return -1 if order is None else order[1]


def last_save_seq(output_dir: str) -> int:
    """The highest save sequence number of the checkpoints in ``output_dir`` (0 when none has one): a run's next save
    gets a higher one, so that the newest written checkpoint is known even after a rollback."""
    orders = [_order_of(p) for p in run_checkpoints(output_dir)] if os.path.isdir(output_dir) else []
    return max([0] + [o[0] for o in orders if o is not None])


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """The checkpoint to resume from: the readable ``checkpoint_XX.pth`` or ``checkpoint_last.pth`` written last (the
    highest save sequence number; for files that predate it, the highest global step, the latest epoch one on a
    tie). Not the highest step: after a rollback (``--resume checkpoint_00.pth``) or a change of world size the files
    of the abandoned branch may count more steps. None when there is no checkpoint; an unreadable file (damaged outside
    :func:`atomic_save`'s protection) is passed over with a warning, and when every file is unreadable
    :class:`engine.resume.ResumeError` is raised (never a silent start from scratch over days of training)."""
    from engine.resume import ResumeError

    candidates = run_checkpoints(output_dir)
    best, best_key = None, None
    for i, path in enumerate(candidates):  # epoch ones by epoch, then checkpoint_last.pth
        order = _order_of(path)
        if order is None:
            print(f"warning: {path} is not a readable checkpoint (truncated or corrupt); passed over", flush=True)
            continue
        key = (order[0], order[1], path != last_path(output_dir), i)
        if best_key is None or key > best_key:
            best, best_key = path, key
    if candidates and best is None:
        raise ResumeError(f"no readable checkpoint in {output_dir}: {', '.join(os.path.basename(p) for p in candidates)} "
                          "are all truncated or corrupt. Resume from a copy with --resume PATH, or start anew with "
                          "--overwrite.")
    return best


@torch.no_grad()
def param_checksums(model: torch.nn.Module) -> torch.Tensor:
    """Per trainable parameter: (sum, sum of squares) in float64, on the parameters' device. Equal on every rank iff
    (for all practical purposes) the ranks hold equal weights; non-finite iff a weight is."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        return torch.zeros(0, 2, dtype=torch.float64)
    return torch.stack([torch.stack([p.double().sum(), p.double().square().sum()]) for p in params])


def load_training_state(path: str) -> Dict[str, Any]:
    """Load a training checkpoint written by this framework (tensors and plain types only: ``weights_only``)."""
    from engine.resume import ResumeError

    if not os.path.isfile(path):
        raise ResumeError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ResumeError(f"{path} is not a readable checkpoint (truncated, corrupt or another format: "
                          f"{str(e).splitlines()[0][:160]}). Resume from another one with --resume PATH, or delete "
                          "it to let --resume pick the newest readable one.") from e
    if not isinstance(state, dict) or MODEL not in state:
        raise ResumeError(f"{path} is not a training checkpoint of this framework (no {MODEL!r} key); use "
                          "--checkpoint to initialise weights from it instead of --resume")
    missing = [k for k in TRAINING_KEYS if k not in state]
    if missing:  # the original ALBEF's checkpoints (model, optimizer, lr_scheduler, config, epoch), checkpoint_best.pth
        raise ResumeError(f"{path} cannot be resumed exactly: it lacks {', '.join(missing)} (a checkpoint of the "
                          "original ALBEF code, or a weights-only file such as checkpoint_best.pth). Start a run from "
                          f"its weights instead: --checkpoint {path} without --resume (optimizer, schedule and data "
                          "order then start afresh).")
    return state
