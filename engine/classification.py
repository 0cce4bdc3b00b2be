"""What SNLI-VE and NLVR2 fine-tuning share: a config, exact sharded accuracy, and the fine-tune / evaluate recipe
(the original ``VE.py`` and ``NLVR.py`` differ only in their model and data set).

The recipe: evaluate val and test after every epoch, keep ``checkpoint_best.pth`` by val accuracy, log
``val_acc`` / ``test_acc`` (fractions, as the original) with the training losses in ``log.txt``; with
``--evaluate`` only evaluate and write ``eval_{val,test}.json``. Training reads ``train_file``, or streams
``train_shards`` (``python -m tools.make_shards --task ve|nlvr``) with ``train_samples_per_epoch``.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Union

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from dataset import CaptionCollator
from dataset.images import DEFAULT_MAX_IMAGE_PIXELS, check_image_options
from dataset.shards import ShardSample
from dataset.transforms import AugmentConfig, eval_transform, train_transform
from engine.checkpoint import atomic_save
from engine.recipe import ModelKeys, add_resume_arg, make_trainer, ramped_alpha
from engine.trainer import TrainOptions, print0
from optim import OptimizerConfig
from scheduler import SchedulerConfig
from utils import distributed as du
from utils.config import to_dict


@dataclass
class ClassifierConfig(ModelKeys, TrainOptions):
    """The original ``VE.yaml`` / ``NLVR.yaml`` keys, then the keys this framework adds."""

    train_file: Union[str, List[str]] = field(default_factory=list)
    val_file: Union[str, List[str], None] = None
    test_file: Union[str, List[str], None] = None
    image_root: Optional[str] = None
    image_res: int = 384
    batch_size_train: int = 32
    batch_size_test: int = 64
    batch_size: Optional[int] = None  # NLVR.yaml's single key: sets both batch sizes (image pairs)
    alpha: float = 0.4
    distill: bool = True
    warm_up: bool = False  # ramp alpha from 0 over the first epoch
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=2e-5))
    scheduler: SchedulerConfig = field(default_factory=lambda: SchedulerConfig(
        lr=2e-5, epochs=5, min_lr=1e-6, warmup_lr=1e-5, warmup_epochs=1), metadata={"aliases": ["schedular"]})
    eval_ema: bool = False  # in the original NLVR.yaml; never read there either
    # ---- new keys
    # webdataset shards of the train records (python -m tools.make_shards --task ve / --task nlvr) instead of
    # train_file: brace pattern, several joined by ::, or a list
    train_shards: Union[str, List[str], None] = None
    train_samples_per_epoch: Optional[int] = None  # with train_shards: samples per epoch over all ranks
    max_words: int = 30  # words kept by pre_caption
    max_tokens: int = 100  # tokenizer truncation (the original does not truncate these short sentences)
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(crop_scale=[0.5, 1.0]))
    on_bad_image: str = "raise"  # training set only (val/test always raise); skip = use another record
    max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS  # bigger images are bad (PIL's default); null = no limit

    def __post_init__(self):
        super().__post_init__()
        check_image_options(self.on_bad_image, self.max_image_pixels)
        if not self.train_file and not self.train_shards:
            raise ValueError("train_file (a JSON file or a list of them) or train_shards is required")
        if self.train_shards and not (self.train_samples_per_epoch or 0) > 0:
            raise ValueError("train_samples_per_epoch (samples per epoch over all ranks) is required with train_shards")
        if self.batch_size is not None:
            self.batch_size_train = self.batch_size_test = self.batch_size
        if self.batch_size_train < 1 or self.batch_size_test < 1:
            raise ValueError("batch sizes must be >= 1")
        if self.tokenizer is None and self.text_encoder is None:
            raise ValueError("tokenizer must be given when text_encoder is null")


def add_classifier_args(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--evaluate", action="store_true", help="evaluate val/test only, no training")
    return add_resume_arg(p)


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader, device: torch.device) -> float:
    """Exact accuracy over a loader whose data set is sharded across ranks without padding (see
    :func:`eval_loader`): correct and total counts are summed over ranks, so no sample is counted twice."""
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in loader:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}  # not bad_images
        pred = model.classify(batch["image"], batch["input_ids"], batch["attention_mask"]).argmax(-1)
        counts[0] += (pred == batch["label"]).sum()
        counts[1] += batch["label"].numel()
    counts = du.all_reduce_sum(counts)
    return (counts[0] / counts[1].clamp(min=1)).item()


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int, collate_fn) -> DataLoader:
    """This rank's share of ``dataset`` (every world-size-th sample), unpadded: the original's
    DistributedSampler repeated samples to even out the shards and counted them twice."""
    shard = Subset(dataset, range(du.get_rank(), len(dataset), du.get_world_size()))
    return DataLoader(shard, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_fn)


def run_classifier(args: argparse.Namespace, cfg: ClassifierConfig, model: nn.Module, tokenizer,
                   device: torch.device, make_dataset: Callable[[Union[str, List[str]], Callable], Dataset],
                   make_shard_sample: Callable[[Callable], ShardSample]) -> Dict[str, Dict[str, float]]:
    """Fine-tune (or with ``--evaluate`` only evaluate) ``model`` (weights already loaded) on ``cfg``'s files.

    ``make_dataset(files, transform)`` builds a data set whose samples carry ``label``;
    ``make_shard_sample(transform)`` the :class:`dataset.shards.ShardSample` giving the same samples from
    ``train_shards``. Returns ``{"val": {"acc": ...}, "test": {"acc": ...}}`` at the best epoch (or the
    evaluated model).
    """
    collate = CaptionCollator(tokenizer, min(cfg.max_tokens, model.cfg.bert.max_position_embeddings))
    eval_sets = {split: eval_loader(make_dataset(path, eval_transform(cfg.image_res)).set_image_options(
                                        "raise", cfg.max_image_pixels).require_images(), cfg.batch_size_test,
                                    min(cfg.num_workers, 4), collate)
                 for split, path in (("val", cfg.val_file), ("test", cfg.test_file)) if path}
    model.to(device)

    def run_eval() -> Dict[str, float]:
        flat = {f"{split}_acc": accuracy(model, loader, device) for split, loader in eval_sets.items()}
        print0("  ".join(f"{k}: {100 * v:.2f}%" for k, v in flat.items()))
        return flat

    def write_results(flat: Dict[str, float], epoch: int) -> Dict[str, Dict[str, float]]:
        results = {split: {"acc": flat[f"{split}_acc"], "epoch": epoch} for split in eval_sets}
        if du.is_main_process():
            for split, res in results.items():
                with open(os.path.join(args.output_dir, f"eval_{split}.json"), "w") as f:
                    json.dump(res, f, indent=2)
        return results

    if args.evaluate:
        flat = run_eval()
        results = write_results(flat, 0)
        if du.is_main_process():
            with open(os.path.join(args.output_dir, "log.txt"), "a") as f:
                f.write(json.dumps({**flat, "epoch": 0}) + "\n")
        return results

    transform = train_transform(cfg.image_res, cfg.augment)
    dataset = shard_sample = None  # with train_shards, make_trainer streams the shards (bad images skipped)
    if cfg.train_shards:
        shard_sample = make_shard_sample(transform)
    else:
        dataset = make_dataset(cfg.train_file, transform).set_image_options(cfg.on_bad_image, cfg.max_image_pixels)
    trainer, loader, sampler = make_trainer(args, cfg, model, dataset, cfg.batch_size_train, collate, device,
                                            shard_sample=shard_sample)

    def train_step(module, batch, ctx):
        alpha = ramped_alpha(cfg.alpha, cfg.warm_up, ctx)
        return module(batch["image"], batch["input_ids"], batch["attention_mask"], batch["label"], alpha=alpha)

    best: Dict[str, object] = {"acc": -1.0, "epoch": -1, "results": {}}
    best_path = os.path.join(args.output_dir, "checkpoint_best.pth")
    if args.resume and os.path.exists(os.path.join(args.output_dir, "eval_val.json")):
        with open(os.path.join(args.output_dir, "eval_val.json")) as f:
            saved = json.load(f)  # the best of the run before the resume
        best.update(acc=saved["acc"], epoch=saved.get("epoch", -1))

    def after_epoch(epoch: int) -> Dict[str, float]:
        flat = run_eval()
        score = flat.get("val_acc", flat.get("test_acc", 0.0))
        if score > best["acc"]:
            best.update(acc=score, epoch=epoch, results=write_results(flat, epoch))
            if du.is_main_process():
                atomic_save({"model": model.state_dict(), "config": to_dict(cfg), "epoch": epoch}, best_path)
        return flat

    trainer.fit(loader, train_step, cfg.scheduler.epochs, sampler=sampler, after_epoch=after_epoch,
                batch_size_of=lambda b: len(b["label"]), exit_after_epochs=args.exit_after_epochs)
    if best["epoch"] >= 0:
        print0(f"best epoch: {best['epoch']} (val acc {100 * best['acc']:.2f}%), saved {best_path}")
    return best["results"]
