"""The one training loop every task script shares.

A task script builds its model, data and a ``train_step(model, batch, ctx) -> {name: loss}`` function; the
:class:`Trainer` owns everything else: device placement (and with ``normalize_on_device`` the images' normalisation,
on the device), DDP, mixed precision, gradient clipping, the per-step learning-rate schedule, logging (stdout,
``log.txt`` JSON lines, tensorboard), throughput and memory, and what keeps a multi-day run alive:

* checkpoints at every epoch end (``checkpoint_XX.pth``) and inside epochs (``checkpoint_last.pth``, every
  ``checkpoint_every_steps`` steps or ``checkpoint_every_minutes``), written atomically, with everything an exact
  continuation needs (weights, optimizer, scheduler, scaler, queues, every rank's RNG, the data position);
* SIGTERM / SIGUSR1 (SLURM preemption, ``#SBATCH --signal=USR1@120``): every rank finishes its step, one
  ``checkpoint_last.pth`` is written, and the process exits with :data:`EXIT_PREEMPTED` (75) so the job can be
  requeued and continued with ``--resume``;
* a divergence guard: a step with a non-finite loss or gradient norm is skipped (no optimizer update), counted and
  logged; ``max_bad_steps`` consecutive skips stop the run naming the step and the losses; a checkpoint is never
  written with non-finite weights, nor with weights that differ between ranks;
* a first-step check that every trainable parameter received a gradient (the bug that makes DDP fail at step 2);
* totals of the images the data sets skipped (``train_bad_images`` in ``log.txt``, with the first paths named).

Host syncs: on CUDA the step stays free of them (the guard's flags are read one step late through pinned memory;
the skip goes to the fused optimizer as its ``found_inf``); only ``optimizer.fused: false`` needs one per step.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import math
import os
import random
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from dataset.transforms import normalize_images
from engine import checkpoint as ckpt
from engine.resume import HARMLESS_KEYS, ResumeError, config_changes, format_changes
from utils import distributed as du

EXIT_PREEMPTED = 75  # sysexits EX_TEMPFAIL: "try again later"; a requeued job continues with --resume
STOP_SIGNALS = tuple(s for s in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)) if s is not None)


class Preempted(Exception):
    """Raised after the checkpoint of a SIGTERM / SIGUSR1 stop is written; scripts exit with EXIT_PREEMPTED."""


@dataclass
class TrainOptions:
    """Engine settings shared by every task config (new keys; the original had none of these)."""

    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast; fp16 adds a GradScaler)
    grad_clip: Optional[float] = None  # max global gradient norm; None = no clipping (the original)
    num_workers: int = 4
    print_freq: int = 50  # iterations between progress lines
    compile: bool = False  # torch.compile every transformer block (regional compilation) before DDP
    keep_checkpoints: Optional[int] = None  # keep only the newest N checkpoint_XX.pth; None = keep all
    checkpoint_every_steps: Optional[int] = None  # write checkpoint_last.pth every N optimizer steps inside epochs
    checkpoint_every_minutes: Optional[float] = None  # ... and/or every M minutes (rank 0's clock decides)
    max_bad_steps: int = 10  # consecutive skipped (non-finite) steps that stop the run
    dist_timeout_minutes: float = 30.0  # process-group timeout: a rank blocked in a collective longer fails
    accum_steps: int = 1  # micro-batches (of batch_size each) per optimizer step
    persistent_workers: bool = True  # keep loader workers alive across epochs (no re-spawn cost per epoch)
    prefetch_factor: int = 2  # batches each loader worker prepares ahead
    max_bad_image_fraction: float = 0.5  # stop when more of the images read than this are unreadable (image_root?)
    # loader workers yield uint8 images and the engine normalises each batch on the device (bitwise the same floats;
    # less work per worker and 4x fewer bytes through shared / pinned memory and the host-to-device copy)
    normalize_on_device: bool = False

    def __post_init__(self):
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.grad_clip is not None and not (self.grad_clip > 0 and math.isfinite(self.grad_clip)):
            raise ValueError(f"grad_clip must be positive or null, got {self.grad_clip}")
        if self.print_freq < 1:
            raise ValueError(f"print_freq must be >= 1, got {self.print_freq}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.keep_checkpoints is not None and self.keep_checkpoints < 1:
            raise ValueError(f"keep_checkpoints must be >= 1 or null, got {self.keep_checkpoints}")
        if self.checkpoint_every_steps is not None and self.checkpoint_every_steps < 1:
            raise ValueError(f"checkpoint_every_steps must be >= 1 or null, got {self.checkpoint_every_steps}")
        if self.checkpoint_every_minutes is not None and not self.checkpoint_every_minutes > 0:
            raise ValueError(f"checkpoint_every_minutes must be > 0 or null, got {self.checkpoint_every_minutes}")
        if self.max_bad_steps < 1:
            raise ValueError(f"max_bad_steps must be >= 1, got {self.max_bad_steps}")
        if not self.dist_timeout_minutes > 0:
            raise ValueError(f"dist_timeout_minutes must be > 0, got {self.dist_timeout_minutes}")
        if self.accum_steps < 1:
            raise ValueError(f"accum_steps must be >= 1, got {self.accum_steps}")
        if not 0 < self.max_bad_image_fraction <= 1:
            raise ValueError(f"max_bad_image_fraction must be in (0, 1], got {self.max_bad_image_fraction}")
        if self.prefetch_factor < 1:
            raise ValueError(f"prefetch_factor must be >= 1, got {self.prefetch_factor}")


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


class _HostMirror:
    """Small per-step device tensors read on the host: at once on the CPU, one step late on CUDA (through pinned
    memory and an event), so the host never stalls the device queue to look at them."""

    def __init__(self, device: torch.device):
        self.lagged = device.type == "cuda"
        self.pending: deque = deque()

    def push(self, values: torch.Tensor, meta: Any) -> None:
        values = values.detach()
        if not self.lagged:
            self.pending.append((values.cpu(), None, meta))
            return
        buf = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
        buf.copy_(values, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        self.pending.append((buf, event, meta))

    def pull(self, flush: bool = False) -> List[Any]:
        """``[(values list, meta), ...]`` of every step that is ready (all of them when ``flush``)."""
        out = []
        while self.pending and (flush or not self.lagged or len(self.pending) > 1):
            buf, event, meta = self.pending.popleft()
            if event is not None:
                event.synchronize()
            out.append((buf.tolist(), meta))
        return out


# the fields of a mid-epoch position that differ between ranks (checkpoint_last.pth keeps them per rank)
_RANK_POSITION_KEYS = ("names", "sums", "n_good", "bad_images", "bad_paths", "bad_events", "samples")


def compile_regions(model: nn.Module) -> int:
    """Regional compilation: ``torch.compile`` each transformer block in place (ViT blocks and BERT layers, the
    momentum copies included). Identical blocks share one compiled graph, so compile time is that of a block, not of
    the model; the glue between blocks (losses, sampling, queues) stays eager, and state-dict keys do not change.
    Returns the number of blocks compiled."""
    from timm.models.vision_transformer import Block

    from models.bert import BertLayer

    # Every BertLayer (text, fusion, momentum, the VQA decoder) shares one code object, so one recompile budget for
    # all its variants (self-only / cross-attention, with or without cached image K/V, grad or no grad, shapes):
    # 7 were counted for pre-training with its zero-shot evaluation. Past the default of 8 Dynamo would silently run
    # further variants eagerly.
    dynamo_config = torch._dynamo.config
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 64)
    n = 0
    for m in model.modules():
        if isinstance(m, (Block, BertLayer)):
            m.compile()
            n += 1
    return n


def _optimizer_steps(loader, accum: int, start: int, steps: int):
    """``(step index, [accum micro-batches], seconds waited for them)`` for each optimizer step of an epoch; an
    incomplete last group is dropped."""
    it = iter(loader)
    for i in range(start, steps):
        t0 = time.perf_counter()
        group = []
        for _ in range(accum):
            try:
                group.append(next(it))
            except StopIteration:
                return
        yield i, group, time.perf_counter() - t0


class Trainer:
    """Runs ``epochs`` epochs of ``train_step`` over a loader, with checkpoints and resumption.

    Args:
        model: the unwrapped model (moved to ``device`` here; wrapped in DDP when the process group is up).
        optimizer, scheduler: scheduler must offer ``step_update(global_step)`` and ``state_dict()``.
        opts: :class:`TrainOptions`.
        output_dir: where ``log.txt``, ``tensorboard/`` and the checkpoints go.
        config: the resolved config (a plain dict) stored in every checkpoint and compared on resume.
        device: torch device of this rank.
        steps_per_epoch, batch_size: the epoch's length in steps and the per-rank batch (data position on resume).
        run_info: what else fixes the run's mathematics (e.g. ``{"seed": 42}``); compared on resume.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, opts: TrainOptions,
                 output_dir: str, config: Dict[str, Any], device: torch.device, steps_per_epoch: int = 0,
                 batch_size: int = 0, run_info: Optional[Dict[str, Any]] = None,
                 config_defaults: Optional[Dict[str, Any]] = None):
        self.model = model.to(device)
        self.device = device
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.opts = opts
        self.output_dir = output_dir
        self.config = config
        self.config_defaults = config_defaults or {}
        self.steps_per_epoch = steps_per_epoch
        self.batch_size = batch_size
        self.run_info = {**(run_info or {}), "world_size": du.get_world_size()}
        self.scaler = torch.amp.GradScaler(device.type, enabled=opts.precision == "fp16")
        self.start_epoch = 0
        self.start_step = 0  # batches of start_epoch already done (a mid-epoch resume)
        self.global_step = 0
        self.bad_steps = 0  # skipped steps in this run (all epochs), and the current streak
        self.consecutive_bad = 0
        self._epoch_resume: Optional[Dict[str, Any]] = None  # partial epoch sums of a mid-epoch checkpoint
        self._grads_checked = False
        self._stop_signal = 0
        self._last_save_time = time.time()
        self._save_seq: Optional[int] = None  # the last checkpoint's save sequence number (read at the first save)
        self.log = JsonLog(output_dir, du.is_main_process())
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.param_names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        rank = du.get_rank()
        if rank:  # every rank built the model from the same seed; from here on each draws its own randomness
            torch.manual_seed(torch.initial_seed() + rank)
            random.seed(torch.initial_seed())
            np.random.seed(torch.initial_seed() % 2**32)
        if opts.compile:
            print0(f"compile: {compile_regions(self.model)} transformer blocks compiled (regional compilation)")
        module = self.model
        if du.get_world_size() > 1:
            module = du.wrap_ddp(module, device)
        self.train_module = module

    # -------------------------------------------------------------------------------- checkpoints
    def state_dict(self, epoch: int) -> Dict[str, Any]:
        return {
            ckpt.MODEL: self.model.state_dict(), ckpt.OPTIMIZER: self.optimizer.state_dict(),
            ckpt.SCHEDULER: self.scheduler.state_dict(), ckpt.SCALER: self.scaler.state_dict(),
            ckpt.CONFIG: self.config, ckpt.EPOCH: epoch, ckpt.STEP: self.global_step,
            ckpt.RNG: [ckpt.rng_state()], ckpt.VERSION: ckpt.FORMAT_VERSION, ckpt.RUN: self.run_info,
            ckpt.GUARD: {"bad_steps": self.bad_steps, "consecutive_bad": self.consecutive_bad},
        }

    def _checked_checksums(self) -> List[torch.Tensor]:
        """Every rank's parameter checksums; raises if a weight is non-finite or the ranks' weights differ."""
        local = ckpt.param_checksums(self.model)
        world = du.get_world_size()
        every = du.all_gather_no_grad(local.unsqueeze(0)).view(world, *local.shape) if world > 1 else local[None]
        if not torch.isfinite(every).all():
            names = [self.param_names[i] for i in range(local.shape[0]) if not torch.isfinite(every[:, i]).all()]
            raise FloatingPointError(f"refusing to write a checkpoint at step {self.global_step}: non-finite weights "
                                     f"in {names[:8]}{' ...' if len(names) > 8 else ''}")
        for r in range(1, world):
            if not torch.equal(every[r], every[0]):
                i = int((every[r] != every[0]).any(dim=1).nonzero()[0])
                raise RuntimeError(f"rank {r} holds different weights from rank 0 at step {self.global_step} "
                                   f"(first: {self.param_names[i]}); refusing to write a checkpoint")
        return [c.cpu() for c in every]

    def save(self, epoch: int, position: Optional[Dict[str, Any]] = None) -> Optional[str]:
        """Write ``checkpoint_{epoch:02d}.pth`` (epoch done), or ``checkpoint_last.pth`` with ``position`` inside the
        epoch, on rank 0 (collective: every rank must call it)."""
        checksums = self._checked_checksums()
        rng = du.all_gather_object(ckpt.rng_state())  # every rank's RNG, for an exact resume
        if position is not None:  # every rank's partial epoch sums and bad-image counts, each rank restoring its own
            ranks = du.all_gather_object({k: position[k] for k in _RANK_POSITION_KEYS})
        self._last_save_time = time.time()
        if not du.is_main_process():
            return None
        path = ckpt.last_path(self.output_dir) if position is not None else ckpt.checkpoint_path(self.output_dir, epoch)
        if self._save_seq is None:  # after every checkpoint already in the folder, whatever branch wrote them
            self._save_seq = ckpt.last_save_seq(self.output_dir)
        self._save_seq += 1
        state = self.state_dict(epoch)
        state[ckpt.SEQ] = self._save_seq
        state[ckpt.RNG] = rng
        state[ckpt.CHECKSUMS] = checksums
        if position is not None:
            state[ckpt.POSITION] = dict(position, ranks=ranks)
        ckpt.atomic_save(state, path)
        if self.opts.keep_checkpoints and position is None:
            for old in range(epoch - self.opts.keep_checkpoints, -1, -1):
                p = ckpt.checkpoint_path(self.output_dir, old)
                if os.path.exists(p):
                    os.remove(p)
        return path

    def resume(self, path: str, apply_changes: bool = False,
               rebuild_scheduler: Optional[Callable[[], Any]] = None) -> None:
        """Restore model, optimizer, scheduler, scaler, counters, RNG and the data position.

        The checkpoint's config and run info are compared with the current ones first: a difference that changes the
        run's mathematics raises :class:`ResumeError` listing it, unless ``apply_changes``; then the new values take
        effect: optimizer hyper-parameters from the current config, the schedule rebuilt for the current config, and
        a changed batch size or world size continues at the same sample of the epoch, rounded down to a whole step.
        """
        state = ckpt.load_training_state(path)
        changes = config_changes(state.get(ckpt.CONFIG) or {}, self.config, defaults=self.config_defaults,
                                 harmless=HARMLESS_KEYS + ("normalize_on_device",))  # the same floats either way
        old_run = state.get(ckpt.RUN) or {"world_size": len(state[ckpt.RNG])}  # version 1 stored no run info
        changes += config_changes({"run": old_run}, {"run": {k: v for k, v in self.run_info.items() if k in old_run}})
        if changes and not apply_changes:
            raise ResumeError(f"{path} was written by a run with other settings:\n{format_changes(changes)}\n"
                              "Resume with the checkpoint's settings, or pass --resume_changes apply to continue with "
                              "the new ones (they then take effect and are logged).")
        self.model.load_state_dict(state[ckpt.MODEL])
        fresh = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state[ckpt.OPTIMIZER])
        self.scaler.load_state_dict(state[ckpt.SCALER])
        if changes:  # the current config's hyper-parameters and schedule, from the saved position
            for group, new in zip(self.optimizer.param_groups, fresh):
                group.update(new)
            if rebuild_scheduler is not None:
                self.scheduler = rebuild_scheduler()
        else:
            self.scheduler.load_state_dict(state[ckpt.SCHEDULER])
        epoch = state[ckpt.EPOCH]
        position = state.get(ckpt.POSITION)
        self.global_step = state[ckpt.STEP]
        if position is None:
            self.start_epoch, self.start_step = epoch + 1, 0
        else:
            self.start_epoch = epoch
            old_accum = position.get("accum_steps", 1)
            same = (position["batch_size"] == self.batch_size and position["world_size"] == du.get_world_size()
                    and position["steps_per_epoch"] == self.steps_per_epoch and old_accum == self.opts.accum_steps)
            if same:
                self.start_step = position["step_in_epoch"]
                self._epoch_resume = position
            else:
                done = position["step_in_epoch"] * position["batch_size"] * position["world_size"] * old_accum
                per_step = self.batch_size * du.get_world_size() * self.opts.accum_steps
                self.start_step = min(done // per_step, self.steps_per_epoch - 1)
                print0(f"note: batch size, world size, accum_steps or epoch length changed: continuing epoch {epoch} "
                       f"at step {self.start_step} of "
                       f"{self.steps_per_epoch} (sample {done} of the epoch, rounded down to a whole step)")
        if changes:
            self.global_step = self.start_epoch * self.steps_per_epoch + self.start_step
            self.scheduler.step_update(self.global_step)
            print0(f"resuming with changed settings (--resume_changes apply):\n{format_changes(changes)}")
            self.log.line({"resume_changes": {k: [a, b] for k, a, b in changes}, "step": self.global_step})
        guard = state.get(ckpt.GUARD) or {}
        self.bad_steps, self.consecutive_bad = guard.get("bad_steps", 0), guard.get("consecutive_bad", 0)
        rng = state[ckpt.RNG]
        if len(rng) == du.get_world_size():
            ckpt.set_rng_state(rng[du.get_rank()])
        else:  # resumed on another number of ranks: data order and augmentation stay exact, model RNG cannot
            ckpt.set_rng_state(rng[du.get_rank() % len(rng)])
            torch.manual_seed(torch.initial_seed() + du.get_rank())
        where = f"epoch {epoch} done" if position is None else f"epoch {epoch} at step {self.start_step}"
        print0(f"resumed from {path}: {where}, global step {self.global_step}")

    # ------------------------------------------------------------------------------------- training
    def _signal_handler(self, signum, frame) -> None:
        self._stop_signal = signum

    @contextlib.contextmanager
    def _stop_signals(self):
        """SIGTERM / SIGUSR1 set a flag; the loop checkpoints and stops at the next step every rank agrees on."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {s: signal.signal(s, self._signal_handler) for s in STOP_SIGNALS}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def _check_grads(self) -> None:
        """First step: every trainable parameter must have received a gradient (on some rank)."""
        local = [n for n, p in zip(self.param_names, self.params) if p.grad is None]
        missing = sorted(set().union(*map(set, du.all_gather_object(local))))  # any rank: DDP needs them all
        if missing:
            raise RuntimeError(
                f"{len(missing)} trainable parameter(s) received no gradient in the first step: {missing[:20]}"
                f"{' ...' if len(missing) > 20 else ''}. They take no part in the loss: freeze them "
                "(requires_grad_(False)) or use them; under DDP they make the second step fail.")
        self._grads_checked = True

    def _step(self, batches: List[Any], ctx: StepContext, train_step):
        """One optimizer step over ``batches`` (``accum_steps`` micro-batches: their gradients are summed, the loss of
        each divided by their number; DDP all-reduces only after the last), skipped (no update) when the loss or the
        gradient norm is not finite on any rank. Returns ``(losses, flags)``: the micro-batches' mean losses and
        ``flags`` = [bad, stop requested, save requested] agreed by every rank."""
        self.optimizer.zero_grad(set_to_none=True)
        k = len(batches)
        losses: Dict[str, torch.Tensor] = {}
        loss_total = None
        for j, batch in enumerate(batches):
            defer_sync = j + 1 < k and hasattr(self.train_module, "no_sync")
            with self.train_module.no_sync() if defer_sync else contextlib.nullcontext():
                with autocast_context(self.opts.precision, self.device):
                    out = train_step(self.train_module, batch, ctx)
                loss = sum(v for name, v in out.items() if name.startswith("loss"))
                self.scaler.scale(loss if k == 1 else loss / k).backward()
            if k == 1:
                losses, loss_total = out, loss
            else:
                for name, v in out.items():
                    losses[name] = losses.get(name, 0) + v.detach() / k
                loss_total = loss.detach() if loss_total is None else loss_total + loss.detach()
        loss = loss_total
        if not self._grads_checked:
            self._check_grads()
        fp16 = self.scaler.is_enabled()
        if fp16:
            self.scaler.unscale_(self.optimizer)
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
        if self.opts.grad_clip is not None:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.opts.grad_clip, norm)
        finite = torch.isfinite(loss.detach()).float()
        if not fp16:  # with fp16 an infinite gradient is the scaler's business (it skips and lowers the scale)
            finite = finite * torch.isfinite(norm).float()
        save_due = (self.opts.checkpoint_every_minutes is not None and du.is_main_process()
                    and time.time() - self._last_save_time >= 60 * self.opts.checkpoint_every_minutes)
        if save_due:
            self._last_save_time = time.time()  # requested once; on CUDA the request is read a step later
        host = torch.tensor([float(self._stop_signal != 0), float(save_due)],
                            pin_memory=self.device.type == "cuda").to(self.device, non_blocking=True)
        flags = torch.cat([(1.0 - finite).view(1), host])
        if du.get_world_size() > 1:
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        bad = flags[0] > 0
        if fp16:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif self.optimizer.defaults.get("fused"):
            self.optimizer.found_inf = bad.float()  # the fused kernel skips the whole update, no host sync
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.found_inf
        elif not bool(bad):  # a host sync per step: only with optimizer.fused false (free on the CPU)
            self.optimizer.step()
        self.global_step += 1
        self.scheduler.step_update(self.global_step)
        return losses, flags

    def _to_device(self, batch: Any) -> Any:
        """The batch on the training device; with ``normalize_on_device`` its uint8 ``image`` normalised there."""
        batch = move_to(batch, self.device)
        if self.opts.normalize_on_device:
            images = batch.get("image") if isinstance(batch, dict) else None
            if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
                got = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
                raise TypeError(f"normalize_on_device: the batch's 'image' must be a uint8 tensor, got {got} (the "
                                "loader's transform must come from engine.recipe.make_trainer)")
            batch["image"] = normalize_images(images)
        return batch

    def _position(self, epoch: int, step_in_epoch: int, names, sums, n_good, bad_images, bad_paths
                  ) -> Dict[str, Any]:
        return {"step_in_epoch": step_in_epoch, "steps_per_epoch": self.steps_per_epoch,
                "batch_size": self.batch_size, "accum_steps": self.opts.accum_steps,
                "world_size": du.get_world_size(), "names": list(names),
                "sums": None if sums is None else sums.detach().cpu(), "n_good": float(n_good),
                "bad_images": int(bad_images), "bad_paths": list(bad_paths), "bad_events": int(self._bad_events),
                "samples": int(self._samples)}

    def train_epoch(self, loader, epoch: int, train_step, batch_size_of: Callable[[Any], int],
                    start_step: int = 0) -> Dict[str, float]:
        self.train_module.train()
        steps = self.steps_per_epoch or len(loader)
        sums: Optional[torch.Tensor] = None
        window: Optional[torch.Tensor] = None
        names: List[str] = []
        n_good = 0.0
        bad_images, bad_paths, bad_set = 0, [], set()  # distinct unreadable files met by this rank this epoch
        self._bad_events = self._samples = 0  # images skipped / samples delivered (for max_bad_image_fraction)
        resumed = self._epoch_resume if start_step else None
        self._epoch_resume = None
        if resumed is not None and len(resumed.get("ranks") or ()) == du.get_world_size():
            resumed = resumed["ranks"][du.get_rank()]  # this rank's part (checkpoints before it: rank 0's for all)
        if resumed is not None and resumed.get("sums") is not None:
            names, sums = list(resumed["names"]), resumed["sums"].to(self.device)
            window = torch.zeros_like(sums)
            n_good, bad_images, bad_paths = resumed["n_good"], resumed["bad_images"], list(resumed["bad_paths"])
            self._bad_events, self._samples = resumed.get("bad_events", 0), resumed.get("samples", 0)
        n_window, samples_window = 0, 0
        t_epoch = t_window = time.time()
        header = f"Train Epoch: [{epoch}]"
        mirror = _HostMirror(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        every = self.opts.checkpoint_every_steps
        counts = {"good": n_good, "good_window": 0.0, "stop": False, "save": False}

        def drain(flush: bool) -> None:
            """Host-side bookkeeping of the steps whose flags are readable (all of them when ``flush``)."""
            for vals, (step_i, gstep) in mirror.pull(flush):
                counts["stop"] |= vals[1] > 0
                counts["save"] |= vals[2] > 0
                if vals[0] > 0:
                    self._on_bad_step(epoch, step_i, gstep, dict(zip(names, vals[3:])))
                else:
                    self.consecutive_bad = 0
                    counts["good"] += 1
                    counts["good_window"] += 1

        wait_total = wait_window = 0.0
        for i, group, wait in _optimizer_steps(loader, self.opts.accum_steps, start_step, steps):
            wait_total += wait
            wait_window += wait
            for batch in group:
                if isinstance(batch, dict) and batch.get("bad_images"):
                    self._bad_events += len(batch["bad_images"])  # every try: substitutes are drawn at random
                    new = set(batch["bad_images"]) - bad_set  # distinct files, for the logs
                    bad_set |= new
                    bad_images += len(new)
                    bad_paths = (bad_paths + sorted(new))[:5]
            group = [self._to_device(batch) for batch in group]
            ctx = StepContext(epoch, i, steps, self.global_step)
            losses, flags = self._step(group, ctx, train_step)
            values = torch.stack([v.detach().float() for v in losses.values()])
            if sums is None:
                names = list(losses)
                sums = torch.zeros_like(values)
                window = torch.zeros_like(values)
            kept = torch.where(flags[0] == 0, values, torch.zeros_like(values))  # skipped steps stay out of means
            sums += kept
            window += kept
            n_window += 1
            n_samples = sum(batch_size_of(batch) for batch in group)
            samples_window += n_samples
            self._samples += n_samples
            mirror.push(torch.cat([flags, values]), (i, self.global_step))
            drain(flush=False)
            last_step = i + 1 == steps
            save_now = counts["save"] or (every is not None and self.global_step % every == 0)
            if save_now and not counts["stop"] and self.consecutive_bad:
                save_now = False  # no periodic checkpoint in the middle of a diverging streak: keep the last good one
            if (save_now or counts["stop"]) and not last_step:
                drain(flush=True)  # the saved position must count every step done
                path = self.save(epoch, self._position(epoch, i + 1, names, sums, counts["good"], bad_images,
                                                       bad_paths))
                counts["save"] = False
                if path:
                    print0(f"saved {path} (epoch {epoch}, step {i + 1}/{steps}, global step {self.global_step})")
            if counts["stop"]:
                if last_step:
                    self._stop_signal = self._stop_signal or signal.SIGTERM  # stop after this epoch's checkpoint
                else:
                    print0(f"stop signal: checkpoint written at global step {self.global_step}; exiting with code "
                           f"{EXIT_PREEMPTED} (continue with --resume)")
                    raise Preempted(self.global_step)
            if (i + 1) % self.opts.print_freq == 0 or last_step:
                drain(flush=True)
                self._check_bad_image_fraction(bad_paths)
                avg = ((window / counts["good_window"]).tolist() if counts["good_window"]
                       else [float("nan")] * len(names))  # every step of the window skipped  # the only other host sync, every print_freq steps
                elapsed = time.time() - t_window
                lr = self.optimizer.param_groups[0]["lr"]
                rate = samples_window * du.get_world_size() / max(elapsed, 1e-9)
                eta = (time.time() - t_epoch) / (i + 1 - start_step) * (steps - i - 1)
                parts = [f"{header} [{i + 1}/{steps}]", f"eta: {datetime.timedelta(seconds=int(eta))}"]
                parts += [f"{k}: {v:.4f}" for k, v in zip(names, avg)]
                wait_pct = 100.0 * wait_window / max(elapsed, 1e-9)
                parts += [f"lr: {lr:.3e}", f"samples/s: {rate:.1f}", f"s/it: {elapsed / n_window:.3f}",
                          f"data: {wait_window / n_window:.3f} s/it ({wait_pct:.0f}%)"]
                if self.bad_steps:
                    parts.append(f"skipped steps: {self.bad_steps}")
                if bad_images:
                    parts.append(f"bad images: {bad_images} (this rank)")
                if self.device.type == "cuda":
                    parts.append(f"max mem: {torch.cuda.max_memory_allocated(self.device) / 2**20:.0f} MB")
                print0("  ".join(parts))
                self.log.scalars(dict(zip(names, avg)), self.global_step, "train/")
                self.log.scalars({"lr": lr, "samples_per_s": rate, "bad_steps": self.bad_steps,
                                  "data_wait_s": wait_window / n_window, "data_wait_pct": wait_pct},
                                 self.global_step, "train/")
                window.zero_()
                n_window, samples_window, t_window, wait_window = 0, 0, time.time(), 0.0
                counts["good_window"] = 0.0
        if sums is None:
            raise RuntimeError("the training loader produced no batch (data set smaller than one batch?)")
        total_time = time.time() - t_epoch
        extra = torch.tensor([float(counts["good"]), float(bad_images), 100.0 * wait_total / max(total_time, 1e-9)],
                             device=sums.device)
        totals = du.all_reduce_sum(torch.cat([sums, extra]))
        means = (totals[:-3] / totals[-3]).tolist() if float(totals[-3]) else [float("nan")] * len(names)
        total_bad_images = int(totals[-2])
        wait_pct = float(totals[-1]) / du.get_world_size()
        print0(f"{header} Total time: {datetime.timedelta(seconds=int(total_time))} "
               f"({total_time / max(steps - start_step, 1):.4f} s / it)")
        paths = [p for ps in du.all_gather_object(bad_paths) for p in ps]
        if total_bad_images:
            print0(f"{header} {total_bad_images} unreadable image(s) skipped on all ranks (first: {paths[:5]})")
        stats = {f"train_{k}": v for k, v in zip(names, means)}
        stats["train_lr"] = self.optimizer.param_groups[0]["lr"]
        stats["train_bad_images"] = total_bad_images
        stats["train_bad_steps"] = self.bad_steps
        stats["train_data_wait_pct"] = wait_pct  # share of this epoch's wall time spent waiting for batches
        if paths:
            stats["train_bad_image_paths"] = paths[:5]
        return stats

    def _check_bad_image_fraction(self, bad_paths: List[str]) -> None:
        """Every rank at the same step: stop when most images read so far this epoch were unreadable."""
        counts = du.all_reduce_sum(torch.tensor([float(self._bad_events), float(self._samples)], device=self.device))
        bad, good = counts.tolist()
        if bad and good >= 8 and bad / (bad + good) > self.opts.max_bad_image_fraction:
            raise RuntimeError(
                f"{int(bad)} of the {int(bad + good)} images read so far this epoch were unreadable (more than "
                f"max_bad_image_fraction {self.opts.max_bad_image_fraction}; first on this rank: {bad_paths[:3]}). "
                "Check image_root (and the paths in the annotation files); python -m tools.check_data --config "
                "<config> lists every bad record.")

    def _on_bad_step(self, epoch: int, step_in_epoch: int, global_step: int, losses: Dict[str, float]) -> None:
        self.bad_steps += 1
        self.consecutive_bad += 1
        shown = ", ".join(f"{k}={v:.4g}" for k, v in losses.items())
        print0(f"warning: epoch {epoch} step {step_in_epoch + 1}/{self.steps_per_epoch} (global step {global_step}): "
               "non-finite loss or gradient "
               f"norm ({shown}); optimizer step skipped ({self.consecutive_bad} in a row, {self.bad_steps} in all)")
        if self.consecutive_bad >= self.opts.max_bad_steps:
            raise FloatingPointError(
                f"training diverged: {self.consecutive_bad} consecutive steps with a non-finite loss or gradient norm "
                f"(max_bad_steps {self.opts.max_bad_steps}), the last at epoch {epoch} step {step_in_epoch + 1} (global "
                f"step {global_step}) with {shown}. No checkpoint was written with these weights; lower optimizer.lr, "
                "set grad_clip, or resume from an earlier checkpoint.")

    def _keep_epoch_after_failed_evaluation(self, epoch: int, stats: Dict[str, Any], error: Exception) -> None:
        """The evaluation after ``epoch`` raised: in a single-process run, write the epoch's checkpoint anyway (its
        training is not lost; ``--resume`` continues with the next epoch, without this epoch's evaluation, and from
        the RNG state the failed evaluation left) and log the epoch's training statistics with the error. With
        several ranks nothing is written: the other ranks may be waiting in one of the evaluation's collectives,
        and saving is collective too."""
        if du.get_world_size() > 1 or self.consecutive_bad:
            return
        path = self.save(epoch)
        self.log.line({**stats, "epoch": epoch, "eval_error": f"{type(error).__name__}: {error}"[:500]})
        print0(f"evaluation after epoch {epoch} failed ({type(error).__name__}); the epoch's training is kept in "
               f"{path}: fix the cause and continue with --resume (epoch {epoch} is not evaluated again)")

    def fit(self, loader, train_step: Callable, epochs: int, sampler=None,
            after_epoch: Optional[Callable[[int], Dict[str, Any]]] = None,
            batch_size_of: Callable[[Any], int] = lambda b: len(b["image"]),
            exit_after_epochs: Optional[int] = None) -> bool:
        """Train from the resumed position to ``epochs``; checkpoint and log after each epoch. Returns True when every
        epoch is done (False after an ``exit_after_epochs`` stop); raises :class:`Preempted` after a stop signal.

        Args:
            after_epoch: called with the epoch index after training it (e.g. evaluation); its dict is logged. It runs
                on every rank (evaluation is sharded, or at least never leaves ranks waiting in a collective).
            exit_after_epochs: stop after this many epochs of this run (for time-limited jobs); resume later.
        """
        steps = self.steps_per_epoch or len(loader)
        if self.start_epoch >= epochs:
            print0(f"all {epochs} epochs are done: nothing to train (to train longer, raise schedular.epochs and "
                   "resume with --resume_changes apply)")
            self.log.close()
            return True
        print0(f"Start training: epochs {self.start_epoch}..{epochs - 1}"
               + (f" (epoch {self.start_epoch} from step {self.start_step})" if self.start_step else "")
               + f", {steps} steps per epoch, world size {du.get_world_size()}, precision {self.opts.precision}")
        t0 = time.time()
        done = 0
        finished = True
        with self._stop_signals():
            for epoch in range(self.start_epoch, epochs):
                start_step = self.start_step if epoch == self.start_epoch else 0
                if sampler is not None and hasattr(sampler, "set_epoch"):
                    sampler.set_epoch(epoch)
                if start_step and sampler is not None:
                    sampler.set_start(start_step * self.batch_size * self.opts.accum_steps)
                stats = self.train_epoch(loader, epoch, train_step, batch_size_of, start_step)
                # Evaluate before saving, so the saved RNG state is exactly the one the next epoch starts from.
                try:
                    extra = after_epoch(epoch) if after_epoch is not None else {}
                except Exception as e:
                    self._keep_epoch_after_failed_evaluation(epoch, stats, e)
                    raise
                if self.consecutive_bad:  # the weights are those before a streak of skipped steps: likely exploded
                    if epoch + 1 == epochs:
                        raise FloatingPointError(
                            f"training ended inside a streak of {self.consecutive_bad} skipped steps (non-finite loss "
                            f"or gradient norm); no final checkpoint written. Lower optimizer.lr or set grad_clip.")
                    print0(f"warning: epoch {epoch} ends inside a streak of {self.consecutive_bad} skipped steps: "
                           f"checkpoint_{epoch:02d}.pth is not written")
                    path = None
                else:
                    path = self.save(epoch)
                record = {**stats, **(extra or {}), "epoch": epoch}
                self.log.line(record)
                self.log.scalars({k: v for k, v in record.items() if k != "epoch"}, epoch, "epoch/")
                if path:
                    print0(f"saved {path}")
                # every rank decides on the same flag (a signal may reach the ranks on either side of this point)
                flag = torch.tensor([float(self._stop_signal != 0)], device=self.device)
                stop = float(du.all_reduce_sum(flag)[0]) > 0  # also the epoch's barrier
                done += 1
                if stop and epoch + 1 < epochs:
                    print0(f"stop signal: checkpoint written at the end of epoch {epoch}; exiting with code "
                           f"{EXIT_PREEMPTED} (continue with --resume)")
                    raise Preempted(self.global_step)
                if exit_after_epochs is not None and done >= exit_after_epochs and epoch + 1 < epochs:
                    print0(f"stopping after {done} epoch(s) as asked; resume with --resume")
                    finished = False
                    break
        print0(f"Training time {datetime.timedelta(seconds=int(time.time() - t0))}")
        self.log.close()
        return finished
