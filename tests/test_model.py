"""ALBEF pre-training model (models/albef.py): size and checkpoint layout of the base model, and the
behaviour of a tiny model: losses, gradients, momentum (EMA) encoders, feature queues, temperature clamp,
single-process operation and a state-dict round trip."""
import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from models.albef import ALBEF, ALBEFConfig
from models.bert import BertConfig
from models.losses import distill_targets, itc_loss, mask_tokens, mlm_loss, sample_hard_negatives
from models.vit import VisionConfig
from utils.distributed import all_gather_no_grad, get_world_size


# ============================================================================================ base model
@pytest.fixture(scope="module")
def base_model():
    cfg = ALBEFConfig()
    with torch.device("meta"):
        model = ALBEF(cfg)
    return model


def _expected_trainable_params() -> int:
    """Reference section 4.2 arithmetic for ViT-B/16 @256 + BERT-base (12 layers, cross-attention in 6-11)."""
    d, v, mlp, pos, inter = 768, 30522, 3072, 512, 3072

    def linear(i, o):
        return i * o + o

    ln = 2 * d
    vit_block = ln + linear(d, 3 * d) + linear(d, d) + ln + linear(d, mlp) + linear(mlp, d)
    vit = (d * 3 * 16 * 16 + d) + d + (1 + 256) * d + 12 * vit_block + ln
    embeddings = v * d + pos * d + 2 * d + ln
    attention = 3 * linear(d, d) + linear(d, d) + ln
    layer = attention + linear(d, inter) + linear(inter, d) + ln
    text = embeddings + 12 * layer + 6 * attention  # cross-attention (key/value from 768-wide image tokens)
    mlm_head = v + linear(d, d) + ln  # bias + transform; decoder weight tied to word embeddings
    heads = 2 * linear(d, 256) + 1 + linear(d, 2)  # vision_proj, text_proj, temp, itm_head
    assert abs(vit - 85.84e6) < 0.01e6 and abs(embeddings - 23.84e6) < 0.01e6  # reference 4.2 sub-totals
    assert abs(layer - 7.09e6) < 0.01e6 and abs(attention - 2.36e6) < 0.01e6
    assert abs(text - 123.08e6) < 0.01e6 and abs(mlm_head - 0.62e6) < 0.01e6
    return vit + text + mlm_head + heads


def _unique_count(params) -> int:
    seen, n = set(), 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def test_base_model_trainable_parameter_count(base_model):
    params = [p for _, p in base_model.named_parameters(remove_duplicate=False)]  # tied tensors under each name
    trainable = _unique_count(p for p in params if p.requires_grad)
    frozen = _unique_count(p for p in params if not p.requires_grad)
    expected = _expected_trainable_params()
    print(f"base ALBEF trainable parameters: {trainable:,} (derived {expected:,}); frozen momentum: {frozen:,}")
    assert abs(trainable - 209.9e6) < 0.1e6
    assert trainable == expected
    # the momentum copy holds everything except temp and itm_head
    assert frozen == trainable - 1 - (768 * 2 + 2)


def _vit_keys(prefix, depth=12):
    keys = [f"{prefix}.cls_token", f"{prefix}.pos_embed", f"{prefix}.patch_embed.proj.weight",
            f"{prefix}.patch_embed.proj.bias", f"{prefix}.norm.weight", f"{prefix}.norm.bias"]
    for i in range(depth):
        for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys += [f"{prefix}.blocks.{i}.{m}.weight", f"{prefix}.blocks.{i}.{m}.bias"]
    return keys


def _bert_mlm_keys(prefix, layers=12, fusion=6):
    wb = ("weight", "bias")
    p = f"{prefix}.bert"
    keys = [f"{p}.embeddings.position_ids", f"{p}.embeddings.word_embeddings.weight",
            f"{p}.embeddings.position_embeddings.weight", f"{p}.embeddings.token_type_embeddings.weight",
            f"{p}.embeddings.LayerNorm.weight", f"{p}.embeddings.LayerNorm.bias"]
    for i in range(layers):
        blocks = ["attention"] + (["crossattention"] if i >= fusion else [])
        for att in blocks:
            for m in ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm"):
                keys += [f"{p}.encoder.layer.{i}.{att}.{m}.{w}" for w in wb]
        for m in ("intermediate.dense", "output.dense", "output.LayerNorm"):
            keys += [f"{p}.encoder.layer.{i}.{m}.{w}" for w in wb]
    c = f"{prefix}.cls.predictions"
    keys += [f"{c}.bias", f"{c}.transform.dense.weight", f"{c}.transform.dense.bias",
             f"{c}.transform.LayerNorm.weight", f"{c}.transform.LayerNorm.bias", f"{c}.decoder.weight",
             f"{c}.decoder.bias"]
    return keys


def _expected_pretrain_keys():
    keys = []
    for sfx in ("", "_m"):
        keys += _vit_keys(f"visual_encoder{sfx}")
        keys += _bert_mlm_keys(f"text_encoder{sfx}")
        for proj in ("vision_proj", "text_proj"):
            keys += [f"{proj}{sfx}.weight", f"{proj}{sfx}.bias"]
    keys += ["temp", "itm_head.weight", "itm_head.bias", "image_queue", "text_queue", "queue_ptr"]
    assert len(keys) == len(set(keys))
    return set(keys)


def test_base_model_state_dict_matches_original_checkpoint_layout(base_model):
    got = set(base_model.state_dict().keys())
    expected = _expected_pretrain_keys()
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    assert not missing, f"keys of ALBEF.pth the model lacks: {missing[:20]}"
    assert not unexpected, f"keys the original checkpoint does not have: {unexpected[:20]}"
    assert len(got) == 844


def test_base_model_key_shapes(base_model):
    sd = base_model.state_dict()
    shapes = {
        "visual_encoder.pos_embed": (1, 257, 768),
        "visual_encoder_m.pos_embed": (1, 257, 768),
        "visual_encoder.cls_token": (1, 1, 768),
        "visual_encoder.patch_embed.proj.weight": (768, 3, 16, 16),
        "visual_encoder.blocks.11.attn.qkv.weight": (2304, 768),
        "visual_encoder.blocks.0.mlp.fc1.weight": (3072, 768),
        "image_queue": (256, 65536),
        "text_queue": (256, 65536),
        "temp": (),
        "queue_ptr": (1,),
        "text_encoder.bert.encoder.layer.6.crossattention.self.key.weight": (768, 768),
        "text_encoder.bert.encoder.layer.11.crossattention.self.value.weight": (768, 768),
        "text_encoder.bert.embeddings.word_embeddings.weight": (30522, 768),
        "text_encoder.bert.embeddings.position_ids": (1, 512),
        "text_encoder.cls.predictions.decoder.weight": (30522, 768),
        "text_encoder.cls.predictions.bias": (30522,),
        "text_encoder_m.cls.predictions.decoder.bias": (30522,),
        "vision_proj.weight": (256, 768),
        "text_proj.weight": (256, 768),
        "itm_head.weight": (2, 768),
        "itm_head.bias": (2,),
    }
    for k, s in shapes.items():
        assert tuple(sd[k].shape) == s, k
    assert sd["queue_ptr"].dtype == torch.long
    assert sd["temp"].dtype == torch.float32
    assert sd["text_encoder.bert.embeddings.position_ids"].dtype == torch.long


def test_base_model_tied_and_frozen(base_model):
    for enc in (base_model.text_encoder, base_model.text_encoder_m):
        assert enc.cls.predictions.decoder.weight is enc.bert.embeddings.word_embeddings.weight
        assert enc.cls.predictions.decoder.bias is enc.cls.predictions.bias
    assert (base_model.text_encoder_m.bert.embeddings.word_embeddings.weight
            is not base_model.text_encoder.bert.embeddings.word_embeddings.weight)
    assert all(not p.requires_grad for p in base_model.momentum_parameters())


# ============================================================================================ tiny model
B, L, VOCAB = 4, 8, 100
CLS_ID, MASK_ID, PAD_ID = 1, 2, 0


def tiny_cfg(queue_size=32, dropout=0.1) -> ALBEFConfig:
    vit = VisionConfig(patch_size=8, embed_dim=64, depth=2, num_heads=2)
    bert = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
                      intermediate_size=128, max_position_embeddings=32, fusion_layer=2, encoder_width=64,
                      hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return ALBEFConfig(image_res=32, vision_width=64, embed_dim=16, queue_size=queue_size, vit=vit, bert=bert,
                       pad_token_id=PAD_ID, cls_token_id=CLS_ID, mask_token_id=MASK_ID)


def tiny_model(seed=0, **kw) -> ALBEF:
    torch.manual_seed(seed)
    return ALBEF(tiny_cfg(**kw))


def tiny_batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(B, 3, 32, 32, generator=g)
    ids = torch.randint(3, VOCAB, (B, L), generator=g)
    ids[:, 0] = CLS_ID
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, 6:] = 0
    mask[3, 4:] = 0
    ids[mask == 0] = PAD_ID
    return image, ids, mask


def _losses_finite(out):
    assert set(out) == {"loss_mlm", "loss_ita", "loss_itm"}
    for k, v in out.items():
        assert v.shape == () and torch.isfinite(v), k


def test_tiny_forward_backward_every_trainable_param_gets_a_gradient():
    model = tiny_model()
    model.train()
    image, ids, mask = tiny_batch()
    out = model(image, ids, mask, alpha=0.4, generator=torch.Generator().manual_seed(0))
    _losses_finite(out)
    (out["loss_mlm"] + out["loss_ita"] + out["loss_itm"]).backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, f"unused trainable parameters (DDP would need find_unused_parameters): {no_grad}"
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    assert not bad
    zero = [n for n, p in model.named_parameters() if p.requires_grad and p.grad.abs().sum() == 0]
    assert not zero, f"trainable parameters with an all-zero gradient: {zero}"
    mom_ids = {id(p) for p in model.momentum_parameters()}
    for n, p in model.named_parameters():
        if id(p) in mom_ids:
            assert not p.requires_grad and p.grad is None, n
    # momentum parameters are exactly the *_m modules' parameters
    names_m = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert names_m and all(n.split(".")[0].endswith("_m") for n in names_m)
    assert all(p.requires_grad for n, p in model.named_parameters() if not n.split(".")[0].endswith("_m"))


def test_momentum_pairs_align_by_name():
    model = tiny_model()
    for online, mom in model.model_pairs():
        on = [(n, p.shape) for n, p in online.named_parameters()]
        mo = [(n, p.shape) for n, p in mom.named_parameters()]
        assert on == mo


def test_momentum_update_is_ema_of_online_params():
    model = tiny_model()
    m = model.cfg.momentum
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for online, mom in model.model_pairs():
            for p in online.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
            for p in mom.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
    pairs = [(n, p.detach().clone(), p_m.detach().clone())
             for online, mom in model.model_pairs()
             for (n, p), p_m in zip(online.named_parameters(), mom.parameters())]
    model.momentum_update()
    moms = [p_m for _, mom in model.model_pairs() for p_m in mom.parameters()]
    assert len(moms) == len(pairs)
    for (n, p, old_m), new_m in zip(pairs, moms):
        torch.testing.assert_close(new_m, m * old_m + (1 - m) * p, msg=n)
    # online parameters untouched
    now = [p for o, _ in model.model_pairs() for p in o.parameters()]
    for (n, p, _), p_now in zip(pairs, now):
        assert torch.equal(p, p_now), n
    # buffers are not averaged
    assert torch.equal(model.text_encoder_m.bert.embeddings.position_ids,
                       model.text_encoder.bert.embeddings.position_ids)


def test_copy_params_and_momentum_mlm_head_stays_tied():
    model = tiny_model()
    with torch.no_grad():
        for p in model.momentum_parameters():
            p.add_(1.0)
    model.copy_params()
    for online, mom in model.model_pairs():
        for (n, p), p_m in zip(online.named_parameters(), mom.parameters()):
            assert torch.equal(p, p_m), n
            assert p.data_ptr() != p_m.data_ptr(), n
    enc_m = model.text_encoder_m
    word_m = enc_m.bert.embeddings.word_embeddings.weight
    assert enc_m.cls.predictions.decoder.weight is word_m
    assert enc_m.cls.predictions.decoder.bias is enc_m.cls.predictions.bias
    assert word_m is not model.text_encoder.bert.embeddings.word_embeddings.weight
    model.momentum_update()
    assert enc_m.cls.predictions.decoder.weight is word_m
    # also after a deepcopy of the whole model
    clone = copy.deepcopy(model)
    e = clone.text_encoder_m
    assert e.cls.predictions.decoder.weight is e.bert.embeddings.word_embeddings.weight
    assert e.cls.predictions.decoder.weight is not clone.text_encoder.cls.predictions.decoder.weight


def test_init_momentum_equals_online():
    model = tiny_model()
    for online, mom in model.model_pairs():
        for (n, p), p_m in zip(online.named_parameters(), mom.parameters()):
            assert torch.equal(p, p_m), n
    # queues start as unit columns, pointer at 0
    torch.testing.assert_close(model.image_queue.norm(dim=0), torch.ones(32))
    torch.testing.assert_close(model.text_queue.norm(dim=0), torch.ones(32))
    assert model.queue_ptr.tolist() == [0]


def test_dequeue_and_enqueue_wraps_around():
    model = tiny_model(queue_size=6)
    e = model.cfg.embed_dim
    img0, txt0 = model.image_queue.clone(), model.text_queue.clone()
    a_img, a_txt = torch.randn(4, e), torch.randn(4, e)
    model._dequeue_and_enqueue(a_img, a_txt)
    assert model.queue_ptr.tolist() == [4]
    torch.testing.assert_close(model.image_queue[:, :4], a_img.T)
    torch.testing.assert_close(model.text_queue[:, :4], a_txt.T)
    torch.testing.assert_close(model.image_queue[:, 4:], img0[:, 4:])
    torch.testing.assert_close(model.text_queue[:, 4:], txt0[:, 4:])

    b_img, b_txt = torch.randn(4, e), torch.randn(4, e)
    model._dequeue_and_enqueue(b_img, b_txt)
    assert model.queue_ptr.tolist() == [2]
    cols = [4, 5, 0, 1]
    torch.testing.assert_close(model.image_queue[:, cols], b_img.T)
    torch.testing.assert_close(model.text_queue[:, cols], b_txt.T)
    torch.testing.assert_close(model.image_queue[:, 2:4], a_img.T[:, 2:4])
    torch.testing.assert_close(model.text_queue[:, 2:4], a_txt.T[:, 2:4])
    assert model.queue_ptr.dtype == torch.long


def test_forward_enqueues_momentum_features_and_uses_the_old_queue():
    """Eval mode (no dropout) makes every branch deterministic, so the whole forward can be replayed from
    the reference's steps (section 3.4) with the public pieces."""
    model = tiny_model(seed=1)
    model.eval()
    image, ids, mask = tiny_batch(seed=1)
    with torch.no_grad():
        model(image, ids, mask, alpha=0.4)  # move the pointer off 0 and make the queue non-random
    q_img, q_txt = model.image_queue.clone(), model.text_queue.clone()
    ptr = model.queue_ptr.item()
    assert ptr == B
    alpha, gen_seed = 0.4, 7
    with torch.no_grad():
        out = model(image, ids, mask, alpha=alpha, generator=torch.Generator().manual_seed(gen_seed))
    assert model.queue_ptr.item() == (ptr + B) % model.cfg.queue_size

    with torch.no_grad():  # momentum weights are now the ones the forward used (it updates first)
        img_m = model.encode_image(image, momentum=True)
        txt_m = model.encode_text(ids, mask, momentum=True)
        cols = [(ptr + i) % model.cfg.queue_size for i in range(B)]
        torch.testing.assert_close(model.image_queue[:, cols], img_m.feat.T)
        torch.testing.assert_close(model.text_queue[:, cols], txt_m.feat.T)
        others = [c for c in range(model.cfg.queue_size) if c not in cols]
        assert torch.equal(model.image_queue[:, others], q_img[:, others])
        assert torch.equal(model.text_queue[:, others], q_txt[:, others])

        # ---- replay: ITC against [batch momentum keys | queue before this batch]
        img, txt = model.encode_image(image), model.encode_text(ids, mask)
        temp = model.temp
        img_all = torch.cat([img_m.feat.T, q_img], dim=1)
        txt_all = torch.cat([txt_m.feat.T, q_txt], dim=1)
        hard = torch.zeros(B, B + model.cfg.queue_size)
        hard[torch.arange(B), torch.arange(B)] = 1
        t_i2t = distill_targets(img_m.feat @ txt_all / temp, hard, alpha)
        t_t2i = distill_targets(txt_m.feat @ img_all / temp, hard, alpha)
        loss_ita, sim_i2t, sim_t2i = itc_loss(img.feat, txt.feat, img_all, txt_all, temp, t_i2t, t_t2i)
        torch.testing.assert_close(out["loss_ita"], loss_ita)

        # ---- ITM: positives + (neg image per text, neg text per image), labels 1, 0, 0
        g = torch.Generator().manual_seed(gen_seed)
        same = torch.eye(B, dtype=torch.bool)
        neg_img = sample_hard_negatives(sim_t2i[:, :B], same, g)
        neg_txt = sample_hard_negatives(sim_i2t[:, :B], same, g)
        enc = model.text_encoder.bert
        pos = enc(encoder_embeds=txt.embeds, attention_mask=mask, encoder_hidden_states=img.embeds, mode="fusion")
        n1 = enc(encoder_embeds=txt.embeds, attention_mask=mask, encoder_hidden_states=img.embeds[neg_img],
                 mode="fusion")
        n2 = enc(encoder_embeds=txt.embeds[neg_txt], attention_mask=mask[neg_txt],
                 encoder_hidden_states=img.embeds, mode="fusion")
        logits = model.itm_head(torch.cat([pos[:, 0], n1[:, 0], n2[:, 0]]))
        labels = torch.tensor([1] * B + [0] * (2 * B))
        torch.testing.assert_close(out["loss_itm"], F.cross_entropy(logits, labels))

        # ---- MLM on the masked text, full text+fusion stack, distilled from the momentum model
        cfg = model.cfg
        masked, mlm_labels = mask_tokens(ids, VOCAB, MASK_ID, PAD_ID, CLS_ID, cfg.mlm_probability, g)
        soft = F.softmax(model.text_encoder_m(masked, mask, encoder_hidden_states=img_m.embeds), dim=-1)
        student = model.text_encoder(masked, mask, encoder_hidden_states=img.embeds)
        torch.testing.assert_close(out["loss_mlm"], mlm_loss(student, mlm_labels, soft, alpha))


@pytest.mark.parametrize("start,clamped", [(1.0, 0.5), (1e-5, 0.001), (0.07, 0.07)])
def test_forward_clamps_temperature(start, clamped):
    model = tiny_model()
    with torch.no_grad():
        model.temp.fill_(start)
    image, ids, mask = tiny_batch()
    out = model(image, ids, mask, alpha=0.0, generator=torch.Generator().manual_seed(0))
    _losses_finite(out)
    assert model.temp.item() == pytest.approx(clamped, rel=1e-6)
    assert model.temp.requires_grad


def test_single_process_without_process_group():
    assert not (dist.is_available() and dist.is_initialized())
    assert get_world_size() == 1
    x = torch.randn(3, 5)
    assert all_gather_no_grad(x) is x
    model = tiny_model()
    image, ids, mask = tiny_batch()
    _losses_finite(model(image, ids, mask, alpha=0.4))


def test_state_dict_checkpoint_round_trip(tmp_path):
    a = tiny_model(seed=0)
    b = tiny_model(seed=1)
    with torch.no_grad():  # make the momentum copy and the queue differ from a fresh init
        a.momentum_update()
        a.temp.fill_(0.05)
        for p in a.momentum_parameters():
            p.add_(0.01)
        a._dequeue_and_enqueue(torch.randn(3, 16), torch.randn(3, 16))
    path = tmp_path / "ckpt.pth"
    torch.save({"model": a.state_dict(), "epoch": 0}, path)
    ckpt = torch.load(path, map_location="cpu")
    result = b.load_state_dict(ckpt["model"], strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    for (k, va), (k2, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert k == k2 and torch.equal(va, vb), k
    # tying survives loading
    for enc in (b.text_encoder, b.text_encoder_m):
        assert enc.cls.predictions.decoder.weight is enc.bert.embeddings.word_embeddings.weight
    image, ids, mask = tiny_batch(seed=2)
    outs = []
    for model in (a, b):
        model.train()
        torch.manual_seed(123)
        outs.append(model(image, ids, mask, alpha=0.4, generator=torch.Generator().manual_seed(5)))
    for k in outs[0]:
        assert torch.equal(outs[0][k], outs[1][k]), k
    assert torch.equal(a.queue_ptr, b.queue_ptr) and torch.equal(a.image_queue, b.image_queue)


def test_grad_checkpointing_gives_the_same_losses_and_gradients():
    image, ids, mask = tiny_batch(seed=3)
    results = []
    for ckpt in (False, True):
        cfg = tiny_cfg()
        cfg.vit.grad_checkpointing = ckpt
        cfg.bert.grad_checkpointing = ckpt
        torch.manual_seed(0)
        model = ALBEF(cfg)
        model.train()
        torch.manual_seed(42)
        out = model(image, ids, mask, alpha=0.4, generator=torch.Generator().manual_seed(9))
        sum(out.values()).backward()
        results.append((out, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (o1, g1), (o2, g2) = results
    for k in o1:
        torch.testing.assert_close(o1[k], o2[k])
    assert g1.keys() == g2.keys()
    for n in g1:
        torch.testing.assert_close(g1[n], g2[n], rtol=1e-4, atol=1e-6, msg=n)
