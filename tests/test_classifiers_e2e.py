"""VE.py, Pretrain_nlvr.py and NLVR.py end to end on the tiny synthetic world (plumbing, not accuracy): fine-tune
from a Pretrain.py checkpoint, keep the best checkpoint by val accuracy, evaluate, and the 2-process evaluation."""
import json
import os

import pytest
import torch
import yaml

import NLVR
import Pretrain_nlvr
import VE
from models import ALBEFNLVR, ALBEFVE, load_model
from tests.conftest import ROOT, write_tiny_config

VE_LABELS = ["entailment", "neutral", "contradiction"]


def _images(world, split, n):
    return [f"images/{split}_{i:05d}.jpg" for i in range(n)]


@pytest.fixture(scope="module")
def task_files(tiny_world, tmp_path_factory):
    """Small VE and NLVR2 files in the original formats over the tiny world's images (labels arbitrary)."""
    d = tmp_path_factory.mktemp("tasks")
    files = {}
    for split, n in (("train", 64), ("val", 8), ("test", 16)):
        imgs = _images(tiny_world, split, n)
        ve = [{"image": p[:-4], "sentence": f"there is a shape number {i % 3}", "label": VE_LABELS[i % 3]}
              for i, p in enumerate(imgs)]
        nlvr = [{"images": [imgs[i], imgs[(i + 1) % n]], "sentence": "the left image has more shapes",
                 "label": "True" if i % 2 else "False"} for i in range(n)]
        for name, recs in (("ve", ve), ("nlvr", nlvr)):
            files[f"{name}_{split}"] = str(d / f"{name}_{split}.json")
            with open(files[f"{name}_{split}"], "w") as f:
                json.dump(recs, f)
    return files


def _classifier_config(path, world, files, task, **kw):
    cfg = {
        "train_file": files[f"{task}_train"], "val_file": files[f"{task}_val"], "test_file": files[f"{task}_test"],
        "image_root": str(world), "bert_config": os.path.join(ROOT, "configs", "config_bert_tiny.json"),
        "image_res": 32, "batch_size_train": 8, "batch_size_test": 8, "vision_width": 128,
        "vit": {"patch_size": 8, "embed_dim": 128, "depth": 2, "num_heads": 4}, "text_encoder": None,
        "tokenizer": str(world / "tokenizer"), "optimizer": {"lr": 1e-4},
        "schedular": {"epochs": 1, "warmup_epochs": 0.05},
        "augment": {"crop_scale": [0.8, 1.0], "hflip": False, "randaugment": False}, "num_workers": 0,
        "print_freq": 4}
    cfg.update(kw)
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return str(path)


def test_ve_finetune_and_evaluate(tmp_path, tiny_world, task_files, pretrained):
    config = _classifier_config(tmp_path / "ve.yaml", tiny_world, task_files, "ve")
    out = tmp_path / "ft"
    results = VE.main(["--config", config, "--output_dir", str(out), "--device", "cpu", "--checkpoint",
                       str(pretrained)])
    line = json.loads((out / "log.txt").read_text().splitlines()[0])
    assert {"train_loss_cls", "train_lr", "val_acc", "test_acc", "epoch"} <= set(line)
    assert 0.0 <= line["val_acc"] <= 1.0 and results["val"]["acc"] == line["val_acc"]
    best = torch.load(out / "checkpoint_best.pth", weights_only=True)
    assert best["epoch"] == 0 and "cls_head_m.2.weight" in best["model"]
    # the best checkpoint evaluates to the accuracy logged for it, and load_model gives the VE model
    ev = tmp_path / "ev"
    again = VE.main(["--config", config, "--output_dir", str(ev), "--device", "cpu", "--evaluate",
                     "--checkpoint", str(out / "checkpoint_best.pth")])
    assert again["val"]["acc"] == pytest.approx(line["val_acc"]) and again["test"]["acc"] == pytest.approx(
        line["test_acc"])
    assert json.loads((ev / "eval_test.json").read_text())["acc"] == pytest.approx(line["test_acc"])
    assert isinstance(load_model(str(out / "checkpoint_best.pth"), config), ALBEFVE)


def test_text_assignment_then_nlvr(tmp_path, tiny_world, task_files, pretrained):
    ta_config = write_tiny_config(tmp_path / "ta.yaml", tiny_world, test_file=None)
    ta_out = tmp_path / "ta"
    Pretrain_nlvr.main(["--config", ta_config, "--output_dir", str(ta_out), "--device", "cpu", "--checkpoint",
                        str(pretrained), "--options", "schedular.epochs=1"])
    ta_ckpt = ta_out / "checkpoint_00.pth"
    assert "train_loss_ta" in json.loads((ta_out / "log.txt").read_text().splitlines()[0])
    config = _classifier_config(tmp_path / "nlvr.yaml", tiny_world, task_files, "nlvr", batch_size=4,
                                warm_up=True)
    out = tmp_path / "nlvr"
    NLVR.main(["--config", config, "--output_dir", str(out), "--device", "cpu", "--checkpoint", str(ta_ckpt)])
    line = json.loads((out / "log.txt").read_text().splitlines()[0])
    assert {"train_loss_cls", "val_acc", "test_acc"} <= set(line)
    model = load_model(str(out / "checkpoint_best.pth"), config)
    assert isinstance(model, ALBEFNLVR) and model.distill
    # NLVR refuses a plain pre-training checkpoint with a message that says what to do
    with pytest.raises(ValueError, match="text-assignment"):
        NLVR.main(["--config", config, "--output_dir", str(tmp_path / "x"), "--device", "cpu", "--checkpoint",
                   str(pretrained), "--evaluate"])


@pytest.mark.slow
def test_two_process_accuracy_equals_single_process(tmp_path, tiny_world, task_files, pretrained):
    from tests.test_distributed import _torchrun

    # 8 val / 16 test samples, batch 3: uneven shards and a ragged last batch on each rank
    config = _classifier_config(tmp_path / "ve.yaml", tiny_world, task_files, "ve", batch_size_test=3)
    single, multi = tmp_path / "single", tmp_path / "multi"
    VE.main(["--config", config, "--output_dir", str(single), "--device", "cpu", "--evaluate",
             "--checkpoint", str(pretrained)])
    res = _torchrun(["VE.py", "--config", config, "--output_dir", str(multi), "--device", "cpu", "--evaluate",
                     "--checkpoint", str(pretrained)])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for split in ("val", "test"):
        assert json.loads((single / f"eval_{split}.json").read_text()) == \
            json.loads((multi / f"eval_{split}.json").read_text())
