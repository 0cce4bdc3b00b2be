"""Training data order that can be resumed at any step: an epoch-seeded sampler with a start offset, and per-sample
random streams.

A mid-epoch checkpoint must be able to say "the next batch is batch k of epoch e" and a resumed run must then see
exactly the batches, and the augmentations, an uninterrupted run would have seen. Two things make that hold:

* :class:`ResumableSampler`: the order of an epoch is a pure function of ``(seed, epoch)`` (a
  ``DistributedSampler`` permutation; each rank takes its interleaved share), and ``set_start(n)`` skips the first
  ``n`` samples of this rank's share without loading them.
* :class:`SeededSamples`: every sample is produced under its own random stream, seeded from
  ``(seed, epoch, index)``, so a sample's crop, flips, RandAugment draws and caption choice do not depend on which
  worker made it, on what that worker made before, or on the number of workers. In the main process
  (``num_workers: 0``) the global RNG state is restored afterwards, so loading data never perturbs the model's RNG.

torchdata's ``StatefulDataLoader`` was considered: for a map-style data set its state is the same two integers
(epoch, samples yielded) and it does not restore the workers' RNG streams, so per-sample seeding is needed anyway;
this module gives exact resumption without the extra dependency.
"""
from __future__ import annotations

import atexit
import hashlib
import random
import signal
import weakref
from typing import Any, Callable, Iterator, Optional, Tuple

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from utils import distributed as du


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed for sample ``index`` of ``epoch`` (independent of rank, worker and world size)."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


class ResumableSampler(DistributedSampler):
    """An epoch-seeded ``DistributedSampler`` that yields ``(index, sample_seed)`` keys and can start mid-epoch.

    Call :meth:`set_epoch` every epoch (the engine does) and :meth:`set_start` with the number of this rank's samples
    already consumed when resuming inside an epoch; the offset applies to the next iteration only.
    """

    def __init__(self, dataset: Dataset, seed: int = 0, shuffle: bool = True, drop_last: bool = True):
        super().__init__(dataset, num_replicas=du.get_world_size(), rank=du.get_rank(), shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.start = 0

    def set_start(self, num_samples: int) -> None:
        if not 0 <= num_samples <= self.num_samples:
            raise ValueError(f"start offset {num_samples} outside this rank's {self.num_samples} samples")
        self.start = num_samples

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        indices = list(super().__iter__())[self.start:]
        self.start = 0  # the offset is for the resumed epoch only
        epoch = self.epoch
        return iter([(i, sample_seed(self.seed, epoch, i)) for i in indices])

    def __len__(self) -> int:
        return self.num_samples - self.start


class SeededRNG:
    """``with SeededRNG(seed):`` runs its block under torch's CPU generator and Python's ``random`` seeded with
    ``seed`` and gives the caller its previous states back on exit (CUDA's generators are not touched)."""

    __slots__ = ("seed", "_torch", "_python")

    def __init__(self, seed: int):
        self.seed = seed

    def __enter__(self) -> None:
        generator = torch.default_generator
        self._torch, self._python = generator.get_state(), random.getstate()
        generator.manual_seed(self.seed)
        random.seed(self.seed)

    def __exit__(self, *exc) -> bool:
        torch.default_generator.set_state(self._torch)
        random.setstate(self._python)
        return False


class SeededSamples(Dataset):
    """Wraps a map-style data set: ``self[(index, seed)]`` is ``dataset[index]`` made under its own random stream
    (torch's CPU generator and Python's ``random`` seeded with ``seed``); plain integer keys pass through."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any):
        if not isinstance(key, tuple):
            return self.dataset[key]
        index, seed = key
        with SeededRNG(seed):  # the CPU generator only: CUDA's stream (dropout) is untouched
            return self.dataset[index]


def ignore_stop_signals(_worker_id: int = 0) -> None:
    """Loader-worker init: SLURM and torchrun signal every process of the job; the main process handles SIGTERM and
    SIGUSR1 (checkpoint, then exit) and the workers must keep serving it until then."""
    for sig in (signal.SIGTERM, getattr(signal, "SIGUSR1", None)):
        if sig is not None:
            signal.signal(sig, signal.SIG_IGN)


def _shutdown_workers(loader_ref: "weakref.ref[DataLoader]") -> None:
    loader = loader_ref()
    iterator = getattr(loader, "_iterator", None) if loader is not None else None
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()


def shutdown_workers_at_exit(loader: DataLoader) -> None:
    """Stop a persistent loader's workers at interpreter exit, before ``multiprocessing``'s own exit hook (registered
    earlier, so it runs later), which would SIGTERM them (ignored: :func:`ignore_stop_signals`) and then wait for them
    forever: without this a crash with persistent workers would hang instead of exiting."""
    atexit.register(_shutdown_workers, weakref.ref(loader))


def create_train_loader(dataset: Dataset, batch_size: int, num_workers: int, seed: int,
                        collate_fn: Optional[Callable] = None, persistent_workers: bool = True,
                        prefetch_factor: int = 2) -> Tuple[DataLoader, ResumableSampler]:
    """The training loader every script uses: this rank's share of an epoch-seeded order, whole batches only, every
    sample under its own random stream; the loader never draws from the global RNG. Returns ``(loader, sampler)``;
    call ``sampler.set_epoch`` every epoch (the engine does)."""
    sampler = ResumableSampler(dataset, seed=seed, shuffle=True, drop_last=True)
    if len(sampler) < batch_size:
        raise ValueError(f"the training set gives {len(sampler)} samples per rank, fewer than one batch of "
                         f"{batch_size}")
    loader = DataLoader(SeededSamples(dataset), batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                        pin_memory=torch.cuda.is_available(), drop_last=True, collate_fn=collate_fn,
                        generator=torch.Generator().manual_seed(seed),
                        worker_init_fn=ignore_stop_signals if num_workers else None,
                        # safe with exact resume: augmentation draws depend on (seed, epoch, index), not on workers
                        persistent_workers=persistent_workers and num_workers > 0,
                        prefetch_factor=prefetch_factor if num_workers else None)
    if num_workers and persistent_workers:
        shutdown_workers_at_exit(loader)
    return loader, sampler
