"""Optimizer groups (optim/) and the warm-up + cosine learning-rate schedule (scheduler/), against the
original ALBEF's behaviour (reference sections 7.1 and 7.2)."""
import math

import pytest
import torch

from models.albef import ALBEF, ALBEFConfig
from models.bert import BertConfig
from models.vit import VisionConfig
from optim import OptimizerConfig, create_optimizer, param_groups
from scheduler import SchedulerConfig, create_scheduler


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    vit = VisionConfig(patch_size=8, embed_dim=64, depth=2, num_heads=2)
    bert = BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
                      intermediate_size=128, max_position_embeddings=32, fusion_layer=2, encoder_width=64)
    cfg = ALBEFConfig(image_res=32, vision_width=64, embed_dim=16, queue_size=32, vit=vit, bert=bert,
                      cls_token_id=1, mask_token_id=2)
    return ALBEF(cfg)


# ============================================================================================ optimizer
def _group_names(model, groups):
    ids = [{id(p) for p in g["params"]} for g in groups]
    names = [set(), set()]
    for n, p in model.named_parameters():
        for k in range(2):
            if id(p) in ids[k]:
                names[k].add(n)
    return names


def test_param_groups_match_original_decay_rules(tiny):
    groups = param_groups(tiny, 0.02)
    assert len(groups) == 2
    wd = [g["weight_decay"] for g in groups]
    no_decay_group, decay_group = (groups[0], groups[1]) if wd[0] == 0 else (groups[1], groups[0])
    assert no_decay_group["weight_decay"] == 0.0 and decay_group["weight_decay"] == 0.02
    no_decay, decay = _group_names(tiny, [no_decay_group, decay_group])
    assert not (no_decay & decay)

    # decayed as in the original (0-d temp and 3-d pos_embed / cls_token included)
    for n in ("temp", "visual_encoder.pos_embed", "visual_encoder.cls_token", "visual_encoder.patch_embed.proj.weight",
              "visual_encoder.blocks.0.attn.qkv.weight", "text_encoder.bert.embeddings.word_embeddings.weight",
              "text_encoder.bert.encoder.layer.3.crossattention.self.key.weight", "itm_head.weight",
              "vision_proj.weight", "text_proj.weight", "text_encoder.cls.predictions.transform.dense.weight"):
        assert n in decay, n
    # not decayed: biases and 1-D (LayerNorm) weights
    for n in ("visual_encoder.norm.weight", "visual_encoder.blocks.1.norm1.weight", "visual_encoder.blocks.1.attn.qkv.bias",
              "text_encoder.bert.embeddings.LayerNorm.weight", "text_encoder.bert.encoder.layer.0.output.LayerNorm.weight",
              "text_encoder.cls.predictions.bias", "itm_head.bias", "vision_proj.bias"):
        assert n in no_decay, n

    trainable = {n: p for n, p in tiny.named_parameters() if p.requires_grad}
    for n, p in trainable.items():
        expect_no_decay = p.ndim == 1 or n.endswith(".bias")
        assert (n in no_decay) == expect_no_decay, n
    # every trainable parameter exactly once, no momentum parameter at all
    assert no_decay | decay == set(trainable)
    n_grouped = sum(len(g["params"]) for g in groups)
    assert n_grouped == len({id(p) for p in trainable.values()})
    mom = {id(p) for p in tiny.momentum_parameters()}
    assert not any(id(p) in mom for g in groups for p in g["params"])
    assert not any(n.split(".")[0].endswith("_m") for n in no_decay | decay)


@pytest.mark.parametrize("opt,cls", [("adamW", torch.optim.AdamW), ("adam", torch.optim.Adam), ("AdamW", torch.optim.AdamW)])
def test_create_optimizer_uses_config_values(tiny, opt, cls):
    cfg = OptimizerConfig(opt=opt, lr=3e-4, weight_decay=0.05, betas=[0.8, 0.99], eps=1e-6)
    optimizer = create_optimizer(tiny, cfg)
    assert type(optimizer) is cls
    wds = sorted(g["weight_decay"] for g in optimizer.param_groups)
    assert wds == [0.0, 0.05]
    for g in optimizer.param_groups:
        assert g["lr"] == 3e-4 and tuple(g["betas"]) == (0.8, 0.99) and g["eps"] == 1e-6
    defaults = OptimizerConfig()
    assert (defaults.opt, defaults.lr, defaults.weight_decay, tuple(defaults.betas), defaults.eps) == \
        ("adamW", 1e-4, 0.02, (0.9, 0.999), 1e-8)


@pytest.mark.parametrize("fused", [None, True, False])
def test_fused_null_picks_the_fused_kernel_on_the_cpu(tiny, fused):
    """``fused: null`` picks torch's fused AdamW on the CPU (5x faster than foreach at the base size)."""
    optimizer = create_optimizer(tiny, OptimizerConfig(lr=1e-3, fused=fused))
    assert bool(optimizer.defaults.get("fused")) == (fused is not False)
    assert bool(optimizer.defaults.get("foreach")) == (fused is False)


def test_fused_kernel_on_the_cpu_is_the_foreach_update():
    """The fused CPU kernel gives the foreach update to float32 rounding, and it skips a step whose ``found_inf`` is
    set (the trainer's divergence guard) without counting it."""
    torch.manual_seed(0)
    params = [torch.randn(300) for _ in range(3)]
    grads = [[torch.randn(300) for _ in params] for _ in range(10)]
    runs = {}
    for kernel in ("foreach", "fused"):
        ps = [torch.nn.Parameter(p.clone()) for p in params]
        opt = torch.optim.AdamW([{"params": ps, "weight_decay": 0.02}], lr=1e-3, **{kernel: True})
        for g in grads:
            for p, gi in zip(ps, g):
                p.grad = gi.clone()
            opt.step()
        runs[kernel] = ps
    for a, b in zip(runs["foreach"], runs["fused"]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)

    p = torch.nn.Parameter(torch.ones(4))
    p.grad = torch.ones(4)
    opt = torch.optim.AdamW([p], lr=0.1, fused=True)
    opt.found_inf = torch.tensor(1.0)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(4)) and opt.state[p]["step"].item() == 0
    opt.found_inf = torch.tensor(0.0)
    opt.step()
    assert (p.detach() < 1).all() and opt.state[p]["step"].item() == 1


def test_adamw_step_decays_only_the_decay_group(tiny):
    model = tiny
    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        lr, wd = 1e-2, 0.5
        optimizer = create_optimizer(model, OptimizerConfig(lr=lr, weight_decay=wd))
        for p in model.parameters():
            if p.requires_grad:
                p.grad = torch.zeros_like(p)  # Adam's update is 0: only the decoupled weight decay acts
        optimizer.step()
        for n, p in model.named_parameters():
            before = saved[n]
            if not p.requires_grad or p.ndim == 1 or n.endswith(".bias"):
                assert torch.equal(p, before), n
            else:
                torch.testing.assert_close(p.detach(), before * (1 - lr * wd), msg=n)
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(saved[n])
                p.grad = None


@pytest.mark.parametrize("kw", [dict(opt="sgd"), dict(opt="lamb"), dict(betas=[0.9])])
def test_optimizer_config_rejects_unsupported(kw):
    with pytest.raises(ValueError):
        OptimizerConfig(**kw)


# ============================================================================================ scheduler
def _sched(cfg, lr=1e-4, steps_per_epoch=50):
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [p]}, {"params": [torch.nn.Parameter(torch.zeros(1))], "weight_decay": 0.0}],
                            lr=lr)
    return opt, create_scheduler(cfg, opt, steps_per_epoch)


def _reference_lr(t, lr=1e-4, warmup_lr=1e-5, min_lr=1e-6, warmup=10, total=100):
    if t < warmup:
        return warmup_lr + t * (lr - warmup_lr) / warmup
    if t >= total:
        return min_lr
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * (t - warmup) / (total - warmup)))


def test_warmup_then_cosine_per_step():
    cfg = SchedulerConfig(epochs=2, warmup_steps=10, warmup_lr=1e-5, min_lr=1e-6)
    opt, sched = _sched(cfg)
    # construction sets the warm-up lr
    assert all(g["lr"] == pytest.approx(1e-5) for g in opt.param_groups)
    seen = []
    for t in range(0, 121):
        sched.step_update(t)
        lrs = [g["lr"] for g in opt.param_groups]
        assert lrs[0] == lrs[1]
        assert lrs[0] == pytest.approx(_reference_lr(t), rel=1e-9, abs=1e-15), t
        seen.append(lrs[0])
    assert seen[0] == pytest.approx(1e-5)
    assert seen[5] == pytest.approx(1e-5 + 0.5 * (1e-4 - 1e-5))
    assert seen[10] == pytest.approx(1e-4)  # peak right after warm-up
    assert seen[55] == pytest.approx(1e-6 + 0.5 * (1e-4 - 1e-6))  # half-way through the cosine
    assert seen[100] == pytest.approx(1e-6) and seen[120] == pytest.approx(1e-6)
    # monotone: up during warm-up, down after
    assert all(a < b for a, b in zip(seen[:10], seen[1:11]))
    assert all(a >= b for a, b in zip(seen[10:100], seen[11:101]))


def test_default_warmup_length_is_warmup_epochs_times_100():
    assert SchedulerConfig().num_warmup_steps() == 2000
    assert SchedulerConfig(warmup_epochs=0.5).num_warmup_steps() == 50
    assert SchedulerConfig(warmup_epochs=20, warmup_steps=7).num_warmup_steps() == 7
    cfg = SchedulerConfig(epochs=30, warmup_lr=1e-5, min_lr=1e-5)  # the original Pretrain.yaml schedule
    opt, sched = _sched(cfg, lr=1e-4, steps_per_epoch=1000)
    sched.step_update(1000)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-5 + 1000 * (1e-4 - 1e-5) / 2000)
    sched.step_update(2000)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)
    sched.step_update(30 * 1000)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-5)


def test_warmup_longer_than_training_is_clipped():
    cfg = SchedulerConfig(epochs=1, warmup_steps=500, warmup_lr=1e-5, min_lr=1e-6)
    opt, sched = _sched(cfg, steps_per_epoch=20)
    lrs = []
    for t in range(21):
        sched.step_update(t)
        lrs.append(opt.param_groups[0]["lr"])
    assert all(math.isfinite(x) for x in lrs)
    assert lrs[19] == pytest.approx(1e-4)  # warm-up shortened to total - 1 steps
    assert lrs[20] == pytest.approx(1e-6)


def test_scheduler_state_dict_round_trip():
    cfg = SchedulerConfig(epochs=2, warmup_steps=10, warmup_lr=1e-5, min_lr=1e-6)
    opt, sched = _sched(cfg)
    for t in range(37):
        sched.step_update(t)
    state = sched.state_dict()
    assert "optimizer" not in state
    opt2, sched2 = _sched(SchedulerConfig(epochs=5, warmup_steps=3, warmup_lr=1e-3, min_lr=1e-3), lr=1e-4)
    sched2.load_state_dict(state)
    assert sched2.state_dict() == state
    for t in range(37, 105):
        sched.step_update(t)
        sched2.step_update(t)
        assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == pytest.approx(_reference_lr(t)), t


@pytest.mark.parametrize("kw", [dict(sched="step"), dict(epochs=0)])
def test_scheduler_config_rejects_unsupported(kw):
    with pytest.raises(ValueError):
        SchedulerConfig(**kw)


def test_no_warmup_starts_at_peak():
    cfg = SchedulerConfig(epochs=1, warmup_steps=0, warmup_lr=1e-5, min_lr=1e-6)
    opt, sched = _sched(cfg, lr=1e-4, steps_per_epoch=10)
    sched.step_update(0)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)
    sched.step_update(5)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-6 + 0.5 * (1e-4 - 1e-6))
    sched.step_update(10)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-6)
