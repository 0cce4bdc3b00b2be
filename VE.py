r"""ALBEF for SNLI-VE (visual entailment): fine-tune a 3-way classifier on the fused [CLS], or evaluate one.

    torchrun --nproc_per_node=8 VE.py --config configs/VE.yaml --output_dir output/VE --checkpoint ALBEF.pth
    python VE.py ... --evaluate                   # val/test accuracy of a fine-tuned checkpoint
    python VE.py --config configs/VE_tiny.yaml --output_dir output/demo_ve \
        --checkpoint output/demo/checkpoint_05.pth --device cpu

Annotations: ``[{"image": id (no extension), "sentence": hypothesis, "label": entailment|neutral|contradiction}]``.
Training can stream webdataset shards instead of ``train_file``: write them with ``python -m tools.make_shards
--task ve --ann ve_train.json --image_root ... --out shards/ve-%06d.tar`` and set ``train_shards`` (the pattern
it prints) and ``train_samples_per_epoch`` (samples per epoch over all ranks).
"""
from __future__ import annotations

from typing import Dict

from dataset.ve_dataset import VEDataset, VEShardSample
from engine.classification import ClassifierConfig, add_classifier_args, run_classifier
from engine.recipe import base_parser, run_cli, setup_run
from models.classifiers import ALBEFVE
from models.convert import load_checkpoint
from models.pretrained import load_bert_weights
from utils import distributed as du


def main(argv=None) -> Dict[str, Dict[str, float]]:
    args = add_classifier_args(base_parser(__doc__, "./configs/VE.yaml", "output/VE")).parse_args(argv)
    cfg, device, tokenizer = setup_run(ClassifierConfig, args)
    model = ALBEFVE(cfg.albef_config(tokenizer, args.config), distill=cfg.distill)
    if args.checkpoint:  # pre-training (ALBEF.pth) or VE layout; a checkpoint provides every weight
        load_checkpoint(model, args.checkpoint, verbose=du.is_main_process())
    elif cfg.text_encoder:
        load_bert_weights(model.text_encoder, cfg.text_encoder)
        model.copy_params()

    def make_dataset(path, transform):
        if isinstance(path, list):
            if len(path) != 1:
                raise ValueError(f"VE takes one annotation file per split, got {path}")
            path = path[0]
        return VEDataset(path, transform, cfg.image_root, cfg.max_words)

    results = run_classifier(args, cfg, model, tokenizer, device, make_dataset,
                             lambda transform: VEShardSample(transform, cfg.max_words))
    du.cleanup()
    return results


if __name__ == "__main__":
    run_cli(main)
