"""Learning-rate schedule: linear warm-up then cosine decay, updated every optimizer step (timm's scheduler).

The config keeps the original ``schedular`` keys. Differences from the original, on purpose:

* The original warms up in a staircase, stepping the scheduler every 100 iterations, so ``warmup_epochs: 20``
  meant 2,000 iterations. Here the warm-up is linear per step over ``warmup_steps`` (default
  ``warmup_epochs * 100``, the same length as the original).
* The original then holds one learning rate per epoch (cosine over epochs). Here the cosine runs per step
  from the end of warm-up to the last step, reaching ``min_lr`` at the end. With the original's settings
  the two curves agree at every epoch start to within one epoch's share of the cosine.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Optional

import torch
from timm.scheduler import CosineLRScheduler

from utils import distributed as du


@dataclass
class SchedulerConfig:
    sched: str = "cosine"
    lr: Optional[float] = None  # ignored, as in the original (the peak is optimizer.lr)
    epochs: int = 30
    min_lr: float = 1e-5
    decay_rate: float = 1.0  # timm cycle decay; irrelevant for one cycle
    warmup_lr: float = 1e-5
    warmup_epochs: float = 20  # the original's unit: 100 iterations (see module docstring)
    warmup_steps: Optional[int] = None  # warm-up length in optimizer steps; overrides warmup_epochs
    cooldown_epochs: float = 0  # accepted for compatibility; unused, as in the original

    def __post_init__(self):
        if self.sched != "cosine":
            raise ValueError(f"schedular.sched {self.sched!r} is not supported (only 'cosine')")
        if self.epochs < 1:
            raise ValueError(f"schedular.epochs must be >= 1, got {self.epochs}")
        # 0 is allowed: a warm-up from 0 and a cosine down to 0 are common
        for key in ("warmup_lr", "min_lr"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"schedular.{key} must be a finite number >= 0, got {value}")
        if not (math.isfinite(self.warmup_epochs) and self.warmup_epochs >= 0):
            raise ValueError(f"schedular.warmup_epochs must be a finite number >= 0, got {self.warmup_epochs}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"schedular.warmup_steps must be >= 0 (or null), got {self.warmup_steps}")
        if not (math.isfinite(self.decay_rate) and self.decay_rate > 0):
            raise ValueError(f"schedular.decay_rate must be a finite number > 0, got {self.decay_rate}")

    def num_warmup_steps(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else int(round(self.warmup_epochs * 100))


def create_scheduler(cfg: SchedulerConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
                     ) -> CosineLRScheduler:
    """Per-step scheduler; call ``step_update(global_step)`` after every optimizer step."""
    total = cfg.epochs * steps_per_epoch
    warmup = min(cfg.num_warmup_steps(), max(total - 1, 0))
    if warmup < cfg.num_warmup_steps() and du.is_main_process():
        print(f"note: the warm-up ({cfg.num_warmup_steps()} steps) is longer than the run ({total} steps): the "
              f"learning rate rises from warmup_lr to optimizer.lr over the whole run, with no cosine decay (set "
              f"schedular.warmup_epochs or warmup_steps for a short run)", flush=True)
    cosine_log = logging.getLogger(CosineLRScheduler.__module__)
    level = cosine_log.level
    cosine_log.setLevel(logging.ERROR)  # its "no effect" warning for a 1-step cosine: said above in our words
    try:
        return CosineLRScheduler(
            optimizer, t_initial=max(total - warmup, 1), lr_min=cfg.min_lr, cycle_decay=cfg.decay_rate,
            warmup_lr_init=cfg.warmup_lr, warmup_t=warmup, warmup_prefix=True, cycle_limit=1, t_in_epochs=False,
        )
    finally:
        cosine_log.setLevel(level)
