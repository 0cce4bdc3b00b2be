"""The objectives ablation (the paper's Table 1): the ALBEF switches ``itc``, ``itm_hard_negatives``, ``itc_distill``
and ``mlm_distill`` each change only the loss they name (the other losses bitwise equal, the random draws in the same
order), the defaults are the full model as it was, the Pretrain.py keys reach the model, bad combinations are
refused naming the keys, and ``tools/ablation.py`` tabulates and plots runs (fake ones, and one real tiny run)."""
import json
import os
import time

import pytest
import torch
import torch.nn.functional as F
import yaml

import models.albef as albef_mod
from models.albef import OBJECTIVE_ROWS, ALBEF, ALBEFConfig, ALBEFRetrieval
from models.bert import BertConfig
from models.losses import mask_tokens, mlm_loss, sample_hard_negatives
from models.vit import VisionConfig
from tests.conftest import write_tiny_config
from tools import ablation

VOCAB, PAD_ID, CLS_ID, MASK_ID = 120, 0, 2, 4
B, L = 6, 10
SWITCHES = ("itc", "itm_hard_negatives", "itc_distill", "mlm_distill")


def _cfg(dropout: float = 0.1, **kw) -> ALBEFConfig:
    base = dict(image_res=16, vision_width=32, embed_dim=16, queue_size=24, momentum=0.9,
                vit=VisionConfig(patch_size=4, embed_dim=32, depth=1, num_heads=2),
                bert=BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                intermediate_size=64, fusion_layer=2, encoder_width=32, max_position_embeddings=40,
                                hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout),
                pad_token_id=PAD_ID, cls_token_id=CLS_ID, mask_token_id=MASK_ID)
    base.update(kw)
    return ALBEFConfig(**base)


def _model(cfg: ALBEFConfig, train: bool = True) -> ALBEF:
    """Fixed weights (seed 0, whatever the switches) with the momentum copies equal to the online model."""
    torch.manual_seed(0)
    model = ALBEF(cfg)
    model.copy_params()
    return model.train(train)


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (B, L), generator=g)
    ids[:, 0] = CLS_ID
    mask = torch.ones_like(ids)
    mask[: B // 2, L - 3:] = 0
    ids[mask == 0] = PAD_ID
    return torch.randn(B, 3, 16, 16, generator=g), ids, mask


def _losses(model, alpha: float = 0.4, seed: int = 0, batch_seed: int = 0, forward=None):
    """One forward with dropout (global RNG) and the generator (ITM negatives, MLM masking) seeded."""
    image, ids, mask = _batch(batch_seed)
    torch.manual_seed(100 + seed)
    g = torch.Generator().manual_seed(200 + seed)
    out = (forward or ALBEF.forward)(model, image, ids, mask, alpha=alpha, generator=g)
    return {k: v.detach() for k, v in out.items()}


def _original_forward(model, image, ids, mask, alpha=0.0, generator=None):
    """``ALBEF.forward`` as it was before the objective switches (the full model, unconditionally)."""
    cfg = model.cfg
    with torch.no_grad():
        model.temp.clamp_(0.001, 0.5)
    img = model.encode_image(image)
    txt = model.encode_text(ids, mask)
    loss_ita, sim_i2t, sim_t2i, img_m, txt_m = model._itc(image, ids, mask, img, txt, None, alpha)
    model._dequeue_and_enqueue(img_m.feat, txt_m.feat)
    same = torch.eye(image.shape[0], dtype=torch.bool)
    image_kv = model.image_kv(img.embeds)
    loss_itm = model._itm_loss(txt, img, mask, sim_i2t, sim_t2i, same, generator, image_kv,
                               feat_m=(img_m.feat, txt_m.feat))
    masked_ids, labels = mask_tokens(ids, cfg.bert.vocab_size, cfg.mask_token_id, cfg.pad_token_id,
                                     cfg.cls_token_id, cfg.mlm_probability, generator)
    positions = labels.ne(-100).nonzero(as_tuple=True)
    with torch.no_grad():
        logits_m = model.text_encoder_m(masked_ids, mask, encoder_hidden_states=img_m.embeds, positions=positions)
        soft_labels = F.softmax(logits_m.float(), dim=-1)
    logits = model.text_encoder(masked_ids, mask, encoder_kv=image_kv, positions=positions)
    loss_mlm = mlm_loss(logits, labels[positions], soft_labels, alpha)
    return {"loss_mlm": loss_mlm, "loss_ita": loss_ita, "loss_itm": loss_itm}


def _assert_bitwise(a: dict, b: dict, keys):
    for k in keys:
        assert torch.equal(a[k], b[k]), (k, a[k].item(), b[k].item())


# ------------------------------------------------------------------------------------------- the model
def test_defaults_are_the_full_model_bitwise():
    """Default switches = the full model; two steps (dropout on) equal the pre-switch forward bit for bit, queues
    included; so is a model whose switches were set explicitly to the defaults."""
    cfg = _cfg()
    assert all(getattr(cfg, k) is True for k in SWITCHES) and OBJECTIVE_ROWS["full"] == {k: True for k in SWITCHES}
    ours, ref = _model(cfg), _model(_cfg())
    explicit = _model(_cfg(**OBJECTIVE_ROWS["full"]))
    for step in range(2):
        want = _losses(ref, seed=step, batch_seed=step, forward=_original_forward)
        _assert_bitwise(_losses(ours, seed=step, batch_seed=step), want, want)
        _assert_bitwise(_losses(explicit, seed=step, batch_seed=step), want, want)
    for name in ("image_queue", "text_queue", "queue_ptr"):
        assert torch.equal(getattr(ours, name), getattr(ref, name))
    assert all(p.requires_grad for n, p in ours.named_parameters() if not n.split(".")[0].endswith("_m"))


@pytest.mark.parametrize("switch,changed", [("itc_distill", "loss_ita"), ("mlm_distill", "loss_mlm"),
                                            ("itm_hard_negatives", "loss_itm")])
def test_each_switch_changes_only_its_loss(switch, changed):
    """Dropout on, same weights, generator and global seed: only the named loss moves; the others and the queues
    are bitwise those of the full model (the random draws stay in the same order)."""
    full, ablated = _model(_cfg()), _model(_cfg(**{switch: False}))
    for step in range(2):
        want, got = _losses(full, seed=step, batch_seed=step), _losses(ablated, seed=step, batch_seed=step)
        assert not torch.equal(got[changed], want[changed]), (switch, step)
        _assert_bitwise(got, want, [k for k in want if k != changed])
    for name in ("image_queue", "text_queue", "queue_ptr"):
        assert torch.equal(getattr(ablated, name), getattr(full, name))


@pytest.mark.parametrize("switch,loss", [("itc_distill", "loss_ita"), ("mlm_distill", "loss_mlm")])
def test_distill_off_is_the_hard_target_loss(switch, loss):
    """``*_distill: false`` ignores alpha for that loss: it equals the full model's loss at alpha 0 bit for bit."""
    off = _losses(_model(_cfg(dropout=0.0, **{switch: False})), alpha=0.4)
    assert torch.equal(off[loss], _losses(_model(_cfg(dropout=0.0)), alpha=0.0)[loss])
    assert not torch.equal(off[loss], _losses(_model(_cfg(dropout=0.0)), alpha=0.4)[loss])


def test_random_negatives_are_uniform_and_never_the_positive(monkeypatch):
    """itm_hard_negatives false: both draws (an image per text, a text per image) are uniform over the other
    samples of the batch -- flat weights with the positive masked -- and never the positive itself."""
    calls = []

    def spy(sim, same, generator=None, offset=0):
        idx = sample_hard_negatives(sim, same, generator, offset)
        calls.append((sim.clone(), same.clone(), idx))
        return idx

    monkeypatch.setattr(albef_mod, "sample_hard_negatives", spy)
    model = _model(_cfg(itm_hard_negatives=False))
    for step in range(8):
        _losses(model, seed=step, batch_seed=step)
    assert len(calls) == 16
    drawn = torch.zeros(B, B, dtype=torch.long)
    for sim, same, idx in calls:
        assert torch.equal(sim, torch.zeros(B, B)) and torch.equal(same, torch.eye(B, dtype=torch.bool))
        assert not (idx == torch.arange(B)).any()
        drawn[torch.arange(B), idx] += 1
    assert drawn.diagonal().sum() == 0 and (drawn.sum() - drawn.diagonal().sum()) == 16 * B
    calls.clear()
    _losses(_model(_cfg()))  # the default draws from the contrastive similarities
    assert len(calls) == 2 and all(sim.abs().sum() > 0 for sim, _, _ in calls)


@pytest.mark.parametrize("mlm_distill", [True, False])
def test_itc_off(mlm_distill):
    """itc false (with itm_hard_negatives false): loss_ita a constant 0 without gradient, queues untouched, ITC
    projections and temp frozen, every other trainable parameter gets a gradient; loss_itm and loss_mlm equal those of
    the ITC model with random negatives (no dropout, same generator); without MLM distillation the momentum model is
    never used (not even updated)."""
    off = _model(_cfg(dropout=0.0, itc=False, itm_hard_negatives=False, mlm_distill=mlm_distill))
    ref = _model(_cfg(dropout=0.0, itm_hard_negatives=False, mlm_distill=mlm_distill))
    queues = {n: getattr(off, n).clone() for n in ("image_queue", "text_queue", "queue_ptr")}
    updates = []
    update = off.momentum_update
    off.momentum_update = lambda: updates.append(1) or update()
    image, ids, mask = _batch()
    out = off(image, ids, mask, alpha=0.4, generator=torch.Generator().manual_seed(200))
    assert out["loss_ita"].item() == 0.0 and not out["loss_ita"].requires_grad
    sum(out.values()).backward()
    frozen = {"vision_proj.weight", "vision_proj.bias", "text_proj.weight", "text_proj.bias", "temp"}
    trainable = {n for n, p in off.named_parameters() if p.requires_grad}
    assert not trainable & frozen and trainable
    assert all(p.grad is not None for n, p in off.named_parameters() if n in trainable)
    assert all(torch.equal(getattr(off, n), v) for n, v in queues.items())
    assert len(updates) == int(mlm_distill)
    want = _losses(ref)
    _assert_bitwise(_losses(_model(_cfg(dropout=0.0, itc=False, itm_hard_negatives=False, mlm_distill=mlm_distill))),
                    want, ["loss_itm", "loss_mlm"])


def test_bad_combinations_name_the_keys():
    with pytest.raises(ValueError, match="itm_hard_negatives: true needs itc: true"):
        _cfg(itc=False)
    with pytest.raises(ValueError, match="itm_negatives: global .*itm_hard_negatives: false"):
        _cfg(itm_hard_negatives=False, itm_negatives="global")
    _cfg(itc=False, itm_hard_negatives=False, itc_distill=True)  # itc_distill without ITC: accepted, unused
    with pytest.raises(ValueError, match="itc: true"):
        ALBEFRetrieval(_cfg(itc=False, itm_hard_negatives=False))
    for row, switches in OBJECTIVE_ROWS.items():
        assert set(switches) == set(SWITCHES), row
        _cfg(**switches)  # every Table 1 row is a valid combination


# ------------------------------------------------------------------------------------------- Pretrain.py keys
def test_pretrain_keys_reach_the_model(tmp_path, tiny_world):
    import Pretrain
    from models.tokenizer import load_tokenizer
    from utils.config import ConfigError, load_config

    path = write_tiny_config(tmp_path / "c.yaml", tiny_world)
    tok = load_tokenizer(str(tiny_world / "tokenizer"))
    default = load_config(Pretrain.PretrainConfig, path)
    assert all(getattr(default, k) is True for k in SWITCHES)
    assert all(getattr(Pretrain.build_model(default, tok, path).cfg, k) is True for k in SWITCHES)
    for row, switches in OBJECTIVE_ROWS.items():
        cfg = load_config(Pretrain.PretrainConfig, path, ablation.run_options(row))
        model = Pretrain.build_model(cfg, tok, path)
        assert {k: getattr(model.cfg, k) for k in SWITCHES} == switches, row
        assert model.vision_proj.weight.requires_grad == switches["itc"]
    in_file = write_tiny_config(tmp_path / "f.yaml", tiny_world, itc=False, itm_hard_negatives=False)
    assert load_config(Pretrain.PretrainConfig, in_file).itc is False
    with pytest.raises(ConfigError, match=r"c\.yaml.*itm_hard_negatives: true needs itc: true"):
        load_config(Pretrain.PretrainConfig, path, ["itc=false"])
    with pytest.raises(ConfigError, match="itc: expected true/false"):
        load_config(Pretrain.PretrainConfig, path, ["itc=maybe"])


# ------------------------------------------------------------------------------------------- tools/ablation.py
def _fake_run(out, row, seed, metrics, epochs=None):
    d = ablation.run_dir(str(out), row, seed)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "eval_test.json"), "w") as f:
        json.dump(metrics, f)
    cfg = dict(OBJECTIVE_ROWS[row], scheduler={"epochs": epochs or 14})
    with open(os.path.join(d, "config.yaml"), "w") as f:
        yaml.safe_dump(cfg, f)


def test_ablation_report_from_fake_runs(tmp_path, monkeypatch, capsys):
    out = tmp_path / "abl"
    _fake_run(out, "full", 0, {"img_r1": 10.0, "txt_r1": 20.0, "r_mean": 30.0, "consistent_at_1": 0.5,
                               "ceiling_img_r1": 90.0, "ceiling_img_r10": 99.0})
    _fake_run(out, "full", 1, {"img_r1": 14.0, "txt_r1": 22.0, "r_mean": 34.0, "consistent_at_1": 0.7,
                               "ceiling_img_r1": 90.0, "ceiling_img_r10": 99.0})
    _fake_run(out, "MLM+ITM", 0, {"img_r1": 1.0, "txt_r1": 2.0, "r_mean": 3.0})
    _fake_run(out, "MLM+ITM", 1, {"img_r1": 1.0, "txt_r1": 2.0, "r_mean": 3.0})
    monkeypatch.setattr(ablation.subprocess, "call", lambda *a, **k: pytest.fail("finished runs must be skipped"))
    assert ablation.main(["--config", "c.yaml", "--seeds", "0", "1", "--out", str(out), "--rows",
                          "full,MLM+ITM"]) == 0
    report = json.loads((out / "ablation.json").read_text())
    assert list(report["rows"]) == ["MLM+ITM", "full"]  # Table 1 order
    full = report["rows"]["full"]
    assert full["mean"]["img_r1"] == pytest.approx(12.0) and full["std"]["img_r1"] == pytest.approx(2 ** 0.5 * 2)
    assert full["mean"]["consistent_at_1"] == pytest.approx(0.6) and full["std"]["ceiling_img_r1"] == 0.0
    assert report["rows"]["MLM+ITM"]["std"]["r_mean"] == 0.0 and full["switches"] == OBJECTIVE_ROWS["full"]
    md = (out / "ablation.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| row"))
    assert header.split(" | ")[6:] == ["img_r1", "txt_r1", "r_mean", "consistent_at_1", "ceiling_img_r1 |"]  # R@10 ceiling: json only
    assert ("| full | ✓ | ✓ | ✓ | ✓ | 2 | 12.00 ± 2.83 | 21.00 ± 1.41 | 32.00 ± 2.83 | 0.60 ± 0.14 | "
            "90.00 ± 0.00 |") in md
    assert "| MLM+ITM | - | - | - | - | 2 | 1.00 ± 0.00 | 2.00 ± 0.00 | 3.00 ± 0.00 | - | - |" in md
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "done already" in capsys.readouterr().out


def test_ablation_dry_run_and_resume_rules(tmp_path, capsys):
    out = tmp_path / "abl"
    _fake_run(out, "full", 0, {"img_r1": 1.0, "txt_r1": 1.0, "r_mean": 1.0}, epochs=3)
    _fake_run(out, "full", 1, {"img_r1": 1.0, "txt_r1": 1.0, "r_mean": 1.0}, epochs=14)  # other epochs: redo
    _fake_run(out, "ITC+MLM+ITM", 0, {"img_r1": 1.0, "txt_r1": 1.0, "r_mean": 1.0}, epochs=3)
    with open(os.path.join(ablation.run_dir(str(out), "ITC+MLM+ITM", 0), "config.yaml"), "w") as f:
        yaml.safe_dump(dict(OBJECTIVE_ROWS["full"], scheduler={"epochs": 3}), f)  # another row's switches: redo
    assert ablation.main(["--config", "c.yaml", "--seeds", "0", "1", "--out", str(out), "--epochs", "3",
                          "--dry-run", "--options", "batch_size=4"]) == 0
    printed = capsys.readouterr().out.splitlines()
    commands = [line for line in printed if "Pretrain.py" in line]
    assert len(commands) == 2 * 5 - 1 and sum("done already" in line for line in printed) == 1
    first = commands[0].split()
    assert first[first.index("--output_dir") + 1] == ablation.run_dir(str(out), "MLM+ITM", 0)
    assert first[first.index("--seed") + 1] == "0" and "--overwrite" in first and first[-1] == "batch_size=4"
    assert first[first.index("--options") + 1:-1] == ["itc=false", "itm_hard_negatives=false", "itc_distill=false",
                                                      "mlm_distill=false", "scheduler.epochs=3"]
    assert not (out / "ablation.json").exists()
    with pytest.raises(SystemExit):
        ablation.parse_args(["--rows", "MLM+ITM,nope"])


def test_ablation_report_only_leaves_unfinished_runs_out(tmp_path, monkeypatch, capsys):
    out = tmp_path / "abl"
    _fake_run(out, "full", 0, {"img_r1": 10.0, "txt_r1": 20.0, "r_mean": 30.0})
    monkeypatch.setattr(ablation.subprocess, "call", lambda *a, **k: pytest.fail("--report never trains"))
    assert ablation.main(["--config", "c.yaml", "--seeds", "0", "1", "--out", str(out), "--rows", "full",
                          "--report"]) == 0
    assert "not finished, left out: full/seed1" in capsys.readouterr().out
    report = json.loads((out / "ablation.json").read_text())
    assert report["rows"]["full"]["mean"]["img_r1"] == pytest.approx(10.0)


@pytest.mark.slow
def test_ablation_one_real_tiny_run(tmp_path, tiny_world, capsys):
    """One row (MLM+ITM: no ITC, so the engine's first-step gradient check sees the frozen projections), one seed,
    one epoch of the tiny config through Pretrain.py in a subprocess; then a second call skips it."""
    config = write_tiny_config(tmp_path / "tiny.yaml", tiny_world)
    out = tmp_path / "abl"
    t0 = time.time()
    rc = ablation.main(["--config", config, "--seeds", "0", "--out", str(out), "--rows", "MLM+ITM", "--epochs", "1"])
    log = out / "MLM+ITM" / "seed0" / "run.log"
    assert rc == 0, log.read_text()[-3000:]
    report = json.loads((out / "ablation.json").read_text())
    run = report["rows"]["MLM+ITM"]["runs"]["0"]
    assert {"img_r1", "txt_r1", "r_mean"} <= set(run) and all(0 <= run[k] <= 100 for k in ("img_r1", "txt_r1"))
    saved = yaml.safe_load((out / "MLM+ITM" / "seed0" / "config.yaml").read_text())
    assert {k: saved[k] for k in SWITCHES} == OBJECTIVE_ROWS["MLM+ITM"] and saved["scheduler"]["epochs"] == 1
    assert "loss_ita: 0.0000" in log.read_text()
    print(f"one tiny ablation run: {time.time() - t0:.1f} s")
    capsys.readouterr()
    assert ablation.main(["--config", config, "--seeds", "0", "--out", str(out), "--rows", "MLM+ITM",
                          "--epochs", "1"]) == 0
    assert "done already" in capsys.readouterr().out


def test_ablation_refuses_to_mix_settings(tmp_path, monkeypatch):
    """The first run stamps OUT with its setting (config content, options, epochs); another config or other
    options are refused before anything trains, naming what differs; comments in the config do not count."""
    calls = []
    monkeypatch.setattr(ablation.subprocess, "call", lambda *a, **k: calls.append(a) or 1)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("# a comment\nqueue_size: 256\noptimizer: {lr: 3e-4}\n")
    out = tmp_path / "abl"
    args = ["--config", str(cfg), "--seeds", "0", "--out", str(out), "--rows", "full"]
    ablation.main(args)  # the (fake) run fails, but the setting is stamped
    assert len(calls) == 1 and json.loads((out / ablation.STAMP_FILE).read_text())["config"]["queue_size"] == 256
    cfg.write_text("# another comment\nqueue_size: 256\noptimizer: {lr: 3e-4}\n")
    ablation.main(args)
    assert len(calls) == 2
    cfg.write_text("queue_size: 2048\noptimizer: {lr: 3e-4}\n")
    with pytest.raises(SystemExit, match="config keys queue_size differ"):
        ablation.main(args)
    cfg.write_text("queue_size: 256\noptimizer: {lr: 3e-4}\n")
    with pytest.raises(SystemExit, match="options differ"):
        ablation.main(args + ["--options", "temp=0.1"])
    assert len(calls) == 2
