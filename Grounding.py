r"""ALBEF weakly-supervised visual grounding (RefCOCO+): retrieval fine-tuning on (image, referring expression)
pairs, then the proposal with the most Grad-CAM heat per expression (paper Table 5; the original protocol).

    torchrun --nproc_per_node=8 Grounding.py --config configs/Grounding.yaml --output_dir output/RefCOCO+ \
        --checkpoint ALBEF.pth [--gradcam_mode itm|itc] [--block_num 8]
    python Grounding.py --config configs/Grounding.yaml --checkpoint refcoco.pth --evaluate   # the paper's numbers
    python Grounding.py --config configs/Grounding_tiny.yaml --output_dir output/grounding_demo \
        --checkpoint output/demo/checkpoint_05.pth --device cpu                                # the synthetic world

Training is retrieval fine-tuning (ITC with same-image positives + ITM, momentum distillation) on the shared
engine. Evaluation (after every epoch, or alone with ``--evaluate``) computes each expression's Grad-CAM
(``models.gradcam.grounding_cam``: ``itm`` = cross-attention of BERT layer ``block_num`` x relu(gradient of the
ITM match logit); ``itc`` = the image [CLS] attention row of ViT block ``block_num`` x relu(gradient of the ITC
similarity)), sharded over ranks and merged in record order on rank 0, which scores every proposal of the image
in ``det_file`` (heat inside the box / sqrt(area), on the map upsampled bicubically to the image size) and counts
the top proposal correct at IoU >= 0.5 with the REFER ground-truth box (``engine.grounding``). Accuracies per split
(``val_d``, ``testA_d``, ``testB_d``) go to log.txt and ``eval.json``, every expression's prediction to
``results_<split>.json``, and the best epoch by ``val_d`` to ``checkpoint_best.pth``. An expression whose image
has no proposal with positive heat is a miss (counted as ``no_positive``; the original reused the previous
expression's box there).

Training can stream webdataset shards instead of ``train_file``: write them with ``python -m tools.make_shards
--task grounding --ann refcoco+_train.json --image_root ... --out shards/refcoco-%06d.tar`` and set
``train_shards`` (the pattern it prints) and ``train_samples_per_epoch`` (samples per epoch over all ranks); the
same-image positives then come from each record's image file name (``dataset.grounding.GroundingShardSample``).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Union

import torch

from dataset.grounding import GroundingCollator, GroundingDataset, GroundingShardSample, Refer, load_dets
from dataset.images import DEFAULT_MAX_IMAGE_PIXELS, check_image_options
from dataset.transforms import AugmentConfig, eval_transform, grounding_train_transform
from engine.checkpoint import atomic_save
from engine.grounding import grounding_accuracy
from engine.recipe import ModelKeys, add_resume_arg, base_parser, make_trainer, ramped_alpha, run_cli, setup_run
from engine.trainer import TrainOptions, print0
from models.albef import ALBEFRetrieval
from models.convert import load_checkpoint
from models.gradcam import grounding_cam
from models.pretrained import load_bert_weights
from optim import OptimizerConfig
from scheduler import SchedulerConfig
from utils import distributed as du
from utils.config import ConfigError, to_dict

SPLITS = ("val", "testA", "testB")


@dataclass
class GroundingConfig(ModelKeys, TrainOptions):
    """``configs/Grounding.yaml``: the original keys, then the keys this framework adds."""

    train_file: Union[str, List[str]] = field(default_factory=list)
    test_file: Union[str, List[str]] = field(default_factory=list)  # val + test expressions (splits from REFER)
    refcoco_data: str = "data"  # REFER root: <root>/refcoco+/refs(unc).p and <root>/refcoco+/instances.json
    det_file: str = "data/refcoco+/dets.json"  # proposals per image: {str(image_id): [[x, y, w, h, ...], ...]}
    coco_file: Optional[str] = None  # loaded by the original, never used: accepted and ignored
    image_root: Optional[str] = None
    image_res: int = 384
    batch_size: int = 32  # training and evaluation batch per rank
    alpha: float = 0.4
    distill: bool = True
    warm_up: bool = True
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=1e-5))
    scheduler: SchedulerConfig = field(default_factory=lambda: SchedulerConfig(
        epochs=5, min_lr=1e-6, warmup_lr=1e-5, warmup_epochs=1), metadata={"aliases": ["schedular"]})
    # ---- new keys
    # webdataset shards of the train records (python -m tools.make_shards --task grounding) instead of train_file:
    # brace pattern, several joined by ::, or a list
    train_shards: Union[str, List[str], None] = None
    train_samples_per_epoch: Optional[int] = None  # with train_shards: samples per epoch over all ranks
    gradcam_mode: str = "itm"  # itm (the paper's best) or itc; --gradcam_mode overrides
    block_num: int = 8  # BERT layer (itm) or ViT block (itc) of the Grad-CAM; --block_num overrides
    score_alpha: float = 0.5  # proposal score = heat inside / area ** score_alpha (the original's alpha=0.5)
    clamp_temp: bool = False
    max_words: int = 30
    max_tokens: int = 30
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # crop_scale unused: grounding resizes
    on_bad_image: str = "raise"  # training set only (evaluation always raises)
    max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS

    def __post_init__(self):
        super().__post_init__()
        check_image_options(self.on_bad_image, self.max_image_pixels)
        if self.gradcam_mode not in ("itm", "itc"):
            raise ValueError(f"gradcam_mode must be 'itm' or 'itc', got {self.gradcam_mode!r}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2 (ITM negatives come from the batch)")
        if self.tokenizer is None and self.text_encoder is None:
            raise ValueError("tokenizer must be given when text_encoder is null")
        if not self.test_file:
            raise ValueError("test_file (the val/test expressions) is required")
        if self.train_shards and not (self.train_samples_per_epoch or 0) > 0:
            raise ValueError("train_samples_per_epoch (samples per epoch over all ranks) is required with train_shards")


def parse_args(argv=None):
    p = base_parser(__doc__, "./configs/Grounding.yaml", "output/RefCOCO+")
    p.add_argument("--gradcam_mode", choices=("itm", "itc"), default=None, help="overrides the config's")
    p.add_argument("--block_num", type=int, default=None, help="overrides the config's")
    p.add_argument("--evaluate", action="store_true", help="evaluate only, no training")
    return add_resume_arg(p).parse_args(argv)


def check_block(model: ALBEFRetrieval, mode: str, block_num: int) -> None:
    """Refuse a ``block_num`` that the Grad-CAM mode cannot use, before any training."""
    if mode == "itm":
        bert = model.text_encoder.config
        if not bert.fusion_layer <= block_num < bert.num_hidden_layers:
            raise ConfigError(f"block_num {block_num}: gradcam_mode itm needs a fusion layer of the BERT, "
                              f"{bert.fusion_layer}..{bert.num_hidden_layers - 1}")
    else:
        depth = len(model.visual_encoder.blocks)
        if not 0 <= block_num < depth:
            raise ConfigError(f"block_num {block_num}: gradcam_mode itc needs a ViT block, 0..{depth - 1}")


def compute_cams(model, loader, device, mode: str, block_num: int) -> List[Dict[str, Any]]:
    """``[{'index', 'ref_id', 'cam'}]`` for this rank's records (``index``: the record's position in the data set);
    the model is put in eval mode (no dropout) and restored."""
    was_training = model.training
    model.eval()
    out: List[Dict[str, Any]] = []
    try:
        for batch in loader:
            cams = grounding_cam(model, batch["image"].to(device, non_blocking=True), batch["input_ids"].to(device),
                                 batch["attention_mask"].to(device), mode, block_num).float().cpu()
            for i, ref_id, cam in zip(batch["index"].tolist(), batch["ref_id"].tolist(), cams):
                # a copy, not a view: gathering a view would pickle the whole batch's storage with every record
                out.append({"index": i, "ref_id": ref_id, "cam": cam.clone()})
    finally:
        model.train(was_training)
    return out


class _Indexed(torch.utils.data.Dataset):
    """This rank's share (records ``rank, rank + world, ...``) with each item's position in the whole set."""

    def __init__(self, dataset, rank: int, world: int):
        self.dataset, self.indices = dataset, list(range(rank, len(dataset), world))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Dict[str, Any]:
        return {**self.dataset[self.indices[i]], "index": self.indices[i]}


class _IndexedCollator(GroundingCollator):
    def __call__(self, samples):
        batch = super().__call__(samples)
        batch["index"] = torch.tensor([s["index"] for s in samples], dtype=torch.long)
        return batch


def evaluate(model, loader, refer: Refer, dets, device, cfg: GroundingConfig, mode: str, block_num: int
             ) -> tuple:
    """Every rank computes its share of the CAMs; rank 0 merges them in record order and scores them.
    Returns ``(metrics, predictions)`` on rank 0, ``(None, None)`` elsewhere."""
    mine = compute_cams(model, loader, device, mode, block_num)
    parts = du.all_gather_object(mine)
    if not du.is_main_process():
        return None, None
    results = sorted((r for part in parts for r in part), key=lambda r: r["index"])
    metrics, predictions = grounding_accuracy(results, refer, dets, cfg.score_alpha)
    for pred, res in zip(predictions, results):
        pred["index"] = res["index"]
    return metrics, predictions


def main(argv=None) -> Dict[str, Any]:
    args = parse_args(argv)
    cfg, device, tokenizer = setup_run(GroundingConfig, args)
    mode = args.gradcam_mode or cfg.gradcam_mode
    block_num = cfg.block_num if args.block_num is None else args.block_num
    refer = Refer(cfg.refcoco_data)
    dets = load_dets(cfg.det_file)
    model = ALBEFRetrieval(cfg.albef_config(tokenizer, args.config), distill=cfg.distill, clamp_temp=cfg.clamp_temp)
    check_block(model, mode, block_num)
    if args.checkpoint:  # ALBEF.pth (pre-training layout) or refcoco.pth (a raw retrieval-layout state dict)
        load_checkpoint(model, args.checkpoint, verbose=du.is_main_process())
    elif cfg.text_encoder:
        load_bert_weights(model.text_encoder, cfg.text_encoder)
        model.copy_params()
    model.to(device)

    test_set = GroundingDataset(cfg.test_file, eval_transform(cfg.image_res), cfg.image_root, cfg.max_words,
                                mode="eval", max_image_pixels=cfg.max_image_pixels).require_images()
    ref_ids = sorted({r["ref_id"] for r in test_set.records})
    missing = [r for r in ref_ids if r not in refer.refs]
    if missing:
        raise ConfigError(f"{len(missing)} ref_id(s) of test_file are not in refcoco_data {cfg.refcoco_data} "
                          f"(e.g. {missing[:3]})")
    bare = sorted({refer.image_id(r) for r in ref_ids if not dets.get(str(refer.image_id(r)))})
    if bare:
        print0(f"warning: {cfg.det_file} (det_file) has no proposals for {len(bare)} test image(s) (e.g. "
               f"{bare[:3]}); their expressions count as misses")
    counts = {s: sum(refer.split(r["ref_id"]) == s for r in test_set.records) for s in SPLITS}
    print0(f"evaluation: {len(test_set)} expressions ({', '.join(f'{s} {n}' for s, n in counts.items())}); "
           f"Grad-CAM {mode}, block {block_num}")
    test_loader = torch.utils.data.DataLoader(
        _Indexed(test_set, du.get_rank(), du.get_world_size()), batch_size=cfg.batch_size,
        num_workers=min(cfg.num_workers, 4),
        # padded to max_tokens, not to the batch's longest text: the itm map is a mean over the padded length, so
        # this keeps every expression's scores independent of its batch (and of the number of ranks); the chosen
        # boxes are the original's either way (a per-sample scale)
        collate_fn=_IndexedCollator(tokenizer, cfg.max_tokens, padding="max_length"))

    def write_eval(metrics: Dict[str, Any], predictions: List[dict], epoch: int, name: str = "eval.json") -> None:
        with open(os.path.join(args.output_dir, name), "w") as f:
            json.dump({**metrics, **{f"chance_{s}": chance[s] for s in SPLITS}, "epoch": epoch,
                       "gradcam_mode": mode, "block_num": block_num}, f, indent=2)
        for split in SPLITS:
            with open(os.path.join(args.output_dir, f"results_{split}.json"), "w") as f:
                json.dump([p for p in predictions if p["split"] == split], f)

    # chance: a uniformly random proposal of the expression's image (mean of 1 / proposals, per split)
    chance = {s: [] for s in SPLITS}
    for rec in test_set.records:
        split = refer.split(rec["ref_id"])
        if split in chance:
            chance[split].append(1 / max(1, len(dets.get(str(refer.image_id(rec["ref_id"])), ()))))
    chance = {s: sum(v) / len(v) if v else math.nan for s, v in chance.items()}

    def report(metrics: Dict[str, Any]) -> str:
        return "  ".join(f"{s}: {100 * metrics[f'{s}_d']:.2f} (chance {100 * chance[s]:.2f})" for s in SPLITS
                         if not math.isnan(metrics[f"{s}_d"]))

    if args.evaluate:
        metrics, predictions = evaluate(model, test_loader, refer, dets, device, cfg, mode, block_num)
        if du.is_main_process():
            print0(f"grounding accuracy (%): {report(metrics)}  (no positive proposal: {metrics['no_positive']})")
            write_eval(metrics, predictions, 0)
            with open(os.path.join(args.output_dir, "log.txt"), "a") as f:
                f.write(json.dumps({f"test_{k}": v for k, v in metrics.items()} | {"epoch": 0}) + "\n")
        du.cleanup()
        return metrics or {}

    transform = grounding_train_transform(cfg.image_res, cfg.augment)
    dataset = shard_sample = None  # with train_shards, make_trainer streams the shards
    if cfg.train_shards:
        shard_sample = GroundingShardSample(transform, cfg.max_words)
    else:
        dataset = GroundingDataset(cfg.train_file, transform, cfg.image_root, cfg.max_words, mode="train",
                                   on_bad_image=cfg.on_bad_image, max_image_pixels=cfg.max_image_pixels)
        print0(f"data: {len(dataset)} expressions of {len(dataset.img_ids)} images")
    trainer, loader, sampler = make_trainer(args, cfg, model, dataset, cfg.batch_size,
                                            GroundingCollator(tokenizer, cfg.max_tokens), device,
                                            shard_sample=shard_sample)

    def train_step(module, batch, ctx):
        alpha = ramped_alpha(cfg.alpha, cfg.warm_up, ctx)
        return module(batch["image"], batch["input_ids"], batch["attention_mask"], batch["idx"], alpha=alpha)

    best = {"val_d": -1.0, "epoch": -1}
    if args.resume and os.path.exists(os.path.join(args.output_dir, "eval.json")):
        with open(os.path.join(args.output_dir, "eval.json")) as f:
            saved = json.load(f)  # the best of the run before the resume
        best.update(val_d=saved["val_d"], epoch=saved.get("epoch", -1))
    final: Dict[str, Any] = {}

    def after_epoch(epoch: int) -> Dict[str, float]:
        metrics, predictions = evaluate(model, test_loader, refer, dets, device, cfg, mode, block_num)
        if not du.is_main_process():
            return {}
        print0(f"epoch {epoch} grounding accuracy (%): {report(metrics)}")
        final.clear()
        final.update(metrics)
        val = metrics["val_d"]
        if not math.isnan(val) and val > best["val_d"]:
            best.update(val_d=val, epoch=epoch)
            atomic_save({"model": model.state_dict(), "config": to_dict(cfg), "epoch": epoch},
                        os.path.join(args.output_dir, "checkpoint_best.pth"))
            write_eval(metrics, predictions, epoch)
        return {f"test_{k}": v for k, v in metrics.items()}

    trainer.fit(loader, train_step, cfg.scheduler.epochs, sampler=sampler, after_epoch=after_epoch,
                batch_size_of=lambda b: len(b["image"]), exit_after_epochs=args.exit_after_epochs)
    print0(f"best epoch: {best['epoch']} (val_d {100 * best['val_d']:.2f} %)")
    du.cleanup()
    return final


if __name__ == "__main__":
    run_cli(main)
