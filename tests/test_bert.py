"""BERT text / fusion encoder (models/bert.py): equivalence with Hugging Face BERT, modes, masking, Grad-CAM path,
multi-image cross-attention, tied weights and config parsing. Tiny sizes, CPU, fp32."""
from __future__ import annotations

import json
import os

import pytest
import torch

from models.bert import BertConfig, BertForMaskedLM, BertModel, init_bert_weights
from models.pretrained import load_bert_weights

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL = 1e-5
VOCAB, HIDDEN, HEADS, INTER, MAXPOS = 100, 32, 4, 64, 64


def tiny_cfg(**kw) -> BertConfig:
    base = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=4, num_attention_heads=HEADS,
                intermediate_size=INTER, max_position_embeddings=MAXPOS, fusion_layer=2, encoder_width=24)
    base.update(kw)
    return BertConfig(**base)


def hf_cfg(**kw):
    from transformers import BertConfig as HFBertConfig

    base = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=3, num_attention_heads=HEADS,
                intermediate_size=INTER, max_position_embeddings=MAXPOS, hidden_dropout_prob=0.1,
                attention_probs_dropout_prob=0.1)
    base.update(kw)
    return HFBertConfig(**base)


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Replace the (tiny-std) default init by larger random values, LayerNorm scales around 1, so that every
    parameter visibly matters. Tied parameters are visited once (named_parameters dedups)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g) * std
        if "LayerNorm.weight" in name or name.endswith("norm.weight"):
            p.copy_(1.0 + noise)
        else:
            p.copy_(noise)


def ids_and_mask(batch=3, length=9, seed=1, lengths=(9, 6, 4)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=g)
    mask = torch.zeros(batch, length, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    ids = ids.masked_fill(mask == 0, 0)  # [PAD] = 0 at padded positions
    return ids, mask


def image_tokens(batch=3, n=5, width=24, seed=2):
    g = torch.Generator().manual_seed(seed)
    img = torch.randn(batch, n, width, generator=g)
    img_mask = torch.ones(batch, n, dtype=torch.long)
    img_mask[1, -2:] = 0
    img_mask[2, -1] = 0
    return img, img_mask


def make_model(seed=0, **kw) -> BertForMaskedLM:
    model = BertForMaskedLM(tiny_cfg(**kw))
    randomize(model, seed)
    return model.eval()


# --------------------------------------------------------------------------------------------------------------
# Equivalence with Hugging Face
# --------------------------------------------------------------------------------------------------------------

def test_text_mode_matches_hf_bert_for_masked_lm(tmp_path):
    """A random HF BertForMaskedLM saved with save_pretrained and loaded with load_bert_weights gives the same last
    hidden states and MLM logits (all positions, padding included: both implementations mask keys only)."""
    from transformers import BertForMaskedLM as HFBertForMaskedLM

    torch.manual_seed(0)
    hf = HFBertForMaskedLM(hf_cfg())
    randomize(hf, seed=3)
    hf.eval()
    hf.save_pretrained(tmp_path)

    ours = BertForMaskedLM(tiny_cfg(num_hidden_layers=3, fusion_layer=3)).eval()
    load_bert_weights(ours, str(tmp_path))
    ids, mask = ids_and_mask()
    with torch.no_grad():
        hf_out = hf(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        hf_hidden, hf_logits = hf_out.hidden_states[-1], hf_out.logits
        hidden = ours.bert(ids, mask, mode="text")
        logits_text = ours(ids, mask, mode="text")
        logits_mm = ours(ids, mask)  # fusion_layer == num layers: 'multi_modal' == 'text'
    assert hidden.shape == (3, 9, HIDDEN)
    torch.testing.assert_close(hidden, hf_hidden, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(logits_text, hf_logits, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(logits_mm, hf_logits, atol=ATOL, rtol=1e-5)
    # the comparison is not vacuous: padding really is present and changes the real tokens' outputs if ignored
    with torch.no_grad():
        unmasked = ours.bert(ids, torch.ones_like(mask), mode="text")
    assert (unmasked[1, :6] - hidden[1, :6]).abs().max() > 1e-3


def test_text_mode_matches_hf_bert_model(tmp_path):
    """Same with a plain HF BertModel checkpoint (keys without the `bert.` prefix)."""
    from transformers import BertModel as HFBertModel

    torch.manual_seed(0)
    hf = HFBertModel(hf_cfg(num_hidden_layers=2))
    randomize(hf, seed=4)
    hf.eval()
    hf.save_pretrained(tmp_path)
    ours = BertForMaskedLM(tiny_cfg(num_hidden_layers=2, fusion_layer=2)).eval()
    load_bert_weights(ours, str(tmp_path))
    ids, mask = ids_and_mask(seed=5)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
        out = ours.bert(ids, mask, mode="text")
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-5)


def test_cross_attention_matches_hf_decoder_with_cross_attention():
    """HF BertModel(is_decoder, add_cross_attention) has self-attn -> cross-attn -> FFN in every layer, exactly
    ALBEF's fusion layers with fusion_layer=0; same parameter names, so its state dict loads directly."""
    from transformers import BertModel as HFBertModel

    torch.manual_seed(0)
    hf = HFBertModel(hf_cfg(is_decoder=True, add_cross_attention=True), add_pooling_layer=False)
    randomize(hf, seed=6)
    hf.eval()
    ours = BertModel(tiny_cfg(num_hidden_layers=3, fusion_layer=0, encoder_width=HIDDEN)).eval()
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=False)
    assert [k for k in missing if not k.endswith("position_ids")] == []
    assert [k for k in unexpected if not k.endswith(("position_ids", "token_type_ids"))] == []
    assert all(ours.encoder.layer[i].has_cross_attention for i in range(3))

    ids, mask = ids_and_mask(seed=7)
    img, img_mask = image_tokens(width=HIDDEN, seed=8)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, encoder_hidden_states=img,
                 encoder_attention_mask=img_mask, use_cache=False).last_hidden_state
        out = ours(ids, mask, encoder_hidden_states=img, encoder_attention_mask=img_mask, is_decoder=True)
        non_causal = ours(ids, mask, encoder_hidden_states=img, encoder_attention_mask=img_mask)
        no_img_mask = ours(ids, mask, encoder_hidden_states=img, is_decoder=True)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-5)
    # the causal mask and the image mask both matter in this set-up (the test would notice if either were dropped)
    assert (non_causal - ref).abs().max() > 1e-3
    assert (no_img_mask[1] - ref[1]).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------------------
# Modes
# --------------------------------------------------------------------------------------------------------------

def test_layer_sets_of_each_mode():
    model = make_model()
    enc = model.bert.encoder
    assert list(enc.layer_range("text")) == [0, 1]
    assert list(enc.layer_range("fusion")) == [2, 3]
    assert list(enc.layer_range("multi_modal")) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="mode"):
        enc.layer_range("image")
    assert [layer.has_cross_attention for layer in enc.layer] == [False, False, True, True]
    assert [hasattr(layer, "crossattention") for layer in enc.layer] == [False, False, True, True]
    keys = model.state_dict().keys()
    assert "bert.encoder.layer.2.crossattention.self.key.weight" in keys
    assert not any(k.startswith("bert.encoder.layer.1.crossattention") for k in keys)
    assert model.state_dict()["bert.encoder.layer.3.crossattention.self.value.weight"].shape == (HIDDEN, 24)
    assert model.state_dict()["bert.encoder.layer.3.crossattention.self.query.weight"].shape == (HIDDEN, HIDDEN)


def test_text_then_fusion_equals_multi_modal():
    model = make_model(seed=11)
    ids, mask = ids_and_mask(seed=12)
    img, img_mask = image_tokens(seed=13)
    with torch.no_grad():
        text = model.bert(ids, mask, mode="text")
        fused = model.bert(encoder_embeds=text, attention_mask=mask, encoder_hidden_states=img,
                           encoder_attention_mask=img_mask, mode="fusion")
        full = model.bert(ids, mask, encoder_hidden_states=img, encoder_attention_mask=img_mask,
                          mode="multi_modal")
        logits = model(ids, mask, encoder_hidden_states=img, encoder_attention_mask=img_mask)
    torch.testing.assert_close(fused, full, atol=ATOL, rtol=1e-5)
    torch.testing.assert_close(logits, model.cls(full), atol=ATOL, rtol=1e-5)
    # 'text' runs exactly the first fusion_layer layers, by hand
    with torch.no_grad():
        x = model.bert.embeddings(ids)
        am = mask[:, None, None, :].bool()
        for layer in model.bert.encoder.layer[:2]:
            x = layer(x, am)
    torch.testing.assert_close(text, x, atol=ATOL, rtol=1e-5)
    # the image really is used by the fusion layers and not by the text layers
    with torch.no_grad():
        full2 = model.bert(ids, mask, encoder_hidden_states=img + 1.0, encoder_attention_mask=img_mask)
        text2 = model.bert(ids, mask, encoder_hidden_states=img + 1.0, mode="text")
    assert (full2 - full).abs().max() > 1e-3
    torch.testing.assert_close(text2, text, atol=0, rtol=0)


def test_fusion_layer_without_image_raises():
    model = make_model()
    ids, mask = ids_and_mask()
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model.bert(ids, mask, mode="multi_modal")
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        model.bert(encoder_embeds=torch.randn(3, 9, HIDDEN), attention_mask=mask, mode="fusion")
    with pytest.raises(ValueError, match="mode"):
        model.bert(ids, mask, mode="bogus")
    model.bert(ids, mask, mode="text")  # text mode needs no image


def test_padding_token_ids_do_not_change_real_token_outputs():
    model = make_model(seed=21)
    ids, mask = ids_and_mask(seed=22)
    img, img_mask = image_tokens(seed=23)
    other = ids.clone()
    g = torch.Generator().manual_seed(24)
    other[mask == 0] = torch.randint(1, VOCAB, (int((mask == 0).sum()),), generator=g)
    assert not torch.equal(other, ids)
    real = mask.bool()
    with torch.no_grad():
        for mode in ("text", "multi_modal"):
            kw = {} if mode == "text" else dict(encoder_hidden_states=img, encoder_attention_mask=img_mask)
            a = model.bert(ids, mask, mode=mode, **kw)
            b = model.bert(other, mask, mode=mode, **kw)
            torch.testing.assert_close(a[real], b[real], atol=ATOL, rtol=1e-5)
            assert (a[~real] - b[~real]).abs().max() > 1e-3  # pad positions themselves do change
        # masked image tokens are ignored too
        img2 = img.clone()
        img2[img_mask == 0] = 100.0
        a = model.bert(ids, mask, encoder_hidden_states=img, encoder_attention_mask=img_mask)
        b = model.bert(ids, mask, encoder_hidden_states=img2, encoder_attention_mask=img_mask)
    torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Grad-CAM (explicit softmax) path
# --------------------------------------------------------------------------------------------------------------

def cross_self_modules(model):
    return [layer.crossattention.self for layer in model.bert.encoder.layer if layer.has_cross_attention]


def test_save_attention_path_matches_sdpa_and_stores_map_and_gradient():
    model = make_model(seed=31)
    ids, mask = ids_and_mask(seed=32)
    img, img_mask = image_tokens(seed=33)
    with torch.no_grad():
        ref = model(ids, mask, encoder_hidden_states=img, encoder_attention_mask=img_mask)
    mods = cross_self_modules(model)
    assert len(mods) == 2 and all(m.attention_map is None for m in mods)
    for m in mods:
        m.save_attention = True
    img = img.clone().requires_grad_(True)
    out = model(ids, mask, encoder_hidden_states=img, encoder_attention_mask=img_mask)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=1e-5)
    B, L, N = ids.shape[0], ids.shape[1], img.shape[1]
    for m in mods:
        amap = m.attention_map
        assert amap is not None and amap.shape == (B, HEADS, L, N)
        torch.testing.assert_close(amap.sum(-1), torch.ones(B, HEADS, L), atol=1e-5, rtol=0)
        hidden = (img_mask == 0)[:, None, None, :].expand_as(amap)
        assert torch.all(amap[hidden] == 0)
        assert torch.all(amap[~hidden] > 0)
    # self-attention modules never store maps
    assert all(layer.attention.self.attention_map is None for layer in model.bert.encoder.layer)
    out[:, 0].sum().backward()
    for m in mods:
        assert m.attention_gradients is not None
        assert m.attention_gradients.shape == (B, HEADS, L, N)
        assert m.attention_gradients.abs().sum() > 0
    assert img.grad is not None and img.grad.abs().sum() > 0


# --------------------------------------------------------------------------------------------------------------
# Several images
# --------------------------------------------------------------------------------------------------------------

def test_multi_image_layers_alternate_between_images():
    """2 images, 4 fusion layers (fusion_layer=1 of 5): fusion layers +0, +2 read image 0, +1, +3 image 1."""
    model = make_model(seed=41, num_hidden_layers=5, fusion_layer=1)
    ids, mask = ids_and_mask(seed=42)
    img0, m0 = image_tokens(seed=43)
    img1, m1 = image_tokens(n=7, seed=44)
    m1 = torch.ones_like(m1)
    m1[0, -3:] = 0
    with torch.no_grad():
        out = model.bert(ids, mask, encoder_hidden_states=[img0, img1], encoder_attention_mask=[m0, m1])
        # by hand: layer 0 text, layers 1..4 alternate image 0 / image 1
        x = model.bert.embeddings(ids)
        am = mask[:, None, None, :].bool()
        x = model.bert.encoder.layer[0](x, am)
        imgs = [(img0, m0[:, None, None, :].bool()), (img1, m1[:, None, None, :].bool())]
        for i, j in zip(range(1, 5), (0, 1, 0, 1)):
            x = model.bert.encoder.layer[i](x, am, imgs[j][0], imgs[j][1])
        torch.testing.assert_close(out, x, atol=ATOL, rtol=1e-5)
        # the wrong assignment gives a different result (the check above is discriminative)
        y = model.bert.encoder.layer[0](model.bert.embeddings(ids), am)
        for i, j in zip(range(1, 5), (1, 0, 1, 0)):
            y = model.bert.encoder.layer[i](y, am, imgs[j][0], imgs[j][1])
        assert (y - out).abs().max() > 1e-3
        # fusion mode on the text output gives the same with lists
        text = model.bert(ids, mask, mode="text")
        fused = model.bert(encoder_embeds=text, attention_mask=mask, encoder_hidden_states=[img0, img1],
                           encoder_attention_mask=[m0, m1], mode="fusion")
        torch.testing.assert_close(fused, out, atol=ATOL, rtol=1e-5)
        # no masks at all: a list of images without a list of masks
        out_nomask = model.bert(ids, mask, encoder_hidden_states=[img0, img1])
        full = [torch.ones_like(m0), torch.ones_like(m1)]
        torch.testing.assert_close(
            out_nomask, model.bert(ids, mask, encoder_hidden_states=[img0, img1], encoder_attention_mask=full),
            atol=ATOL, rtol=1e-5)


def test_multi_image_only_the_right_layers_see_each_image():
    """Perturbing image 0 changes what layers fusion+0/+2 see; replacing the cross-attention of those layers by a
    zero key/value weight (so the image is ignored there) makes image 0 irrelevant: image 0 is read nowhere else."""
    model = make_model(seed=51, num_hidden_layers=4, fusion_layer=0)
    ids, mask = ids_and_mask(seed=52)
    img0, _ = image_tokens(seed=53)
    img1, _ = image_tokens(seed=54)
    with torch.no_grad():
        for i in (0, 2):  # the layers that should read image 0: make their cross-attention blind to it
            ca = model.bert.encoder.layer[i].crossattention.self
            ca.key.weight.zero_()
            ca.value.weight.zero_()
        a = model.bert(ids, mask, encoder_hidden_states=[img0, img1])
        b = model.bert(ids, mask, encoder_hidden_states=[img0 * 3 + 1, img1])
        c = model.bert(ids, mask, encoder_hidden_states=[img0, img1 * 3 + 1])
    torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-5)
    assert (a - c).abs().max() > 1e-3


# --------------------------------------------------------------------------------------------------------------
# Tied weights, state dict layout, init
# --------------------------------------------------------------------------------------------------------------

def test_tied_weights_and_state_dict_names():
    model = BertForMaskedLM(tiny_cfg())
    pred = model.cls.predictions
    assert pred.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert pred.decoder.bias is pred.bias
    sd = model.state_dict()
    for k in ("cls.predictions.decoder.weight", "cls.predictions.decoder.bias", "cls.predictions.bias",
              "bert.embeddings.word_embeddings.weight", "bert.embeddings.position_ids",
              "bert.embeddings.position_embeddings.weight", "bert.embeddings.token_type_embeddings.weight",
              "bert.embeddings.LayerNorm.weight", "cls.predictions.transform.dense.weight",
              "cls.predictions.transform.LayerNorm.bias",
              "bert.encoder.layer.0.attention.self.query.weight",
              "bert.encoder.layer.0.attention.output.LayerNorm.weight",
              "bert.encoder.layer.0.intermediate.dense.weight", "bert.encoder.layer.0.output.dense.bias"):
        assert k in sd, k
    assert not any("pooler" in k for k in sd)
    assert torch.equal(sd["bert.embeddings.position_ids"], torch.arange(MAXPOS)[None])
    assert sd["cls.predictions.decoder.weight"].data_ptr() == sd["bert.embeddings.word_embeddings.weight"].data_ptr()
    # tie survives a load of a state dict (e.g. an original ALBEF checkpoint carrying both names)
    other = make_model(seed=61)
    model.load_state_dict(other.state_dict())
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert model.cls.predictions.decoder.bias is model.cls.predictions.bias
    torch.testing.assert_close(model.cls.predictions.decoder.weight, other.bert.embeddings.word_embeddings.weight)
    # one parameter under two names: parameters() lists it once, named_parameters(remove_duplicate=False) twice
    names = [n for n, _ in model.named_parameters()]
    assert "bert.embeddings.word_embeddings.weight" in names and "cls.predictions.decoder.weight" not in names
    all_names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
    assert "cls.predictions.decoder.weight" in all_names and "cls.predictions.decoder.bias" in all_names


def test_mlm_logits_use_tied_decoder_and_bias():
    model = make_model(seed=71, num_hidden_layers=2, fusion_layer=2)
    ids, mask = ids_and_mask()
    with torch.no_grad():
        h = model.bert(ids, mask, mode="text")
        p = model.cls.predictions
        t = torch.nn.functional.layer_norm(torch.nn.functional.gelu(p.transform.dense(h)), (HIDDEN,),
                                           p.transform.LayerNorm.weight, p.transform.LayerNorm.bias, 1e-12)
        ref = t @ model.bert.embeddings.word_embeddings.weight.T + p.bias
        torch.testing.assert_close(model(ids, mask, mode="text"), ref, atol=ATOL, rtol=1e-5)


def test_init_bert_weights_keeps_tie_and_statistics():
    model = BertForMaskedLM(tiny_cfg())
    init_bert_weights(model)
    emb = model.bert.embeddings.word_embeddings.weight
    assert model.cls.predictions.decoder.weight is emb
    assert model.cls.predictions.decoder.bias is model.cls.predictions.bias
    assert torch.all(model.cls.predictions.bias == 0)
    assert 0.01 < emb[1:].std().item() < 0.03
    assert torch.all(model.bert.embeddings.LayerNorm.weight == 1)
    assert torch.all(model.bert.embeddings.LayerNorm.bias == 0)
    assert torch.all(model.bert.encoder.layer[3].crossattention.self.key.bias == 0)


def test_init_bert_weights_zeroes_padding_row():
    model = BertForMaskedLM(tiny_cfg())
    init_bert_weights(model)
    assert torch.all(model.bert.embeddings.word_embeddings.weight[0] == 0)


def test_grad_checkpointing_gives_same_output_and_grads():
    a = make_model(seed=81)
    b = make_model(seed=81, grad_checkpointing=True)
    a.train()
    b.train()
    for m in (a, b):  # dropout off for a deterministic comparison, but training mode on
        for mod in m.modules():
            if isinstance(mod, torch.nn.Dropout):
                mod.p = 0.0
            if hasattr(mod, "dropout_p"):
                mod.dropout_p = 0.0
    ids, mask = ids_and_mask()
    img, img_mask = image_tokens()
    la = a(ids, mask, encoder_hidden_states=img, encoder_attention_mask=img_mask)
    lb = b(ids, mask, encoder_hidden_states=img, encoder_attention_mask=img_mask)
    torch.testing.assert_close(la, lb, atol=ATOL, rtol=1e-5)
    la.square().mean().backward()
    lb.square().mean().backward()
    ga = dict(a.named_parameters())
    for n, p in b.named_parameters():
        torch.testing.assert_close(p.grad, ga[n].grad, atol=1e-5, rtol=1e-4, msg=n)


# --------------------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------------------

def test_config_rejects_unknown_keys_with_file_name(tmp_path):
    path = tmp_path / "my_bert_config.json"
    data = json.loads(open(os.path.join(ROOT, "configs", "config_bert.json")).read())
    data["fusion_layerz"] = 3
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError) as ei:
        BertConfig.from_json_file(path)
    assert "my_bert_config.json" in str(ei.value)
    assert "fusion_layerz" in str(ei.value)


def test_config_rejects_invalid_json_with_file_name(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="broken.json"):
        BertConfig.from_json_file(path)


def test_config_accepts_original_config_bert_json():
    cfg = BertConfig.from_json_file(os.path.join(ROOT, "configs", "config_bert.json"))
    assert cfg.vocab_size == 30522 and cfg.hidden_size == 768 and cfg.num_hidden_layers == 12
    assert cfg.num_attention_heads == 12 and cfg.intermediate_size == 3072
    assert cfg.fusion_layer == 6 and cfg.encoder_width == 768
    assert cfg.layer_norm_eps == 1e-12 and cfg.max_position_embeddings == 512 and cfg.type_vocab_size == 2
    assert cfg.hidden_act == "gelu"
    # HF bookkeeping keys are accepted (and ignored)
    cfg2 = BertConfig.from_dict({"architectures": ["BertForMaskedLM"], "model_type": "bert",
                                 "transformers_version": "4.8.1", "hidden_size": 64,
                                 "num_attention_heads": 4, "fusion_layer": 2, "num_hidden_layers": 4})
    assert cfg2.hidden_size == 64 and cfg2.fusion_layer == 2


def test_config_validation():
    with pytest.raises(ValueError, match="multiple"):
        tiny_cfg(hidden_size=30)
    with pytest.raises(ValueError, match="fusion_layer"):
        tiny_cfg(fusion_layer=5)
    with pytest.raises(ValueError, match="hidden_act"):
        tiny_cfg(hidden_act="relu")
