"""Retrieval: the retrieval model's objectives, checkpoint mapping, the ITM re-rank protocol, Retrieval.py."""
import json
import os

import pytest
import torch
import yaml

import Retrieval
from engine.retrieval import recall_metrics
from models.albef import ALBEF, ALBEFConfig, ALBEFRetrieval
from models.bert import BertConfig
from models.convert import load_checkpoint
from models.vit import VisionConfig
from tests.conftest import ROOT, write_tiny_config


def _cfg(**kw):
    base = dict(image_res=16, vision_width=32, embed_dim=8, queue_size=8, momentum=0.9,
                vit=VisionConfig(patch_size=8, embed_dim=32, depth=1, num_heads=2),
                bert=BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, fusion_layer=1, encoder_width=32, max_position_embeddings=40,
                                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0),
                pad_token_id=0, cls_token_id=2, mask_token_id=4)
    base.update(kw)
    return ALBEFConfig(**base)


def _batch(bs=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 50, (bs, 7), generator=g)
    ids[:, 0] = 2
    return torch.randn(bs, 3, 16, 16, generator=g), ids, torch.ones_like(ids)


def test_retrieval_layout_and_losses():
    torch.manual_seed(0)
    model = ALBEFRetrieval(_cfg())
    keys = set(model.state_dict())
    assert "idx_queue" in keys and "text_encoder.encoder.layer.1.crossattention.self.query.weight" in keys
    assert not any(k.startswith(("text_encoder.bert.", "text_encoder.cls.")) for k in keys)
    image, ids, mask = _batch()
    idx = torch.tensor([0, 0, 1, 2])  # two captions of image 0
    losses = model(image, ids, mask, idx, alpha=0.4)
    assert set(losses) == {"loss_ita", "loss_itm"} and all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert model.idx_queue[0, :4].tolist() == [0, 0, 1, 2] and int(model.queue_ptr) == 4


def test_same_image_is_never_an_itm_negative():
    """A batch that is all one image except one sample: negatives must be drawn (no multinomial crash)."""
    torch.manual_seed(0)
    model = ALBEFRetrieval(_cfg())
    image, ids, mask = _batch()
    losses = model(image, ids, mask, torch.tensor([7, 7, 7, 7]), alpha=0.0)
    assert torch.isfinite(losses["loss_itm"])


def test_itc_targets_use_image_ids_across_batch_and_queue():
    torch.manual_seed(0)
    model = ALBEFRetrieval(_cfg(), distill=False)
    model.idx_queue[0, :2] = torch.tensor([5, 9])
    image, ids, mask = _batch()
    idx = torch.tensor([5, 6, 6, 8])
    captured = {}
    import models.albef as albef_mod
    real = albef_mod.itc_loss

    def spy(*args):
        captured["targets"] = args[5]
        return real(*args)

    albef_mod.itc_loss = spy
    try:
        model(image, ids, mask, idx)
    finally:
        albef_mod.itc_loss = real
    t = captured["targets"]  # [4, 4 + 8]
    assert torch.allclose(t.sum(1), torch.ones(4))
    assert t[0, 0] == 0.5 and t[0, 4] == 0.5  # image 5: itself and the queued feature of image 5
    assert t[1, 1] == 0.5 and t[1, 2] == 0.5  # image 6: both captions in the batch


def test_pretrain_checkpoint_maps_to_retrieval(tmp_path):
    torch.manual_seed(0)
    pre = ALBEF(_cfg())
    torch.save({"model": pre.state_dict()}, tmp_path / "pre.pth")
    ret = ALBEFRetrieval(_cfg(image_res=24))  # 2x2 -> 3x3 patches: pos-embed resized
    report = load_checkpoint(ret, str(tmp_path / "pre.pth"), verbose=False)
    assert report["missing"] == ["idx_queue"] and len(report["dropped"]) == 2 * 7
    sd_pre, sd_ret = pre.state_dict(), ret.state_dict()
    assert torch.equal(sd_ret["text_encoder.encoder.layer.0.attention.self.query.weight"],
                       sd_pre["text_encoder.bert.encoder.layer.0.attention.self.query.weight"])
    assert torch.equal(sd_ret["text_encoder_m.embeddings.word_embeddings.weight"],
                       sd_pre["text_encoder_m.bert.embeddings.word_embeddings.weight"])
    assert torch.equal(sd_ret["image_queue"], sd_pre["image_queue"]) and torch.equal(sd_ret["temp"], sd_pre["temp"])
    assert sd_ret["visual_encoder.pos_embed"].shape == (1, 10, 32)
    assert (sd_ret["idx_queue"] == -100).all()
    # a retrieval checkpoint loads back with nothing missing; a raw state dict (refcoco.pth style) too
    torch.save(ret.state_dict(), tmp_path / "raw.pth")
    again = ALBEFRetrieval(_cfg(image_res=24))
    assert load_checkpoint(again, str(tmp_path / "raw.pth"), verbose=False)["missing"] == []
    # a wrong queue size is an error that says what to do
    with pytest.raises(ValueError, match="queue_size"):
        load_checkpoint(ALBEFRetrieval(_cfg(queue_size=16)), str(tmp_path / "pre.pth"), verbose=False)


def test_recall_metrics_by_hand():
    # 2 images, 3 texts: image 0 <-> texts 0,1; image 1 <-> text 2
    i2t = torch.tensor([[0.1, 0.9, 0.5], [0.8, 0.2, 0.3]]).numpy()  # image 1 ranks its text 2nd
    t2i = i2t.T.copy()
    m = recall_metrics(i2t, t2i, {0: 0, 1: 0, 2: 1}, {0: [0, 1], 1: [2]})
    assert m["txt_r1"] == 50.0 and m["txt_r5"] == 100.0
    # texts: t0 -> best image 1 (wrong), t1 -> image 0 (right), t2 -> image 0 (wrong, rank 2)
    assert m["img_r1"] == pytest.approx(100 / 3) and m["img_r5"] == 100.0
    assert m["r_mean"] == pytest.approx((m["txt_r_mean"] + m["img_r_mean"]) / 2)


def _retrieval_config(path, world, **kw):
    cfg = {
        "train_file": [str(world / "retrieval_train.json")], "val_file": str(world / "retrieval_val.json"),
        "test_file": str(world / "retrieval_test.json"), "image_root": str(world),
        "bert_config": os.path.join(ROOT, "configs", "config_bert_tiny.json"), "image_res": 32,
        "batch_size_train": 8, "batch_size_test": 8, "queue_size": 64, "momentum": 0.995, "vision_width": 128,
        "embed_dim": 32, "k_test": 4, "optimizer": {"lr": 1e-4}, "schedular": {"epochs": 1, "warmup_epochs": 0.05},
        "vit": {"patch_size": 8, "embed_dim": 128, "depth": 2, "num_heads": 4}, "text_encoder": None,
        "tokenizer": str(world / "tokenizer"), "augment": {"crop_scale": [0.8, 1.0], "hflip": False,
                                                            "randaugment": False},
        "num_workers": 0, "print_freq": 10}
    cfg.update(kw)
    with open(path, "w") as f:
        yaml.safe_dump(cfg, f)
    return str(path)


def test_retrieval_evaluate_writes_scores_and_metrics(tmp_path, tiny_world, pretrained):
    config = _retrieval_config(tmp_path / "r.yaml", tiny_world)
    out = tmp_path / "eval"
    results = Retrieval.main(["--config", config, "--output_dir", str(out), "--device", "cpu", "--evaluate",
                              "--checkpoint", str(pretrained)])
    scores = torch.load(out / "score_matrix_test.pt", weights_only=True)
    n_img = 16
    assert scores["i2t"].shape == (n_img, 5 * n_img) and scores["t2i"].shape == (5 * n_img, n_img)
    # exactly k_test re-scored entries per row, -100 elsewhere
    assert ((scores["i2t"] != -100).sum(1) == 4).all() and ((scores["t2i"] != -100).sum(1) == 4).all()
    metrics = json.loads((out / "eval_test.json").read_text())
    assert metrics == pytest.approx(results["test"])
    assert json.loads((out / "log.txt").read_text().splitlines()[0])["epoch"] == 0


def test_retrieval_finetune_keeps_best(tmp_path, tiny_world, pretrained):
    config = _retrieval_config(tmp_path / "r.yaml", tiny_world)
    out = tmp_path / "ft"
    Retrieval.main(["--config", config, "--output_dir", str(out), "--device", "cpu", "--checkpoint", str(pretrained)])
    line = json.loads((out / "log.txt").read_text().splitlines()[0])
    assert {"train_loss_ita", "train_loss_itm", "val_r_mean", "test_txt_r1", "epoch"} <= set(line)
    best = torch.load(out / "checkpoint_best.pth", weights_only=True)
    assert best["epoch"] == 0 and "idx_queue" in best["model"]


def test_retrieval_exit_and_resume_keeps_the_best_of_both_runs(tmp_path, tiny_world, pretrained):
    config = _retrieval_config(tmp_path / "r.yaml", tiny_world, schedular={"epochs": 2, "warmup_epochs": 0.05})
    out = tmp_path / "ft"
    base = ["--config", config, "--output_dir", str(out), "--device", "cpu", "--checkpoint", str(pretrained)]
    Retrieval.main(base + ["--exit_after_epochs", "1"])
    assert (out / "checkpoint_00.pth").exists() and not (out / "checkpoint_01.pth").exists()
    Retrieval.main(base + ["--resume"])
    lines = [json.loads(x) for x in (out / "log.txt").read_text().splitlines()]
    assert [x["epoch"] for x in lines] == [0, 1]
    best_epoch = max(lines, key=lambda x: x["val_r_mean"])["epoch"]
    assert torch.load(out / "checkpoint_best.pth", weights_only=True)["epoch"] == best_epoch
    assert json.loads((out / "eval_val.json").read_text())["epoch"] == best_epoch


@pytest.mark.slow
def test_two_process_evaluate_equals_single_process(tmp_path, tiny_world, pretrained):
    from tests.test_distributed import _torchrun

    config = _retrieval_config(tmp_path / "r.yaml", tiny_world)
    single, multi = tmp_path / "single", tmp_path / "multi"
    Retrieval.main(["--config", config, "--output_dir", str(single), "--device", "cpu", "--evaluate",
                    "--checkpoint", str(pretrained)])
    res = _torchrun(["Retrieval.py", "--config", config, "--output_dir", str(multi), "--device", "cpu", "--evaluate",
                     "--checkpoint", str(pretrained)])
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    for split in ("val", "test"):
        a = torch.load(single / f"score_matrix_{split}.pt", weights_only=True)
        b = torch.load(multi / f"score_matrix_{split}.pt", weights_only=True)
        for k in ("i2t", "t2i"):
            assert torch.allclose(a[k], b[k], atol=1e-5), (split, k, (a[k] - b[k]).abs().max())
        assert json.loads((single / f"eval_{split}.json").read_text()) == \
            json.loads((multi / f"eval_{split}.json").read_text())


def test_load_model_api_and_search(tmp_path, tiny_world, pretrained):
    from models import load_model
    from models.tokenizer import tokenize
    from tools.search import main as search_main

    config = write_tiny_config(tmp_path / "pre.yaml", tiny_world)
    model = load_model(str(pretrained), config)
    assert isinstance(model, ALBEF) and not model.training
    enc = tokenize(model.tokenizer, ["a red circle", "two blue squares"], 30)
    from PIL import Image

    images = torch.stack([model.transform(Image.open(tiny_world / "images" / f"test_{i:05d}.jpg").convert("RGB"))
                          for i in range(2)])
    img = model.encode_image(images)
    txt = model.encode_text(enc["input_ids"], enc["attention_mask"])
    assert img.embeds.shape == (2, 1 + 16, 128) and img.feat.shape == (2, 32)
    assert torch.allclose(img.feat.norm(dim=-1), torch.ones(2), atol=1e-5)
    fused = model.fuse(txt.embeds, enc["attention_mask"], img.embeds)
    assert model.itm_logits(fused).shape == (2, 2)
    assert model.mlm_logits(enc["input_ids"], enc["attention_mask"], img.embeds).shape[-1] == 512
    # the same weights as a retrieval-layout file load as the retrieval model, with identical features
    ret = ALBEFRetrieval(model.cfg)
    load_checkpoint(ret, str(pretrained), verbose=False)
    torch.save({"model": ret.state_dict()}, tmp_path / "ret.pth")
    model_r = load_model(str(tmp_path / "ret.pth"), config)
    assert isinstance(model_r, ALBEFRetrieval)
    assert torch.allclose(model_r.encode_text(enc["input_ids"], enc["attention_mask"]).feat, txt.feat, atol=1e-6)
    results = search_main(["--checkpoint", str(pretrained), "--config", config, "--images",
                           str(tiny_world / "images"), "--query", "a red circle", "--top", "3", "--k_test", "4",
                           "--device", "cpu"])
    assert len(results) == 4 and results[0][1] >= results[-1][1]


def test_load_model_gives_the_task_model_of_a_task_checkpoint(tmp_path, tiny_world, pretrained):
    """A VQA / VE / NLVR / TA checkpoint from the demo's pre-training: load_model builds the matching model."""
    from models import ALBEFNLVR, ALBEFTextAssignment, ALBEFVE, ALBEFVQA, load_model
    from models.tokenizer import tokenize

    config = write_tiny_config(tmp_path / "pre.yaml", tiny_world)
    cfg = load_model(str(pretrained), config).cfg
    enc = tokenize(load_model(str(pretrained), config).tokenizer, ["what color is the circle"], 30)
    image = torch.randn(1, 3, 32, 32)
    ta = ALBEFTextAssignment(cfg)
    load_checkpoint(ta, str(pretrained), verbose=False)
    for cls, source, distill in ((ALBEFVQA, str(pretrained), True), (ALBEFVE, str(pretrained), False),
                                 (ALBEFNLVR, ta.state_dict(), True), (ALBEFTextAssignment, str(pretrained), None)):
        model = cls(cfg) if distill is None else cls(cfg, distill=distill)
        load_checkpoint(model, source, verbose=False)
        path = tmp_path / f"{cls.layout}.pth"
        torch.save({"model": model.state_dict()}, path)
        loaded = load_model(str(path), config)
        assert type(loaded) is cls and not loaded.training and loaded.transform is not None
        assert getattr(loaded, "distill", None) == distill
        for k, v in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k
    answers = torch.tensor([[2, 10, 3], [2, 11, 3]])
    ids, probs = load_model(str(tmp_path / "vqa.pth"), config).answer(
        image, enc["input_ids"], enc["attention_mask"], answers, torch.ones_like(answers), k=2)
    assert ids.shape == probs.shape == (1, 2) and torch.allclose(probs.sum(), torch.tensor(1.0))
    assert load_model(str(tmp_path / "ve.pth"), config).classify(image, enc["input_ids"],
                                                                 enc["attention_mask"]).shape == (1, 3)


def test_convert_checkpoint_tool(tmp_path):
    from tools.convert_checkpoint import main as convert_main

    torch.manual_seed(0)
    pre = ALBEF(_cfg())
    torch.save({"model": {"module." + k: v for k, v in pre.state_dict().items()}}, tmp_path / "pre.pth")
    convert_main([str(tmp_path / "pre.pth"), str(tmp_path / "ret.pth"), "--to", "retrieval", "--image_res", "24"])
    sd = torch.load(tmp_path / "ret.pth", weights_only=True)["model"]
    ret = ALBEFRetrieval(_cfg(image_res=24))
    ret.load_state_dict(sd, strict=True)  # exactly the retrieval layout
    assert (sd["idx_queue"] == -100).all()
    with pytest.raises(SystemExit, match="cannot map a retrieval checkpoint"):
        convert_main([str(tmp_path / "ret.pth"), str(tmp_path / "x.pth"), "--to", "pretrain"])


def test_evaluate_needs_a_checkpoint_and_its_own_folder(tmp_path, tiny_world, pretrained):
    """--evaluate without --checkpoint would score random weights; into a training run's folder it would overwrite
    that run's config.yaml, log.txt and results; an --output_dir that is a file is named as such."""
    import shutil

    from engine.resume import OutputDirError
    from utils.config import ConfigError

    config = _retrieval_config(tmp_path / "r.yaml", tiny_world)

    def run(out, *extra):
        return Retrieval.main(["--config", config, "--output_dir", str(out), "--device", "cpu", *extra])

    with pytest.raises(ConfigError, match="--evaluate needs --checkpoint"):
        run(tmp_path / "a", "--evaluate")
    trained = tmp_path / "trained"
    trained.mkdir()
    shutil.copy(pretrained, trained / "checkpoint_00.pth")
    (trained / "log.txt").write_text("{}\n")
    with pytest.raises(OutputDirError, match="holds a training run .*evaluate into another --output_dir"):
        run(trained, "--evaluate", "--checkpoint", str(pretrained))
    assert (trained / "log.txt").read_text() == "{}\n" and not (trained / "config.yaml").exists()
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputDirError, match="afile is a file, not a folder"):
        run(tmp_path / "afile", "--evaluate", "--checkpoint", str(pretrained))


@pytest.mark.parametrize("error,prefix", [("config", "config error"), ("weights", "missing file"),
                                          ("data", "data error"), ("layout", "checkpoint error")])
def test_run_cli_prints_one_line_and_exits_2(error, prefix, capsys):
    from dataset.images import DataError
    from engine.recipe import run_cli
    from models.layouts import LayoutError
    from models.pretrained import MissingWeightsError
    from utils.config import ConfigError

    cls = {"config": ConfigError, "weights": MissingWeightsError, "data": DataError, "layout": LayoutError}[error]

    def main():
        raise cls("what went wrong, naming the file")

    with pytest.raises(SystemExit) as e:
        run_cli(main)
    assert e.value.code == 2
    assert capsys.readouterr().err == f"{prefix}: what went wrong, naming the file\n"
