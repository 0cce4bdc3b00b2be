"""ALBEF objectives (models/losses.py) checked against small hand computations.

The expected values are computed with ``math`` on Python floats or with independent torch primitives
(``F.cross_entropy``), never by calling the code path under test a second time.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from models.losses import (distill_targets, itc_loss, mask_tokens, mlm_loss, sample_hard_negatives,
                           soft_cross_entropy)


def _log_softmax_row(row):
    lse = math.log(sum(math.exp(x) for x in row))
    return [x - lse for x in row]


def _softmax_row(row):
    z = sum(math.exp(x) for x in row)
    return [math.exp(x) / z for x in row]


# ------------------------------------------------------------------------------------ soft_cross_entropy
def test_soft_cross_entropy_hand_computed_2x3():
    logits = [[1.0, 2.0, 3.0], [0.5, -1.0, 0.0]]
    targets = [[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]]
    # row 0: lse = log(e + e^2 + e^3)
    lse0 = math.log(math.exp(1) + math.exp(2) + math.exp(3))
    l0 = -(0.2 * (1 - lse0) + 0.3 * (2 - lse0) + 0.5 * (3 - lse0))
    lse1 = math.log(math.exp(0.5) + math.exp(-1.0) + math.exp(0.0))
    l1 = -(1.0 * (0.5 - lse1))
    expected = (l0 + l1) / 2
    got = soft_cross_entropy(torch.tensor(logits), torch.tensor(targets))
    assert got.shape == ()
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_soft_cross_entropy_with_onehot_equals_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 7, generator=g)
    labels = torch.tensor([0, 3, 6, 2, 2])
    onehot = F.one_hot(labels, 7).float()
    torch.testing.assert_close(soft_cross_entropy(logits, onehot), F.cross_entropy(logits, labels))


def test_soft_cross_entropy_half_logits_computed_in_float32():
    logits = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.bfloat16)
    targets = torch.tensor([[0.0, 0.0, 1.0]])
    out = soft_cross_entropy(logits, targets)
    assert out.dtype == torch.float32
    assert out.item() == pytest.approx(-_log_softmax_row([1.0, 2.0, 3.0])[2], rel=1e-6)


# --------------------------------------------------------------------------------------- distill_targets
def test_distill_targets_hand_computed():
    teacher = [[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]]
    hard = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    alpha = 0.4
    got = distill_targets(torch.tensor(teacher), torch.tensor(hard), alpha)
    for i in range(2):
        p = _softmax_row(teacher[i])
        for j in range(3):
            assert got[i, j].item() == pytest.approx(alpha * p[j] + (1 - alpha) * hard[i][j], rel=1e-6)
    torch.testing.assert_close(got.sum(dim=1), torch.ones(2))


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_distill_targets_extremes(alpha):
    teacher = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    hard = torch.eye(3, 5)
    got = distill_targets(teacher, hard, alpha)
    expected = hard if alpha == 0 else F.softmax(teacher, dim=1)
    torch.testing.assert_close(got, expected)


# ---------------------------------------------------------------------------------------------- itc_loss
def _unit(g, *shape, dim):
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=dim).float()


def _itc_loop(img, txt, img_all, txt_all, temp, t_i2t, t_t2i):
    """Loop-over-floats reference of (L_i2t + L_t2i) / 2."""
    b, e = img.shape
    n = img_all.shape[1]

    def direction(q, keys, tgt):
        total = 0.0
        for i in range(b):
            row = [sum(q[i][k] * keys[k][j] for k in range(e)) / temp for j in range(n)]
            ls = _log_softmax_row(row)
            total += -sum(tgt[i][j] * ls[j] for j in range(n))
        return total / b

    return (direction(img.tolist(), txt_all.tolist(), t_i2t.tolist())
            + direction(txt.tolist(), img_all.tolist(), t_t2i.tolist())) / 2


def _itc_inputs(b=3, e=4, q=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    img, txt = _unit(g, b, e, dim=1), _unit(g, b, e, dim=1)
    img_m, txt_m = _unit(g, b, e, dim=1), _unit(g, b, e, dim=1)
    img_queue, txt_queue = _unit(g, e, q, dim=0), _unit(g, e, q, dim=0)
    img_all = torch.cat([img_m.T, img_queue], dim=1)
    txt_all = torch.cat([txt_m.T, txt_queue], dim=1)
    return img, txt, img_all, txt_all


def test_itc_loss_matches_loop_with_queue_and_soft_targets():
    b, q = 3, 5
    img, txt, img_all, txt_all = _itc_inputs(b=b, q=q)
    temp = 0.07
    g = torch.Generator().manual_seed(5)
    t_i2t = F.softmax(torch.randn(b, b + q, generator=g), dim=1)
    t_t2i = F.softmax(torch.randn(b, b + q, generator=g), dim=1)
    loss, sim_i2t, sim_t2i = itc_loss(img, txt, img_all, txt_all, torch.tensor(temp), t_i2t, t_t2i)
    expected = _itc_loop(img, txt, img_all, txt_all, temp, t_i2t, t_t2i)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert sim_i2t.shape == sim_t2i.shape == (b, b + q)
    # similarity of image 1 with queue text 2 (column b + 2), by hand
    s = sum(img[1, k].item() * txt_all[k, b + 2].item() for k in range(img.shape[1])) / temp
    assert sim_i2t[1, b + 2].item() == pytest.approx(s, rel=1e-5)


def test_itc_loss_alpha0_is_infonce_with_diagonal_positive():
    b, q = 4, 6
    img, txt, img_all, txt_all = _itc_inputs(b=b, q=q, seed=3)
    temp = torch.tensor(0.1)
    hard = torch.zeros(b, b + q)
    hard[torch.arange(b), torch.arange(b)] = 1.0
    targets = distill_targets(torch.randn(b, b + q), hard, 0.0)
    loss, _, _ = itc_loss(img, txt, img_all, txt_all, temp, targets, targets)
    labels = torch.arange(b)
    infonce = (F.cross_entropy(img @ txt_all / 0.1, labels) + F.cross_entropy(txt @ img_all / 0.1, labels)) / 2
    torch.testing.assert_close(loss, infonce)
    expected = _itc_loop(img, txt, img_all, txt_all, 0.1, hard, hard)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_itc_loss_gradient_flows_to_features_and_temp():
    b, q = 3, 4
    img0, txt0, img_all, txt_all = _itc_inputs(b=b, q=q, seed=7)
    img = img0.clone().requires_grad_(True)
    txt = txt0.clone().requires_grad_(True)
    temp = torch.nn.Parameter(torch.tensor(0.07))
    hard = torch.eye(b, b + q)
    loss, _, _ = itc_loss(img, txt, img_all, txt_all, temp, hard, hard)
    loss.backward()
    for t in (img, txt, temp):
        assert t.grad is not None and torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0
    # the keys (momentum features) are constants
    assert not img_all.requires_grad and not txt_all.requires_grad
    # d loss / d temp by finite differences
    eps = 1e-3
    with torch.no_grad():
        lp = itc_loss(img0, txt0, img_all, txt_all, torch.tensor(0.07 + eps), hard, hard)[0]
        lm = itc_loss(img0, txt0, img_all, txt_all, torch.tensor(0.07 - eps), hard, hard)[0]
    assert temp.grad.item() == pytest.approx(((lp - lm) / (2 * eps)).item(), rel=2e-2)


# ---------------------------------------------------------------------------------------------- mlm_loss
def _mlm_inputs(seed=0, v=7):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 5, v, generator=g)
    labels = torch.tensor([[-100, 3, -100, 0, -100], [6, -100, -100, -100, 2]])
    return logits, labels


def test_mlm_loss_is_ce_over_labelled_positions():
    logits, labels = _mlm_inputs()
    got = mlm_loss(logits, labels)
    expected = F.cross_entropy(logits.reshape(-1, 7), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(got, expected)
    # and by hand over the 4 labelled positions
    total, n = 0.0, 0
    for b in range(2):
        for t in range(5):
            if labels[b, t] != -100:
                total += -_log_softmax_row(logits[b, t].tolist())[labels[b, t].item()]
                n += 1
    assert got.item() == pytest.approx(total / n, rel=1e-5)


def test_mlm_loss_ignores_logits_at_unlabelled_positions():
    logits, labels = _mlm_inputs()
    changed = logits.clone()
    changed[labels == -100] = 1e3 * torch.randn_like(changed[labels == -100])
    torch.testing.assert_close(mlm_loss(changed, labels), mlm_loss(logits, labels))


@pytest.mark.parametrize("alpha", [0.0, 0.4, 1.0])
def test_mlm_loss_with_soft_labels(alpha):
    logits, labels = _mlm_inputs(seed=1)
    soft = F.softmax(torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(9)), dim=-1)
    got = mlm_loss(logits, labels, soft, alpha)
    ce = F.cross_entropy(logits.reshape(-1, 7), labels.reshape(-1), ignore_index=-100).item()
    kd, n = 0.0, 0
    for b in range(2):
        for t in range(5):
            if labels[b, t] != -100:
                ls = _log_softmax_row(logits[b, t].tolist())
                kd += -sum(soft[b, t, v].item() * ls[v] for v in range(7))
                n += 1
    assert got.item() == pytest.approx((1 - alpha) * ce + alpha * kd / n, rel=1e-5)


def test_mlm_loss_without_masked_tokens_is_zero_with_finite_gradient():
    logits = torch.randn(2, 4, 6, requires_grad=True)
    labels = torch.full((2, 4), -100)
    soft = F.softmax(torch.randn(2, 4, 6), dim=-1)
    for args in ((), (soft, 0.4)):
        if logits.grad is not None:
            logits.grad = None
        loss = mlm_loss(logits, labels, *args)
        assert loss.item() == 0.0
        loss.backward()
        assert logits.grad is not None and torch.isfinite(logits.grad).all()
        assert (logits.grad == 0).all()


# -------------------------------------------------------------------------------------------- mask_tokens
PAD, CLS, MASK, VOCAB = 0, 101, 103, 1000


def _token_batch(rows=200, cols=100, seed=0):
    """[CLS] w1 ... wn [PAD]... with words drawn from [200, VOCAB) (never a special id)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(200, VOCAB, (rows, cols), generator=g)
    ids[:, 0] = CLS
    lengths = torch.randint(cols // 2, cols + 1, (rows,), generator=g)
    ids[torch.arange(cols)[None, :] >= lengths[:, None]] = PAD
    return ids


def test_mask_tokens_statistics_over_20000_tokens():
    ids = _token_batch()
    assert ids.numel() == 20000
    original = ids.clone()
    masked, labels = mask_tokens(ids, VOCAB, MASK, PAD, CLS, 0.15, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ids, original), "the input must not be modified in place"
    assert masked.shape == labels.shape == ids.shape
    assert masked.dtype == labels.dtype == ids.dtype

    eligible = (ids != PAD) & (ids != CLS)
    selected = labels != -100
    # [PAD] and [CLS] never selected
    assert not selected[~eligible].any()
    assert (labels[:, 0] == -100).all()
    # labels: original id where selected, -100 elsewhere
    assert torch.equal(labels[selected], ids[selected])
    assert (labels[~selected] == -100).all()
    # unselected tokens are unchanged
    assert torch.equal(masked[~selected], ids[~selected])

    frac = selected.sum().item() / eligible.sum().item()
    assert frac == pytest.approx(0.15, abs=0.01)

    n = selected.sum().item()
    sel_new, sel_old = masked[selected], ids[selected]
    to_mask = (sel_new == MASK).sum().item() / n
    unchanged = (sel_new == sel_old).sum().item() / n
    randomised = ((sel_new != MASK) & (sel_new != sel_old)).sum().item() / n
    assert to_mask == pytest.approx(0.80, abs=0.03)
    assert unchanged == pytest.approx(0.10, abs=0.025)
    assert randomised == pytest.approx(0.10, abs=0.025)
    # random ids are drawn from the whole vocabulary [0, VOCAB)
    assert masked.min().item() >= 0 and masked.max().item() < VOCAB
    rand_ids = sel_new[(sel_new != MASK) & (sel_new != sel_old)]
    assert (rand_ids < 200).any(), "random replacements should cover the full vocabulary, not only the words"


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_mask_tokens_probability_extremes(p):
    ids = _token_batch(rows=20, cols=30, seed=4)
    _, labels = mask_tokens(ids, VOCAB, MASK, PAD, CLS, p, generator=torch.Generator().manual_seed(0))
    eligible = (ids != PAD) & (ids != CLS)
    assert torch.equal(labels != -100, eligible if p == 1.0 else torch.zeros_like(eligible))


def test_mask_tokens_deterministic_with_generator_on_cpu():
    ids = _token_batch(rows=32, cols=40, seed=2)
    a = mask_tokens(ids, VOCAB, MASK, PAD, CLS, generator=torch.Generator().manual_seed(123))
    b = mask_tokens(ids, VOCAB, MASK, PAD, CLS, generator=torch.Generator().manual_seed(123))
    c = mask_tokens(ids, VOCAB, MASK, PAD, CLS, generator=torch.Generator().manual_seed(124))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not (torch.equal(a[0], c[0]) and torch.equal(a[1], c[1]))
    # works on a CUDA-less device, outputs stay on the input's device; also without a generator
    masked, labels = mask_tokens(ids.to("cpu"), VOCAB, MASK, PAD, CLS)
    assert masked.device.type == labels.device.type == "cpu"


# --------------------------------------------------------------------------------- sample_hard_negatives
def _draw_counts(sim, same, draws, seed=0):
    g = torch.Generator().manual_seed(seed)
    b = sim.shape[0]
    counts = torch.zeros(b, sim.shape[1], dtype=torch.long)
    rows = torch.arange(b)
    for _ in range(draws):
        idx = sample_hard_negatives(sim, same, g)
        counts[rows, idx] += 1
    return counts


def test_sample_hard_negatives_shape_dtype_and_never_the_positive():
    b = 6
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(b, b, generator=g) * 3
    sim.fill_diagonal_(10.0)  # the positive is usually the most similar
    same = torch.eye(b, dtype=torch.bool)
    idx = sample_hard_negatives(sim, same, g)
    assert idx.shape == (b,) and idx.dtype == torch.int64
    counts = _draw_counts(sim, same, 500)
    assert counts.diagonal().sum() == 0


def test_sample_hard_negatives_never_returns_a_duplicate_image():
    image_ids = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])
    same = image_ids[:, None] == image_ids[None, :]
    sim = torch.randn(8, 8, generator=torch.Generator().manual_seed(1))
    sim[same] += 5.0  # duplicates look very similar: they would be drawn often if not masked
    counts = _draw_counts(sim, same, 500)
    assert counts[same].sum() == 0
    assert (counts.sum(dim=1) == 500).all()


def test_sample_hard_negatives_follows_softmax_over_allowed_columns():
    b, draws = 5, 4000
    sim = torch.tensor([[9.0, 1.0, 0.0, -1.0, 0.5],
                        [2.0, 9.0, 2.0, 0.0, -2.0],
                        [0.0, 0.0, 9.0, 0.0, 0.0],
                        [1.5, -0.5, 0.3, 9.0, 1.0],
                        [-1.0, 1.0, 0.0, 0.7, 9.0]])
    same = torch.eye(b, dtype=torch.bool)
    same[1, 4] = True  # an extra masked column (duplicate image)
    counts = _draw_counts(sim, same, draws, seed=3).double()
    for i in range(b):
        allowed = [j for j in range(b) if not same[i, j]]
        p = _softmax_row([sim[i, j].item() for j in allowed])
        expected = [draws * pj for pj in p]
        observed = [counts[i, j].item() for j in allowed]
        chi2 = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
        # dof = len(allowed) - 1 <= 3; P(chi2_3 > 25) ~ 1.6e-5
        assert chi2 < 25.0, (i, observed, expected)
        assert sum(counts[i, j].item() for j in range(b) if same[i, j]) == 0


def test_sample_hard_negatives_underflowing_row_returns_allowed_index():
    b = 4
    sim = torch.full((b, b), -1e4)
    sim.fill_diagonal_(1e4)  # softmax is exactly one-hot on the (masked) diagonal
    same = torch.eye(b, dtype=torch.bool)
    counts = _draw_counts(sim, same, 300)
    assert counts.diagonal().sum() == 0
    off = ~same
    assert (counts[off] > 0).all(), "each allowed column should be reachable (uniform fallback)"


def test_sample_hard_negatives_underflow_still_prefers_hardest_negative():
    # Reachable with the learnable temperature near its clamp (temp = 0.001 -> |sim| up to 1000).
    sim = torch.tensor([[500.0, 10.0, -10.0, -10.0],
                        [10.0, 500.0, -10.0, -10.0],
                        [10.0, -10.0, 500.0, -10.0],
                        [10.0, -10.0, -10.0, 500.0]])
    same = torch.eye(4, dtype=torch.bool)
    counts = _draw_counts(sim, same, 200)
    # softmax over the allowed columns puts probability ~1 - 4e-9 on the column with sim 10
    assert counts[0, 1] == 200 and (counts[1:, 0] == 200).all()


def test_sample_hard_negatives_row_with_nothing_allowed():
    b = 4
    sim = torch.randn(b, b, generator=torch.Generator().manual_seed(2))
    same = torch.eye(b, dtype=torch.bool)
    same[2, :] = True  # every sample in the batch is the same image as sample 2's
    counts = _draw_counts(sim, same, 300)
    assert counts.sum(dim=1).eq(300).all()
    assert counts[2, 2] == 0, "falls back to another column, not the row itself"
    # the other rows are unaffected: never their own column
    assert counts.diagonal().sum() == 0
    # all rows masked entirely (a batch of one image): no error, never the row itself
    idx = sample_hard_negatives(sim, torch.ones(b, b, dtype=torch.bool), torch.Generator().manual_seed(0))
    assert idx.shape == (b,) and (idx != torch.arange(b)).all()


def test_sample_hard_negatives_deterministic_with_generator():
    sim = torch.randn(8, 8, generator=torch.Generator().manual_seed(5))
    same = torch.eye(8, dtype=torch.bool)
    a = sample_hard_negatives(sim, same, torch.Generator().manual_seed(11))
    b = sample_hard_negatives(sim, same, torch.Generator().manual_seed(11))
    assert torch.equal(a, b)


def test_sample_hard_negatives_batch_of_one():
    idx = sample_hard_negatives(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool))
    assert idx.tolist() == [0]


def _old_sample_hard_negatives(sim, same, generator):
    """The formula before non-finite rows were handled (kept here to pin bitwise parity)."""
    b = sim.shape[0]
    logits = sim.float().masked_fill(same, float("-inf"))
    nothing_allowed = same.all(dim=1, keepdim=True)
    fallback = torch.zeros_like(logits)
    if b > 1:
        fallback = fallback.masked_fill(torch.eye(b, dtype=torch.bool), float("-inf"))
    weights = torch.nn.functional.softmax(torch.where(nothing_allowed, fallback, logits), dim=1)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def _non_finite_cases():
    nan, inf = float("nan"), float("inf")
    b = 6
    base = torch.randn(b, b, generator=torch.Generator().manual_seed(7))
    eye = torch.eye(b, dtype=torch.bool)
    dup = eye.clone()
    dup[0, 1] = dup[1, 0] = True  # samples 0 and 1 show the same image
    nan_rows = base.clone()
    nan_rows[[1, 4]] = nan
    pos_inf = base.clone()
    pos_inf[0, 3] = pos_inf[2, 5] = inf
    pos_inf[3, 3] = inf  # on the (masked) positive: harmless
    neg_inf = base.clone()
    neg_inf[1, 2] = -inf  # one allowed column impossible, the rest fine
    neg_inf[4] = -inf
    neg_inf[4, 4] = 0.0  # only the masked positive is finite
    only_masked_finite = base.clone()
    only_masked_finite[2] = nan
    only_masked_finite[2, 2] = 5.0
    only_masked_finite[0, 2:] = nan  # row 0: its allowed columns are 2.. (0 and 1 masked), all nan
    mixed = base.clone()
    mixed[5, 0], mixed[5, 1] = inf, nan
    return [("nan rows", nan_rows, eye), ("+inf", pos_inf, eye), ("-inf", neg_inf, eye),
            ("all nan", torch.full((b, b), nan), eye), ("only masked finite", only_masked_finite, dup),
            ("mixed inf/nan", mixed, dup), ("all +inf", torch.full((b, b), inf), dup),
            ("all -inf", torch.full((b, b), -inf), eye)]


@pytest.mark.parametrize("name, sim, same", _non_finite_cases(), ids=[c[0] for c in _non_finite_cases()])
def test_sample_hard_negatives_non_finite_similarities_never_raise(name, sim, same):
    """A diverged step (e.g. optimizer.lr=1e30) gives nan/inf similarities: the draw must not raise, and rows
    that still have an allowed column never return a masked one."""
    b = sim.shape[0]
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        idx = sample_hard_negatives(sim, same, g)
        assert idx.shape == (b,) and idx.dtype == torch.int64
        assert not same[torch.arange(b), idx].any(), name
    for dtype in (torch.float16, torch.bfloat16):
        idx = sample_hard_negatives(sim.to(dtype), same, g)
        assert not same[torch.arange(b), idx].any(), (name, dtype)


def test_sample_hard_negatives_non_finite_row_is_uniform_over_allowed_columns():
    b, draws = 5, 3000
    sim = torch.randn(b, b, generator=torch.Generator().manual_seed(3))
    sim[2] = float("nan")
    same = torch.eye(b, dtype=torch.bool)
    same[2, 4] = True
    counts = _draw_counts(sim, same, draws, seed=4)
    allowed = [0, 1, 3]
    assert counts[2, 2] == counts[2, 4] == 0
    chi2 = sum((counts[2, j].item() - draws / 3) ** 2 / (draws / 3) for j in allowed)
    assert chi2 < 25.0, counts[2]  # dof 2: P(chi2_2 > 25) ~ 4e-6


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sample_hard_negatives_finite_input_bitwise_as_before(seed):
    g = torch.Generator().manual_seed(100 + seed)
    b = 16
    sim = torch.randn(b, b, generator=g) * 10
    ids = torch.randint(0, 10, (b,), generator=g)
    same = ids[:, None] == ids[None, :]
    same[3, :] = True  # one row with nothing allowed (the fallback path)
    ga, gb = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    for _ in range(20):
        assert torch.equal(sample_hard_negatives(sim, same, ga), _old_sample_hard_negatives(sim, same, gb))
    assert torch.equal(ga.get_state(), gb.get_state())  # the same amount of randomness consumed


def test_sample_hard_negatives_rectangular_with_offset():
    """All ranks' columns (itm_negatives: global): never the own column offset + i, and the fallback of a row with
    nothing allowed avoids the own column too."""
    torch.manual_seed(0)
    b, n, offset = 3, 9, 3
    sim = torch.randn(b, n)
    same = torch.zeros(b, n, dtype=torch.bool)
    same[torch.arange(b), torch.arange(b) + offset] = True
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        idx = sample_hard_negatives(sim, same, g, offset=offset)
        assert idx.shape == (b,) and not (idx == torch.arange(b) + offset).any()
    everything = torch.ones(b, n, dtype=torch.bool)
    for _ in range(50):
        idx = sample_hard_negatives(sim, everything, g, offset=offset)
        assert not (idx == torch.arange(b) + offset).any()
