"""Pretrain.py end to end on a tiny synthetic world: logs, checkpoints, evaluation, exact resume, --checkpoint."""
import json
import os

import pytest
import torch

import Pretrain
from engine.checkpoint import latest_checkpoint
from tests.conftest import write_tiny_config

LOG_KEYS = {"train_loss_mlm", "train_loss_ita", "train_loss_itm", "train_lr", "epoch"}


def _run(config, out, *extra):
    return Pretrain.main(["--config", config, "--output_dir", str(out), "--device", "cpu", *extra])


@pytest.fixture(scope="module")
def two_epoch_run(tmp_path_factory, tiny_world):
    d = tmp_path_factory.mktemp("full")
    config = write_tiny_config(d / "tiny.yaml", tiny_world)
    results = _run(config, d / "out")
    return config, d / "out", results


def test_outputs_and_log_lines(two_epoch_run):
    _, out, results = two_epoch_run
    lines = [json.loads(x) for x in (out / "log.txt").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1]
    for x in lines:
        assert LOG_KEYS <= set(x) and all(isinstance(x[k], float) for k in LOG_KEYS - {"epoch"})
        assert "test_img_r1" in x and "test_r_mean" in x
    assert lines[0]["train_lr"] != round(lines[0]["train_lr"], 3) or lines[0]["train_lr"] == 0  # full precision
    for name in ("config.yaml", "checkpoint_00.pth", "checkpoint_01.pth", "eval_test.json"):
        assert (out / name).exists(), name
    evaluation = json.loads((out / "eval_test.json").read_text())
    assert evaluation == results and set(evaluation) >= {"img_r1", "img_r5", "img_r10", "txt_r1", "r_mean"}
    assert all(0 <= v <= 100 for v in evaluation.values())
    assert latest_checkpoint(str(out)).endswith("checkpoint_01.pth")


def test_checkpoint_contents(two_epoch_run):
    _, out, _ = two_epoch_run
    state = torch.load(out / "checkpoint_01.pth", map_location="cpu", weights_only=False)
    assert {"model", "optimizer", "lr_scheduler", "scaler", "config", "epoch", "step", "rng_state"} <= set(state)
    assert state["epoch"] == 1 and state["step"] == 2 * (64 // 8)
    sd = state["model"]
    assert {"image_queue", "text_queue", "queue_ptr", "temp", "text_encoder.cls.predictions.bias",
            "visual_encoder_m.pos_embed"} <= set(sd)
    assert int(sd["queue_ptr"]) == (2 * 64) % 64  # 16 steps of 8 features into a queue of 64
    assert state["config"]["batch_size"] == 8


def test_tensorboard_scalars(two_epoch_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, out, _ = two_epoch_run
    acc = EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss_ita", "train/loss_itm", "train/loss_mlm", "train/lr", "epoch/test_img_r1"} <= tags
    assert len(acc.Scalars("train/loss_ita")) >= 2


def test_resume_equals_uninterrupted_run(two_epoch_run, tmp_path, capsys):
    config, full_out, _ = two_epoch_run
    out = tmp_path / "out"
    _run(config, out, "--exit_after_epochs", "1")
    assert (out / "checkpoint_00.pth").exists() and not (out / "checkpoint_01.pth").exists()
    assert not (out / "eval_test.json").exists()  # the final evaluation's file belongs to a finished run
    _run(config, out, "--resume")
    a = torch.load(full_out / "checkpoint_01.pth", map_location="cpu", weights_only=False)
    b = torch.load(out / "checkpoint_01.pth", map_location="cpu", weights_only=False)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert a["step"] == b["step"]
    lines = [json.loads(x) for x in (out / "log.txt").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1]
    capsys.readouterr()
    _run(config, out, "--resume")  # a finished run: nothing to do, said so
    printed = capsys.readouterr().out
    assert "all 2 epochs are done: nothing to train" in printed and "Start training" not in printed
    assert [json.loads(x)["epoch"] for x in (out / "log.txt").read_text().splitlines()] == [0, 1]


def test_checkpoint_initialises_weights(two_epoch_run, tmp_path):
    config, full_out, _ = two_epoch_run
    out = tmp_path / "out"
    _run(config, out, "--checkpoint", str(full_out / "checkpoint_01.pth"), "--options", "schedular.epochs=1",
         "optimizer.lr=1e-30", "schedular.warmup_lr=0", "schedular.min_lr=0")
    a = torch.load(full_out / "checkpoint_01.pth", map_location="cpu", weights_only=False)["model"]
    b = torch.load(out / "checkpoint_00.pth", map_location="cpu", weights_only=False)["model"]
    # with lr 0 the online weights stay those of the checkpoint
    assert torch.equal(a["text_encoder.bert.embeddings.word_embeddings.weight"],
                       b["text_encoder.bert.embeddings.word_embeddings.weight"])
    assert torch.equal(a["visual_encoder.blocks.0.attn.qkv.weight"], b["visual_encoder.blocks.0.attn.qkv.weight"])


def test_config_error_exit_code(tmp_path, tiny_world, capsys):
    config = write_tiny_config(tmp_path / "bad.yaml", tiny_world, batch_sise=3)
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "Pretrain.py", "--config", config, "--output_dir", str(tmp_path / "o")],
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), capture_output=True,
                         text=True)
    assert res.returncode == 2 and "batch_sise" in res.stderr and "bad.yaml" in res.stderr


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path, tiny_world):
    """Kill -9 the training process mid-run, resume, and end with the uninterrupted run's weights."""
    import subprocess
    import sys
    import time

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_world)
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    _run(config, ref, "--options", "schedular.epochs=4")
    cmd = [sys.executable, "Pretrain.py", "--config", config, "--output_dir", str(killed), "--device", "cpu",
           "--options", "schedular.epochs=4"]
    proc = subprocess.Popen(cmd, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "checkpoint_00.pth").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    assert (killed / "checkpoint_00.pth").exists()
    _run(config, killed, "--resume", "--options", "schedular.epochs=4")
    a = torch.load(ref / "checkpoint_03.pth", map_location="cpu", weights_only=True)
    b = torch.load(killed / "checkpoint_03.pth", map_location="cpu", weights_only=True)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k


def test_world_ceilings_consistency_and_examples(tmp_path, tiny_world):
    """test_world: eval_test.json carries the ceilings and consistent@1 of the world's test split; examples.png
    shows the chosen captions' top images. A test_world whose test split is not test_file gives no ceilings."""
    from PIL import Image

    from dataset.caption_logic import world_ceilings

    config = write_tiny_config(tmp_path / "c.yaml", tiny_world, test_world=str(tiny_world), examples=3)
    out = tmp_path / "out"
    Pretrain.main(["--config", config, "--output_dir", str(out), "--device", "cpu",
                   "--options", "schedular.epochs=1"])
    metrics = json.loads((out / "eval_test.json").read_text())
    expected = world_ceilings(str(tiny_world))
    for k in ("ceiling_img_r1", "ceiling_txt_r1", "ceiling_img_r5", "ceiling_txt_r10"):
        assert metrics[k] == pytest.approx(expected[k])
    assert 0.0 <= metrics["consistent_at_1"] <= 100.0
    assert metrics["img_r1"] <= metrics["consistent_at_1"]  # its own image makes a caption true
    with Image.open(out / "examples.png") as im:
        assert im.format == "PNG" and im.size[1] > 3 * 96
    other = write_tiny_config(tmp_path / "o.yaml", tiny_world, test_world=str(tiny_world),
                              test_file=str(tiny_world / "retrieval_val.json"))
    Pretrain.main(["--config", other, "--output_dir", str(tmp_path / "o"), "--device", "cpu",
                   "--options", "schedular.epochs=1"])
    assert "ceiling_img_r1" not in json.loads((tmp_path / "o" / "eval_test.json").read_text())


def test_test_every_evaluates_every_nth_epoch_and_the_last(tmp_path, tiny_world):
    config = write_tiny_config(tmp_path / "c.yaml", tiny_world, test_every=2)
    out = tmp_path / "out"
    _run(config, out, "--options", "schedular.epochs=3")
    log = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1, 2]
    assert [("test_img_r1" in r) for r in log] == [False, True, True]
    assert json.loads((out / "eval_test.json").read_text())["img_r1"] == log[2]["test_img_r1"]


def test_k_test_reranks_the_zero_shot_evaluation_by_itm(tmp_path, tiny_world):
    """k_test: the zero-shot metrics are the original retrieval protocol's (ITC top-k re-scored by ITM), the ITC-only
    ones stay in eval_test.json as itc_*; both equal what the engine's evaluation functions give for the saved
    model, and consistent@1 is taken from the re-ranked scores."""
    from dataset.caption_dataset import RetrievalEvalDataset
    from dataset.caption_logic import consistent_at_1, world_consistency
    from dataset.transforms import eval_transform
    from engine.retrieval import itc_retrieval, itm_rerank_scores, recall_metrics
    from models.tokenizer import load_tokenizer
    from utils.config import load_config

    config = write_tiny_config(tmp_path / "c.yaml", tiny_world, test_world=str(tiny_world), k_test=4)
    out = tmp_path / "out"
    _run(config, out, "--options", "schedular.epochs=1")
    metrics = json.loads((out / "eval_test.json").read_text())
    log = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert log["test_img_r1"] == metrics["img_r1"] and log["test_itc_img_r1"] == metrics["itc_img_r1"]

    cfg = load_config(Pretrain.PretrainConfig, config)
    tokenizer = load_tokenizer(cfg.tokenizer)
    model = Pretrain.build_model(cfg, tokenizer, config)
    model.load_state_dict(torch.load(out / "checkpoint_00.pth", weights_only=False)["model"])
    test_set = RetrievalEvalDataset(cfg.test_file, eval_transform(cfg.image_res), max_words=cfg.max_words)
    loader = torch.utils.data.DataLoader(test_set, batch_size=8)
    itc = itc_retrieval(model, loader, test_set, tokenizer, torch.device("cpu"))
    scores = itm_rerank_scores(model, loader, test_set.text, tokenizer, torch.device("cpu"), 4, cfg.max_tokens)
    reranked = recall_metrics(scores["i2t"].numpy(), scores["t2i"].numpy(), test_set.txt2img, test_set.img2txt)
    for k, v in reranked.items():
        assert metrics[k] == pytest.approx(v, abs=1e-6), k
    for k, v in itc.items():
        assert metrics[f"itc_{k}"] == pytest.approx(v, abs=1e-6), k
    assert (scores["t2i"] > -100).sum(1).eq(4).all()  # 4 candidates per caption re-scored
    truth = world_consistency(str(tiny_world), "test")[0]
    assert metrics["consistent_at_1"] == pytest.approx(consistent_at_1(scores["t2i"], truth))
