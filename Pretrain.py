"""ALBEF pre-training: ITC + ITM + MLM with momentum distillation.

    torchrun --nproc_per_node=8 Pretrain.py --config configs/Pretrain.yaml --output_dir output/pretrain
    python Pretrain.py --config configs/Pretrain_tiny.yaml --output_dir output/demo      # CPU demo
    python Pretrain.py ... --resume                       # continue from the newest checkpoint_XX.pth
    python Pretrain.py ... --options optimizer.lr=2e-4 batch_size=32
    python Pretrain.py ... --options itc_distill=false mlm_distill=false   # an ablation row (tools/ablation.py)
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field, replace
from typing import Callable, Dict, List, Optional, Union

import torch

from dataset import CaptionCollator
from dataset.caption_dataset import PretrainDataset, RetrievalEvalDataset
from dataset.images import DEFAULT_MAX_IMAGE_PIXELS, check_image_options
from dataset.transforms import AugmentConfig, eval_transform, train_transform
from dataset.caption_logic import consistent_at_1
from dataset.text import pre_caption
from engine.retrieval import check_rerank, itc_retrieval, itm_rerank_scores, recall_metrics, save_examples
from engine.recipe import ModelKeys, add_resume_arg, base_parser, make_trainer, ramped_alpha, run_cli, setup_run
from engine.trainer import TrainOptions, print0
from models.albef import ALBEF, check_objectives
from models.pretrained import load_bert_weights, load_vit_weights
from models.convert import load_checkpoint
from optim import OptimizerConfig
from scheduler import SchedulerConfig
from utils import distributed as du


@dataclass
class PretrainConfig(ModelKeys, TrainOptions):
    """``configs/Pretrain.yaml``: the original keys, then the keys this framework adds (see README)."""

    train_file: Union[str, List[str]] = field(default_factory=list)  # pre-training JSON file(s)
    batch_size: int = 64  # per GPU
    mlm_probability: float = 0.15
    alpha: float = 0.4  # distillation weight, ramped linearly over the first epoch
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig, metadata={"aliases": ["schedular"]})
    # ---- new keys
    vit_init: Optional[str] = None  # DeiT/timm weights: a .pth/.safetensors file or a timm name; null = random
    image_root: Optional[str] = None  # prefix for relative image paths (default: each JSON file's folder)
    max_words: int = 30  # caption words kept by pre_caption
    max_tokens: int = 25  # tokens per caption including [CLS]
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    on_bad_image: str = "skip"  # skip (another record is used; reported in batch["bad_images"]) or raise
    max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS  # bigger images are bad (PIL's default); null = no limit
    test_file: Optional[str] = None  # retrieval-format JSON evaluated zero-shot after every epoch
    test_every: int = 1  # evaluate test_file after every this many epochs (and always after the last)
    # zero-shot evaluation: null = ranked by ITC similarity alone; k = the original retrieval protocol (the top k
    # candidates of every image and text by ITC re-scored by the ITM head, rerank_score as in Retrieval.py)
    k_test: Optional[int] = None
    rerank_score: str = "itm"  # itm (the original) or itm+itc (BLIP)
    rerank_itc_weight: float = 1.0  # itm+itc: ITM logit + this x ITC similarity (1 = BLIP's sum)
    train_shards: Union[str, List[str], None] = None  # webdataset tar shards (python -m tools.make_shards) instead
    train_samples_per_epoch: Optional[int] = None  # with train_shards: samples per epoch over all ranks
    batch_size_test: int = 64
    # a synthetic world folder whose retrieval_test.json is test_file: the evaluation adds the retrieval ceilings
    # (what a perfect model gets, ceiling_*) and consistent_at_1 from the captions' logical forms
    test_world: Optional[str] = None
    examples: int = 0  # write examples.png: this many test captions with their top-5 images (0: none)
    # objectives (the paper's Table 1 ablation, ``python -m tools.ablation``); the defaults are the full model
    itc: bool = True  # false: no ITC loss (loss_ita 0); needs itm_hard_negatives: false
    itm_hard_negatives: bool = True  # false: ITM negatives uniform among the batch's other samples
    itc_distill: bool = True  # false: ITC on one-hot targets (alpha unused by ITC)
    mlm_distill: bool = True  # false: MLM on the masked ids only (alpha unused by MLM)

    def __post_init__(self):
        super().__post_init__()
        check_objectives(self.itc, self.itm_hard_negatives, self.itm_negatives)
        if not self.train_file and not self.train_shards:
            raise ValueError("train_file (a JSON file or a list of them) or train_shards is required")
        if self.train_shards and not (self.train_samples_per_epoch or 0) > 0:
            raise ValueError("train_samples_per_epoch (samples per epoch over all ranks) is required with train_shards")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2 (ITM needs an in-batch negative)")
        check_image_options(self.on_bad_image, self.max_image_pixels)
        if self.tokenizer is None and self.text_encoder is None:
            raise ValueError("tokenizer must be given when text_encoder is null")
        if self.k_test is not None and self.k_test < 1:
            raise ValueError(f"k_test must be a positive number of re-ranked candidates or null, got {self.k_test}")
        if not (isinstance(self.test_every, int) and self.test_every >= 1):
            raise ValueError(f"test_every must be a whole number of epochs >= 1, got {self.test_every!r}")
        check_rerank(self.rerank_score, self.rerank_itc_weight)


def parse_args(argv=None) -> argparse.Namespace:
    p = base_parser(__doc__, "./configs/Pretrain.yaml", "output/pretrain")
    add_resume_arg(p)
    args = p.parse_args(argv)
    if args.resume is not None and args.resume.lower() in ("false", "0", "no"):
        args.resume = None  # the original's `--resume False`
    elif args.resume is not None and args.resume.lower() in ("true", "1", "yes"):
        args.resume = "latest"
    return args


def build_model(cfg: PretrainConfig, tokenizer, source: str) -> ALBEF:
    # the objective switches are pre-training keys, not model-shape keys (ModelKeys): set on the model config here
    model_cfg = replace(cfg.albef_config(tokenizer, source, cfg.mlm_probability), itc=cfg.itc,
                        itm_hard_negatives=cfg.itm_hard_negatives, itc_distill=cfg.itc_distill,
                        mlm_distill=cfg.mlm_distill)
    model = ALBEF(model_cfg)
    if cfg.text_encoder:
        load_bert_weights(model.text_encoder, cfg.text_encoder)
        print0(f"text encoder initialised from {cfg.text_encoder}")
    if cfg.vit_init:
        load_vit_weights(model.visual_encoder, cfg.vit_init)
        print0(f"image encoder initialised from {cfg.vit_init}")
    model.copy_params()
    return model


def load_world_truth(world_dir: str, test_set) -> Optional[Dict]:
    """The test split's truth from a synthetic world: ``{'consistent': [texts, images] bool, 'ceilings': {...}}``,
    or None (with a warning) when the world's test split is not ``test_set``."""
    from dataset.caption_logic import ceiling_recall, world_consistency

    consistent, txt2img, img2txt, texts, _ = world_consistency(world_dir, "test")
    if [pre_caption(t, 10 ** 6) for t in texts] != [pre_caption(t, 10 ** 6) for t in test_set.text] \
            or len(img2txt) != len(test_set.images):
        print0(f"warning: test_world {world_dir}: its retrieval_test.json is not test_file; no ceilings")
        return None
    return {"consistent": consistent, "ceilings": ceiling_recall(consistent, txt2img, img2txt)}


def main(argv=None) -> Dict[str, float]:
    args = parse_args(argv)
    cfg, device, tokenizer = setup_run(PretrainConfig, args)
    model = build_model(cfg, tokenizer, args.config)
    if args.resume == "latest" and args.checkpoint:  # the original's `--checkpoint X --resume True`
        args.resume, args.checkpoint = args.checkpoint, ""
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint, verbose=du.is_main_process())  # pos-embeds resized, strict
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print0(f"model: {n_train / 1e6:.1f} M trainable parameters")

    dataset = None if cfg.train_shards else PretrainDataset(
        cfg.train_file, train_transform(cfg.image_res, cfg.augment), cfg.image_root, cfg.max_words, cfg.on_bad_image,
        cfg.max_image_pixels)  # with train_shards, make_trainer streams the shards
    # Optimizer and scheduler on the unwrapped model, before DDP (as the original).
    model.to(device)
    trainer, loader, sampler = make_trainer(args, cfg, model, dataset, cfg.batch_size,
                                            CaptionCollator(tokenizer, cfg.max_tokens), device)

    def train_step(module, batch, ctx):
        alpha = ramped_alpha(cfg.alpha, True, ctx)  # always ramped in pre-training
        return module(batch["image"], batch["input_ids"], batch["attention_mask"], alpha=alpha)

    results: Dict[str, float] = {}
    after_epoch: Optional[Callable[[int], Dict[str, float]]] = None
    world: Optional[Dict] = None  # the test split's truth (test_world)
    last_sim: Dict[str, object] = {}
    if cfg.test_file:
        test_set = RetrievalEvalDataset(cfg.test_file, eval_transform(cfg.image_res), cfg.image_root,
                                        cfg.max_words, cfg.max_image_pixels)
        shard = torch.utils.data.Subset(test_set, range(du.get_rank(), len(test_set), du.get_world_size()))
        test_loader = torch.utils.data.DataLoader(shard, batch_size=cfg.batch_size_test,
                                                  num_workers=min(cfg.num_workers, 2))

        world = load_world_truth(cfg.test_world, test_set) if cfg.test_world else None

        if cfg.k_test:  # the re-rank encodes every test image on every rank (as Retrieval.py) and shards the rows
            full_loader = torch.utils.data.DataLoader(test_set, batch_size=cfg.batch_size_test,
                                                      num_workers=min(cfg.num_workers, 2))

        def evaluate(epoch: int) -> Dict[str, float]:  # sharded: every rank encodes its share of the test set
            if (epoch + 1) % cfg.test_every and epoch + 1 < cfg.scheduler.epochs:
                return {}
            if cfg.k_test:
                scores = itm_rerank_scores(model, full_loader, test_set.text, tokenizer, device, cfg.k_test,
                                           cfg.max_tokens, cfg.rerank_score, return_sim=True,
                                           itc_weight=cfg.rerank_itc_weight)
                metrics = recall_metrics(scores["i2t"].numpy(), scores["t2i"].numpy(), test_set.txt2img,
                                         test_set.img2txt)
                sim = scores["itc"].numpy()
                itc = recall_metrics(sim, sim.T, test_set.txt2img, test_set.img2txt)
                ranked = scores["t2i"].numpy().T  # [images, texts], as sim
            else:
                metrics, sim = itc_retrieval(model, test_loader, test_set, tokenizer, device, return_sim=True)
                itc, ranked = None, sim
            if world is not None:
                metrics["consistent_at_1"] = consistent_at_1(ranked.T, world["consistent"])
            if itc is not None:
                metrics.update({f"itc_{k}": v for k, v in itc.items()})
            results.clear()
            results.update(metrics)
            last_sim["sim"] = ranked
            by = cfg.rerank_score.upper() if cfg.rerank_itc_weight == 1 else f"ITM + {cfg.rerank_itc_weight:g} x ITC"
            how = f"ITC, top {cfg.k_test} re-ranked by {by}" if cfg.k_test else "ITC"
            print0(f"zero-shot retrieval ({how}) on {cfg.test_file}: " +
                   "  ".join(f"{k}: {v:.2f}" for k, v in metrics.items() if not k.startswith("itc_")))
            if itc is not None:
                print0("  ITC alone: " + "  ".join(f"{k}: {v:.2f}" for k, v in itc.items()))
            return {f"test_{k}": v for k, v in metrics.items()}

        after_epoch = evaluate
        if not cfg.itc:
            print0("itc: false -- the zero-shot ITC retrieval below ranks by untrained (frozen) projections")

    finished = trainer.fit(loader, train_step, cfg.scheduler.epochs, sampler=sampler, after_epoch=after_epoch,
                           exit_after_epochs=args.exit_after_epochs)
    if finished and results and du.is_main_process():  # eval_test.json: the finished run's (tools/ablation.py)
        if world is not None:
            results.update(world["ceilings"])
        with open(os.path.join(args.output_dir, "eval_test.json"), "w") as f:
            json.dump(results, f, indent=2)
        for name, d in (("text->image", "img"), ("image->text", "txt")):
            line = "  ".join(f"R@{k} {results[f'{d}_r{k}']:.2f}" + (
                f" (ceiling {results[f'ceiling_{d}_r{k}']:.1f})" if f"ceiling_{d}_r{k}" in results else "")
                for k in (1, 5, 10))
            print0(f"{name}: {line}")
        if "consistent_at_1" in results:
            print0(f"consistent@1 {results['consistent_at_1']:.2f} (captions whose top image makes them true)")
        if cfg.examples and last_sim:
            path = os.path.join(args.output_dir, "examples.png")
            save_examples(last_sim["sim"], test_set, path, cfg.examples,
                          consistent=world["consistent"] if world is not None else None)
            print0(f"examples: {path}")
        print0(f"written to {os.path.join(args.output_dir, 'eval_test.json')}")
    du.cleanup()
    return results


if __name__ == "__main__":
    run_cli(main)
