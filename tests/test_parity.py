"""Numerical parity with the original ALBEF code (salesforce/ALBEF b9727e4) at a tiny size.

The reference tensors in ``tests/assets/parity/`` were produced by running the ORIGINAL implementation (its
``models.model_pretrain.ALBEF``, ``models.xbert``, ``models.vit``, ``models.model_retrieval.ALBEF`` and
``Retrieval.evaluation`` / ``itm_eval``) on deterministic weights and fixed inputs; see
``tests/assets/parity/README.md``. Here the original's state dict is loaded into our models with
``strict=True`` (a layout test in itself) and every quantity is recomputed with our API.

``pytest -s tests/test_parity.py`` prints the measured max-abs differences.
"""
from __future__ import annotations

import contextlib
import copy
import os

import pytest
import torch
import torch.nn.functional as F

from models.albef import ALBEF, ALBEFConfig, ALBEFRetrieval
from models.bert import BertConfig
from models.losses import distill_targets, itc_loss, mlm_loss
from models.vit import VisionConfig

ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "parity")
STATE = os.path.join(ASSETS, "pretrain_tiny_state.pt")
EXPECTED = os.path.join(ASSETS, "pretrain_tiny_expected.pt")
# float32: 1e-5, scaled by the reference's magnitude where that exceeds 1 (the original's own float32 outputs differ
# from its float64 outputs by up to 1.4e-5 on the MLM logits, |logit| <= 4.6, so a flat 1e-5 would sit on the
# rounding-noise floor). float64: both implementations in double precision, where any real difference shows.
ATOL = 1e-5
ATOL_FP64 = 1e-10
FP64_QUANTITIES = ["image_embeds", "image_embeds_m", "text_embeds", "text_embeds_m", "fusion", "itm_logits",
                   "fusion_shuffled", "itm_logits_shuffled", "mlm_logits", "mlm_logits_m"]

# quantities recomputed by `ours` and compared with the original's
QUANTITIES = [
    "image_embeds", "image_feat", "image_embeds_m", "image_feat_m",
    "text_embeds", "text_feat", "text_embeds_m", "text_feat_m",
    "sim_i2t_m", "sim_t2i_m", "itc_targets_i2t", "itc_targets_t2i", "sim_i2t", "sim_t2i", "loss_ita",
    "fusion", "itm_logits", "fusion_shuffled", "itm_logits_shuffled", "itm_logits_all", "loss_itm",
    "mlm_logits", "mlm_logits_m", "loss_mlm", "loss_mlm_ce",
]


def tiny_config() -> ALBEFConfig:
    return ALBEFConfig(
        image_res=32, vision_width=64, embed_dim=16, temp=0.07, mlm_probability=0.15, queue_size=16, momentum=0.995,
        vit=VisionConfig(patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=4.0),
        bert=BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=4, num_attention_heads=2,
                        intermediate_size=128, max_position_embeddings=40, fusion_layer=2, encoder_width=64,
                        layer_norm_eps=1e-12, type_vocab_size=2, pad_token_id=0),
        pad_token_id=0, cls_token_id=2, mask_token_id=4,
    )


@contextlib.contextmanager
def _one_thread():
    """Tiny ops: one intra-op thread is much faster on small CPUs and keeps reductions in a fixed order."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return (a.double() - b.double()).abs().max().item()


def load_asset(path: str):
    """A parity file, loaded as any checkpoint here: on the CPU, tensors only."""
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def state():
    return load_asset(STATE)


@pytest.fixture(scope="module")
def expected():
    return load_asset(EXPECTED)


@pytest.fixture(scope="module")
def model(state):
    torch.manual_seed(0)
    m = ALBEF(tiny_config())
    m.load_state_dict(state, strict=True)
    return m.eval()


def inputs(expected) -> dict:
    return {k[len("input."):]: v for k, v in expected.items() if k.startswith("input.")}


@torch.no_grad()
def network_outputs(model, x, dtype=torch.float32) -> dict:
    """Token states, fusion outputs, ITM and MLM logits (no float32 casts on this path, so it also runs in fp64)."""
    image, ids, mask = x["image"].to(dtype), x["input_ids"], x["attention_mask"]
    img, img_m = model.encode_image(image), model.encode_image(image, momentum=True)
    txt, txt_m = model.encode_text(ids, mask), model.encode_text(ids, mask, momentum=True)
    fused = model.fuse(txt.embeds, mask, img.embeds)
    fused_shuf = model.fuse(txt.embeds, mask, img.embeds[x["perm"]])
    return dict(
        image_embeds=img.embeds, image_feat=img.feat, image_embeds_m=img_m.embeds, image_feat_m=img_m.feat,
        text_embeds=txt.embeds, text_feat=txt.feat, text_embeds_m=txt_m.embeds, text_feat_m=txt_m.feat,
        fusion=fused, itm_logits=model.itm_logits(fused), fusion_shuffled=fused_shuf,
        itm_logits_shuffled=model.itm_logits(fused_shuf),
        mlm_logits=model.text_encoder(x["masked_ids"], mask, encoder_hidden_states=img.embeds),
        mlm_logits_m=model.text_encoder_m(x["masked_ids"], mask, encoder_hidden_states=img_m.embeds),
    )


@torch.no_grad()
def compute_ours(model, x) -> dict:
    """Every compared quantity, recomputed with our public API (float32)."""
    out = network_outputs(model, x)
    image, mask, alpha = x["image"], x["attention_mask"], float(x["alpha"])

    # ITC against [momentum batch | queue], hard targets = diagonal, distilled at alpha
    temp = model.temp
    image_feat_all = torch.cat([out["image_feat_m"].T, model.image_queue.clone()], dim=1)
    text_feat_all = torch.cat([out["text_feat_m"].T, model.text_queue.clone()], dim=1)
    positives = torch.zeros(image.shape[0], image_feat_all.shape[1])
    positives.fill_diagonal_(1)
    sim_i2t_m = out["image_feat_m"] @ text_feat_all / temp
    sim_t2i_m = out["text_feat_m"] @ image_feat_all / temp
    targets_i2t = distill_targets(sim_i2t_m, positives, alpha)
    targets_t2i = distill_targets(sim_t2i_m, positives, alpha)
    loss_ita, sim_i2t, sim_t2i = itc_loss(out["image_feat"], out["text_feat"], image_feat_all, text_feat_all, temp,
                                          targets_i2t, targets_t2i)
    out.update(sim_i2t_m=sim_i2t_m, sim_t2i_m=sim_t2i_m, itc_targets_i2t=targets_i2t, itc_targets_t2i=targets_t2i,
               sim_i2t=sim_i2t, sim_t2i=sim_t2i, loss_ita=loss_ita)

    # ITM loss with fixed negatives (an image per text, a text per image), as the original's forward builds it
    t_emb, i_emb = out["text_embeds"], out["image_embeds"]
    neg_img, neg_txt = x["neg_image_idx"], x["neg_text_idx"]
    fused_neg = model.fuse(torch.cat([t_emb, t_emb[neg_txt]]), torch.cat([mask, mask[neg_txt]]),
                           torch.cat([i_emb[neg_img], i_emb]))
    logits_all = model.itm_logits(torch.cat([out["fusion"][:, :1], fused_neg[:, :1]]))
    labels = torch.tensor([1] * 3 + [0] * 6)
    out.update(itm_logits_all=logits_all, loss_itm=F.cross_entropy(logits_all, labels))

    # MLM loss on the masked ids; soft labels from the momentum model
    soft = F.softmax(out["mlm_logits_m"], dim=-1)
    out.update(loss_mlm=mlm_loss(out["mlm_logits"], x["mlm_labels"], soft, alpha),
               loss_mlm_ce=mlm_loss(out["mlm_logits"], x["mlm_labels"]))
    return out


@pytest.fixture(scope="module")
def ours(model, expected):
    with _one_thread():
        return compute_ours(model, inputs(expected))


def test_original_state_dict_layout(state, model):
    """The original's full state dict (online + momentum + queues) loads strictly; MLM decoder stays tied."""
    ours_sd = model.state_dict()
    assert set(ours_sd) == set(state)
    for k, v in state.items():
        assert ours_sd[k].shape == v.shape and ours_sd[k].dtype == v.dtype, k
        assert torch.equal(ours_sd[k], v), k
    for enc in (model.text_encoder, model.text_encoder_m):
        assert enc.cls.predictions.decoder.weight is enc.bert.embeddings.word_embeddings.weight
    # the stored momentum model differs from the online one in a few tensors (see README)
    assert not torch.equal(state["visual_encoder.norm.weight"], state["visual_encoder_m.norm.weight"])


@pytest.mark.parametrize("name", QUANTITIES)
def test_matches_original(name, ours, expected):
    diff = _max_abs(ours[name], expected[name])
    scale = expected[name].double().abs().max().item()
    tol = ATOL * max(1.0, scale)
    print(f"\n  parity fp32 {name:22s} {tuple(expected[name].shape)!s:14s} max-abs diff {diff:.3e}  "
          f"(|ref| max {scale:.3g}, tol {tol:.1e})")
    assert diff < tol, f"{name}: max-abs diff {diff:.3e} vs the original ALBEF"


@pytest.fixture(scope="module")
def ours_fp64(model, expected):
    with _one_thread():
        return network_outputs(copy.deepcopy(model).double(), inputs(expected), torch.float64)


@pytest.mark.parametrize("name", FP64_QUANTITIES)
def test_matches_original_fp64(name, ours_fp64, expected):
    ref = expected["fp64." + name]
    assert ref.dtype == torch.float64 and ours_fp64[name].dtype == torch.float64
    diff = _max_abs(ours_fp64[name], ref)
    print(f"\n  parity fp64 {name:22s} {tuple(ref.shape)!s:14s} max-abs diff {diff:.3e}")
    assert diff < ATOL_FP64, f"{name} (float64): max-abs diff {diff:.3e} vs the original ALBEF"


def test_momentum_differs_from_online(ours):
    """Guard: the reference momentum outputs really differ from the online ones, so a swap would be caught."""
    for a, b in (("image_feat", "image_feat_m"), ("text_feat", "text_feat_m"), ("mlm_logits", "mlm_logits_m")):
        assert _max_abs(ours[a], ours[b]) > 1e-2


# ------------------------------------------------------------------------------------------- retrieval
class _StubTokenizer:
    """Maps the texts 't0', 't1', 't2' to the fixed token rows, in the form a HF BERT tokenizer returns them
    (with the trailing [SEP] that ``models.tokenizer.tokenize`` strips)."""

    pad_token_id, cls_token_id, sep_token_id, mask_token_id = 0, 2, 3, 4

    def __init__(self, ids, mask):
        self.ids, self.mask = ids, mask

    def __call__(self, texts, padding="longest", truncation=True, max_length=None, **kw):
        rows = [int(t[1:]) for t in texts]
        n = self.ids.shape[1] + 1 if padding == "longest" else max_length
        ids = torch.zeros(len(rows), n, dtype=torch.long)
        mask = torch.zeros(len(rows), n, dtype=torch.long)
        for i, r in enumerate(rows):
            length = int(self.mask[r].sum())
            ids[i, :length] = self.ids[r, :length]
            ids[i, length] = self.sep_token_id
            mask[i, :length + 1] = 1
        return {"input_ids": ids, "attention_mask": mask}


class _ImageLoader(list):
    pass


def test_retrieval_protocol_matches_original(state, expected):
    """Pre-training state -> retrieval layout (the original drops 'bert.' and ignores the MLM heads), then the
    original evaluation protocol: ITC top-k, ITM positive logit on the k candidates, -100 elsewhere; recalls."""
    from engine.retrieval import itm_rerank_scores, recall_metrics
    from models.layouts import pretrain_to_retrieval

    rmodel = ALBEFRetrieval(tiny_config())
    sd, dropped = pretrain_to_retrieval(dict(state))
    missing, unexpected = rmodel.load_state_dict(sd, strict=False)
    # what the original's load_state_dict(strict=False) reported for the same mapping
    assert list(missing) == ["idx_queue"] and not unexpected
    assert set(dropped) == {k for k in state if k.startswith(("text_encoder.cls.", "text_encoder_m.cls."))}
    rmodel.eval()

    image = expected["input.image"]
    loader = _ImageLoader([{"image": image, "index": torch.arange(3)}])
    loader.dataset = [0, 1, 2]
    tok = _StubTokenizer(expected["input.input_ids"], expected["input.attention_mask"])
    k = int(expected["retrieval.k_test"])
    with _one_thread():
        scores = itm_rerank_scores(rmodel, loader, ["t0", "t1", "t2"], tok, torch.device("cpu"), k_test=k,
                                   max_length=expected["input.input_ids"].shape[1])
    for ours_key, ref_key in (("i2t", "retrieval.score_i2t"), ("t2i", "retrieval.score_t2i")):
        diff = _max_abs(scores[ours_key], expected[ref_key])
        print(f"\n  parity retrieval {ours_key} score matrix max-abs diff {diff:.3e}")
        assert diff < ATOL, f"retrieval {ours_key}: max-abs diff {diff:.3e}"
    metrics = recall_metrics(scores["i2t"].numpy(), scores["t2i"].numpy(), {0: 0, 1: 1, 2: 2},
                             {0: [0], 1: [1], 2: [2]})
    for key, value in metrics.items():
        assert abs(value - float(expected["retrieval.metric." + key])) < 1e-9, key
