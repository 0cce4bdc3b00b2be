"""Data sets, transforms and loaders for ALBEF in the original JSON formats, plus the synthetic world."""
from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from utils import distributed as du


class CaptionCollator:
    """Stacks images and tokenizes captions in the loader workers: ``{'image', 'input_ids', 'attention_mask'}``,
    plus ``idx`` / ``label`` when the samples carry them. Image pairs (``image0``, ``image1``: NLVR2) become one
    ``image`` batch ``[all left images; all right images]``."""

    def __init__(self, tokenizer, max_length: int, padding: str = "longest"):
        self.tokenizer, self.max_length, self.padding = tokenizer, max_length, padding

    def __call__(self, samples: List[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        from models.tokenizer import tokenize

        if "image0" in samples[0]:
            batch = {"image": torch.stack([s["image0"] for s in samples] + [s["image1"] for s in samples])}
        else:
            batch = {"image": torch.stack([s["image"] for s in samples])}
        batch.update(tokenize(self.tokenizer, [s["caption"] for s in samples], self.max_length, self.padding))
        if "idx" in samples[0]:
            batch["idx"] = torch.tensor([s["idx"] for s in samples], dtype=torch.long)
        if "label" in samples[0]:
            batch["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)
        return batch


def create_sampler(dataset: Dataset, shuffle: bool, seed: int = 0, drop_last: bool = False) -> DistributedSampler:
    """A DistributedSampler for every run (world size 1 included): epoch-seeded order, so a resumed run sees the
    same batches as an uninterrupted one. Call ``set_epoch`` each epoch (the engine does)."""
    return DistributedSampler(dataset, num_replicas=du.get_world_size(), rank=du.get_rank(), shuffle=shuffle,
                              seed=seed, drop_last=drop_last)


def create_loader(dataset: Dataset, sampler, batch_size: int, num_workers: int, train: bool,
                  collate_fn: Optional[Callable] = None) -> DataLoader:
    if train and len(sampler) < batch_size:
        raise ValueError(f"the training set gives {len(sampler)} samples per rank, fewer than one batch of "
                         f"{batch_size}")
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available(), drop_last=train, collate_fn=collate_fn,
                      persistent_workers=False)
