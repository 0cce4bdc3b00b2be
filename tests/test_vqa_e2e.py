"""VQA: the data set's answer weights, the collator, the VQA metric, and VQA.py end to end on the tiny world
(fine-tune from a Pretrain.py checkpoint, answer the test questions, 2-process answers equal 1-process)."""
import json
import os

import pytest
import torch
import yaml

import VQA
from dataset.transforms import eval_transform
from dataset.vqa_dataset import VQACollator, VQADataset
from engine.vqa import vqa_accuracy
from models import ALBEFVQA, load_model
from models.tokenizer import load_tokenizer
from tests.conftest import ROOT

ANSWERS = ["red", "blue", "green", "one", "two", "three", "yes", "no"]


@pytest.fixture(scope="module")
def vqa_files(tiny_world, tmp_path_factory):
    d = tmp_path_factory.mktemp("vqa")
    qid = 0
    files = {}
    for split, n in (("train", 64), ("test", 16)):
        recs = []
        for i in range(n):
            for q, a in (("what color is the shape", ANSWERS[i % 3]), ("how many shapes are there", ANSWERS[3 + i % 3])):
                answers = [a] * 8 + [ANSWERS[(i + 1) % 8]] * 2
                recs.append({"question_id": qid, "question": q, "image": f"images/{split}_{i:05d}.jpg",
                             "dataset": "vqa", "answer": answers})
                qid += 1
        files[split] = str(d / f"vqa_{split}.json")
        with open(files[split], "w") as f:
            json.dump(recs, f)
    files["vg"] = str(d / "vg_qa.json")
    with open(files["vg"], "w") as f:
        json.dump([{"question": "is there a shape", "image": f"images/train_{i:05d}.jpg", "dataset": "vg",
                    "answer": "yes"} for i in range(8)], f)
    files["answer_list"] = str(d / "answer_list.json")
    with open(files["answer_list"], "w") as f:
        json.dump(ANSWERS, f)
    return files


def _vqa_config(path, world, files, **kw):
    cfg = {
        "train_file": [files["train"], files["vg"]], "test_file": [files["test"]], "answer_list": files["answer_list"],
        "vqa_root": str(world), "vg_root": str(world),
        "bert_config": os.path.join(ROOT, "configs", "config_bert_tiny.json"), "image_res": 32,
        "batch_size_train": 8, "batch_size_test": 5, "k_test": 4, "vision_width": 128,
        "vit": {"patch_size": 8, "embed_dim": 128, "depth": 2, "num_heads": 4}, "text_encoder": None,
        "tokenizer": str(world / "tokenizer"), "optimizer": {"lr": 1e-4},
        "schedular": {"epochs": 1, "warmup_epochs": 0.05},
        "augment": {"crop_scale": [0.8, 1.0], "hflip": False, "randaugment": False}, "num_workers": 0,
        "print_freq": 5}
    cfg.update(kw)
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return str(path)


def test_vqa_accuracy_by_hand():
    assert vqa_accuracy("red", ["red"] * 10) == 1.0
    assert vqa_accuracy("red", ["blue"] * 10) == 0.0
    # 2 of 10 say red: leaving out one of them leaves 1 match (1/3), else 2 matches (2/3)
    assert vqa_accuracy("red", ["red"] * 2 + ["blue"] * 8) == pytest.approx((2 * (1 / 3) + 8 * (2 / 3)) / 10)
    # 3 of 10: 7 subsets keep 3 matches (1.0), 3 keep 2 (2/3)
    assert vqa_accuracy("red", ["red"] * 3 + ["blue"] * 7) == pytest.approx((7 + 3 * (2 / 3)) / 10)
    assert vqa_accuracy("red", ["red"]) == 1.0


def test_vqa_dataset_weights_and_collator(tiny_world, vqa_files):
    ds = VQADataset([vqa_files["train"], vqa_files["vg"]], eval_transform(32), str(tiny_world), str(tiny_world))
    first = ds[0]
    assert first["answers"] == ["red", "blue"] and first["weights"] == pytest.approx([0.8, 0.2])
    assert ds[len(ds) - 1]["answers"] == ["yes"] and ds[len(ds) - 1]["weights"] == [0.5]
    tok = load_tokenizer(str(tiny_world / "tokenizer"))
    batch = VQACollator(tok, 25)([ds[0], ds[len(ds) - 1]])
    assert batch["k"].tolist() == [2, 1] and batch["weights"].tolist() == pytest.approx([0.8, 0.2, 0.5])
    ids = batch["answer_ids"]
    assert ids.shape[0] == 3 and (ids[:, 0] == tok.cls_token_id).all()
    assert ((ids == tok.sep_token_id).sum(1) == 1).all()  # each answer ends with one [SEP] (the original's eos)
    assert (batch["question_ids"] != tok.sep_token_id).all()  # questions: [CLS] words, no [SEP]
    test = VQADataset(vqa_files["test"], eval_transform(32), str(tiny_world), split="test")
    tb = VQACollator(tok, 100)([test[0], test[1]])
    assert tb["question_id"].tolist() == [test.records[0]["question_id"], test.records[1]["question_id"]]
    assert len(tb["gt"]) == 2 and len(tb["gt"][0]) == 10
    with pytest.raises(ValueError, match="record 0"):
        bad = tiny_world / "bad_vqa.json"
        bad.write_text(json.dumps([{"question": "q", "image": "x.jpg", "dataset": "vg", "answer": ["a"]}]))
        VQADataset(str(bad), eval_transform(32), str(tiny_world))


def test_vqa_finetune_and_answer(tmp_path, tiny_world, vqa_files, pretrained):
    config = _vqa_config(tmp_path / "vqa.yaml", tiny_world, vqa_files)
    out = tmp_path / "ft"
    metrics = VQA.main(["--config", config, "--output_dir", str(out), "--device", "cpu", "--checkpoint",
                        str(pretrained)])
    lines = [json.loads(x) for x in (out / "log.txt").read_text().splitlines()]
    assert "train_loss_vqa" in lines[0] and lines[-1]["test_vqa_acc"] == pytest.approx(metrics["test_vqa_acc"])
    results = json.loads((out / "result" / "vqa_result_epoch0.json").read_text())
    assert len(results) == 32 and {r["answer"] for r in results} <= set(ANSWERS)
    assert [r["question_id"] for r in results] == sorted(r["question_id"] for r in results)
    model = load_model(str(out / "checkpoint_00.pth"), config)
    assert isinstance(model, ALBEFVQA) and model.distill
    # --evaluate on the fine-tuned checkpoint gives the same answers
    ev = tmp_path / "ev"
    again = VQA.main(["--config", config, "--output_dir", str(ev), "--device", "cpu", "--evaluate",
                      "--checkpoint", str(out / "checkpoint_00.pth")])
    assert again["test_vqa_acc"] == pytest.approx(metrics["test_vqa_acc"])
    assert json.loads((ev / "result" / "vqa_result_epoch0.json").read_text()) == results


@pytest.mark.slow
def test_two_process_answers_equal_single_process(tmp_path, tiny_world, vqa_files, pretrained):
    from tests.test_distributed import _torchrun

    config = _vqa_config(tmp_path / "vqa.yaml", tiny_world, vqa_files)
    single, multi = tmp_path / "single", tmp_path / "multi"
    VQA.main(["--config", config, "--output_dir", str(single), "--device", "cpu", "--evaluate", "--checkpoint",
              str(pretrained)])
    res = _torchrun(["VQA.py", "--config", config, "--output_dir", str(multi), "--device", "cpu", "--evaluate",
                     "--checkpoint", str(pretrained)])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    a = json.loads((single / "result" / "vqa_result_epoch0.json").read_text())
    b = json.loads((multi / "result" / "vqa_result_epoch0.json").read_text())
    assert a == b and len(a) == 32
    torch.testing.assert_close(json.loads((single / "eval_test.json").read_text())["test_vqa_acc"],
                               json.loads((multi / "eval_test.json").read_text())["test_vqa_acc"])
