"""Weakly-supervised grounding (Grad-CAM + proposal ranking) against the original ALBEF code, plus unit tests.

The reference data in ``tests/assets/grounding_parity/`` were produced by running the ORIGINAL ``Grounding.py``
``val()`` (``itm`` and ``itc`` modes) and ``dataset/utils.py`` ``grounding_eval`` (salesforce/ALBEF b9727e4) on a
tiny retrieval model with deterministic weights, fixed images/expressions and made-up proposals and ground-truth
boxes; see that folder's README.md. Here the original's state dict is loaded into our ``ALBEFRetrieval`` with
``strict=True`` and the maps, chosen boxes and accuracies are recomputed with ``models.gradcam`` and
``engine.grounding``.

``pytest -s tests/test_grounding_parity.py`` prints the measured differences.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from engine.grounding import grounding_accuracy, iou_inclusive, pick_box, proposal_scores, upsample_cam
from models.albef import ALBEFConfig, ALBEFRetrieval, Encoded
from models.bert import BertConfig
from models.gradcam import grounding_cam, itc_gradcam, itm_gradcam
from models.vit import VisionConfig

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "grounding_parity")
# float32 maps: an absolute bound, and one relative to the map's largest value (the itm maps are ~1e-2, where
# 1e-5 alone would be loose); the original's own float32 maps differ from its float64 maps by up to 9.3e-9 (itm,
# max 0.013) and 7.4e-8 (itc, max 0.110).
ATOL, RTOL_OF_MAX = 1e-5, 1e-5
# both implementations in float64: itm agrees to double rounding; itc goes through our ITC features, which
# ``encode_image`` / ``encode_text`` always return in float32 (so its float64 run has a float32 floor)
ATOL_FP64 = {"itm": 1e-12, "itc": 1e-6}
MODES = ("itm", "itc")


def tiny_config() -> ALBEFConfig:
    return ALBEFConfig(
        image_res=48, vision_width=32, embed_dim=16, temp=0.07, queue_size=16, momentum=0.995,
        vit=VisionConfig(patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0),
        bert=BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=40, fusion_layer=2, encoder_width=32,
                        layer_norm_eps=1e-12, type_vocab_size=2, pad_token_id=0),
        pad_token_id=0, cls_token_id=2, mask_token_id=4,
    )


@contextlib.contextmanager
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return (a.double() - b.double()).abs().max().item()


class Refer:
    """The duck-typed REFER view ``grounding_accuracy`` reads, over the asset's JSON."""

    def __init__(self, meta: dict):
        self.refs = {r["ref_id"]: r for r in meta["refs"]}
        self.images = {i["image_id"]: i for i in meta["images"]}

    def split(self, ref_id):
        return self.refs[ref_id]["split"]

    def box(self, ref_id):
        return self.refs[ref_id]["bbox"]

    def image_id(self, ref_id):
        return self.refs[ref_id]["image_id"]

    def image_size(self, ref_id):
        img = self.images[self.image_id(ref_id)]
        return img["height"], img["width"]


@pytest.fixture(scope="module")
def expected():
    return torch.load(os.path.join(ASSETS, "grounding_tiny_expected.pt"), map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def meta():
    with open(os.path.join(ASSETS, "grounding_tiny_refs.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = ALBEFRetrieval(tiny_config())
    state = torch.load(os.path.join(ASSETS, "grounding_tiny_state.pt"), map_location="cpu", weights_only=True)
    m.load_state_dict(state, strict=True)
    return m.eval()


def our_cams(model, expected, meta, mode, dtype=torch.float32, device="cpu"):
    """grounding_cam over the original's batches, each padded to its own longest text (padding='longest')."""
    image = expected["input.image"][expected["input.image_index"]].to(device, dtype)
    ids, mask = expected["input.input_ids"].to(device), expected["input.attention_mask"].to(device)
    out, start = [], 0
    for bs in expected["input.batch_sizes"].tolist():
        rows = slice(start, start + bs)
        n = int(mask[rows].sum(1).max())
        out.append(grounding_cam(model, image[rows], ids[rows, :n], mask[rows, :n], mode=mode,
                                 block_num=meta["block_num"][mode]))
        start += bs
    return torch.cat(out)


@pytest.fixture(scope="module")
def cams(model, expected, meta):
    with _one_thread():
        return {mode: our_cams(model, expected, meta, mode) for mode in MODES}


# ------------------------------------------------------------------------------------------------- parity
@pytest.mark.parametrize("mode", MODES)
def test_cam_matches_original(mode, cams, expected, model):
    ref = expected[f"{mode}.cam"]
    diff = _max_abs(cams[mode], ref)
    print(f"\n  grounding {mode} cam max-abs diff {diff:.3e} (max |cam| {ref.abs().max().item():.3e})")
    assert diff <= ATOL and diff <= RTOL_OF_MAX * ref.abs().max().item()
    assert ref.abs().max() > 0 and (cams[mode] >= 0).all()
    assert all(p.grad is None for p in model.parameters())


def test_itm_cam_scales_with_batch_padding(model, expected, meta, cams):
    """The original averages the itm maps over the batch's padded length: the second batch is padded to 7 by
    ``padding='longest'``; padded to 9 its maps shrink by exactly 7/9 (and no chosen box changes)."""
    assert expected["input.attention_mask"][6:].sum(1).max() == 7
    rows = slice(6, 12)
    image = expected["input.image"][expected["input.image_index"][rows]]
    with _one_thread():
        cam9 = grounding_cam(model, image, expected["input.input_ids"][rows], expected["input.attention_mask"][rows],
                             mode="itm", block_num=meta["block_num"]["itm"])
    torch.testing.assert_close(cam9 * 9 / 7, cams["itm"][rows], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("mode", MODES)
def test_cam_matches_original_fp64(mode, model, expected, meta):
    m64 = ALBEFRetrieval(tiny_config())
    m64.load_state_dict(model.state_dict())
    m64 = m64.double().eval()
    with _one_thread():
        ours = our_cams(m64, expected, meta, mode, dtype=torch.float64)
    diff = _max_abs(ours, expected[f"{mode}.fp64.cam"])
    print(f"\n  grounding {mode} cam float64 max-abs diff {diff:.3e}")
    assert diff <= ATOL_FP64[mode]


@pytest.mark.parametrize("source", ["ours", "original"])
@pytest.mark.parametrize("mode", MODES)
def test_boxes_and_accuracy_match_original(mode, source, cams, expected, meta):
    """Chosen proposals and per-split accuracies equal the original's, from our maps and from its own maps."""
    cam = cams[mode] if source == "ours" else expected[f"{mode}.cam"]
    ref_ids = expected["input.ref_ids"].tolist()
    results = [{"ref_id": r, "cam": c} for r, c in zip(ref_ids, cam)]
    refer = Refer(meta)
    metrics, preds = grounding_accuracy(results, refer, meta["dets"], alpha=meta["alpha"])

    picked = []
    for r, c in zip(ref_ids, cam):
        boxes = meta["dets"][str(refer.image_id(r))]
        picked.append(pick_box(proposal_scores(upsample_cam(c, refer.image_size(r)), boxes), boxes))
    assert picked == expected[f"{mode}.pred_index"].tolist()
    for p, k in zip(preds, picked):
        assert p["pred_box"] == meta["dets"][str(refer.image_id(p["ref_id"]))][k][:4]
    assert [p["iou"] for p in preds] == meta["original"][mode]["iou"]

    acc = expected[f"{mode}.acc"].tolist()
    assert [metrics["val_d"], metrics["testA_d"], metrics["testB_d"]] == acc
    assert metrics == {**meta["original"][mode]["accuracy"], "num_val": 5, "num_testA": 4, "num_testB": 3,
                       "no_positive": 0}
    print(f"\n  grounding {mode} ({source} maps): {metrics}")


def test_parity_case_is_discriminative(expected, meta):
    """The asset exercises what it should: several splits, near ties, an exact tie, IoU exactly 0.5 both ways."""
    assert {r["split"] for r in meta["refs"]} == {"val", "testA", "testB"}
    margins = [d["margin_itm"] for d in meta["design"].values()]
    assert sum(0 < m < 3e-3 for m in margins) >= 5 and min(m for m in margins if m > 0) > 5e-5
    assert 0.0 in margins  # the duplicated proposal: the first of two equal boxes wins
    assert 0.5 in meta["original"]["itm"]["iou"] and 0 < meta["original"]["itm"]["accuracy"]["val_d"] < 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cam_and_accuracy_on_cuda(model, expected, meta):
    gpu = ALBEFRetrieval(tiny_config())
    gpu.load_state_dict(model.state_dict())
    gpu = gpu.cuda().eval()
    for mode in MODES:
        cam = our_cams(gpu, expected, meta, mode, device="cuda")
        ref = expected[f"{mode}.cam"]
        diff = _max_abs(cam.cpu(), ref)
        print(f"\n  grounding {mode} cam on CUDA max-abs diff {diff:.3e}")
        assert diff <= ATOL and diff <= RTOL_OF_MAX * ref.abs().max().item()
        results = [{"ref_id": r, "cam": c} for r, c in zip(expected["input.ref_ids"].tolist(), cam)]
        metrics, _ = grounding_accuracy(results, Refer(meta), meta["dets"], alpha=meta["alpha"])
        assert [metrics["val_d"], metrics["testA_d"], metrics["testB_d"]] == expected[f"{mode}.acc"].tolist()
    assert all(p.grad is None for p in gpu.parameters())


# ------------------------------------------------------------------------------------------ Grad-CAM units
def test_itc_gradcam_restores_the_model(model, expected):
    image = expected["input.image"][:2]
    ids, mask = expected["input.input_ids"][:2, :9], expected["input.attention_mask"][:2, :9]
    blocks = model.visual_encoder.blocks
    with torch.no_grad():
        before = model.encode_image(image).embeds
    model.visual_encoder.grad_checkpointing = True
    try:
        cam = itc_gradcam(model, image, ids, mask, block_num=1)
        assert model.visual_encoder.grad_checkpointing
    finally:
        model.visual_encoder.grad_checkpointing = False
    assert cam.shape == (2, 6, 6) and (cam >= 0).all() and cam.sum() > 0
    assert all(b.attn.fused_attn for b in blocks) and not any(b.attn.attn_drop._forward_hooks for b in blocks)
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(image).embeds, before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="mode"):
        grounding_cam(model, image, ids, mask, mode="gradcam")


class _StubALBEF(nn.Module):
    """One cross-attention "fusion layer" whose map and gradient are set by hand: image tokens are one-hot
    values, so the ITM positive logit is ``sum_b mean_heads(A[b, h, 0, :]) . gain`` and the gradient of the map
    of token 0 at key ``j`` is ``gain[j] / heads`` (other tokens get none)."""

    def __init__(self, attn_logits: torch.Tensor, gain: torch.Tensor):
        super().__init__()
        self.attn_logits = nn.Parameter(attn_logits)  # [heads, 1 + N] for token 0 (others: uniform)
        self.gain = gain  # [1 + N]
        cross = SimpleNamespace(save_attention=False, attention_map=None, attention_gradients=None)
        layer = SimpleNamespace(has_cross_attention=True, crossattention=SimpleNamespace(self=cross))
        self.text_encoder = SimpleNamespace(encoder=SimpleNamespace(layer=[layer]), config=None)
        self.cross = cross

    @staticmethod
    def _bert(encoder):
        return encoder

    def encode_image(self, image):  # image: [B, 1 + N, 1 + N] one-hot tokens
        return Encoded(image, None)

    def encode_text(self, input_ids, attention_mask):
        return Encoded(torch.zeros(*input_ids.shape, 1), None)

    def fuse(self, text_embeds, attention_mask, image_embeds):
        b, length = attention_mask.shape
        logits = torch.zeros(b, self.attn_logits.shape[0], length, self.attn_logits.shape[1])
        logits = logits + F.pad(self.attn_logits[:, None], (0, 0, 0, length - 1))  # token 0 row set
        probs = logits.softmax(-1)
        if self.cross.save_attention:
            self.cross.attention_map = probs
        return (probs @ image_embeds[:, None]).mean(1)  # [B, L, 1 + N]

    def itm_logits(self, fused):
        return torch.stack([torch.zeros_like(fused[:, 0, 0]), fused[:, 0] @ self.gain], dim=1)


def test_itm_map_peaks_at_largest_positive_gradient():
    n, heads = 9, 2  # 3 x 3 patches
    image = torch.eye(1 + n).expand(2, -1, -1)
    ids = torch.tensor([[2, 7, 8], [2, 9, 0]])
    mask = (ids > 0).long()

    # uniform attention: the map follows the gradient; its largest value (patch 5) wins, negative ones give 0
    gain = torch.tensor([0.3, 0.2, -1.0, 0.4, 0.1, 0.2, 2.0, -0.5, 0.7, 0.0])
    model = _StubALBEF(torch.zeros(heads, 1 + n), gain)
    per_token = itm_gradcam(model, image, ids, mask, block_num=0)
    cam = grounding_cam(model, image, ids, mask, mode="itm", block_num=0)
    assert per_token.shape == (2, 3, 3, 3) and cam.shape == (2, 3, 3)
    assert (per_token[:, 1:] == 0).all()  # only token 0 feeds the ITM logit
    by_hand = (1 / (1 + n)) * gain[1:].clamp(min=0) / heads / ids.shape[1]  # mean over all 3 positions
    torch.testing.assert_close(cam, by_hand.view(1, 3, 3).expand(2, -1, -1))
    assert int(cam[0].argmax()) == 5 and cam[0].flatten()[1] == 0 and cam[0].flatten()[6] == 0

    # attention concentrated on patch 1 whose gradient is negative: that patch gets 0, patch 5 still wins
    logits = torch.zeros(heads, 1 + n)
    logits[:, 2] = 4.0
    cam = grounding_cam(_StubALBEF(logits, gain), image, ids, mask, mode="itm", block_num=0)
    assert cam[0].flatten()[1] == 0 and int(cam[0].argmax()) == 5

    # equal positive gradients: the most attended patch wins
    logits = torch.zeros(heads, 1 + n)
    logits[0, 1 + 7], logits[1, 1 + 7] = 1.0, 0.5
    cam = grounding_cam(_StubALBEF(logits, torch.ones(1 + n)), image, ids, mask, mode="itm", block_num=0)
    assert int(cam[1].argmax()) == 7


# ------------------------------------------------------------------------------------------ scoring units
def test_iou_inclusive_by_hand():
    assert iou_inclusive([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    # x 0..9 / 5..14 and y 0..9 / 5..14: 5 x 5 = 25 shared pixels, union 175
    assert iou_inclusive([0, 0, 10, 10], [5, 5, 10, 10]) == 25 / 175
    # same box with twice the height: exactly 0.5 (pixel-inclusive), the original's threshold is >= 0.5
    assert iou_inclusive([2.25, 3.5, 20.5, 10.75], [2.25, 3.5, 20.5, 21.5]) == 0.5
    # the original's strict x1 < x2: boxes sharing one pixel column (x = 9) have intersection 0
    assert iou_inclusive([0, 0, 10, 10], [9, 0, 10, 10]) == 0.0
    assert iou_inclusive([0, 0, 10, 10], [20, 20, 5, 5]) == 0.0
    assert iou_inclusive([0, 0, 0, 0], [5, 5, 0, 0]) == 0.0  # zero union: the original would divide by 0


def test_proposal_scores_by_hand():
    cam = torch.arange(20, dtype=torch.float32).view(4, 5)  # rows y, columns x
    boxes = [[1, 1, 2, 2],  # rows 1-2, cols 1-2: 6 + 7 + 11 + 12 = 36, / sqrt(4)
             [0.5, 2.9, 3.7, 5.0, 0.99],  # rows int(2.9)=2 .. int(7.9)=7 (cut at 4), cols 0 .. int(4.2)=4
             [3, 0, 0, 2]]  # zero area: NaN
    s = proposal_scores(cam, boxes)
    assert s[0].item() == 18.0
    assert s[1].item() == pytest.approx((10 + 11 + 12 + 13 + 15 + 16 + 17 + 18) / 18.5 ** 0.5, rel=1e-6)
    assert math.isnan(s[2].item())
    assert proposal_scores(cam, [[1, 1, 2, 2]], alpha=1.0).item() == 9.0
    as_tensor = torch.tensor([b[:4] for b in boxes], dtype=torch.float64)
    torch.testing.assert_close(proposal_scores(cam, as_tensor), s, equal_nan=True, rtol=0, atol=0)
    assert proposal_scores(cam, []).shape == (0,)
    with pytest.raises(ValueError, match="negative"):
        proposal_scores(cam, [[0, 0, -1, 2]])


def test_pick_box():
    boxes = [[0, 0, 1, 1]] * 4
    assert pick_box(torch.tensor([0.1, 0.5, 0.5, 0.2]), boxes) == 1  # first of tied maxima
    assert pick_box(torch.tensor([float("nan"), 0.3, -1.0, 0.2]), boxes) == 1
    assert pick_box(torch.tensor([-0.1, 0.0, float("nan"), -2.0]), boxes) is None  # no score above 0
    assert pick_box(torch.zeros(0), []) is None  # no proposals
    with pytest.raises(ValueError):
        pick_box(torch.zeros(2), boxes)


def test_upsample_cam_is_the_original_bicubic():
    cam = torch.rand(3, 6, 6)
    up = upsample_cam(cam, (20, 30))
    assert up.shape == (3, 20, 30)
    for c, u in zip(cam, up):
        ref = F.interpolate(c.view(1, 1, 6, 6), size=(20, 30), mode="bicubic", align_corners=False).squeeze()
        assert torch.equal(upsample_cam(c, (20, 30)), ref) and torch.equal(u, ref)


def test_grounding_accuracy_without_positive_proposal():
    """A map that is 0 everywhere (no box scores above 0) and an image without proposals: no prediction, a miss,
    counted in ``no_positive`` (the original would reuse the previous sample's box)."""
    meta = {"images": [{"image_id": 1, "height": 12, "width": 12}, {"image_id": 2, "height": 8, "width": 8}],
            "refs": [{"ref_id": 10, "image_id": 1, "split": "val", "bbox": [2, 2, 4, 4]},
                     {"ref_id": 11, "image_id": 1, "split": "val", "bbox": [2, 2, 4, 4]},
                     {"ref_id": 12, "image_id": 2, "split": "testA", "bbox": [0, 0, 4, 4]},
                     {"ref_id": 13, "image_id": 1, "split": "train", "bbox": [2, 2, 4, 4]}]}
    dets = {"1": [[2, 2, 4, 4], [6, 6, 4, 4]]}  # image 2 has none
    peak = torch.zeros(3, 3)
    peak[0, 0] = 1.0
    results = [{"ref_id": 10, "cam": peak}, {"ref_id": 11, "cam": torch.zeros(3, 3)},
               {"ref_id": 12, "cam": peak}, {"ref_id": 13, "cam": peak}]
    metrics, preds = grounding_accuracy(results, Refer(meta), dets)
    assert [p["pred_box"] for p in preds] == [[2.0, 2.0, 4.0, 4.0], None, None, [2.0, 2.0, 4.0, 4.0]]
    assert [p["correct"] for p in preds] == [True, False, False, True]
    assert metrics["val_d"] == 0.5 and metrics["testA_d"] == 0.0 and math.isnan(metrics["testB_d"])
    assert (metrics["num_val"], metrics["num_testA"], metrics["num_testB"], metrics["no_positive"]) == (2, 1, 0, 2)
    json.dumps(preds)
