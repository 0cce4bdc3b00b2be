"""Pre-training -> task layout key mappings (models/layouts.py) against key sets of our task models."""
import pytest
import torch

from models.albef import ALBEF, ALBEFConfig
from models.bert import BertConfig
from models.classifiers import ALBEFNLVR, ALBEFTextAssignment, ALBEFVE
from models.layouts import (TRANSITIONS, nlvr_ta_to_nlvr, pretrain_to_nlvr_ta, pretrain_to_ve,
                            pretrain_to_vqa)
from models.vit import VisionConfig
from models.vqa import ALBEFVQA

LAYERS, FUSION = 4, 2
PRETRAIN_ONLY = {"vision_proj", "text_proj", "vision_proj_m", "text_proj_m", "temp", "itm_head", "image_queue",
                 "text_queue", "queue_ptr"}


def _cfg(layers=LAYERS, fusion=FUSION):
    return ALBEFConfig(image_res=16, vision_width=32, embed_dim=8, queue_size=8, momentum=0.9,
                       vit=VisionConfig(patch_size=8, embed_dim=32, depth=1, num_heads=2),
                       bert=BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                       intermediate_size=64, fusion_layer=fusion, encoder_width=32,
                                       max_position_embeddings=40),
                       pad_token_id=0, cls_token_id=2, mask_token_id=4)


@pytest.fixture(scope="module")
def pretrain():
    torch.manual_seed(0)
    model = ALBEF(_cfg())
    with torch.no_grad():  # make momentum weights distinguishable from the online ones
        for p in model.momentum_parameters():
            p.add_(1.0)
    return model


@pytest.fixture()
def sd(pretrain):
    return dict(pretrain.state_dict())


def _assert_fits(mapped, target, missing=()):
    """Key sets equal both ways (minus the documented missing ones), shapes equal, strict load works."""
    expected = target.state_dict()
    assert set(expected) - set(mapped) == set(missing)
    assert set(mapped) - set(expected) == set()
    for k, v in mapped.items():
        assert v.shape == expected[k].shape, k
    missing_, unexpected = target.load_state_dict(mapped, strict=False)
    assert set(missing_) == set(missing) and not unexpected


def _top(keys):
    return {k.split(".")[0] for k in keys}


@pytest.mark.parametrize("distill", [True, False])
def test_vqa_mapping(pretrain, sd, distill):
    mapped, dropped = pretrain_to_vqa(sd, fusion_layer=FUSION, distill=distill)
    _assert_fits(mapped, ALBEFVQA(pretrain.cfg, distill=distill))
    dropped_tops = PRETRAIN_ONLY if distill else PRETRAIN_ONLY | {"visual_encoder_m", "text_encoder_m"}
    assert _top(dropped) == dropped_tops
    assert set(mapped) | set(dropped) >= {k for k in sd if not k.startswith(("text_encoder.", "text_encoder_m."))}
    for suffix in ("", "_m") if distill else ("",):
        enc, dec = f"text_encoder{suffix}", f"text_decoder{suffix}"
        for L in range(LAYERS):  # full encoder
            for rest in ("attention.self.query.weight", "output.LayerNorm.bias"):
                assert torch.equal(mapped[f"{enc}.encoder.layer.{L}.{rest}"],
                                   sd[f"{enc}.bert.encoder.layer.{L}.{rest}"])
        for L in range(FUSION, LAYERS):  # decoder layer L - fusion == encoder fusion layer L
            for rest in ("attention.self.query.weight", "crossattention.self.key.weight", "intermediate.dense.bias"):
                assert torch.equal(mapped[f"{dec}.bert.encoder.layer.{L - FUSION}.{rest}"],
                                   sd[f"{enc}.bert.encoder.layer.{L}.{rest}"])
        for rest in ("position_ids", "word_embeddings.weight", "LayerNorm.weight"):
            assert torch.equal(mapped[f"{dec}.bert.embeddings.{rest}"], sd[f"{enc}.bert.embeddings.{rest}"])
            assert torch.equal(mapped[f"{enc}.embeddings.{rest}"], sd[f"{enc}.bert.embeddings.{rest}"])
        assert torch.equal(mapped[f"{dec}.cls.predictions.transform.dense.weight"],
                           sd[f"{enc}.cls.predictions.transform.dense.weight"])
    if distill:  # momentum from momentum, not from online
        k = "text_decoder_m.bert.encoder.layer.0.attention.self.query.weight"
        assert torch.equal(mapped[k], sd[f"text_encoder_m.bert.encoder.layer.{FUSION}.attention.self.query.weight"])
        assert not torch.equal(mapped[k], mapped[k.replace("_m.", ".", 1)])


def test_vqa_mapping_default_fusion_on_twelve_layers():
    """fusion 6 of 12 (the released layout), on a narrow model: decoder = 6 layers from encoder layers 6-11."""
    torch.manual_seed(0)
    model = ALBEF(_cfg(layers=12, fusion=6))
    sd = model.state_dict()
    mapped, _ = pretrain_to_vqa(sd)
    dec_layers = {int(k.split(".")[4]) for k in mapped if k.startswith("text_decoder.bert.encoder.layer.")}
    assert dec_layers == set(range(6))
    assert torch.equal(mapped["text_decoder.bert.encoder.layer.5.output.dense.weight"],
                       sd["text_encoder.bert.encoder.layer.11.output.dense.weight"])


@pytest.mark.parametrize("distill", [True, False])
def test_ve_mapping(pretrain, sd, distill):
    mapped, dropped = pretrain_to_ve(sd, distill=distill)
    missing = {f"cls_head{s}.{i}.{p}" for s in (("", "_m") if distill else ("",)) for i in (0, 2)
               for p in ("weight", "bias")}
    _assert_fits(mapped, ALBEFVE(pretrain.cfg, distill=distill), missing)
    assert all(k.startswith(("text_encoder.cls.", "text_encoder_m.cls.")) or k.split(".")[0] in PRETRAIN_ONLY
               or (not distill and k.split(".")[0].endswith("_m")) for k in dropped)
    assert any(k.startswith("text_encoder.cls.") for k in dropped)
    if distill:
        for k in ("text_encoder_m.encoder.layer.3.crossattention.self.value.weight", "visual_encoder_m.pos_embed"):
            src = k.replace("text_encoder_m.", "text_encoder_m.bert.")
            assert torch.equal(mapped[k], sd[src])
            assert not torch.equal(mapped[k], mapped[k.replace("_m.", ".", 1)])
    else:
        assert not any(k.split(".")[0].endswith("_m") for k in mapped)


def test_nlvr_ta_mapping(pretrain, sd):
    mapped, dropped = pretrain_to_nlvr_ta(sd, fusion_layer=FUSION)
    target = ALBEFTextAssignment(pretrain.cfg)
    _assert_fits(mapped, target, missing={"ta_head.weight", "ta_head.bias"})
    assert not any(k.split(".")[0].endswith("_m") for k in mapped)
    assert _top(dropped) == {"visual_encoder_m", "text_encoder_m", "vision_proj_m", "text_proj_m", "itm_head",
                             "image_queue", "text_queue", "queue_ptr", "text_encoder"}
    assert {k for k in dropped if k.startswith("text_encoder.")} == {k for k in sd if k.startswith("text_encoder.cls.")}
    rest = "crossattention.self.key.weight"
    for L in range(FUSION, LAYERS):  # each fusion layer duplicated
        src = sd[f"text_encoder.bert.encoder.layer.{L}.{rest}"]
        first = 2 * (L - FUSION) + FUSION
        assert torch.equal(mapped[f"text_encoder.encoder.layer.{first}.{rest}"], src)
        assert torch.equal(mapped[f"text_encoder.encoder.layer.{first + 1}.{rest}"], src)
    for L in range(FUSION):  # text layers unchanged
        assert torch.equal(mapped[f"text_encoder.encoder.layer.{L}.output.dense.weight"],
                           sd[f"text_encoder.bert.encoder.layer.{L}.output.dense.weight"])
    assert torch.equal(mapped["temp"], sd["temp"])
    assert torch.equal(mapped["vision_proj.weight"], sd["vision_proj.weight"])


def test_nlvr_mapping_from_ta(pretrain, sd):
    ta, _ = pretrain_to_nlvr_ta(sd, fusion_layer=FUSION)
    ta["ta_head.weight"], ta["ta_head.bias"] = torch.zeros(3, 32), torch.zeros(3)  # as a trained TA checkpoint
    mapped, dropped = nlvr_ta_to_nlvr(ta)
    assert set(dropped) == {"vision_proj.weight", "vision_proj.bias", "text_proj.weight", "text_proj.bias", "temp",
                            "ta_head.weight", "ta_head.bias"}
    target = ALBEFNLVR(pretrain.cfg, distill=False)
    _assert_fits(mapped, target, missing={f"cls_head.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")})
    assert all(mapped[k] is ta[k] for k in mapped)


def test_converted_dicts_are_refused(pretrain, sd):
    vqa, _ = pretrain_to_vqa(sd, fusion_layer=FUSION)
    ve, _ = pretrain_to_ve(sd)
    ta, _ = pretrain_to_nlvr_ta(sd, fusion_layer=FUSION)
    for fn, kw in ((pretrain_to_vqa, dict(fusion_layer=FUSION)), (pretrain_to_ve, {}),
                   (pretrain_to_nlvr_ta, dict(fusion_layer=FUSION))):
        for converted in (vqa, ve, ta):
            with pytest.raises(ValueError, match="pre-training|layout"):
                fn(converted, **kw)
    with pytest.raises(ValueError, match="pre-training"):
        nlvr_ta_to_nlvr(sd)
    ta["ta_head.weight"], ta["ta_head.bias"] = torch.zeros(3, 32), torch.zeros(3)
    nlvr, _ = nlvr_ta_to_nlvr(ta)
    with pytest.raises(ValueError, match="ta_head"):
        nlvr_ta_to_nlvr(nlvr)
    with pytest.raises(ValueError, match="ta_head"):
        nlvr_ta_to_nlvr(ve)


def test_bad_inputs_are_refused(sd):
    for fn in (pretrain_to_vqa, pretrain_to_nlvr_ta):
        with pytest.raises(ValueError, match="fusion_layer"):
            fn(sd, fusion_layer=1)  # checkpoint has cross-attention from layer 2
    with pytest.raises(ValueError, match="no fusion layers"):
        pretrain_to_vqa({k: v for k, v in ALBEF(_cfg(layers=2, fusion=2)).state_dict().items()}, fusion_layer=2)
    no_m = {k: v for k, v in sd.items() if not k.split(".")[0].endswith("_m")}
    for fn in (pretrain_to_vqa, pretrain_to_ve):
        with pytest.raises(ValueError, match="distill=False"):
            fn(no_m, **({"fusion_layer": FUSION} if fn is pretrain_to_vqa else {}))
    assert not any(k.split(".")[0].endswith("_m") for k in pretrain_to_ve(no_m, distill=False)[0])
    with pytest.raises(ValueError, match="unexpected top-level"):
        pretrain_to_ve({**sd, "idx_queue": torch.zeros(1, 8)})
    with pytest.raises(ValueError, match="unexpected text-encoder key"):
        pretrain_to_ve({**sd, "text_encoder.bert.pooler.dense.weight": torch.zeros(32, 32)})


def test_registry():
    assert set(TRANSITIONS) == {("pretrain", "retrieval"), ("pretrain", "vqa"), ("pretrain", "ve"),
                                ("pretrain", "nlvr_ta"), ("nlvr_ta", "nlvr")}
