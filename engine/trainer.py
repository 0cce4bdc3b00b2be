"""The one training loop every task script shares.

A task script builds its model, data and a ``train_step(model, batch, ctx) -> {name: loss}`` function; the
:class:`Trainer` owns everything else: device placement, DDP, mixed precision, gradient clipping, the per-step
learning-rate schedule, logging (stdout, ``log.txt`` JSON lines, tensorboard), throughput and memory,
checkpoints written atomically every epoch, and exact resumption.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from engine import checkpoint as ckpt
from utils import distributed as du


@dataclass
class TrainOptions:
    """Engine settings shared by every task config (new keys; the original had none of these)."""

    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 adds a GradScaler)
    grad_clip: Optional[float] = None  # max global gradient norm; None = no clipping (the original)
    num_workers: int = 4
    print_freq: int = 50  # iterations between progress lines
    compile: bool = False  # torch.compile the model before wrapping it in DDP
    keep_checkpoints: Optional[int] = None  # keep only the newest N checkpoint_XX.pth; None = keep all

    def __post_init__(self):
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"grad_clip must be positive or null, got {self.grad_clip}")
        if self.print_freq < 1 or self.num_workers < 0:
            raise ValueError("print_freq must be >= 1 and num_workers >= 0")


@dataclass
class StepContext:
    epoch: int
    step_in_epoch: int
    steps_per_epoch: int
    global_step: int


def autocast_context(precision: str, device: torch.device):
    """Autocast for bf16/fp16, a no-op context for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def move_to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


class JsonLog:
    """Rank-0 log: JSON lines in ``log.txt`` and tensorboard scalars under ``tensorboard/``."""

    def __init__(self, output_dir: str, enabled: bool, tensorboard: bool = True):
        self.enabled = enabled
        self.path = os.path.join(output_dir, "log.txt")
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(output_dir, "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.writer = None

    def line(self, record: Dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def scalars(self, values: Dict[str, float], step: int, prefix: str = "") -> None:
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and math.isfinite(v):
                    self.writer.add_scalar(prefix + k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def print0(*args, **kwargs) -> None:
    if du.is_main_process():
        print(*args, **kwargs, flush=True)


class Trainer:
    """Runs ``epochs`` epochs of ``train_step`` over a loader, with checkpoints and resumption.

    Args:
        model: the unwrapped model (moved to ``device`` here; wrapped in DDP when the process group is up).
        optimizer, scheduler: scheduler must offer ``step_update(global_step)`` and ``state_dict()``.
        opts: :class:`TrainOptions`.
        output_dir: where ``log.txt``, ``tensorboard/`` and ``checkpoint_XX.pth`` go.
        config: the resolved config (a plain dict) stored in every checkpoint.
        device: torch device of this rank.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, opts: TrainOptions,
                 output_dir: str, config: Dict[str, Any], device: torch.device):
        self.model = model.to(device)
        self.device = device
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.opts = opts
        self.output_dir = output_dir
        self.config = config
        self.scaler = torch.amp.GradScaler(device.type, enabled=opts.precision == "fp16")
        self.start_epoch = 0
        self.global_step = 0
        self.log = JsonLog(output_dir, du.is_main_process())
        rank = du.get_rank()
        if rank:  # every rank built the model from the same seed; from here on each draws its own augmentations
            torch.manual_seed(torch.initial_seed() + rank)
            random.seed(torch.initial_seed())
            np.random.seed(torch.initial_seed() % 2**32)
        module = torch.compile(self.model) if opts.compile else self.model
        if du.get_world_size() > 1:
            module = du.wrap_ddp(module, device)
        self.train_module = module

    # -------------------------------------------------------------------------------- checkpoints
    def state_dict(self, epoch: int) -> Dict[str, Any]:
        return {
            ckpt.MODEL: self.model.state_dict(), ckpt.OPTIMIZER: self.optimizer.state_dict(),
            ckpt.SCHEDULER: self.scheduler.state_dict(), ckpt.SCALER: self.scaler.state_dict(),
            ckpt.CONFIG: self.config, ckpt.EPOCH: epoch, ckpt.STEP: self.global_step,
            ckpt.RNG: [ckpt.rng_state()], ckpt.VERSION: ckpt.FORMAT_VERSION,
        }

    def save(self, epoch: int) -> Optional[str]:
        """Write ``checkpoint_{epoch:02d}.pth`` on rank 0 (collective: every rank must call it)."""
        rng = du.all_gather_object(ckpt.rng_state())  # every rank's RNG, for an exact resume
        if not du.is_main_process():
            return None
        path = ckpt.checkpoint_path(self.output_dir, epoch)
        state = self.state_dict(epoch)
        state[ckpt.RNG] = rng
        ckpt.atomic_save(state, path)
        if self.opts.keep_checkpoints:
            for old in range(epoch - self.opts.keep_checkpoints, -1, -1):
                p = ckpt.checkpoint_path(self.output_dir, old)
                if os.path.exists(p):
                    os.remove(p)
        return path

    def resume(self, path: str) -> None:
        """Restore model, optimizer, scheduler, scaler, counters and RNG; training continues at the next epoch."""
        state = ckpt.load_training_state(path)
        self.model.load_state_dict(state[ckpt.MODEL])
        self.optimizer.load_state_dict(state[ckpt.OPTIMIZER])
        self.scheduler.load_state_dict(state[ckpt.SCHEDULER])
        self.scaler.load_state_dict(state[ckpt.SCALER])
        self.start_epoch = state[ckpt.EPOCH] + 1
        self.global_step = state[ckpt.STEP]
        rng = state[ckpt.RNG]
        if len(rng) == du.get_world_size():
            ckpt.set_rng_state(rng[du.get_rank()])
        else:  # resumed on another number of ranks: the data order is still exact, augmentation RNG is not
            print0(f"note: checkpoint was written by {len(rng)} rank(s), resuming on {du.get_world_size()}")
            ckpt.set_rng_state(rng[du.get_rank() % len(rng)])
            torch.manual_seed(torch.initial_seed() + du.get_rank())
        print0(f"resumed from {path}: epoch {state[ckpt.EPOCH]} done, global step {self.global_step}")

    # ------------------------------------------------------------------------------------- training
    def _step(self, batch, ctx: StepContext, train_step) -> Dict[str, torch.Tensor]:
        with autocast_context(self.opts.precision, self.device):
            losses = train_step(self.train_module, batch, ctx)
        loss = sum(v for k, v in losses.items() if k.startswith("loss"))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.opts.grad_clip is not None:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.opts.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.global_step += 1
        self.scheduler.step_update(self.global_step)
        return losses

    def train_epoch(self, loader, epoch: int, train_step, batch_size_of: Callable[[Any], int]) -> Dict[str, float]:
        self.train_module.train()
        steps = len(loader)
        sums: Optional[torch.Tensor] = None
        window: Optional[torch.Tensor] = None
        names: List[str] = []
        n_window, samples_window = 0, 0
        t_epoch = t_window = time.time()
        header = f"Train Epoch: [{epoch}]"
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        for i, batch in enumerate(loader):
            batch = move_to(batch, self.device)
            ctx = StepContext(epoch, i, steps, self.global_step)
            losses = self._step(batch, ctx, train_step)
            values = torch.stack([v.detach().float() for v in losses.values()])
            if sums is None:
                names = list(losses)
                sums = torch.zeros_like(values)
                window = torch.zeros_like(values)
            sums += values
            window += values
            n_window += 1
            samples_window += batch_size_of(batch)
            if (i + 1) % self.opts.print_freq == 0 or i + 1 == steps:
                avg = (window / n_window).tolist()  # the only host sync, every print_freq steps
                if not all(math.isfinite(v) for v in avg):
                    raise FloatingPointError(f"non-finite loss at epoch {epoch} step {i}: "
                                             f"{dict(zip(names, avg))}")
                elapsed = time.time() - t_window
                lr = self.optimizer.param_groups[0]["lr"]
                rate = samples_window * du.get_world_size() / max(elapsed, 1e-9)
                eta = (time.time() - t_epoch) / (i + 1) * (steps - i - 1)
                parts = [f"{header} [{i + 1}/{steps}]", f"eta: {datetime.timedelta(seconds=int(eta))}"]
                parts += [f"{k}: {v:.4f}" for k, v in zip(names, avg)]
                parts += [f"lr: {lr:.3e}", f"samples/s: {rate:.1f}", f"s/it: {elapsed / n_window:.3f}"]
                if self.device.type == "cuda":
                    parts.append(f"max mem: {torch.cuda.max_memory_allocated(self.device) / 2**20:.0f} MB")
                print0("  ".join(parts))
                self.log.scalars(dict(zip(names, avg)), self.global_step, "train/")
                self.log.scalars({"lr": lr, "samples_per_s": rate}, self.global_step, "train/")
                window.zero_()
                n_window, samples_window, t_window = 0, 0, time.time()
        if sums is None:
            raise RuntimeError("the training loader produced no batch (data set smaller than one batch?)")
        totals = torch.cat([sums, torch.tensor([float(steps)], device=sums.device)])
        totals = du.all_reduce_sum(totals)
        means = (totals[:-1] / totals[-1]).tolist()
        total_time = time.time() - t_epoch
        print0(f"{header} Total time: {datetime.timedelta(seconds=int(total_time))} "
               f"({total_time / steps:.4f} s / it)")
        stats = {f"train_{k}": v for k, v in zip(names, means)}
        stats["train_lr"] = self.optimizer.param_groups[0]["lr"]
        return stats

    def fit(self, loader, train_step: Callable, epochs: int, sampler=None,
            after_epoch: Optional[Callable[[int], Dict[str, Any]]] = None,
            batch_size_of: Callable[[Any], int] = lambda b: len(b["image"]),
            exit_after_epochs: Optional[int] = None) -> bool:
        """Train from ``start_epoch`` to ``epochs``; checkpoint and log after each epoch. Returns True when every
        epoch is done (False after an ``exit_after_epochs`` stop).

        Args:
            after_epoch: called with the epoch index after training it (e.g. evaluation); its dict is logged.
            exit_after_epochs: stop after this many epochs of this run (for time-limited jobs); resume later.
        """
        print0(f"Start training: epochs {self.start_epoch}..{epochs - 1}, {len(loader)} steps per epoch, "
               f"world size {du.get_world_size()}, precision {self.opts.precision}")
        t0 = time.time()
        done = 0
        finished = True
        for epoch in range(self.start_epoch, epochs):
            if sampler is not None and hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
            stats = self.train_epoch(loader, epoch, train_step, batch_size_of)
            # Evaluate before saving, so the saved RNG state is exactly the one the next epoch starts from.
            extra = after_epoch(epoch) if after_epoch is not None else {}
            path = self.save(epoch)
            record = {**stats, **(extra or {}), "epoch": epoch}
            self.log.line(record)
            self.log.scalars({k: v for k, v in record.items() if k != "epoch"}, epoch, "epoch/")
            if path:
                print0(f"saved {path}")
            du.barrier()
            done += 1
            if exit_after_epochs is not None and done >= exit_after_epochs and epoch + 1 < epochs:
                print0(f"stopping after {done} epoch(s) as asked; resume with --resume")
                finished = False
                break
        print0(f"Training time {datetime.timedelta(seconds=int(time.time() - t0))}")
        self.log.close()
        return finished
