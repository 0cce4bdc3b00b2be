"""Under autocast the momentum teacher runs with its Linear/Conv weights cast once per entry (one foreach copy)
instead of once per layer call: losses, gradients and the EMA are bit for bit those of plain autocast, the casts
are fewer, checkpoints never see the low-precision copies, and the copies follow replaced or reloaded weights."""
import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine.trainer import autocast_context
from models.albef import ALBEF, ALBEFRetrieval
from models.classifiers import ALBEFNLVR, ALBEFVE
from models.vqa import ALBEFVQA
from tests.test_fast_step import _batch, _cfg  # dropout 0.1: the RNG must line up too

CPU = torch.device("cpu")


def _text(bsz):
    _, ids, mask = _batch(bsz)
    return ids, mask


def _images(n, seed=1):
    return _batch(n, seed)[0]


def _pretrain_call(model, seed):
    ids, mask = _text(6)
    return model(_images(6), ids, mask, alpha=0.4, generator=torch.Generator().manual_seed(seed))


def _retrieval_call(model, seed):
    ids, mask = _text(6)
    return model(_images(6), ids, mask, torch.tensor([0, 1, 1, 2, 3, 4]), alpha=0.4,
                 generator=torch.Generator().manual_seed(seed))


def _ve_call(model, seed):
    ids, mask = _text(4)
    return model(_images(4), ids, mask, torch.tensor([0, 1, 2, 1]), alpha=0.4)


def _nlvr_call(model, seed):
    ids, mask = _text(3)
    return model(_images(6), ids, mask, torch.tensor([0, 1, 1]), alpha=0.4)


def _vqa_call(model, seed):
    ids, mask = _text(2)
    a_ids = torch.tensor([[2, 7, 3, 0], [2, 8, 9, 3], [2, 10, 3, 0]])
    return model(_images(2), ids, mask, a_ids, (a_ids != 0).long(), torch.tensor([2, 1]),
                 torch.tensor([0.6, 0.4, 1.0]), alpha=0.4)


CASES = {
    "pretrain": (lambda: ALBEF(_cfg()), _pretrain_call),
    "retrieval": (lambda: ALBEFRetrieval(_cfg()), _retrieval_call),
    "ve": (lambda: ALBEFVE(_cfg()), _ve_call),
    "nlvr": (lambda: ALBEFNLVR(_cfg()), _nlvr_call),
    "vqa": (lambda: ALBEFVQA(_cfg()), _vqa_call),
}


class _CountCasts(TorchDispatchMode):
    """Counts the casts (``aten._to_copy``) and the tensors they read."""

    def __init__(self):
        super().__init__()
        self.n, self.sources = 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default:
            self.n += 1
            self.sources.append(args[0])
        return func(*args, **(kwargs or {}))


def _train(case, precast, steps=2, precision="bf16"):
    """``steps`` SGD steps (the EMA moves between them): per step (losses, grads), the final state dict and the casts
    counted in the last forward."""
    make, call = CASES[case]
    torch.manual_seed(0)
    model = make().train()
    model.precast_momentum = precast
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    out, counter = [], _CountCasts()
    for step in range(steps):
        torch.manual_seed(10 + step)
        with autocast_context(precision, CPU), (counter if step == steps - 1 else contextlib.nullcontext()):
            losses = call(model, step)
        opt.zero_grad(set_to_none=True)
        sum(losses.values()).backward()
        out.append(({k: v.detach() for k, v in losses.items()},
                    {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
        opt.step()
    teacher = {id(p) for p in model.momentum_parameters()}
    return out, model.state_dict(), (counter.n, sum(id(t) in teacher for t in counter.sources)), model


@pytest.mark.parametrize("case", list(CASES))
def test_precast_teacher_is_bitwise_plain_autocast(case):
    plain, plain_state, plain_casts, _ = _train(case, precast=False)
    fast, fast_state, fast_casts, model = _train(case, precast=True)
    for (lp, gp), (lf, gf) in zip(plain, fast):
        assert lp.keys() == lf.keys() and gp.keys() == gf.keys()
        for k in lp:
            assert torch.equal(lp[k], lf[k]), (case, k, lp[k], lf[k])
        for n in gp:
            assert torch.equal(gp[n], gf[n]), (case, n)
    # the EMA and every other state are the float32 ones, with the same keys (no copy is ever saved)
    assert plain_state.keys() == fast_state.keys()
    for k in plain_state:
        assert fast_state[k].dtype == plain_state[k].dtype and torch.equal(fast_state[k], plain_state[k]), (case, k)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # the teacher's weights were cast at every layer call; now never (the foreach copy refreshes them on entry)
    assert plain_casts[1] >= 10 and fast_casts[1] == 0, (case, plain_casts, fast_casts)
    assert fast_casts[0] == plain_casts[0] - plain_casts[1], (case, plain_casts, fast_casts)


def test_outside_autocast_nothing_is_swapped():
    torch.manual_seed(0)
    model = ALBEF(_cfg()).train()
    seen = []
    hook = model.visual_encoder_m.patch_embed.proj.register_forward_pre_hook(
        lambda m, args: seen.append(m.weight.dtype))
    _pretrain_call(model, 0)
    with autocast_context("bf16", CPU):
        _pretrain_call(model, 0)
    hook.remove()
    assert seen == [torch.float32, torch.bfloat16]
    assert model.visual_encoder_m.patch_embed.proj.weight.dtype == torch.float32  # restored after the forward
    assert isinstance(model.visual_encoder_m.patch_embed.proj.weight, torch.nn.Parameter)


def test_parameters_are_restored_when_the_teacher_raises():
    torch.manual_seed(0)
    model = ALBEF(_cfg())
    before = {n: p for n, p in model.named_parameters()}
    with pytest.raises(RuntimeError, match="boom"):
        with autocast_context("bf16", CPU), model.momentum_weights():
            assert model.text_encoder_m.bert.encoder.layer[0].attention.self.query.weight.dtype == torch.bfloat16
            raise RuntimeError("boom")
    after = dict(model.named_parameters())
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)


@pytest.mark.parametrize("assign", [False, True])
def test_copies_follow_reloaded_teacher_weights(assign):
    """A checkpoint loaded between steps (resume, copy_params, assign=True replacing the parameters) reaches the
    teacher at the next forward: the copies are refreshed at every entry and rebuilt for replaced parameters."""
    torch.manual_seed(0)
    model = ALBEF(_cfg()).eval()
    image, (ids, mask) = _images(3), _text(3)

    def teacher(precast):
        model.precast_momentum = precast
        with torch.no_grad(), autocast_context("bf16", CPU), model.momentum_weights():
            return model.encode_image(image, momentum=True).feat, model.encode_text(ids, mask, momentum=True).feat

    teacher(True)  # builds the copies
    other = {k: (v + 0.25 if k.split(".")[0].endswith("_m") and v.is_floating_point() else v)
             for k, v in model.state_dict().items()}
    model.load_state_dict(other, assign=assign)
    fast, plain = teacher(True), teacher(False)
    for a, b in zip(fast, plain):
        assert torch.equal(a, b)
    model.copy_params()  # the teacher back to the student's weights
    fast, plain = teacher(True), teacher(False)
    for a, b in zip(fast, plain):
        assert torch.equal(a, b)
