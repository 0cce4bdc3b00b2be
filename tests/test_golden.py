"""Golden losses: 6 training steps of a tiny ALBEF (full objective, dropout on, fixed seed and batches) through the
shared engine, against the losses recorded before the step was optimised (tests/assets/golden_pretrain_losses.json).
An optimisation that changes the training trajectory beyond float32 rounding fails here.

Regenerate only when a change of the mathematics is intended: ``ALBEF_UPDATE_GOLDEN=1 pytest tests/test_golden.py``.
"""
import json
import os
import tempfile

import pytest
import torch

from engine.trainer import Trainer, TrainOptions
from models.albef import ALBEF, ALBEFConfig
from models.bert import BertConfig
from models.vit import VisionConfig
from optim import OptimizerConfig, create_optimizer
from scheduler import SchedulerConfig, create_scheduler

ASSET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "golden_pretrain_losses.json")
STEPS, BATCH, TEXT_LEN = 6, 8, 12


def _golden_run():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        cfg = ALBEFConfig(image_res=32, vision_width=64, embed_dim=32, queue_size=32, momentum=0.9,
                          vit=VisionConfig(patch_size=8, embed_dim=64, depth=2, num_heads=4),
                          bert=BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                          intermediate_size=128, fusion_layer=2, encoder_width=64,
                                          max_position_embeddings=32),
                          pad_token_id=0, cls_token_id=2, mask_token_id=4)
        model = ALBEF(cfg)
        model.copy_params()
        opt = create_optimizer(model, OptimizerConfig(lr=3e-4))
        sched = create_scheduler(SchedulerConfig(epochs=1, warmup_steps=2, warmup_lr=1e-5, min_lr=1e-5), opt, STEPS)
        trainer = Trainer(model, opt, sched, TrainOptions(num_workers=0, print_freq=1000), tempfile.mkdtemp(), {},
                          torch.device("cpu"), steps_per_epoch=STEPS, batch_size=BATCH)
        g = torch.Generator().manual_seed(1)
        batches = []
        for _ in range(STEPS):
            ids = torch.randint(5, 300, (BATCH, TEXT_LEN), generator=g)
            ids[:, 0] = 2
            mask = torch.ones_like(ids)
            mask[: BATCH // 2, TEXT_LEN - 3:] = 0
            ids[mask == 0] = 0
            batches.append({"image": torch.randn(BATCH, 3, 32, 32, generator=g), "input_ids": ids,
                            "attention_mask": mask})
        losses = []

        def step(module, batch, ctx):
            out = module(batch["image"], batch["input_ids"], batch["attention_mask"], alpha=0.4)
            losses.append({k: float(v.detach()) for k, v in out.items()})
            return out

        torch.manual_seed(2)
        trainer.train_epoch(batches, 0, step, lambda b: BATCH)
        return losses
    finally:
        torch.set_num_threads(threads)


def test_training_losses_match_the_recorded_trajectory(capsys):
    losses = _golden_run()
    if os.environ.get("ALBEF_UPDATE_GOLDEN"):
        with open(ASSET, "w") as f:
            json.dump(losses, f, indent=1)
        pytest.skip("golden losses rewritten")
    with open(ASSET) as f:
        golden = json.load(f)
    assert len(losses) == len(golden) == STEPS
    for i, (got, want) in enumerate(zip(losses, golden)):
        assert set(got) == set(want)
        for k in want:
            assert got[k] == pytest.approx(want[k], rel=1e-5, abs=1e-6), (i, k)
