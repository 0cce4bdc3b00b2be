"""Training-state checkpoints: one layout, written atomically, found again for ``--resume``.

A checkpoint is a dict with the keys below. ``model`` is the plain state dict of the unwrapped model in the
original ALBEF layout, so a pre-training checkpoint written here is also a valid ``{'model': ...}`` file for
code that reads the released checkpoints.
"""
from __future__ import annotations

import glob
import os
import random
import re
from typing import Any, Dict, Optional

import numpy as np
import torch

FORMAT_VERSION = 1
MODEL, OPTIMIZER, SCHEDULER, SCALER = "model", "optimizer", "lr_scheduler", "scaler"
CONFIG, EPOCH, STEP, RNG, VERSION = "config", "epoch", "step", "rng_state", "version"


def rng_state() -> Dict[str, Any]:
    """Python, numpy, torch (and CUDA) RNG states as tensors and plain types (loadable with weights_only)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "gauss": float(gauss)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_save(obj: Any, path: str) -> None:
    """Write to ``path + '.tmp'``, flush to disk, then rename: a crash never leaves a half-written file."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def checkpoint_path(output_dir: str, epoch: int) -> str:
    return os.path.join(output_dir, f"checkpoint_{epoch:02d}.pth")


def latest_checkpoint(output_dir: str) -> Optional[str]:
    """The checkpoint of the highest epoch in ``output_dir`` (``checkpoint_XX.pth``), or None."""
    found = []
    for p in glob.glob(os.path.join(output_dir, "checkpoint_*.pth")):
        m = re.fullmatch(r"checkpoint_(\d+)\.pth", os.path.basename(p))
        if m:
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


def load_training_state(path: str) -> Dict[str, Any]:
    """Load a training checkpoint written by this framework (tensors and plain types only: ``weights_only``)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in (MODEL, EPOCH):
        if key not in state:
            raise ValueError(f"{path} is not a training checkpoint of this framework (no {key!r} key); use "
                             "--checkpoint to initialise weights from it instead of --resume")
    return state
