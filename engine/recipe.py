"""Pieces every task script shares: command line, seeding, the model-shape config keys, tokenizer + model config."""
from __future__ import annotations

import argparse
import os
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, Optional, Union

import numpy as np
import torch

from models.albef import ALBEFConfig
from models.bert import BertConfig
from models.vit import VisionConfig
from utils.config import ConfigError

if TYPE_CHECKING:
    from dataset.shards import ShardSample


@dataclass
class ModelKeys:
    """Config keys that fix the model's shape (original names first)."""

    bert_config: Union[str, Dict[str, Any]] = "configs/config_bert.json"  # path to a BERT JSON, or inline
    image_res: int = 256
    vision_width: int = 768
    embed_dim: int = 256
    temp: float = 0.07
    queue_size: int = 65536
    momentum: float = 0.995
    itm_negatives: str = "local"  # ITM hard negatives from this rank's batch (original) or all ranks' (global)
    vit: VisionConfig = field(default_factory=VisionConfig)  # image encoder size (default ViT-B/16)
    text_encoder: Optional[str] = "bert-base-uncased"  # HF name or folder with BERT weights; null = random
    tokenizer: Optional[str] = None  # HF name or folder; default: text_encoder

    def bert(self, source: str) -> BertConfig:
        if isinstance(self.bert_config, dict):
            return BertConfig.from_dict(self.bert_config, f"{source}: bert_config")
        if not os.path.isfile(self.bert_config):
            raise ConfigError(f"{source}: bert_config file {self.bert_config} does not exist")
        return BertConfig.from_json_file(self.bert_config)

    def albef_config(self, tokenizer, source: str, mlm_probability: float = 0.15) -> ALBEFConfig:
        bert = self.bert(source)
        if len(tokenizer) > bert.vocab_size:
            raise ConfigError(f"{source}: the tokenizer has {len(tokenizer)} entries, more than bert_config "
                              f"vocab_size {bert.vocab_size}")
        try:
            return ALBEFConfig(image_res=self.image_res, vision_width=self.vision_width, embed_dim=self.embed_dim,
                               temp=self.temp, mlm_probability=mlm_probability, queue_size=self.queue_size,
                               momentum=self.momentum, itm_negatives=self.itm_negatives, vit=self.vit, bert=bert,
                               pad_token_id=tokenizer.pad_token_id,
                               cls_token_id=tokenizer.cls_token_id, mask_token_id=tokenizer.mask_token_id)
        except ValueError as e:
            raise ConfigError(f"{source}: {e}") from e


def base_parser(description: str, config: str, output_dir: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=config)
    p.add_argument("--output_dir", default=output_dir)
    p.add_argument("--checkpoint", default="", help="initialise the model from these weights")
    p.add_argument("--text_encoder", default=None, help="overrides the config's text_encoder")
    p.add_argument("--device", default="cuda")
    p.add_argument("--seed", default=42, type=int)
    p.add_argument("--options", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides")
    # accepted for compatibility with the original's launch lines; torchrun's environment decides
    p.add_argument("--world_size", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dist_url", default=None, help=argparse.SUPPRESS)
    p.add_argument("--distributed", default=None, help=argparse.SUPPRESS)
    # torch.distributed.launch without --use_env passes it (and sets LOCAL_RANK, which is what is read)
    p.add_argument("--local-rank", "--local_rank", dest="local_rank", default=None, help=argparse.SUPPRESS)
    return p


def add_resume_arg(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument("--resume", nargs="?", const="latest", default=None,
                   help="continue a run: a checkpoint path, or no value for the newest in --output_dir")
    p.add_argument("--resume_changes", choices=("refuse", "apply"), default="refuse",
                   help="on --resume with settings that differ from the checkpoint's: refuse (default, lists them) "
                        "or apply the new ones")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in an --output_dir that holds another run's checkpoints (deletes them)")
    p.add_argument("--exit_after_epochs", type=_positive_int, default=None,
                   help="stop after this many epochs of this run (time-limited jobs); resume later")
    return p


def ramped_alpha(alpha: float, warm_up: bool, ctx) -> float:
    """The distillation weight: ramped linearly from 0 over the first epoch when ``warm_up`` (the original's)."""
    if warm_up and ctx.epoch == 0:
        return alpha * min(1.0, ctx.step_in_epoch / ctx.steps_per_epoch)
    return alpha


def _yield_uint8_images(holder) -> None:
    """``normalize_on_device``: the training transform of ``holder`` (a data set or shard sample) without its
    ``ToDtype`` + ``Normalize`` steps; the trainer applies them on the device."""
    from dataset.transforms import uint8_output

    try:
        holder.transform = uint8_output(getattr(holder, "transform", None))
    except ValueError as e:
        raise ValueError(f"normalize_on_device: the training transform of {type(holder).__name__}: {e}") from e


def make_trainer(args: argparse.Namespace, cfg, model, dataset, batch_size: int, collate_fn, device,
                 shard_id_key: Optional[str] = None, shard_sample: Optional[ShardSample] = None):
    """The training half every script shares: a resumable epoch-seeded sampler and loader over ``dataset`` (every
    sample under its own random stream, see ``dataset/sampling.py``) -- or, when ``cfg.train_shards`` is set (and
    ``dataset`` is None), a stream over webdataset shards (``dataset/shards.py``) -- the optimizer and per-step
    scheduler of ``cfg``, the :class:`~engine.trainer.Trainer` and ``--resume`` (if the script has it).

    The shards' samples: ``shard_sample``, the task's :class:`dataset.shards.ShardSample` with its transform
    (e.g. ``VEShardSample(train_transform(...), cfg.max_words)``), the same samples as the task's JSON data set
    so that ``collate_fn`` serves both; by default pre-training samples (``train_transform(cfg.image_res,
    cfg.augment)``, ``cfg.max_words``), with ``idx`` from the json member ``shard_id_key`` (retrieval).

    With ``cfg.normalize_on_device`` the training transform (``dataset.transform``, or the shard sample's) loses
    its ``ToDtype`` + ``Normalize`` steps (:func:`dataset.transforms.uint8_output`; the object is changed in
    place): the loader yields uint8 images and the trainer normalises them on the device, to the same floats.
    Returns ``(trainer, loader, sampler)``."""
    from dataset.images import BadImagePolicy, MissingDataError
    from dataset.sampling import create_train_loader
    from engine.resume import resolve_resume_path
    from engine.trainer import Trainer, print0
    from optim import create_optimizer
    from scheduler import create_scheduler
    from utils import distributed as du
    from utils.config import defaults_of, save_config, to_dict

    shards = getattr(cfg, "train_shards", None)
    run_info = {"seed": args.seed}
    try:
        if shards:
            from dataset.shards import PretrainSample, create_shard_loader
            from dataset.transforms import train_transform

            if shard_sample is None:
                shard_sample = PretrainSample(train_transform(cfg.image_res, cfg.augment), cfg.max_words, shard_id_key)
        if getattr(cfg, "normalize_on_device", False):
            _yield_uint8_images(shard_sample if shards else dataset)
        if shards:
            loader, sampler = create_shard_loader(
                shards, None, None, batch_size, cfg.num_workers, args.seed, cfg.train_samples_per_epoch, collate_fn,
                persistent_workers=cfg.persistent_workers, prefetch_factor=cfg.prefetch_factor,
                max_image_pixels=cfg.max_image_pixels, sample=shard_sample)
            run_info["num_workers"] = cfg.num_workers  # each worker streams its own sequence of the shards
            n_samples = f"{cfg.train_samples_per_epoch} samples per epoch streamed from {shards}"
            if getattr(cfg, "train_file", None):
                print0(f"note: train_shards is set, so the training data are the shards; train_file "
                       f"{cfg.train_file} is not read for training")
        else:
            if isinstance(dataset, BadImagePolicy):
                dataset.check_image_sample()  # a wrong image_root: named now, not after every worker tried every record
            loader, sampler = create_train_loader(dataset, batch_size, cfg.num_workers, args.seed, collate_fn,
                                                  cfg.persistent_workers, cfg.prefetch_factor)
            n_samples = f"{len(dataset)} training samples"
    except MissingDataError:
        raise
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"{args.config}: {e}") from e
    global_batch = batch_size * du.get_world_size()
    if hasattr(model, "image_queue") and model.image_queue.shape[1] % global_batch:
        raise ConfigError(f"{args.config}: queue_size {model.image_queue.shape[1]} is not a multiple of the global "
                          f"batch size {global_batch} ({batch_size} per rank x {du.get_world_size()} ranks), as the "
                          "original requires")
    steps = len(loader) // cfg.accum_steps
    if steps < 1:
        raise ConfigError(f"{args.config}: accum_steps {cfg.accum_steps} is more than the {len(loader)} batches per "
                          "epoch per rank")
    print0(f"data: {n_samples}, {steps} steps per epoch per rank, batch {batch_size} per rank"
           + (f" x {cfg.accum_steps} micro-batches" if cfg.accum_steps > 1 else "")
           + f", {global_batch * cfg.accum_steps} per optimizer step")
    optimizer = create_optimizer(model, cfg.optimizer)
    scheduler = create_scheduler(cfg.scheduler, optimizer, steps)
    trainer = Trainer(model, optimizer, scheduler, cfg, args.output_dir, to_dict(cfg), device, steps_per_epoch=steps,
                      batch_size=batch_size, run_info=run_info, config_defaults=defaults_of(type(cfg)))
    resume = getattr(args, "resume", None)
    if resume:
        path = resolve_resume_path(resume, args.output_dir)
        if path is None:
            print0(f"--resume: no checkpoint in {args.output_dir}, starting from scratch")
        else:
            trainer.resume(path, apply_changes=getattr(args, "resume_changes", "refuse") == "apply",
                           rebuild_scheduler=lambda: create_scheduler(cfg.scheduler, optimizer, steps))
    if du.is_main_process():
        save_config(cfg, os.path.join(args.output_dir, "config.yaml"))
    return trainer, loader, sampler


def overrides_of(args: argparse.Namespace) -> list:
    return list(args.options) + ([f"text_encoder={args.text_encoder}"] if args.text_encoder else [])


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def check_output_dir(args: argparse.Namespace) -> None:
    """``--output_dir`` must be a folder (or not exist yet). ``--evaluate`` needs ``--checkpoint`` (else the model
    would be random) and refuses a folder that holds a training run's checkpoints: it would overwrite that run's
    ``config.yaml``, ``log.txt`` and result files."""
    from engine import checkpoint as ckpt
    from engine.resume import OutputDirError

    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise OutputDirError(f"--output_dir {args.output_dir} is a file, not a folder")
    if not getattr(args, "evaluate", False):
        return
    if not getattr(args, "checkpoint", None):
        raise ConfigError("--evaluate needs --checkpoint, the model to evaluate (without it the weights are random)")
    existing = ckpt.run_checkpoints(args.output_dir) if os.path.isdir(args.output_dir) else []
    if existing:
        raise OutputDirError(f"{args.output_dir} holds a training run ({os.path.basename(existing[-1])}, ...): "
                             "--evaluate would overwrite its config.yaml, log.txt and results; evaluate into another "
                             "--output_dir")


def check_annotation_files(cfg, training: bool) -> None:
    """Raise :class:`dataset.images.MissingDataError` for a ``train_file`` (when training from JSON), ``val_file`` or
    ``test_file`` that does not exist: named before the model is built, not minutes into the start-up."""
    from dataset.caption_dataset import missing_annotation_file
    from dataset.images import MissingDataError

    keys = (("train_file",) if training and not getattr(cfg, "train_shards", None) else ()) + ("val_file", "test_file")
    for key in keys:
        value = getattr(cfg, key, None)
        for path in [value] if isinstance(value, str) else list(value or []):
            if not os.path.isfile(path):
                raise MissingDataError(missing_annotation_file(path, key))


def setup_run(cls, args: argparse.Namespace):
    """Config (validated, overrides applied) -> process group -> seed -> output folder with the resolved
    ``config.yaml`` -> tokenizer. Returns ``(cfg, device, tokenizer)``; config errors surface before any process
    group is created."""
    from models.tokenizer import load_tokenizer
    from utils import distributed as du
    from utils.config import load_config, save_config

    cfg = load_config(cls, args.config, overrides_of(args))
    check_output_dir(args)
    check_annotation_files(cfg, training=not getattr(args, "evaluate", False))
    info = du.init_distributed(args.device, timeout_minutes=getattr(cfg, "dist_timeout_minutes", 30.0))
    set_seed(args.seed)  # the same on every rank: freshly initialised weights (e.g. task heads) agree across ranks
    os.makedirs(args.output_dir, exist_ok=True)
    if hasattr(args, "resume") and not getattr(args, "evaluate", False):  # a training run
        from engine.resume import prepare_output_dir

        # before anything is written: a refused run leaves the other run's folder as it was
        prepare_output_dir(args.output_dir, resuming=bool(args.resume), overwrite=getattr(args, "overwrite", False))
    elif du.is_main_process():  # evaluation: training runs write config.yaml once the trainer has accepted it
        save_config(cfg, os.path.join(args.output_dir, "config.yaml"))
    # The tokenizer comes first: the model's vocabulary and special-token ids come from it.
    return cfg, info.device, load_tokenizer(cfg.tokenizer or cfg.text_encoder)


def run_cli(main) -> None:
    """Run a script's ``main()``. A config or resume error, a malformed data file or record, missing weights, data
    files or evaluation images, or a checkpoint that does not fit the model print one line naming the file and key
    (or record) and exit with 2; a stop signal (SIGTERM / SIGUSR1) exits with ``EXIT_PREEMPTED`` (75) once its
    checkpoint is written."""
    import sys

    from dataset.images import DataError, MissingDataError
    from engine.checkpoint import CheckpointWriteError
    from engine.resume import OutputDirError, ResumeError
    from engine.trainer import EXIT_PREEMPTED, Preempted
    from models.layouts import CheckpointError
    from models.pretrained import MissingWeightsError
    from utils import distributed as du

    try:
        main()
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(2)
    except ResumeError as e:
        print(f"{'output_dir' if isinstance(e, OutputDirError) else 'resume'} error: {e}", file=sys.stderr)
        du.cleanup()
        sys.exit(2)
    except (MissingWeightsError, MissingDataError) as e:
        print(f"missing file: {e}", file=sys.stderr)
        du.cleanup()
        sys.exit(2)
    except DataError as e:
        print(f"data error: {e}", file=sys.stderr)
        du.cleanup()
        sys.exit(2)
    except CheckpointError as e:  # unreadable, another task's layout, other sizes
        print(f"checkpoint error: {e}", file=sys.stderr)
        du.cleanup()
        sys.exit(2)
    except CheckpointWriteError as e:  # disk full, read-only folder: the run stops, its earlier checkpoints stand
        print(f"checkpoint write error: {e}", file=sys.stderr)
        du.cleanup()
        sys.exit(2)
    except Preempted:
        du.cleanup()
        sys.exit(EXIT_PREEMPTED)
