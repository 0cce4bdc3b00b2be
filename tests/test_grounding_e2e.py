"""Grounding.py end to end on the tiny synthetic world's grounding set: evaluation in both Grad-CAM modes,
fine-tuning with the best checkpoint, the released-checkpoint layout, 2 processes = 1 process, bad input."""
from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

import Grounding
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def grounding_set(tiny_world, tmp_path_factory):
    from dataset.synthetic_grounding import generate_grounding

    out = tmp_path_factory.mktemp("grounding")
    generate_grounding(str(tiny_world), str(out))
    return out


def _config(path, world, gset, **kw):
    cfg = {
        "train_file": [str(gset / "refcoco+_train.json")],
        "test_file": [str(gset / "refcoco+_val.json"), str(gset / "refcoco+_test.json")],
        "refcoco_data": str(gset), "det_file": str(gset / "refcoco+" / "dets.json"), "image_root": str(world),
        "bert_config": os.path.join(ROOT, "configs", "config_bert_tiny.json"), "image_res": 32, "batch_size": 8,
        "queue_size": 64, "momentum": 0.995, "vision_width": 128, "embed_dim": 32,
        "optimizer": {"lr": 1e-4}, "schedular": {"epochs": 1, "warmup_epochs": 0.05},
        "vit": {"patch_size": 8, "embed_dim": 128, "depth": 2, "num_heads": 4}, "text_encoder": None,
        "tokenizer": str(world / "tokenizer"), "augment": {"hflip": False, "randaugment": False},
        "block_num": 2, "num_workers": 0, "print_freq": 10}
    cfg.update(kw)
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return str(path)


def _run(config, out, *extra):
    return Grounding.main(["--config", config, "--output_dir", str(out), "--device", "cpu", *extra])


@pytest.mark.parametrize("mode,block", [("itm", 2), ("itc", 1)])
def test_evaluate_writes_accuracies_and_predictions(tmp_path, tiny_world, grounding_set, pretrained, mode, block):
    config = _config(tmp_path / "g.yaml", tiny_world, grounding_set)
    out = tmp_path / "eval"
    metrics = _run(config, out, "--evaluate", "--checkpoint", str(pretrained), "--gradcam_mode", mode,
                   "--block_num", str(block))
    saved = json.loads((out / "eval.json").read_text())
    assert saved["gradcam_mode"] == mode and saved["block_num"] == block
    assert {"val_d", "testA_d", "testB_d", "no_positive"} <= set(saved)
    for split in ("val", "testA", "testB"):
        assert 0.0 <= saved[f"{split}_d"] <= 1.0 and saved[f"num_{split}"] > 0
        preds = json.loads((out / f"results_{split}.json").read_text())
        assert len(preds) == saved[f"num_{split}"]
        assert sum(p["correct"] for p in preds) == pytest.approx(saved[f"{split}_d"] * len(preds))
        assert all(p["split"] == split and (p["pred_box"] is None or len(p["pred_box"]) == 4) for p in preds)
    assert metrics["val_d"] == pytest.approx(saved["val_d"])


def test_finetune_keeps_best_and_logs(tmp_path, tiny_world, grounding_set, pretrained):
    config = _config(tmp_path / "g.yaml", tiny_world, grounding_set)
    out = tmp_path / "ft"
    _run(config, out, "--checkpoint", str(pretrained))
    line = json.loads((out / "log.txt").read_text().splitlines()[0])
    assert {"train_loss_ita", "train_loss_itm", "test_val_d", "test_testA_d", "epoch"} <= set(line)
    best = torch.load(out / "checkpoint_best.pth", weights_only=True)
    assert best["epoch"] == 0 and "idx_queue" in best["model"]
    assert json.loads((out / "eval.json").read_text())["epoch"] == 0


def test_raw_state_dict_like_refcoco_pth(tmp_path, tiny_world, grounding_set, pretrained):
    """The released refcoco.pth is a bare retrieval-layout state dict: it loads as it is, and evaluates as the
    checkpoint it came from."""
    config = _config(tmp_path / "g.yaml", tiny_world, grounding_set)
    ft = tmp_path / "ft"
    _run(config, ft, "--checkpoint", str(pretrained))
    raw = tmp_path / "refcoco.pth"
    torch.save(torch.load(ft / "checkpoint_best.pth", weights_only=True)["model"], raw)
    a = _run(config, tmp_path / "a", "--evaluate", "--checkpoint", str(ft / "checkpoint_best.pth"))
    b = _run(config, tmp_path / "b", "--evaluate", "--checkpoint", str(raw))
    assert a == b


@pytest.mark.slow
def test_two_process_evaluate_equals_single_process(tmp_path, tiny_world, grounding_set, pretrained):
    from tests.test_distributed import _torchrun

    config = _config(tmp_path / "g.yaml", tiny_world, grounding_set)
    single, multi = tmp_path / "single", tmp_path / "multi"
    _run(config, single, "--evaluate", "--checkpoint", str(pretrained))
    res = _torchrun(["Grounding.py", "--config", config, "--output_dir", str(multi), "--device", "cpu",
                     "--evaluate", "--checkpoint", str(pretrained)])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    a, b = (json.loads((d / "eval.json").read_text()) for d in (single, multi))
    assert a == b
    for split in ("val", "testA", "testB"):
        pa, pb = (json.loads((d / f"results_{split}.json").read_text()) for d in (single, multi))
        assert [(p["ref_id"], p["pred_box"], p["correct"]) for p in pa] == \
            [(p["ref_id"], p["pred_box"], p["correct"]) for p in pb]
        assert [p["score"] for p in pa] == pytest.approx([p["score"] for p in pb], rel=1e-4)


def test_bad_input_messages(tmp_path, tiny_world, grounding_set, pretrained):
    from utils.config import ConfigError

    config = _config(tmp_path / "g.yaml", tiny_world, grounding_set, block_num=1)
    with pytest.raises(ConfigError, match="block_num 1: gradcam_mode itm needs a fusion layer"):
        _run(config, tmp_path / "o1", "--evaluate", "--checkpoint", str(pretrained))
    with pytest.raises(ConfigError, match="block_num 5: gradcam_mode itc needs a ViT block, 0..1"):
        _run(config, tmp_path / "o2", "--evaluate", "--checkpoint", str(pretrained), "--gradcam_mode", "itc",
             "--block_num", "5")
    config = _config(tmp_path / "g2.yaml", tiny_world, grounding_set, refcoco_data=str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match=r"refs\(unc\)\.p.*refcoco_data|refcoco_data.*refs\(unc\)\.p"):
        _run(config, tmp_path / "o3", "--evaluate", "--checkpoint", str(pretrained))
