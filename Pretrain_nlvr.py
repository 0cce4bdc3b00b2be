r"""NLVR2's text-assignment pre-training (the original ``Pretrain_nlvr.py``): from a pre-trained ALBEF, learn to
tell whether a caption describes the first, the second or neither of two images, with the 18-layer two-image
fusion encoder that ``NLVR.py`` then fine-tunes.

    torchrun --nproc_per_node=8 Pretrain_nlvr.py --config configs/NLVR_pretrain.yaml \
        --output_dir output/NLVR_pretrain --checkpoint ALBEF.pth
    python Pretrain_nlvr.py --config configs/NLVR_pretrain_tiny.yaml --output_dir output/demo_nlvr_ta \
        --checkpoint output/demo/checkpoint_05.pth --device cpu

Each fusion layer of the checkpoint initialises two layers (one per image). Writes ``checkpoint_XX.pth`` every
epoch (``NLVR.py --checkpoint`` takes it) and ``log.txt``.
"""
from __future__ import annotations

import os
from typing import Dict

from dataset import CaptionCollator
from dataset.caption_dataset import PretrainDataset
from dataset.transforms import train_transform
from engine.checkpoint import latest_checkpoint
from engine.recipe import add_resume_arg, base_parser, make_trainer, run_cli, setup_run
from engine.trainer import print0
from models.classifiers import ALBEFTextAssignment
from models.convert import load_checkpoint
from Pretrain import PretrainConfig
from utils import distributed as du
from utils.config import ConfigError


def main(argv=None) -> Dict[str, float]:
    args = add_resume_arg(base_parser(__doc__, "./configs/NLVR_pretrain.yaml", "output/NLVR_pretrain")).parse_args(argv)
    cfg, device, tokenizer = setup_run(PretrainConfig, args)
    if cfg.batch_size < 3:
        raise ConfigError(f"{args.config}: batch_size must be >= 3 (pairs of other images are drawn from the batch)")
    model = ALBEFTextAssignment(cfg.albef_config(tokenizer, args.config))
    if args.checkpoint:  # a pre-training checkpoint (ALBEF.pth) or a text-assignment one
        load_checkpoint(model, args.checkpoint, verbose=du.is_main_process())
    else:
        print0("warning: no --checkpoint: text assignment starts from random weights")
    model.to(device)

    dataset = None if cfg.train_shards else PretrainDataset(
        cfg.train_file, train_transform(cfg.image_res, cfg.augment), cfg.image_root, cfg.max_words, cfg.on_bad_image,
        cfg.max_image_pixels)  # with train_shards, make_trainer streams the shards
    trainer, loader, sampler = make_trainer(args, cfg, model, dataset, cfg.batch_size,
                                            CaptionCollator(tokenizer, cfg.max_tokens), device)

    def train_step(module, batch, ctx):
        return module(batch["image"], batch["input_ids"], batch["attention_mask"])

    trainer.fit(loader, train_step, cfg.scheduler.epochs, sampler=sampler, exit_after_epochs=args.exit_after_epochs)
    last = latest_checkpoint(args.output_dir)
    print0(f"text-assignment checkpoint for NLVR.py: {last and os.path.abspath(last)}")
    du.cleanup()
    return {}


if __name__ == "__main__":
    run_cli(main)
