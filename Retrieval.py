r"""ALBEF image-text retrieval: fine-tune (ITC with same-image positives + ITM) and evaluate (ITC top-k, ITM re-rank).

    torchrun --nproc_per_node=8 Retrieval.py --config configs/Retrieval_coco.yaml --output_dir output/Retrieval_coco \
        --checkpoint ALBEF.pth
    python Retrieval.py ... --evaluate            # evaluate only (zero-shot or a fine-tuned checkpoint)
    python Retrieval.py --config configs/Retrieval_tiny.yaml --output_dir output/retrieval_demo \
        --checkpoint output/demo/checkpoint_05.pth --device cpu
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

import torch

from dataset import CaptionCollator
from dataset.caption_dataset import RetrievalEvalDataset, RetrievalTrainDataset
from dataset.images import DEFAULT_MAX_IMAGE_PIXELS, check_image_options
from dataset.transforms import AugmentConfig, eval_transform, train_transform
from engine.checkpoint import atomic_save
from engine.recipe import ModelKeys, add_resume_arg, base_parser, make_trainer, ramped_alpha, run_cli, setup_run
from engine.retrieval import check_rerank, itm_rerank_scores, recall_metrics
from engine.trainer import TrainOptions, print0
from models.albef import ALBEFRetrieval
from models.convert import load_checkpoint
from models.pretrained import load_bert_weights
from optim import OptimizerConfig
from scheduler import SchedulerConfig
from utils import distributed as du
from utils.config import to_dict


@dataclass
class RetrievalConfig(ModelKeys, TrainOptions):
    """``configs/Retrieval_{coco,flickr}.yaml``: the original keys, then the keys this framework adds."""

    train_file: Union[str, List[str]] = field(default_factory=list)
    val_file: Optional[str] = None
    test_file: Optional[str] = None
    image_root: Optional[str] = None
    image_res: int = 384
    batch_size_train: int = 32
    batch_size_test: int = 64
    k_test: int = 256  # ITM re-rank candidates per query
    alpha: float = 0.4
    distill: bool = True
    warm_up: bool = True  # ramp alpha over the first epoch
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-5))
    scheduler: SchedulerConfig = field(default_factory=lambda: SchedulerConfig(
        epochs=5, min_lr=1e-6, warmup_lr=1e-5, warmup_epochs=1), metadata={"aliases": ["schedular"]})
    # ---- new keys
    # webdataset shards of retrieval_train-style records (python -m tools.make_shards) instead of train_file; each
    # record's image_id makes its captions positives of each other
    train_shards: Union[str, List[str], None] = None
    train_samples_per_epoch: Optional[int] = None  # with train_shards: samples per epoch over all ranks
    rerank_score: str = "itm"  # itm (the original) or itm+itc (BLIP)
    rerank_itc_weight: float = 1.0  # itm+itc: ITM logit + this x ITC similarity (1 = BLIP's sum)
    clamp_temp: bool = False  # clamp temp to [0.001, 0.5] as pre-training does (the original does not here)
    max_words: int = 30
    max_tokens: int = 30
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(crop_scale=[0.5, 1.0]))
    on_bad_image: str = "raise"  # training set only (val/test always raise); skip = use another record
    max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS  # bigger images are bad (PIL's default); null = no limit

    def __post_init__(self):
        super().__post_init__()
        check_image_options(self.on_bad_image, self.max_image_pixels)
        check_rerank(self.rerank_score, self.rerank_itc_weight)
        if self.train_shards and not (self.train_samples_per_epoch or 0) > 0:
            raise ValueError("train_samples_per_epoch (samples per epoch over all ranks) is required with train_shards")
        if self.k_test < 1 or self.batch_size_train < 2:
            raise ValueError("k_test must be >= 1 and batch_size_train >= 2")
        if self.tokenizer is None and self.text_encoder is None:
            raise ValueError("tokenizer must be given when text_encoder is null")


def parse_args(argv=None):
    p = base_parser(__doc__, "./configs/Retrieval_flickr.yaml", "output/Retrieval_flickr")
    p.add_argument("--evaluate", action="store_true", help="evaluate val/test only, no training")
    return add_resume_arg(p).parse_args(argv)


def evaluate(model, loader, dataset, tokenizer, device, cfg: RetrievalConfig, split: str, output_dir: str,
             save: bool) -> Dict[str, float]:
    scores = itm_rerank_scores(model, loader, dataset.text, tokenizer, device, cfg.k_test, cfg.max_tokens,
                               cfg.rerank_score, itc_weight=cfg.rerank_itc_weight)
    metrics = recall_metrics(scores["i2t"].numpy(), scores["t2i"].numpy(), dataset.txt2img, dataset.img2txt)
    print0(f"{split}: " + "  ".join(f"{k}: {v:.2f}" for k, v in metrics.items()))
    if save and du.is_main_process():
        atomic_save(scores, os.path.join(output_dir, f"score_matrix_{split}.pt"))
        with open(os.path.join(output_dir, f"eval_{split}.json"), "w") as f:
            json.dump(metrics, f, indent=2)
    return metrics


def main(argv=None) -> Dict[str, Dict[str, float]]:
    args = parse_args(argv)
    cfg, device, tokenizer = setup_run(RetrievalConfig, args)
    model = ALBEFRetrieval(cfg.albef_config(tokenizer, args.config), distill=cfg.distill, clamp_temp=cfg.clamp_temp)
    if args.checkpoint:  # a checkpoint provides every weight: no BERT download
        load_checkpoint(model, args.checkpoint, verbose=du.is_main_process())
    elif cfg.text_encoder:
        load_bert_weights(model.text_encoder, cfg.text_encoder)  # BertModel keys are the BERT body's
        model.copy_params()
    model.to(device)

    eval_sets = {}
    for split, path in (("val", cfg.val_file), ("test", cfg.test_file)):
        if path:
            ds = RetrievalEvalDataset(path, eval_transform(cfg.image_res), cfg.image_root, cfg.max_words,
                                      cfg.max_image_pixels)
            eval_sets[split] = (ds, torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size_test,
                                                                num_workers=min(cfg.num_workers, 4)))
    results: Dict[str, Dict[str, float]] = {}

    def run_eval(save: bool) -> Dict[str, float]:
        flat = {}
        for split, (ds, loader) in eval_sets.items():
            results[split] = evaluate(model, loader, ds, tokenizer, device, cfg, split, args.output_dir, save)
            flat.update({f"{split}_{k}": v for k, v in results[split].items()})
        return flat

    if args.evaluate:
        flat = run_eval(save=True)
        if du.is_main_process():
            with open(os.path.join(args.output_dir, "log.txt"), "a") as f:
                f.write(json.dumps({**flat, "epoch": 0}) + "\n")
        du.cleanup()
        return results

    dataset = None  # with train_shards, make_trainer streams the shards (idx from each record's image_id)
    if not cfg.train_shards:
        dataset = RetrievalTrainDataset(cfg.train_file, train_transform(cfg.image_res, cfg.augment), cfg.image_root,
                                        cfg.max_words, cfg.on_bad_image, cfg.max_image_pixels)
        print0(f"data: {len(dataset)} captions of {len(dataset.img_ids)} images")
    trainer, loader, sampler = make_trainer(args, cfg, model, dataset, cfg.batch_size_train,
                                            CaptionCollator(tokenizer, cfg.max_tokens), device,
                                            shard_id_key="image_id")

    def train_step(module, batch, ctx):
        alpha = ramped_alpha(cfg.alpha, cfg.warm_up, ctx)
        return module(batch["image"], batch["input_ids"], batch["attention_mask"], batch["idx"], alpha=alpha)

    best = {"r_mean": -1.0, "epoch": -1}
    best_split = "val" if "val" in eval_sets else "test"
    if args.resume and os.path.exists(os.path.join(args.output_dir, f"eval_{best_split}.json")):
        with open(os.path.join(args.output_dir, f"eval_{best_split}.json")) as f:
            saved = json.load(f)  # the best of the run before the resume
        best.update(r_mean=saved["r_mean"], epoch=saved.get("epoch", -1))

    def after_epoch(epoch: int) -> Dict[str, float]:
        flat = run_eval(save=False)
        val = results.get("val", results.get("test"))
        if val is not None and val["r_mean"] > best["r_mean"] and du.is_main_process():
            best.update(r_mean=val["r_mean"], epoch=epoch)
            atomic_save({"model": model.state_dict(), "config": to_dict(cfg), "epoch": epoch},
                        os.path.join(args.output_dir, "checkpoint_best.pth"))
            for split in results:
                with open(os.path.join(args.output_dir, f"eval_{split}.json"), "w") as f:
                    json.dump({**results[split], "epoch": epoch}, f, indent=2)
        return flat

    trainer.fit(loader, train_step, cfg.scheduler.epochs, sampler=sampler, after_epoch=after_epoch,
                batch_size_of=lambda b: len(b["image"]), exit_after_epochs=args.exit_after_epochs)
    print0(f"best epoch: {best['epoch']} (val r_mean {best['r_mean']:.2f})")
    du.cleanup()
    return results


if __name__ == "__main__":
    run_cli(main)
