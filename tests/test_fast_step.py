"""The cheaper training step computes what the plain one did: cross-attention keys/values of the batch's images
computed once per fusion layer and gathered by each fusion pass (ITM positives, ITM hard negatives, MLM), the MLM
head only at the masked positions, ITC similarities in float32 under autocast, and retrieval re-ranking that
projects each distinct image once per call. Losses and gradients equal the plain computation's to float32
rounding."""
import copy

import pytest
import torch
import torch.nn.functional as F

import models.albef as albef_mod
from engine.retrieval import itm_rerank_scores
from models.albef import ALBEF, ALBEFConfig, ALBEFRetrieval
from models.bert import BertConfig
from models.losses import itc_loss, mask_tokens, mlm_loss
from models.vit import VisionConfig

VOCAB, PAD_ID, CLS_ID, SEP_ID, MASK_ID = 120, 0, 2, 3, 4
B, L = 6, 10


def _cfg(dropout: float = 0.1, **kw) -> ALBEFConfig:
    base = dict(image_res=16, vision_width=32, embed_dim=16, queue_size=24, momentum=0.9,
                vit=VisionConfig(patch_size=4, embed_dim=32, depth=1, num_heads=2),
                bert=BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                intermediate_size=64, fusion_layer=2, encoder_width=32, max_position_embeddings=40,
                                hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout),
                pad_token_id=PAD_ID, cls_token_id=CLS_ID, mask_token_id=MASK_ID)
    base.update(kw)
    return ALBEFConfig(**base)


def _batch(bs: int = B, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (bs, L), generator=g)
    ids[:, 0] = CLS_ID
    mask = torch.ones_like(ids)
    mask[: bs // 2, L - 3:] = 0
    ids[mask == 0] = PAD_ID
    return torch.randn(bs, 3, 16, 16, generator=g), ids, mask


def _assert_grads_equal(got: dict, want: dict, rel: float = 1e-6):
    """Every parameter's gradient within ``rel`` of the reference, relative to its own norm, floored at ``rel`` times
    the whole gradient's norm: the cross-attention key biases have an exactly zero gradient in exact arithmetic
    (softmax is shift-invariant), so both sides hold only rounding noise (~1e-12) there."""
    assert got.keys() == want.keys()
    total = torch.sqrt(sum(g.double().norm() ** 2 for g in want.values())).item()
    for n in want:
        err = (got[n] - want[n]).double().norm().item()
        scale = max(want[n].double().norm().item(), rel * total)
        assert err <= rel * scale, (n, err, want[n].norm().item())


def _step(model, batch, seed: int):
    """One forward + backward with dropout on, everything random drawn from ``seed``: (losses, grads)."""
    image, ids, mask = batch
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(image, ids, mask, alpha=0.4, generator=torch.Generator().manual_seed(seed + 1))
    sum(out.values()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.items()}, grads


def _count_key_rows_in(bert):
    """Forward hooks on every fusion layer's cross-attention key projection: image-token sets projected per layer."""
    rows, handles = {}, []
    for i, layer in enumerate(bert.encoder.layer):
        if layer.has_cross_attention:
            def hook(mod, inp, out, i=i):
                rows[i] = rows.get(i, 0) + inp[0].shape[0]
            handles.append(layer.crossattention.self.key.register_forward_hook(hook))
    return rows, handles


def _count_key_rows(model):
    return _count_key_rows_in(model._bert(model.text_encoder))


# ---------------------------------------------------------------------------------------- (a) K/V reuse
@pytest.mark.parametrize("reuse,sparse", [(True, False), (False, True), (True, True)])
def test_fast_step_equals_plain_step_losses_and_gradients(reuse, sparse):
    """Train mode (dropout on): the K/V-reusing and/or sparse-MLM step against the plain one (each pass projects
    its own image tokens, full MLM logits), from the same weights, queues and random state, for 2 steps (the
    second after an optimizer update and an EMA step, so from weights that differ by float32 rounding already)."""
    torch.manual_seed(0)
    plain = ALBEF(_cfg())
    plain.copy_params()
    plain.reuse_image_kv, plain.sparse_mlm = False, False
    fast = copy.deepcopy(plain)
    fast.reuse_image_kv, fast.sparse_mlm = reuse, sparse
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (plain, fast)]
    plain.train(), fast.train()
    for step in range(2):
        batch = _batch(seed=step)
        rows, handles = _count_key_rows(fast)
        out_f, grads_f = _step(fast, batch, seed=10 + step)
        for h in handles:
            h.remove()
        out_p, grads_p = _step(plain, batch, seed=10 + step)
        # ITM positives (B) + negatives (2B) + MLM (B) image-token sets per fusion layer, or B once
        assert rows and all(r == (B if reuse else 4 * B) for r in rows.values()), rows
        for k in out_p:
            assert torch.isfinite(out_p[k])
            assert out_f[k].item() == pytest.approx(out_p[k].item(), rel=1e-6, abs=1e-7), (step, k)
        # step 0 from identical weights: 1e-6; step 1 from weights that already differ by one update's rounding
        _assert_grads_equal(grads_f, grads_p, rel=1e-6 if step == 0 else 1e-5)
        for o in opts:
            o.step()
    for (n, a), b in zip(fast.state_dict().items(), plain.state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def test_retrieval_model_itm_reuses_kv():
    """ALBEFRetrieval's ITM (positives + hard negatives) gathers from one K/V projection; same loss and gradients."""
    torch.manual_seed(0)
    plain = ALBEFRetrieval(_cfg())
    plain.copy_params()
    plain.reuse_image_kv = False
    fast = copy.deepcopy(plain)
    fast.reuse_image_kv = True
    image, ids, mask = _batch()
    idx = torch.tensor([0, 1, 1, 2, 3, 4])
    res = []
    for m in (fast, plain):
        torch.manual_seed(3)
        out = m(image, ids, mask, idx, alpha=0.4, generator=torch.Generator().manual_seed(4))
        sum(out.values()).backward()
        res.append((out, {n: p.grad for n, p in m.named_parameters() if p.grad is not None}))
    (out_f, g_f), (out_p, g_p) = res
    for k in out_p:
        assert out_f[k].item() == pytest.approx(out_p[k].item(), rel=1e-6, abs=1e-7), k
    _assert_grads_equal(g_f, g_p)


def test_fusion_with_precomputed_kv_and_index_equals_gathered_images():
    """The fusion call's new arguments: distinct images + ``image_index`` (projected inside), or precomputed
    ``image_kv`` + ``image_index``, equal ``fuse(images[index])``; gradients reach the images and the shared
    key/value projections; an image mask is gathered with the rows."""
    torch.manual_seed(0)
    model = ALBEF(_cfg(dropout=0.0)).eval()
    image, ids, mask = _batch()
    bert = model._bert(model.text_encoder)
    index = torch.tensor([3, 0, 0, 5, 1, 3, 2, 2, 4])
    txt = model.encode_text(ids[index % B], mask[index % B])
    img_mask = torch.ones(B, (16 // 4) ** 2 + 1, dtype=torch.long)
    img_mask[1, -3:] = 0
    results = []
    for how in ("plain", "index", "kv"):
        model.zero_grad(set_to_none=True)
        embeds = model.encode_image(image).embeds.detach().requires_grad_(True)
        if how == "plain":
            fused = bert(encoder_embeds=txt.embeds.detach(), attention_mask=mask[index % B],
                         encoder_hidden_states=embeds[index], encoder_attention_mask=img_mask[index], mode="fusion")
        elif how == "index":
            fused = bert(encoder_embeds=txt.embeds.detach(), attention_mask=mask[index % B],
                         encoder_hidden_states=embeds, encoder_attention_mask=img_mask, image_index=index,
                         mode="fusion")
        else:
            kv = bert.cross_attention_kv(embeds, mode="fusion")
            assert sorted(kv) == [2, 3] and kv[2][0].shape == (B, embeds.shape[1], 32)
            fused = bert(encoder_embeds=txt.embeds.detach(), attention_mask=mask[index % B], encoder_kv=kv,
                         encoder_attention_mask=img_mask, image_index=index, mode="fusion")
        fused.square().sum().backward()
        key = bert.encoder.layer[2].crossattention.self.key.weight.grad
        results.append((fused.detach(), embeds.grad, key.clone()))
    for got in results[1:]:
        for a, b in zip(got, results[0]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # model.fuse: the same three forms
    e = model.encode_image(image).embeds
    t = model.encode_text(ids, mask).embeds
    ref = model.fuse(t, mask, e[index[:B]])
    torch.testing.assert_close(model.fuse(t, mask, e, image_index=index[:B]), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model.fuse(t, mask, image_kv=model.image_kv(e), image_index=index[:B]), ref,
                               rtol=1e-5, atol=1e-6)


def test_grad_checkpointing_with_precomputed_kv():
    torch.manual_seed(0)
    plain = ALBEF(_cfg())
    plain.copy_params()
    plain.reuse_image_kv, plain.sparse_mlm = False, False
    fast = copy.deepcopy(plain)
    fast.reuse_image_kv, fast.sparse_mlm = True, True
    fast.text_encoder.bert.config.grad_checkpointing = True
    out_f, g_f = _step(fast, _batch(), seed=5)
    out_p, g_p = _step(plain, _batch(), seed=5)
    for k in out_p:
        assert out_f[k].item() == pytest.approx(out_p[k].item(), rel=1e-6, abs=1e-7), k
    _assert_grads_equal(g_f, g_p)


# ---------------------------------------------------------------------------------------- (b) sparse MLM
@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_sparse_mlm_loss_equals_full_logit_loss(alpha):
    torch.manual_seed(0)
    model = ALBEF(_cfg(dropout=0.0)).eval()
    image, ids, mask = _batch()
    masked, labels = mask_tokens(ids, VOCAB, MASK_ID, PAD_ID, CLS_ID, 0.3, torch.Generator().manual_seed(1))
    assert 0 < int((labels != -100).sum()) < labels.numel()
    img = model.encode_image(image).embeds.detach()
    with torch.no_grad():
        soft_full = F.softmax(model.text_encoder_m(masked, mask, encoder_hidden_states=img), dim=-1)
    pos = labels.ne(-100).nonzero(as_tuple=True)
    res = []
    for sparse in (False, True):
        model.zero_grad(set_to_none=True)
        if sparse:
            with torch.no_grad():
                soft = F.softmax(model.text_encoder_m(masked, mask, encoder_hidden_states=img, positions=pos), -1)
            torch.testing.assert_close(soft, soft_full[pos])
            logits = model.text_encoder(masked, mask, encoder_hidden_states=img, positions=pos)
            assert logits.shape == (len(pos[0]), VOCAB)
            loss = mlm_loss(logits, labels[pos], soft, alpha)
        else:
            loss = mlm_loss(model.text_encoder(masked, mask, encoder_hidden_states=img), labels, soft_full, alpha)
        loss.backward()
        res.append((loss.detach(), {n: p.grad.clone() for n, p in model.text_encoder.named_parameters()
                                    if p.grad is not None}))
    (l_full, g_full), (l_sparse, g_sparse) = res
    assert l_sparse.item() == pytest.approx(l_full.item(), rel=1e-6)
    _assert_grads_equal(g_sparse, g_full)


def test_sparse_mlm_with_no_masked_token_is_zero():
    torch.manual_seed(0)
    model = ALBEF(_cfg(dropout=0.0))
    image, ids, mask = _batch()
    labels = torch.full_like(ids, -100)
    pos = labels.ne(-100).nonzero(as_tuple=True)
    img = model.encode_image(image).embeds
    logits = model.text_encoder(ids, mask, encoder_hidden_states=img, positions=pos)
    soft = F.softmax(logits.detach(), -1)
    loss = mlm_loss(logits, labels[pos], soft, 0.4)
    full = mlm_loss(model.text_encoder(ids, mask, encoder_hidden_states=img), labels, None)
    assert loss.item() == 0.0 == full.item()
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


# ---------------------------------------------------------------------------------------- (c) ITC in fp32
def test_itc_similarities_are_float32_under_bf16_autocast():
    g = torch.Generator().manual_seed(0)
    # features as autocast gives them: bf16 projections, normalised and returned as float32
    img = F.normalize(torch.randn(4, 16, generator=g), dim=-1).bfloat16().float()
    txt = F.normalize(torch.randn(4, 16, generator=g), dim=-1).bfloat16().float()
    img_all = F.normalize(torch.randn(16, 20, generator=g), dim=0)
    txt_all = F.normalize(torch.randn(16, 20, generator=g), dim=0)
    temp = torch.tensor(0.07, requires_grad=True)
    targets = torch.eye(4, 20)
    ref_loss, ref_i2t, ref_t2i = itc_loss(img, txt, img_all, txt_all, temp, targets, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, sim_i2t, sim_t2i = itc_loss(img, txt, img_all, txt_all, temp, targets, targets)
    assert sim_i2t.dtype == sim_t2i.dtype == loss.dtype == torch.float32
    torch.testing.assert_close(sim_i2t, ref_i2t, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sim_t2i, ref_t2i, rtol=1e-6, atol=1e-6)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6)
    # the bf16 product would be visibly different (the guard is meaningful)
    assert (img.bfloat16() @ txt_all.bfloat16() / 0.07 - ref_i2t.detach()).abs().max() > 1e-3


def test_model_itc_math_is_float32_under_bf16_autocast(monkeypatch):
    """In the model's step under bf16 autocast: the ITC similarities, targets and momentum-feature matrices that
    reach ``itc_loss`` are float32 and equal the float32 computation from the same (bf16-produced) features."""
    torch.manual_seed(0)
    model = ALBEF(_cfg(dropout=0.0))
    model.copy_params()
    captured = {}
    real = albef_mod.itc_loss

    def spy(*args):
        out = real(*args)
        captured["args"], captured["out"] = args, out
        return out

    monkeypatch.setattr(albef_mod, "itc_loss", spy)
    real_targets = albef_mod.distill_targets
    teacher = []

    def spy_targets(logits, hard, alpha):
        teacher.append(logits)
        return real_targets(logits, hard, alpha)

    monkeypatch.setattr(albef_mod, "distill_targets", spy_targets)
    image, ids, mask = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(image, ids, mask, alpha=0.4, generator=torch.Generator().manual_seed(0))
    assert all(torch.isfinite(v) for v in out.values())
    img_feat, txt_feat, img_all, txt_all, temp, t_i2t, t_t2i = captured["args"]
    loss, sim_i2t, sim_t2i = captured["out"]
    for t in (img_feat, txt_feat, img_all, txt_all, t_i2t, t_t2i, sim_i2t, sim_t2i, loss, *teacher):
        assert t.dtype == torch.float32
    torch.testing.assert_close(sim_i2t, img_feat @ txt_all / temp, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sim_t2i, txt_feat @ img_all / temp, rtol=1e-6, atol=1e-6)
    img_m = img_all[:, :B].T
    torch.testing.assert_close(teacher[0], img_m @ txt_all / temp, rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------ (d) retrieval re-rank
class _Tok:
    """'t{i}' -> fixed random ids ([CLS] ... [SEP], then padding), as a HF tokenizer returns them."""

    pad_token_id, cls_token_id, sep_token_id, mask_token_id = PAD_ID, CLS_ID, SEP_ID, MASK_ID

    def __init__(self, n: int):
        g = torch.Generator().manual_seed(5)
        self.lengths = torch.randint(3, 8, (n,), generator=g)
        self.ids = torch.randint(5, VOCAB, (n, 8), generator=g)

    def __call__(self, texts, padding="longest", truncation=True, max_length=None, **kw):
        rows = [int(t[1:]) for t in texts]
        n = max_length
        ids = torch.zeros(len(rows), n, dtype=torch.long)
        mask = torch.zeros(len(rows), n, dtype=torch.long)
        for i, r in enumerate(rows):
            k = int(self.lengths[r])
            ids[i, 0] = CLS_ID
            ids[i, 1:k] = self.ids[r, : k - 1]
            ids[i, k] = SEP_ID
            mask[i, : k + 1] = 1
        return {"input_ids": ids, "attention_mask": mask}


class _Loader(list):
    pass


@pytest.mark.parametrize("pairs_per_call", [256, 6])
def test_rerank_with_kv_reuse_equals_plain_rerank(pairs_per_call):
    torch.manual_seed(0)
    model = ALBEFRetrieval(_cfg(dropout=0.0)).eval()
    n_img, n_txt, k = 5, 9, 3
    images = torch.randn(n_img, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    loader = _Loader([{"image": images[:3], "index": torch.arange(3)},
                      {"image": images[3:], "index": torch.arange(3, n_img)}])
    loader.dataset = list(range(n_img))
    texts = [f"t{i}" for i in range(n_txt)]
    tok = _Tok(n_txt)
    rows, handles = _count_key_rows(model)
    fast = itm_rerank_scores(model, loader, texts, tok, torch.device("cpu"), k_test=k, max_length=10,
                             pairs_per_call=pairs_per_call)
    for h in handles:
        h.remove()
    # i2t: each image once; t2i: each distinct candidate image of a call once (at most n_img per call)
    calls = -(-n_img // max(1, pairs_per_call // k)) + -(-n_txt // max(1, pairs_per_call // k))
    assert all(r <= n_img + calls * n_img for r in rows.values())
    assert all(r < n_img * k + n_txt * k for r in rows.values())

    real_fuse = model.fuse

    def plain_fuse(text_embeds, text_mask, image_embeds=None, image_index=None, image_kv=None):
        assert image_kv is None
        if image_index is not None:
            image_embeds = image_embeds[image_index]  # one image-token set per pair, as before
        return real_fuse(text_embeds, text_mask, image_embeds)

    model.fuse = plain_fuse
    try:
        plain = itm_rerank_scores(model, loader, texts, tok, torch.device("cpu"), k_test=k, max_length=10,
                                  pairs_per_call=pairs_per_call)
    finally:
        del model.fuse
    for d in ("i2t", "t2i"):
        assert ((fast[d] == -100) == (plain[d] == -100)).all()
        assert (fast[d] != -100).sum(1).eq(k).all()
        torch.testing.assert_close(fast[d], plain[d], rtol=1e-5, atol=1e-5)


def test_rerank_itc_weight_adds_weighted_similarity_to_the_itm_logit():
    """rerank_score itm+itc with rerank_itc_weight w: at every re-ranked candidate the ITM logit + w x the ITC
    similarity it was taken from (w = 1 is BLIP's sum, bitwise), -100 elsewhere; bad weights are refused."""
    from engine.retrieval import check_rerank

    torch.manual_seed(0)
    model = ALBEFRetrieval(_cfg(dropout=0.0)).eval()
    n_img, n_txt, k = 4, 7, 3
    images = torch.randn(n_img, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    loader = _Loader([{"image": images, "index": torch.arange(n_img)}])
    loader.dataset = list(range(n_img))
    texts = [f"t{i}" for i in range(n_txt)]
    tok = _Tok(n_txt)

    def scores(**kw):
        return itm_rerank_scores(model, loader, texts, tok, torch.device("cpu"), k_test=k, max_length=10,
                                 return_sim=True, **kw)

    itm = scores(score="itm")
    blip = scores(score="itm+itc")
    weighted = scores(score="itm+itc", itc_weight=10.0)
    sim = itm["itc"]
    for d, s in (("i2t", sim), ("t2i", sim.T)):
        picked = itm[d] != -100
        assert (picked == (weighted[d] != -100)).all() and picked.sum(1).eq(k).all()
        assert torch.equal(blip[d][picked], itm[d][picked] + s[picked])
        torch.testing.assert_close(weighted[d][picked], itm[d][picked] + 10.0 * s[picked])
    check_rerank("itm+itc", 10)
    for score, w, msg in (("itm", 10.0, "with rerank_score: itm there is none"), ("itm+itc", -1.0, ">= 0"),
                          ("itm+itc", float("nan"), ">= 0"), ("itc", 1.0, "rerank_score must be")):
        with pytest.raises(ValueError, match=msg):
            check_rerank(score, w)


# ------------------------------------------------------------------------------- task models (VQA, NLVR2 TA)
def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_vqa_decoder_gathers_question_kv():
    """VQA: the answer decoder reads each question's keys/values once (``question_index``) instead of projecting
    the question states repeated per answer; equal logits, loss (with distillation) and gradients; rank_answer equal."""
    from models.vqa import ALBEFVQA

    torch.manual_seed(0)
    model = ALBEFVQA(_cfg(dropout=0.0), distill=True).eval()
    model.copy_params()
    image = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    _, q_ids, q_mask = _batch(3, seed=2)
    a_ids = torch.tensor([[2, 7, 3, 0], [2, 8, 9, 3], [2, 10, 3, 0], [2, 11, 12, 3], [2, 13, 3, 0], [2, 9, 3, 0]])
    a_mask = (a_ids != 0).long()
    k, w = torch.tensor([2, 3, 1]), torch.tensor([0.6, 0.4, 0.5, 0.3, 0.2, 1.0])
    q_index = torch.tensor([0, 0, 1, 1, 1, 2])
    states = model.encode_question(image, q_ids, q_mask).detach()
    plain = model.answer_logits(a_ids, a_mask, states[q_index], q_mask[q_index])
    fast = model.answer_logits(a_ids, a_mask, states, q_mask, question_index=q_index)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-6)

    rows, handles = _count_key_rows_in(model.text_decoder.bert)
    loss = model(image, q_ids, q_mask, a_ids, a_mask, k, w, alpha=0.4)["loss_vqa"]
    for h in handles:
        h.remove()
    assert rows and all(r == 3 for r in rows.values()), rows  # 3 questions, not 6 answers
    model.zero_grad(set_to_none=True)
    loss.backward()
    g_fast = _grads(model)

    real = model.answer_logits

    def repeated(answer_ids, answer_mask, question_states, question_mask, momentum=False, question_index=None):
        if question_index is not None:  # the computation before: states repeated per answer
            question_states, question_mask = question_states[question_index], question_mask[question_index]
        return real(answer_ids, answer_mask, question_states, question_mask, momentum)

    model.answer_logits = repeated
    try:
        model.zero_grad(set_to_none=True)
        loss_plain = model(image, q_ids, q_mask, a_ids, a_mask, k, w, alpha=0.4)["loss_vqa"]
        loss_plain.backward()
        g_plain = _grads(model)
        with torch.no_grad():
            ranked_plain = model.answer(image, q_ids, q_mask, a_ids, a_mask, k=4)
    finally:
        del model.answer_logits
    assert loss.item() == pytest.approx(loss_plain.item(), rel=1e-6)
    _assert_grads_equal(g_fast, g_plain)
    with torch.no_grad():
        ranked = model.answer(image, q_ids, q_mask, a_ids, a_mask, k=4)
    assert torch.equal(ranked[0], ranked_plain[0])
    torch.testing.assert_close(ranked[1], ranked_plain[1], rtol=1e-5, atol=1e-6)


def test_text_assignment_projects_each_image_once_per_layer_pair():
    """NLVR2 text assignment: both images of each caption come from the batch; the layer pair sharing a key/value
    projection projects the B distinct images once (not 2B gathered ones). Equal logits, loss and gradients."""
    from models.classifiers import ALBEFTextAssignment

    torch.manual_seed(0)
    model = ALBEFTextAssignment(_cfg(dropout=0.0)).eval()
    image, ids, mask = _batch(5, seed=3)
    embeds = model.visual_encoder(image).detach().requires_grad_(True)
    img0, img1 = torch.tensor([0, 2, 4, 1, 1]), torch.tensor([3, 0, 0, 2, 4])
    res = []
    for fast in (True, False):
        model.zero_grad(set_to_none=True)
        embeds.grad = None
        rows, handles = _count_key_rows_in(model.text_encoder)
        if fast:
            logits = model.assign_logits(embeds, ids, mask, image_index=(img0, img1))
        else:
            logits = model.assign_logits((embeds[img0], embeds[img1]), ids, mask)
        for h in handles:
            h.remove()
        # 4 fusion layers in 2 pairs: B = 5 images projected by the first layer of each pair only, or 5 rows per layer
        assert rows == ({2: 5, 4: 5} if fast else {2: 5, 3: 5, 4: 5, 5: 5}), rows
        F.cross_entropy(logits, torch.tensor([0, 1, 2, 0, 1])).backward()
        res.append((logits.detach(), embeds.grad.clone(), _grads(model)))
    torch.testing.assert_close(res[0][0], res[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(res[0][1], res[1][1], rtol=1e-5, atol=1e-7)
    _assert_grads_equal(res[0][2], res[1][2])
    # the training forward (one vectorised draw) runs on this path
    out = model(image, ids, mask, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out["loss_ta"])
