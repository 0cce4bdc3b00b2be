"""Shared fixtures: a small synthetic world on disk and a tiny pre-training config for it."""
from __future__ import annotations

import os
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory):
    """A synthetic data set: 64 train / 8 val / 16 test images at 32 px, with its tokenizer."""
    from dataset.synthetic import generate

    out = tmp_path_factory.mktemp("world")
    generate(str(out), seed=0, num_train=64, num_val=8, num_test=16, image_size=32)
    return out


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory, tiny_world):
    """A Pretrain.py checkpoint (1 epoch of the tiny config on the tiny world), shared by the fine-tuning tests."""
    import Pretrain

    d = tmp_path_factory.mktemp("pre")
    config = write_tiny_config(d / "pre.yaml", tiny_world)
    Pretrain.main(["--config", config, "--output_dir", str(d / "out"), "--device", "cpu",
                   "--options", "schedular.epochs=1"])
    return d / "out" / "checkpoint_00.pth"


def write_tiny_config(path, world, **overrides) -> str:
    """A tiny Pretrain config on ``world``: 2-layer ViT at 32 px, 4-layer BERT (fusion at 2), CPU friendly."""
    cfg = {
        "train_file": [str(world / "pretrain.json")],
        "bert_config": os.path.join(ROOT, "configs", "config_bert_tiny.json"),
        "image_res": 32, "vision_width": 128, "embed_dim": 32, "batch_size": 8, "temp": 0.07,
        "mlm_probability": 0.15, "queue_size": 64, "momentum": 0.995, "alpha": 0.4,
        "optimizer": {"opt": "adamW", "lr": 3e-4, "weight_decay": 0.02},
        "schedular": {"sched": "cosine", "lr": 3e-4, "epochs": 2, "min_lr": 1e-5, "decay_rate": 1,
                      "warmup_lr": 1e-5, "warmup_epochs": 0.02, "cooldown_epochs": 0},
        "vit": {"patch_size": 8, "embed_dim": 128, "depth": 2, "num_heads": 4, "mlp_ratio": 4.0},
        "vit_init": None, "text_encoder": None, "tokenizer": str(world / "tokenizer"),
        "augment": {"crop_scale": [0.5, 1.0], "hflip": False, "randaugment": False},
        "num_workers": 0, "print_freq": 4, "test_file": str(world / "retrieval_test.json"),
        "batch_size_test": 8,
    }
    for k, v in overrides.items():
        cfg[k] = v
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return str(path)


@pytest.fixture
def tiny_config(tmp_path, tiny_world):
    return write_tiny_config(tmp_path / "tiny.yaml", tiny_world)
