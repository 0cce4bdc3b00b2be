"""Loading public weights (models/pretrained.py): DeiT/timm checkpoints into the ViT, Hugging Face BERT folders into
the text encoder, and offline-first name resolution. Every checkpoint is written by the test into tmp_path; the
network is never used."""
from __future__ import annotations

import os
import re
import socket
import time

import pytest
import torch

from models.bert import BertConfig, BertForMaskedLM
from models.pretrained import MissingWeightsError, load_bert_weights, load_vit_weights, resolve_hf_path
from models.vit import VisionConfig, create_vit, interpolate_pos_embed

VOCAB, HIDDEN, HEADS, INTER, MAXPOS = 100, 32, 4, 64, 64


@torch.no_grad()
def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.2) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in module.named_parameters():
        noise = torch.randn(p.shape, generator=g) * std
        p.copy_(1.0 + noise if ("LayerNorm.weight" in name or "norm" in name and name.endswith("weight"))
                else noise)


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """Offline hub, an empty private cache, and a record of any attempt to open a connection."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in tests")

    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hf_home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    monkeypatch.setenv("HUGGINGFACE_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    # huggingface_hub reads these at import time: patch the module constants too
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    return {"cache": cache, "attempts": attempts}


# --------------------------------------------------------------------------------------------------------------
# ViT from DeiT / timm checkpoints
# --------------------------------------------------------------------------------------------------------------

VIT = dict(patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=4.0)


def deit_like_state_dict(image_res=32, seed=0):
    """A timm ViT with a classifier head (like DeiT-B/16-224), at a smaller resolution than the target model."""
    from functools import partial

    from timm.models.vision_transformer import VisionTransformer

    src = VisionTransformer(img_size=image_res, patch_size=8, embed_dim=32, depth=2, num_heads=4, mlp_ratio=4.0,
                            qkv_bias=True, num_classes=10, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    randomize(src, seed)
    return src.eval(), {k: v.clone() for k, v in src.state_dict().items()}


def test_load_vit_weights_from_deit_checkpoint_interpolates_pos_embed(tmp_path):
    src, sd = deit_like_state_dict(32)
    assert "head.weight" in sd and "head.bias" in sd and sd["pos_embed"].shape == (1, 17, 32)
    path = tmp_path / "deit_tiny.pth"
    torch.save({"model": sd}, path)

    vit = create_vit(VisionConfig(**VIT), 48)  # 6x6 grid
    load_vit_weights(vit, str(path))
    ours = vit.state_dict()
    assert ours["pos_embed"].shape == (1, 37, 32)
    torch.testing.assert_close(ours["pos_embed"], interpolate_pos_embed(sd["pos_embed"], 36), atol=0, rtol=0)
    torch.testing.assert_close(ours["pos_embed"][:, 0], sd["pos_embed"][:, 0], atol=0, rtol=0)
    for k, v in ours.items():
        if k != "pos_embed":
            torch.testing.assert_close(v, sd[k], atol=0, rtol=0, msg=k)
    assert not any(k.startswith("head") for k in ours)


def test_load_vit_weights_same_resolution_reproduces_timm_features(tmp_path):
    src, sd = deit_like_state_dict(32, seed=1)
    path = tmp_path / "ckpt.pth"
    torch.save({"model": sd}, path)
    vit = create_vit(VisionConfig(**VIT), 32).eval()
    load_vit_weights(vit, str(path))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(vit(x), src.forward_features(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("wrapper", ["model", "state_dict", None])
def test_load_vit_weights_wrappers_and_safetensors(tmp_path, wrapper):
    _, sd = deit_like_state_dict(32, seed=3)
    path = tmp_path / "ckpt.pth"
    torch.save(sd if wrapper is None else {wrapper: sd}, path)
    vit = create_vit(VisionConfig(**VIT), 32)
    load_vit_weights(vit, str(path))
    torch.testing.assert_close(vit.state_dict()["blocks.1.mlp.fc2.weight"], sd["blocks.1.mlp.fc2.weight"])
    if wrapper is None:
        from safetensors.torch import save_file

        st = tmp_path / "ckpt.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
        vit2 = create_vit(VisionConfig(**VIT), 48)
        load_vit_weights(vit2, str(st))
        torch.testing.assert_close(vit2.state_dict()["pos_embed"], interpolate_pos_embed(sd["pos_embed"], 36))


def test_load_vit_weights_extra_key_raises_value_error(tmp_path):
    _, sd = deit_like_state_dict(32)
    sd["blocks.0.attn.extra.weight"] = torch.zeros(3)
    path = tmp_path / "extra.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(ValueError, match="blocks.0.attn.extra.weight"):
        load_vit_weights(create_vit(VisionConfig(**VIT), 32), str(path))


def test_load_vit_weights_missing_key_raises_value_error(tmp_path):
    _, sd = deit_like_state_dict(32)
    del sd["blocks.1.norm2.bias"]
    path = tmp_path / "missing.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(ValueError, match="blocks.1.norm2.bias"):
        load_vit_weights(create_vit(VisionConfig(**VIT), 32), str(path))


def _wrong_shape_checkpoint(tmp_path):
    _, sd = deit_like_state_dict(32)
    sd["blocks.0.attn.qkv.weight"] = torch.zeros(64, 32)  # model expects [96, 32]
    path = tmp_path / "wrong_shape.pth"
    torch.save({"model": sd}, path)
    return path


def test_load_vit_weights_wrong_shape_is_rejected(tmp_path):
    """A wrong-shape tensor never loads silently."""
    path = _wrong_shape_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="blocks.0.attn.qkv.weight"):
        load_vit_weights(create_vit(VisionConfig(**VIT), 32), str(path))


def test_load_vit_weights_wrong_shape_raises_value_error(tmp_path):
    path = _wrong_shape_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="blocks.0.attn.qkv.weight"):
        load_vit_weights(create_vit(VisionConfig(**VIT), 32), str(path))


def test_load_vit_weights_non_square_pos_embed_is_rejected(tmp_path):
    _, sd = deit_like_state_dict(32)
    sd["pos_embed"] = torch.zeros(1, 1 + 6, 32)  # 6 patches: not a square grid
    path = tmp_path / "nonsquare.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(ValueError, match="square"):
        load_vit_weights(create_vit(VisionConfig(**VIT), 48), str(path))


def test_load_vit_weights_rejects_pickled_objects(tmp_path):
    path = tmp_path / "pickled.pth"
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 32)}, "args": object.__new__(_Opaque)}, path)
    with pytest.raises(ValueError, match="weights_only"):
        load_vit_weights(create_vit(VisionConfig(**VIT), 32), str(path))


class _Opaque:
    pass


def test_load_vit_weights_uncached_timm_name_offline_raises(no_network):
    vit = create_vit(VisionConfig(**VIT), 32)
    t0 = time.monotonic()
    with pytest.raises(MissingWeightsError, match="deit_nonexistent_patch8_32"):
        load_vit_weights(vit, "deit_nonexistent_patch8_32.fb_in1k")
    assert time.monotonic() - t0 < 5
    assert no_network["attempts"] == []


@pytest.mark.parametrize("path", ["/models/nope.pth", "./vit.pth", "checkpoints/deit/model.safetensors"])
def test_load_vit_weights_missing_local_file_is_named_as_such(path, no_network):
    with pytest.raises(MissingWeightsError, match=f"ViT weights '{re.escape(path)}' does not exist"):
        load_vit_weights(create_vit(VisionConfig(**VIT), 32), path)
    assert no_network["attempts"] == []


def test_missing_local_folder_is_not_reported_as_a_hub_name(no_network, tmp_path):
    """A path that is no hub name (``org/name``) is named as a missing file, with the synthetic world's recipe."""
    with pytest.raises(MissingWeightsError, match=r"tokenizer '.*/synthetic/tokenizer' does not exist .*make demo"):
        resolve_hf_path(str(tmp_path / "synthetic" / "tokenizer"), "tokenizer")
    with pytest.raises(MissingWeightsError, match=r"BERT weights '/w/bert' does not exist \(no such file or folder"):
        resolve_hf_path("/w/bert", "BERT weights")
    assert no_network["attempts"] == []


def test_scripts_print_one_line_for_missing_files(tmp_path):
    """Missing weights, tokenizer or data files end the script with one line on stderr and exit code 2."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    ann = tmp_path / "ve.json"  # annotation files are checked first (they need only exist here)
    ann.write_text("[]")
    res = subprocess.run([sys.executable, "VE.py", "--config", "configs/VE_tiny.yaml", "--output_dir",
                          str(tmp_path / "out"), "--device", "cpu", "--options", "tokenizer=nowhere/at/all",
                          f"train_file={ann}", f"val_file={ann}", f"test_file={ann}"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2, res.stdout + res.stderr
    assert res.stderr.strip().splitlines() == [
        "missing file: tokenizer 'nowhere/at/all' does not exist (no such file or folder: "
        f"{os.path.join(ROOT, 'nowhere', 'at', 'all')})"]


# --------------------------------------------------------------------------------------------------------------
# BERT from Hugging Face folders
# --------------------------------------------------------------------------------------------------------------

def hf_bert(cls_name: str, seed: int = 0, **kw):
    import transformers

    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=kw.pop("hidden_size", HIDDEN),
                                  num_hidden_layers=kw.pop("num_hidden_layers", 2), num_attention_heads=HEADS,
                                  intermediate_size=INTER, max_position_embeddings=MAXPOS, **kw)
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(cfg)
    randomize(model, seed)
    return model.eval()


def ours(num_layers=2, fusion_layer=1, hidden=HIDDEN):
    torch.manual_seed(123)
    return BertForMaskedLM(BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=num_layers,
                                      num_attention_heads=HEADS, intermediate_size=INTER,
                                      max_position_embeddings=MAXPOS, fusion_layer=fusion_layer, encoder_width=24))


def _cross_params(model):
    return {k: v.clone() for k, v in model.state_dict().items() if ".crossattention." in k}


def _check_loaded(model, hf_sd, prefix=""):
    """Every HF tensor (except pooler / NSP head) equals ours under the same name (`bert.` added for BertModel)."""
    sd = model.state_dict()
    n = 0
    for k, v in hf_sd.items():
        if "pooler" in k or "seq_relationship" in k or k.endswith(("position_ids", "token_type_ids")):
            continue
        torch.testing.assert_close(sd[prefix + k], v, atol=0, rtol=0, msg=k)
        n += 1
    return n


@pytest.mark.parametrize("cls_name", ["BertForMaskedLM", "BertForPreTraining"])
def test_load_bert_weights_with_mlm_head(tmp_path, cls_name):
    hf = hf_bert(cls_name, seed=1)
    hf.save_pretrained(tmp_path)
    model = ours()
    cross_before = _cross_params(model)
    assert cross_before  # layer 1 is a fusion layer
    load_bert_weights(model, str(tmp_path))
    hf_sd = hf.state_dict()
    assert _check_loaded(model, hf_sd) > 20
    # MLM head loaded, decoder tied to the loaded word embeddings, decoder bias = predictions bias
    torch.testing.assert_close(model.cls.predictions.transform.dense.weight,
                               hf_sd["cls.predictions.transform.dense.weight"], atol=0, rtol=0)
    torch.testing.assert_close(model.cls.predictions.bias, hf_sd["cls.predictions.bias"], atol=0, rtol=0)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert model.cls.predictions.decoder.bias is model.cls.predictions.bias
    torch.testing.assert_close(model.cls.predictions.decoder.weight, hf_sd["bert.embeddings.word_embeddings.weight"],
                               atol=0, rtol=0)
    # cross-attention keeps its own init
    after = _cross_params(model)
    for k, v in cross_before.items():
        torch.testing.assert_close(after[k], v, atol=0, rtol=0, msg=k)
    assert not any("seq_relationship" in k or "pooler" in k for k in model.state_dict())


def test_load_bert_weights_from_plain_bert_model(tmp_path):
    hf = hf_bert("BertModel", seed=2)  # has a pooler, no MLM head, keys without `bert.`
    hf.save_pretrained(tmp_path)
    model = ours()
    head_before = model.cls.predictions.transform.dense.weight.clone()
    cross_before = _cross_params(model)
    load_bert_weights(model, str(tmp_path))
    assert _check_loaded(model, hf.state_dict(), prefix="bert.") > 20
    torch.testing.assert_close(model.cls.predictions.transform.dense.weight, head_before, atol=0, rtol=0)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    torch.testing.assert_close(model.cls.predictions.decoder.weight, hf.state_dict()["embeddings.word_embeddings.weight"])
    for k, v in _cross_params(model).items():
        torch.testing.assert_close(v, cross_before[k], atol=0, rtol=0, msg=k)


def test_load_bert_weights_into_plain_bert_model(tmp_path):
    """Fine-tuning models hold a BertModel (keys without ``bert.``, no MLM head): Retrieval/VE from BERT."""
    from models.bert import BertModel

    hf = hf_bert("BertForMaskedLM", seed=5)
    hf.save_pretrained(tmp_path)
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS,
                                 intermediate_size=INTER, max_position_embeddings=MAXPOS, fusion_layer=1,
                                 encoder_width=24))
    load_bert_weights(model, str(tmp_path))
    sd = model.state_dict()
    n = 0
    for k, v in hf.state_dict().items():
        if k.startswith("bert.") and not k.endswith(("position_ids", "token_type_ids")):
            torch.testing.assert_close(sd[k[len("bert."):]], v, atol=0, rtol=0, msg=k)
            n += 1
    assert n > 20


def test_load_bert_weights_first_layers_into_a_shallower_decoder(tmp_path):
    """The VQA answer decoder takes BERT's first layers (as the original's from_pretrained with 6 of 12)."""
    from models.bert import BertLMHeadModel

    hf = hf_bert("BertForMaskedLM", seed=6, num_hidden_layers=3)
    hf.save_pretrained(tmp_path)
    torch.manual_seed(0)
    dec = BertLMHeadModel(BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=2,
                                     num_attention_heads=HEADS, intermediate_size=INTER, max_position_embeddings=MAXPOS,
                                     fusion_layer=0, encoder_width=HIDDEN))
    with pytest.raises(ValueError, match="unexpected"):
        load_bert_weights(dec, str(tmp_path))
    load_bert_weights(dec, str(tmp_path), first_layers_only=True)
    torch.testing.assert_close(dec.bert.encoder.layer[1].output.dense.weight,
                               hf.state_dict()["bert.encoder.layer.1.output.dense.weight"], atol=0, rtol=0)
    assert dec.cls.predictions.decoder.weight is dec.bert.embeddings.word_embeddings.weight


def test_load_bert_weights_text_layers_reproduce_hf(tmp_path):
    """After loading, ours in 'text' mode (layers below fusion_layer) equals the same number of HF layers."""
    hf = hf_bert("BertModel", seed=3, num_hidden_layers=2)
    hf.save_pretrained(tmp_path)
    model = ours(num_layers=2, fusion_layer=2).eval()
    load_bert_weights(model, str(tmp_path))
    ids = torch.randint(1, VOCAB, (2, 7), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        torch.testing.assert_close(model.bert(ids, mask, mode="text"),
                                   hf(input_ids=ids, attention_mask=mask).last_hidden_state, atol=1e-5, rtol=1e-5)


def test_load_bert_weights_from_old_style_pytorch_model_bin(tmp_path):
    """bert-base-uncased's pytorch_model.bin names LayerNorm parameters gamma/beta and carries the NSP head."""
    hf = hf_bert("BertForPreTraining", seed=5)
    sd = {re.sub(r"LayerNorm\.weight$", "LayerNorm.gamma", re.sub(r"LayerNorm\.bias$", "LayerNorm.beta", k)): v
          for k, v in hf.state_dict().items()}
    assert any(k.endswith("LayerNorm.gamma") for k in sd)
    torch.save(sd, tmp_path / "pytorch_model.bin")
    model = ours()
    load_bert_weights(model, str(tmp_path))
    _check_loaded(model, hf.state_dict())


def test_load_bert_weights_hidden_size_mismatch_names_the_key(tmp_path):
    hf = hf_bert("BertForMaskedLM", seed=6, hidden_size=48)
    hf.save_pretrained(tmp_path)
    model = ours(hidden=HIDDEN)
    with pytest.raises(ValueError) as ei:
        load_bert_weights(model, str(tmp_path))
    msg = str(ei.value)
    m = re.search(r"((?:bert|cls)\.[\w.]+) has shape", msg)
    assert m, msg
    key = m.group(1)
    assert key in model.state_dict()
    assert tuple(model.state_dict()[key].shape) != tuple(hf.state_dict()[key].shape)
    assert str(tuple(model.state_dict()[key].shape)) in msg


def test_load_bert_weights_layer_count_mismatch_raises(tmp_path):
    hf = hf_bert("BertForMaskedLM", seed=7, num_hidden_layers=3)
    hf.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="encoder.layer.2"):
        load_bert_weights(ours(num_layers=2), str(tmp_path))


def test_load_bert_weights_missing_non_cross_key_raises(tmp_path):
    hf = hf_bert("BertForMaskedLM", seed=8)
    sd = dict(hf.state_dict())
    del sd["bert.encoder.layer.0.intermediate.dense.weight"]
    torch.save(sd, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="bert.encoder.layer.0.intermediate.dense.weight"):
        load_bert_weights(ours(), str(tmp_path))


def test_load_bert_weights_folder_without_weights_raises(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(MissingWeightsError, match="model.safetensors"):
        load_bert_weights(ours(), str(tmp_path))


def test_load_bert_weights_from_hub_cache_offline(tmp_path, no_network):
    """A hub name already in the local cache loads with the hub offline and no connection attempt."""
    hf = hf_bert("BertForMaskedLM", seed=9)
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = no_network["cache"] / "models--tiny-org--tiny-bert"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    hf.save_pretrained(snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert resolve_hf_path("tiny-org/tiny-bert", what="BERT weights") == str(snap)
    model = ours()
    load_bert_weights(model, "tiny-org/tiny-bert")
    _check_loaded(model, hf.state_dict())
    assert no_network["attempts"] == []


# --------------------------------------------------------------------------------------------------------------
# resolve_hf_path
# --------------------------------------------------------------------------------------------------------------

def test_resolve_hf_path_offline_uncached_raises_fast(no_network):
    name = "nonexistent-org-albef-tests/tiny-bert-xyz"
    t0 = time.monotonic()
    with pytest.raises(MissingWeightsError) as ei:
        resolve_hf_path(name, what="BERT weights")
    assert time.monotonic() - t0 < 5
    assert name in str(ei.value)
    assert "HF_HUB_OFFLINE" in str(ei.value)
    assert isinstance(ei.value, FileNotFoundError)
    assert no_network["attempts"] == []


def test_resolve_hf_path_unreachable_hub_raises(no_network, monkeypatch):
    """Not offline by configuration, but the hub cannot be reached: one clear error, no download attempt."""
    import models.pretrained as pretrained

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    calls = []
    monkeypatch.setattr(pretrained, "_hub_reachable", lambda timeout=3.0: calls.append(1) or False)
    name = "nonexistent-org-albef-tests/tiny-vit"
    with pytest.raises(MissingWeightsError, match=re.escape(name)) as ei:
        resolve_hf_path(name, what="ViT weights")
    assert calls == [1]
    assert "cannot be" in str(ei.value) and "reached" in str(ei.value)


def test_hub_reachable_is_false_without_network(no_network):
    import models.pretrained as pretrained

    assert pretrained._hub_reachable(timeout=0.1) is False


def test_resolve_hf_path_local_folder_unchanged(tmp_path, no_network):
    folder = tmp_path / "my_bert"
    folder.mkdir()
    assert resolve_hf_path(str(folder), what="BERT weights") == str(folder)


def test_resolve_hf_path_rejects_a_file(tmp_path, no_network):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(MissingWeightsError, match="folder"):
        resolve_hf_path(str(f), what="BERT weights")
