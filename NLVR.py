r"""ALBEF for NLVR2: is a sentence true of a pair of images? Fine-tune from a text-assignment checkpoint
(``Pretrain_nlvr.py``, or the released ``pretrain_model_nlvr.pth``), or evaluate a fine-tuned one.

    torchrun --nproc_per_node=8 NLVR.py --config configs/NLVR.yaml --output_dir output/NLVR \
        --checkpoint output/NLVR_pretrain/checkpoint_00.pth
    python NLVR.py ... --checkpoint output/NLVR/checkpoint_best.pth --evaluate

Annotations: ``[{"images": [left, right], "sentence": str, "label": "True" | "False"}]``; val = dev, test = test-P.
The fusion encoder has 2 x 6 layers, alternating between the two images (see ``models/classifiers.py``).
Training can stream webdataset shards instead of ``train_file``: write them with ``python -m tools.make_shards
--task nlvr --ann nlvr_train.json --image_root ... --out shards/nlvr-%06d.tar`` (the two images are the members
``left.jpg`` and ``right.jpg``) and set ``train_shards`` (the pattern it prints) and ``train_samples_per_epoch``.
"""
from __future__ import annotations

from typing import Dict

from dataset.nlvr_dataset import NLVRDataset, NLVRShardSample
from engine.classification import ClassifierConfig, add_classifier_args, run_classifier
from engine.recipe import base_parser, run_cli, setup_run
from engine.trainer import print0
from models.classifiers import ALBEFNLVR
from models.convert import load_checkpoint
from utils import distributed as du
from utils.config import ConfigError


def main(argv=None) -> Dict[str, Dict[str, float]]:
    args = add_classifier_args(base_parser(__doc__, "./configs/NLVR.yaml", "output/NLVR")).parse_args(argv)
    cfg, device, tokenizer = setup_run(ClassifierConfig, args)
    model = ALBEFNLVR(cfg.albef_config(tokenizer, args.config), distill=cfg.distill)
    if args.checkpoint:  # text-assignment (its teacher is copied from the loaded weights) or NLVR layout
        load_checkpoint(model, args.checkpoint, verbose=du.is_main_process())
    elif cfg.text_encoder:
        raise ConfigError(f"{args.config}: NLVR2 starts from a text-assignment checkpoint (--checkpoint); its "
                          f"doubled fusion layers cannot come from {cfg.text_encoder} alone")
    else:
        print0("warning: no --checkpoint: the model starts from random weights")
    results = run_classifier(args, cfg, model, tokenizer, device,
                             lambda path, transform: NLVRDataset(path, transform, cfg.image_root, cfg.max_words),
                             lambda transform: NLVRShardSample(transform, cfg.max_words))
    du.cleanup()
    return results


if __name__ == "__main__":
    run_cli(main)
