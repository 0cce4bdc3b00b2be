"""Numerical parity of the task models (VQA, SNLI-VE, NLVR2 text assignment, NLVR2) with the original ALBEF code.

``tests/assets/parity/tasks_tiny_*`` were produced by the ORIGINAL implementation (salesforce/ALBEF b9727e4:
``model_vqa``, ``model_ve``, ``model_pretrain_nlvr``, ``model_nlvr`` and the key surgery of ``VQA.py``, ``VE.py``,
``Pretrain_nlvr.py``, ``NLVR.py``) at a tiny size; see ``tests/assets/parity/README.md``. Here the same pre-training
state dict goes through OUR loader (``models.convert.load_checkpoint``) into our task models, and

* the key accounting is compared with what the original's ``load_state_dict(strict=False)`` reported,
* every loaded tensor is compared, key by key, with a fingerprint (sum, sum |x|, sum x^2) of the original's,
* every output (encoder states, decoder logits, losses with distillation, answer ranking, class logits) is
  compared with the original's, in fp32 (1e-5, scaled by magnitude above 1) and, for some, fp64.

``pytest -s tests/test_parity_tasks.py`` prints the measured max-abs differences.
"""
from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F

from models.albef import ALBEFConfig
from models.bert import BertConfig
from models.classifiers import ALBEFNLVR, ALBEFTextAssignment, ALBEFVE
from models.convert import load_checkpoint
from models.losses import answer_nll
from models.vit import VisionConfig
from models.vqa import ALBEFVQA
from tests.test_parity import ASSETS, ATOL, ATOL_FP64, _max_abs, _one_thread, load_asset

STATE = os.path.join(ASSETS, "tasks_tiny_pretrain_state.pt")
EXPECTED = os.path.join(ASSETS, "tasks_tiny_expected.pt")
KEYS = os.path.join(ASSETS, "tasks_tiny_keys.json")


def tiny_config(image_res: int) -> ALBEFConfig:
    return ALBEFConfig(
        image_res=image_res, vision_width=32, embed_dim=16, temp=0.07, queue_size=16, momentum=0.995,
        vit=VisionConfig(patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0),
        bert=BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=12, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=40, fusion_layer=6, encoder_width=32,
                        layer_norm_eps=1e-12, type_vocab_size=2, pad_token_id=0),
        pad_token_id=0, cls_token_id=2, mask_token_id=4,
    )


@torch.no_grad()
def _seed_head(head: torch.nn.Module) -> None:
    """The driver's head seeding: ``torch.manual_seed(1)``, each parameter <- 0.2 N(0, 1) in order."""
    torch.manual_seed(1)
    for p in head.parameters():
        p.copy_(0.2 * torch.randn(p.shape))


@pytest.fixture(scope="module")
def state():
    return load_asset(STATE)


@pytest.fixture(scope="module")
def expected():
    return load_asset(EXPECTED)


@pytest.fixture(scope="module")
def original_keys():
    with open(KEYS) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def loaded(state):
    """Our four models, loaded from the original's pre-training state dict the way a user would, plus reports."""
    models, reports = {}, {}
    models["vqa"] = ALBEFVQA(tiny_config(48))
    reports["vqa"] = load_checkpoint(models["vqa"], {"module." + k: v for k, v in state.items()}, verbose=False)
    models["ve"] = ALBEFVE(tiny_config(48))
    reports["ve"] = load_checkpoint(models["ve"], dict(state), verbose=False)
    _seed_head(models["ve"].cls_head)
    models["ve"].cls_head_m.load_state_dict(models["ve"].cls_head.state_dict())
    models["ta"] = ALBEFTextAssignment(tiny_config(32))
    reports["ta"] = load_checkpoint(models["ta"], dict(state), verbose=False)
    _seed_head(models["ta"].ta_head)
    models["nlvr"] = ALBEFNLVR(tiny_config(48))
    reports["nlvr"] = load_checkpoint(models["nlvr"], models["ta"].state_dict(), verbose=False)
    _seed_head(models["nlvr"].cls_head)
    models["nlvr"].copy_params()  # the driver's copy after head seeding (cls_head_m = the seeded head)
    for m in models.values():
        m.eval()
    return models, reports


def _inputs(expected, task):
    prefix = f"{task}.input."
    return {k[len(prefix):]: v for k, v in expected.items() if k.startswith(prefix)}


@pytest.fixture(scope="module")
def ours(loaded, expected):
    models, _ = loaded
    out = {}
    with _one_thread(), torch.no_grad():
        # ---- VQA
        m, x = models["vqa"], _inputs(expected, "vqa")
        q_ids, q_mask, a_ids, a_mask, k = x["question_ids"], x["question_mask"], x["answer_ids"], x["answer_mask"], x["k"]
        states = m.encode_question(x["image"], q_ids, q_mask)
        rep_states, rep_mask = states.repeat_interleave(k, 0), q_mask.repeat_interleave(k, 0)
        logits = m.answer_logits(a_ids, a_mask, rep_states, rep_mask)
        start = m.answer_logits(x["answer_list_ids"][:1, :1].expand(2, 1), None, states, q_mask)[:, 0]
        ids, probs = m.answer(x["image"], q_ids, q_mask, x["answer_list_ids"], x["answer_list_mask"],
                              k=int(x["rank_k"]))
        out["vqa"] = {
            "image_embeds": m.visual_encoder(x["image"]), "question_states": states,
            "answer_logits": logits[:, :-1], "start_logits": start,
            "loss_ce": (x["weights"] * answer_nll(logits, a_ids, 0)).sum() / 2,
            "rank_topk_ids": ids, "rank_topk_probs": probs,
        }
        # ---- SNLI-VE
        m, x = models["ve"], _inputs(expected, "ve")
        embeds = m.visual_encoder(x["image"])
        out["ve"] = {"image_embeds": embeds, "logits": m.classify(x["image"], x["text_ids"], x["text_mask"]),
                     "hidden": m.text_encoder(x["text_ids"], x["text_mask"], encoder_hidden_states=embeds)}
        # ---- text assignment (the fixed pairing of the driver instead of the random draw)
        m, x = models["ta"], _inputs(expected, "ta")
        embeds = m.visual_encoder(x["image"])
        pair = [embeds[x["image0_idx"]], embeds[x["image1_idx"]]]
        logits = m.assign_logits(pair, x["text_ids"], x["text_mask"])
        out["ta"] = {"image_embeds": embeds, "image_feat": F.normalize(m.vision_proj(embeds[:, 0]), dim=-1),
                     "pair_weights": m.pair_weights(embeds),
                     "hidden": m.text_encoder(x["text_ids"], x["text_mask"], encoder_hidden_states=pair),
                     "logits": logits, "loss": F.cross_entropy(logits, x["labels"])}
        # ---- NLVR2
        m, x = models["nlvr"], _inputs(expected, "nlvr")
        embeds = m.visual_encoder(x["image"])
        out["nlvr"] = {"image_embeds": embeds, "logits": m.classify(x["image"], x["text_ids"], x["text_mask"]),
                       "hidden": m.text_encoder(x["text_ids"], x["text_mask"],
                                                encoder_hidden_states=list(embeds.split(2)))}
    # training losses (with the EMA update and the teacher), each on a copy so the models stay as loaded
    with _one_thread():
        m, x = copy.deepcopy(models["vqa"]), _inputs(expected, "vqa")
        out["vqa"]["loss"] = m(x["image"], x["question_ids"], x["question_mask"], x["answer_ids"], x["answer_mask"],
                               x["k"], x["weights"], alpha=float(x["alpha"]))["loss_vqa"].detach()
        for task in ("ve", "nlvr"):
            m, x = copy.deepcopy(models[task]), _inputs(expected, task)
            out[task]["loss"] = m(x["image"], x["text_ids"], x["text_mask"], x["targets"],
                                  alpha=float(x["alpha"]))["loss_cls"].detach()
    return out


QUANTITIES = [
    ("vqa", "image_embeds"), ("vqa", "question_states"), ("vqa", "answer_logits"), ("vqa", "start_logits"),
    ("vqa", "loss_ce"), ("vqa", "loss"), ("vqa", "rank_topk_probs"),
    ("ve", "image_embeds"), ("ve", "hidden"), ("ve", "logits"), ("ve", "loss"),
    ("ta", "image_embeds"), ("ta", "image_feat"), ("ta", "pair_weights"), ("ta", "hidden"), ("ta", "logits"),
    ("ta", "loss"),
    ("nlvr", "image_embeds"), ("nlvr", "hidden"), ("nlvr", "logits"), ("nlvr", "loss"),
]


@pytest.mark.parametrize("task,name", QUANTITIES)
def test_task_outputs_match_original(task, name, ours, expected):
    ref = expected[f"{task}.{name}"]
    diff = _max_abs(ours[task][name].float(), ref)
    scale = ref.double().abs().max().item()
    tol = ATOL * max(1.0, scale)
    print(f"\n  parity fp32 {task}.{name:16s} {tuple(ref.shape)!s:14s} max-abs diff {diff:.3e}  (tol {tol:.1e})")
    assert diff < tol, f"{task}.{name}: max-abs diff {diff:.3e} vs the original ALBEF"


def test_vqa_answer_ranking_is_identical(ours, expected):
    assert torch.equal(ours["vqa"]["rank_topk_ids"], expected["vqa.rank_topk_ids"])


@pytest.mark.parametrize("task,name", [("vqa", "question_states"), ("vqa", "answer_logits"), ("nlvr", "hidden"),
                                       ("nlvr", "logits")])
def test_task_outputs_match_original_fp64(task, name, loaded, expected):
    models, _ = loaded
    m = copy.deepcopy(models[task]).double()
    x = _inputs(expected, task)
    with _one_thread(), torch.no_grad():
        if task == "vqa":
            states = m.encode_question(x["image"].double(), x["question_ids"], x["question_mask"])
            k = x["k"]
            got = states if name == "question_states" else m.answer_logits(
                x["answer_ids"], x["answer_mask"], states.repeat_interleave(k, 0),
                x["question_mask"].repeat_interleave(k, 0))[:, :-1]
        else:
            embeds = m.visual_encoder(x["image"].double())
            hidden = m.text_encoder(x["text_ids"], x["text_mask"], encoder_hidden_states=list(embeds.split(2)))
            got = hidden if name == "hidden" else m.cls_head(hidden[:, 0])
    ref = expected[f"{task}.fp64.{name}"]
    diff = _max_abs(got, ref)
    print(f"\n  parity fp64 {task}.{name:16s} max-abs diff {diff:.3e}")
    assert got.dtype == torch.float64 and diff < ATOL_FP64


@pytest.mark.parametrize("task", ["vqa", "ve", "ta", "nlvr"])
def test_loaded_weights_match_original_key_by_key(task, loaded, expected):
    """Same key set as the original model's state dict, and every tensor equal (by fingerprint)."""
    models, _ = loaded
    prefix = f"{task}.fingerprint."
    ref = {k[len(prefix):]: v for k, v in expected.items() if k.startswith(prefix)}
    sd = models[task].state_dict()
    assert set(sd) == set(ref)
    for k, v in sd.items():
        v = v.double()
        got = torch.stack([v.sum(), v.abs().sum(), (v * v).sum()])
        torch.testing.assert_close(got, ref[k], rtol=1e-9, atol=1e-9, msg=lambda m: f"{task}: {k}: {m}")


def test_key_accounting_matches_original(loaded, original_keys):
    _, reports = loaded
    # VQA / VE: what the original ignored (unexpected) is what we drop; what it left at init is what we report
    for task in ("vqa", "ve"):
        assert set(reports[task]["dropped"]) == set(original_keys[task]["unexpected"]), task
        assert set(reports[task]["missing"]) == set(original_keys[task]["missing"]), task
    assert not reports["vqa"]["momentum_from_online"] and not reports["ve"]["momentum_from_online"]
    # TA: the original renames before ignoring, so compare the modules; the missing head is the same
    assert set(reports["ta"]["missing"]) == set(original_keys["ta"]["missing"]) == {"ta_head.weight", "ta_head.bias"}
    tops = {k.split(".")[0] + (".cls" if ".cls." in k else "") for k in reports["ta"]["dropped"]}
    orig_tops = {k.split(".")[0] + (".cls" if ".cls." in k else "") for k in original_keys["ta"]["unexpected"]}
    assert tops == orig_tops
    # NLVR: the original's missing keys are the fresh head plus every momentum key, which it left at their
    # construction values (its copy_params ran before loading); we copy those from the loaded online weights
    nlvr_momentum = {k for k in loaded[0]["nlvr"].state_dict() if k.split(".")[0].endswith("_m")}
    assert reports["nlvr"]["momentum_from_online"]
    assert set(reports["nlvr"]["missing"]) | nlvr_momentum == set(original_keys["nlvr"]["missing"])
    assert set(reports["nlvr"]["dropped"]) == set(original_keys["nlvr"]["unexpected"])
