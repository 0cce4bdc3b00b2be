r"""ALBEF for VQA: fine-tune the answer decoder, then rank the answer list for every test question.

    torchrun --nproc_per_node=8 VQA.py --config configs/VQA.yaml --output_dir output/vqa --checkpoint ALBEF.pth
    python VQA.py ... --checkpoint output/vqa/checkpoint_07.pth --evaluate      # answers only
    python VQA.py --config configs/VQA_tiny.yaml --output_dir output/demo_vqa \
        --checkpoint output/demo/checkpoint_05.pth --device cpu

Writes ``checkpoint_XX.pth`` every epoch (no validation split, as the original), then
``result/vqa_result_epoch{E}.json`` = ``[{"question_id", "answer"}]`` for the official server, and, when the test
file carries the annotators' answers, the VQA accuracy in ``eval_test.json`` and ``log.txt``.

Training can stream webdataset shards instead of ``train_file``: write them with ``python -m tools.make_shards
--task vqa --ann vqa_train.json --ann vg_qa.json --vqa_root ... --vg_root ... --out shards/vqa-%06d.tar`` and set
``train_shards`` (the pattern it prints) and ``train_samples_per_epoch`` (samples per epoch over all ranks).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Union

from torch.utils.data import DataLoader, Subset

from dataset.transforms import AugmentConfig, eval_transform, train_transform
from dataset.images import DEFAULT_MAX_IMAGE_PIXELS, check_image_options
from dataset.vqa_dataset import VQACollator, VQADataset, VQAShardSample
from engine.recipe import ModelKeys, add_resume_arg, base_parser, make_trainer, ramped_alpha, run_cli, setup_run
from engine.trainer import TrainOptions, print0
from engine.vqa import predict_answers
from models.convert import load_checkpoint
from models.pretrained import load_bert_weights
from models.vqa import ALBEFVQA
from optim import OptimizerConfig
from scheduler import SchedulerConfig
from utils import distributed as du
from utils.config import ConfigError


@dataclass
class VQAConfig(ModelKeys, TrainOptions):
    """``configs/VQA.yaml``: the original keys, then the keys this framework adds."""

    train_file: Union[str, List[str]] = field(default_factory=list)
    test_file: Union[str, List[str]] = field(default_factory=list)
    answer_list: str = "data/answer_list.json"
    vqa_root: Optional[str] = None
    vg_root: Optional[str] = None
    image_res: int = 384
    batch_size_train: int = 32
    batch_size_test: int = 16
    k_test: int = 128  # answers re-ranked per question
    alpha: float = 0.4
    distill: bool = True
    warm_up: bool = True
    eos: str = "[SEP]"
    optimizer: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=2e-5))
    scheduler: SchedulerConfig = field(default_factory=lambda: SchedulerConfig(
        lr=2e-5, epochs=8, min_lr=1e-6, warmup_lr=1e-5, warmup_epochs=4), metadata={"aliases": ["schedular"]})
    # ---- new keys
    # webdataset shards of the train records (python -m tools.make_shards --task vqa) instead of train_file: brace
    # pattern, several joined by ::, or a list
    train_shards: Union[str, List[str], None] = None
    train_samples_per_epoch: Optional[int] = None  # with train_shards: samples per epoch over all ranks
    text_decoder: Optional[str] = None  # BERT for the decoder without --checkpoint (default: text_encoder)
    max_ques_words: int = 30  # question words kept for training (50 at test, as the original)
    max_question_tokens: int = 25  # training-question truncation (the original's max_length=25)
    first_token_twice: bool = True  # the original's ranking score; false = sequence likelihood only (BLIP)
    augment: AugmentConfig = field(default_factory=lambda: AugmentConfig(crop_scale=[0.5, 1.0]))
    on_bad_image: str = "raise"  # training set only (the test questions always raise); skip = use another record
    max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS  # bigger images are bad (PIL's default); null = no limit

    def __post_init__(self):
        super().__post_init__()
        check_image_options(self.on_bad_image, self.max_image_pixels)
        if self.eos != "[SEP]":
            raise ValueError(f"eos must be '[SEP]' (the tokenizer's end token), got {self.eos!r}")
        if self.k_test < 1:
            raise ValueError("k_test must be >= 1")
        if self.train_shards and not (self.train_samples_per_epoch or 0) > 0:
            raise ValueError("train_samples_per_epoch (samples per epoch over all ranks) is required with train_shards")
        if self.tokenizer is None and self.text_encoder is None:
            raise ValueError("tokenizer must be given when text_encoder is null")


def load_answer_list(path: str) -> List[str]:
    if not os.path.isfile(path):
        raise ConfigError(f"answer_list file {path} does not exist")
    with open(path) as f:
        answers = json.load(f)
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a for a in answers):
        raise ConfigError(f"{path}: expected a JSON list of non-empty answer strings")
    return answers


def main(argv=None) -> Dict[str, float]:
    p = base_parser(__doc__, "./configs/VQA.yaml", "output/vqa")
    p.add_argument("--evaluate", action="store_true", help="answer the test questions only, no training")
    p.add_argument("--text_decoder", default=None, help="overrides the config's text_decoder")
    add_resume_arg(p)
    args = p.parse_args(argv)
    if args.text_decoder:
        args.options = list(args.options) + [f"text_decoder={args.text_decoder}"]
    cfg, device, tokenizer = setup_run(VQAConfig, args)
    answer_list = load_answer_list(cfg.answer_list)
    model = ALBEFVQA(cfg.albef_config(tokenizer, args.config), distill=cfg.distill)
    if args.checkpoint:  # pre-training (ALBEF.pth) or VQA layout
        load_checkpoint(model, args.checkpoint, verbose=du.is_main_process())
    elif cfg.text_encoder:
        load_bert_weights(model.text_encoder, cfg.text_encoder)
        load_bert_weights(model.text_decoder, cfg.text_decoder or cfg.text_encoder, first_layers_only=True)
        model.copy_params()
    model.to(device)

    test_set = VQADataset(cfg.test_file, eval_transform(cfg.image_res), cfg.vqa_root, cfg.vg_root, "test", 50,
                          max_image_pixels=cfg.max_image_pixels).require_images()
    test_loader = DataLoader(Subset(test_set, range(du.get_rank(), len(test_set), du.get_world_size())),
                             batch_size=cfg.batch_size_test, num_workers=min(cfg.num_workers, 4),
                             collate_fn=VQACollator(tokenizer, model.cfg.bert.max_position_embeddings))
    last_epoch = 0
    if not args.evaluate:
        transform = train_transform(cfg.image_res, cfg.augment)
        dataset = shard_sample = None  # with train_shards, make_trainer streams the shards
        if cfg.train_shards:
            shard_sample = VQAShardSample(transform, cfg.max_ques_words)
        else:
            dataset = VQADataset(cfg.train_file, transform, cfg.vqa_root, cfg.vg_root, "train", cfg.max_ques_words,
                                 cfg.on_bad_image, cfg.max_image_pixels)
        print0(f"{len(test_set)} test questions, {len(answer_list)} candidate answers")
        trainer, loader, sampler = make_trainer(args, cfg, model, dataset, cfg.batch_size_train,
                                                VQACollator(tokenizer, cfg.max_question_tokens), device,
                                                shard_sample=shard_sample)

        def train_step(module, batch, ctx):
            alpha = ramped_alpha(cfg.alpha, cfg.warm_up, ctx)
            return module(batch["image"], batch["question_ids"], batch["question_mask"], batch["answer_ids"],
                          batch["answer_mask"], batch["k"], batch["weights"], alpha=alpha)

        if not trainer.fit(loader, train_step, cfg.scheduler.epochs, sampler=sampler,
                           batch_size_of=lambda b: len(b["image"]), exit_after_epochs=args.exit_after_epochs):
            du.cleanup()  # stopped early as asked: the test questions are answered after the last epoch
            return {}
        last_epoch = cfg.scheduler.epochs - 1

    results = predict_answers(model, test_loader, answer_list, tokenizer, device, cfg.k_test, cfg.first_token_twice)
    metrics: Dict[str, float] = {}
    if results and "acc" in results[0]:
        metrics["test_vqa_acc"] = 100.0 * sum(r["acc"] for r in results) / len(results)
        print0(f"VQA accuracy on {len(results)} test questions: {metrics['test_vqa_acc']:.2f}")
    if du.is_main_process():
        os.makedirs(os.path.join(args.output_dir, "result"), exist_ok=True)
        path = os.path.join(args.output_dir, "result", f"vqa_result_epoch{last_epoch}.json")
        with open(path, "w") as f:
            json.dump([{"question_id": r["question_id"], "answer": r["answer"]} for r in results], f)
        print0(f"answers written to {path}")
        if metrics:
            with open(os.path.join(args.output_dir, "eval_test.json"), "w") as f:
                json.dump({**metrics, "epoch": last_epoch}, f, indent=2)
            with open(os.path.join(args.output_dir, "log.txt"), "a") as f:
                f.write(json.dumps({**metrics, "epoch": last_epoch}) + "\n")
    du.cleanup()
    return metrics


if __name__ == "__main__":
    run_cli(main)
