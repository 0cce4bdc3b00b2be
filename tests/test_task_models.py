"""The VQA, SNLI-VE, NLVR2 and text-assignment models: layouts, losses by hand, and loading every checkpoint layout
into them through ``models.convert.load_checkpoint`` with exact key accounting."""
import pytest
import torch
import torch.nn.functional as F

from models import MODEL_FOR_LAYOUT
from models.albef import ALBEF, ALBEFConfig, ALBEFRetrieval
from models.bert import BertConfig
from models.classifiers import ALBEFNLVR, ALBEFTextAssignment, ALBEFVE, distilled_cross_entropy
from models.convert import load_checkpoint
from models.layouts import detect_layout
from models.losses import answer_nll
from models.vit import VisionConfig
from models.vqa import ALBEFVQA

LAYERS, FUSION = 4, 2


def _cfg(image_res=16, layers=LAYERS, fusion=FUSION, vit_depth=1):
    return ALBEFConfig(image_res=image_res, vision_width=32, embed_dim=8, queue_size=8, momentum=0.9,
                       vit=VisionConfig(patch_size=8, embed_dim=32, depth=vit_depth, num_heads=2),
                       bert=BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                       intermediate_size=64, fusion_layer=fusion, encoder_width=32,
                                       max_position_embeddings=40, hidden_dropout_prob=0.0,
                                       attention_probs_dropout_prob=0.0),
                       pad_token_id=0, cls_token_id=2, mask_token_id=4)


def _text(bsz, length=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 50, (bsz, length), generator=g)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    for b in range(bsz):  # rows of decreasing length, padded with 0
        n = max(2, length - b)
        ids[b, n:], mask[b, n:] = 0, 0
    return ids, mask


@pytest.fixture(scope="module")
def pretrained():
    """A pre-training state dict whose momentum weights differ from the online ones."""
    torch.manual_seed(0)
    model = ALBEF(_cfg())
    with torch.no_grad():
        for p in model.momentum_parameters():
            p.add_(0.5)
    return {k: v.clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------------------------- layouts

def test_layouts_of_the_task_models():
    cfg = _cfg()
    vqa = ALBEFVQA(cfg).state_dict()
    dec_layers = {int(k.split(".")[4]) for k in vqa if k.startswith("text_decoder.bert.encoder.layer.")}
    assert dec_layers == set(range(LAYERS - FUSION))  # decoder = the fusion layers, all with cross-attention
    assert all(f"text_decoder.bert.encoder.layer.{i}.crossattention.self.key.weight" in vqa for i in dec_layers)
    assert "text_decoder.cls.predictions.decoder.weight" in vqa and "text_encoder.embeddings.position_ids" in vqa
    assert {k.split(".")[0] for k in vqa} == {"visual_encoder", "text_encoder", "text_decoder", "visual_encoder_m",
                                              "text_encoder_m", "text_decoder_m"}
    nlvr = ALBEFNLVR(cfg)
    layers = nlvr.text_encoder.encoder.layer
    assert len(layers) == FUSION + 2 * (LAYERS - FUSION)
    for i in range(FUSION, len(layers), 2):  # K/V shared within a pair, query separate
        a, b = layers[i].crossattention.self, layers[i + 1].crossattention.self
        assert a.key.weight is b.key.weight and a.value.bias is b.value.bias and a.query.weight is not b.query.weight
    m_layers = nlvr.text_encoder_m.encoder.layer  # the momentum copy keeps the tying
    assert m_layers[FUSION].crossattention.self.key.weight is m_layers[FUSION + 1].crossattention.self.key.weight
    assert nlvr.state_dict()["cls_head.2.weight"].shape == (2, 32)
    assert ALBEFVE(cfg).state_dict()["cls_head.2.weight"].shape == (3, 32)
    ta = ALBEFTextAssignment(cfg).state_dict()
    assert {k.split(".")[0] for k in ta} == {"visual_encoder", "text_encoder", "vision_proj", "text_proj", "temp",
                                             "ta_head"}
    for layout, cls in MODEL_FOR_LAYOUT.items():
        assert cls.layout == layout
        assert detect_layout(cls(cfg).state_dict()) == layout


def test_momentum_update_covers_shared_parameters_once():
    model = ALBEFNLVR(_cfg())
    with torch.no_grad():
        for p in model.momentum_parameters():
            p.zero_()
    model.momentum_update()
    shared = model.text_encoder.encoder.layer[FUSION].crossattention.self.key.weight
    shared_m = model.text_encoder_m.encoder.layer[FUSION].crossattention.self.key.weight
    torch.testing.assert_close(shared_m, 0.1 * shared)  # one EMA step with m = 0.9, not two


# ------------------------------------------------------------------------------------------ losses by hand

def test_answer_nll_by_hand():
    torch.manual_seed(0)
    ids = torch.tensor([[2, 7, 3, 0], [2, 8, 9, 3]])
    logits = torch.randn(2, 4, 50)
    logp = logits.log_softmax(-1)
    want = torch.stack([-(logp[0, 0, 7] + logp[0, 1, 3]), -(logp[1, 0, 8] + logp[1, 1, 9] + logp[1, 2, 3])])
    torch.testing.assert_close(answer_nll(logits, ids, 0), want)
    soft = torch.softmax(torch.randn(2, 3, 50), -1)
    h = -(soft * logp[:, :3]).sum(-1) * torch.tensor([[1, 1, 0], [1, 1, 1.0]])
    torch.testing.assert_close(answer_nll(logits, ids, 0, soft, 0.3), 0.7 * want + 0.3 * h.sum(1))


def test_distilled_cross_entropy_by_hand():
    torch.manual_seed(0)
    logits, teacher, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 2, 1, 1])
    want = 0.6 * F.cross_entropy(logits, y) - 0.4 * (teacher.softmax(-1) * logits.log_softmax(-1)).sum(-1).mean()
    torch.testing.assert_close(distilled_cross_entropy(logits, y, teacher, 0.4), want)
    torch.testing.assert_close(distilled_cross_entropy(logits, y, None, 0.4), F.cross_entropy(logits, y))


def test_vqa_loss_repeats_each_question_for_its_answers():
    torch.manual_seed(0)
    model = ALBEFVQA(_cfg(), distill=False).eval()
    image = torch.randn(2, 3, 16, 16)
    q_ids, q_mask = _text(2)
    a_ids = torch.tensor([[2, 7, 3, 0], [2, 8, 9, 3], [2, 10, 3, 0]])
    a_mask = (a_ids != 0).long()
    k, w = torch.tensor([2, 1]), torch.tensor([0.6, 0.4, 1.0])
    loss = model(image, q_ids, q_mask, a_ids, a_mask, k, w)["loss_vqa"]
    states = model.encode_question(image, q_ids, q_mask)
    by_hand = 0.0
    for a, q in enumerate([0, 0, 1]):  # answers 0, 1 belong to question 0, answer 2 to question 1
        logits = model.answer_logits(a_ids[a:a + 1], a_mask[a:a + 1], states[q:q + 1], q_mask[q:q + 1])
        by_hand = by_hand + w[a] * answer_nll(logits, a_ids[a:a + 1], 0)[0]
    torch.testing.assert_close(loss, by_hand / 2)
    loss.backward()
    assert model.text_decoder.bert.encoder.layer[0].crossattention.self.key.weight.grad is not None


def test_vqa_decoder_is_causal():
    torch.manual_seed(0)
    model = ALBEFVQA(_cfg(), distill=False).eval()
    states, q_mask = torch.randn(1, 5, 32), torch.ones(1, 5, dtype=torch.long)
    ids = torch.tensor([[2, 7, 8, 3]])
    full = model.answer_logits(ids, None, states, q_mask)
    changed = model.answer_logits(torch.tensor([[2, 7, 20, 21]]), None, states, q_mask)
    torch.testing.assert_close(full[:, :2], changed[:, :2])  # positions 0-1 don't see tokens 2-3
    assert not torch.allclose(full[:, 2:], changed[:, 2:])


def test_rank_answer_by_hand():
    torch.manual_seed(0)
    model = ALBEFVQA(_cfg(), distill=False).eval()
    image = torch.randn(2, 3, 16, 16)
    q_ids, q_mask = _text(2)
    answers = torch.tensor([[2, 7, 3, 0], [2, 8, 9, 3], [2, 7, 11, 3], [2, 12, 3, 0], [2, 13, 3, 0]])
    a_mask = (answers != 0).long()
    ids, probs = model.answer(image, q_ids, q_mask, answers, a_mask, k=3)
    ids_seq, probs_seq = model.answer(image, q_ids, q_mask, answers, a_mask, k=3, first_token_twice=False)
    states = model.encode_question(image, q_ids, q_mask)
    for q in range(2):
        first = model.answer_logits(answers[:1, :1], None, states[q:q + 1], q_mask[q:q + 1])[0, 0].softmax(-1)
        p1 = first[answers[:, 1]]
        top = p1.topk(3).indices
        nll = torch.stack([answer_nll(model.answer_logits(answers[a:a + 1], a_mask[a:a + 1], states[q:q + 1],
                                                          q_mask[q:q + 1]), answers[a:a + 1], 0)[0] for a in top])
        for twice, (got_ids, got_probs) in ((True, (ids, probs)), (False, (ids_seq, probs_seq))):
            score = -nll + (p1[top].log() if twice else 0)
            want_probs, order = score.softmax(-1).sort(descending=True)
            assert got_ids[q].tolist() == top[order].tolist()
            torch.testing.assert_close(got_probs[q], want_probs)


def test_classifier_losses_and_teacher():
    torch.manual_seed(0)
    for cls, n_img in ((ALBEFVE, 1), (ALBEFNLVR, 2)):
        model = cls(_cfg()).eval()
        image = torch.randn(3 * n_img, 3, 16, 16)
        ids, mask = _text(3)
        y = torch.tensor([0, 1, 1])
        logits = model.classify(image, ids, mask)
        assert logits.shape == (3, cls.num_classes)
        # the teacher equals the student at init, so the KD term is the student's entropy
        loss = model(image, ids, mask, y, alpha=0.4)["loss_cls"]
        torch.testing.assert_close(loss, distilled_cross_entropy(logits, y, logits, 0.4))
        loss.backward()
        assert all(p.grad is None for p in model.momentum_parameters())


def test_nlvr_reads_each_image_in_alternate_layers():
    torch.manual_seed(0)
    model = ALBEFNLVR(_cfg(), distill=False).eval()
    image = torch.randn(4, 3, 16, 16)
    ids, mask = _text(2)
    swapped = torch.cat([image[2:], image[:2]])
    assert not torch.allclose(model.classify(image, ids, mask), model.classify(swapped, ids, mask))


def test_text_assignment_sampling():
    torch.manual_seed(0)
    model = ALBEFTextAssignment(_cfg())
    weights = model.pair_weights(torch.randn(6, 5, 32))
    assert torch.all(weights.diagonal() == 0)
    assert torch.all(weights >= 0) and torch.all(weights.sum(1) < 1)  # a softmax row minus its diagonal
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    own = torch.arange(6)
    for _ in range(200):
        img0, img1, label = model.sample_assignments(weights, g)
        counts += torch.bincount(label, minlength=3)
        assert torch.all(img0 != img1)
        assert torch.all((img0 == own) == (label == 0)) and torch.all((img1 == own) == (label == 1))
    freq = counts / counts.sum()
    torch.testing.assert_close(freq, torch.tensor([1 / 3, 1 / 3, 1 / 3]), atol=0.03, rtol=0)
    # two images per batch: label 2 is impossible, no crash
    _, _, label = model.sample_assignments(model.pair_weights(torch.randn(2, 5, 32)), g)
    assert torch.all(label < 2)
    ids, mask = _text(4)
    out = model(torch.randn(4, 3, 16, 16), ids, mask, generator=g)
    out["loss_ta"].backward()
    assert model.ta_head.weight.grad is not None and model.vision_proj.weight.grad is None


# ------------------------------------------------------------------------------------------------- loading

def _top(keys):
    return sorted({k.split(".")[0] for k in keys})


@pytest.mark.parametrize("distill", [True, False])
def test_load_pretrain_into_vqa(pretrained, distill):
    model = ALBEFVQA(_cfg(image_res=24), distill=distill)  # 2x2 -> 3x3 patches
    report = load_checkpoint(model, dict(pretrained), verbose=False)
    assert (report["source"], report["target"], report["missing"]) == ("pretrain", "vqa", [])
    dropped = {"image_queue", "itm_head", "queue_ptr", "temp", "text_proj", "text_proj_m", "text_queue",
               "vision_proj", "vision_proj_m"}
    assert set(_top(report["dropped"])) == dropped | (set() if distill else {"text_encoder_m", "visual_encoder_m"})
    sd = model.state_dict()
    assert sd["visual_encoder.pos_embed"].shape == (1, 10, 32)
    for s in ("", "_m") if distill else ("",):
        torch.testing.assert_close(sd[f"text_decoder{s}.bert.encoder.layer.1.crossattention.self.query.weight"],
                                   pretrained[f"text_encoder{s}.bert.encoder.layer.{FUSION + 1}"
                                              ".crossattention.self.query.weight"])
    assert not report["momentum_from_online"]


@pytest.mark.parametrize("cls,extra_missing", [(ALBEFVE, ["cls_head", "cls_head_m"]),
                                               (ALBEFTextAssignment, ["ta_head"])])
def test_load_pretrain_into_classifiers(pretrained, cls, extra_missing):
    model = cls(_cfg(image_res=24))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_checkpoint(model, dict(pretrained), verbose=False)
    assert _top(report["missing"]) == extra_missing
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in report["missing"])  # fresh heads untouched
    if cls is ALBEFVE:  # momentum encoders from the momentum weights
        torch.testing.assert_close(model.state_dict()["text_encoder_m.encoder.layer.0.output.dense.weight"],
                                   pretrained["text_encoder_m.bert.encoder.layer.0.output.dense.weight"])
        torch.testing.assert_close(model.cls_head_m[2].weight, model.cls_head[2].weight)


def test_nlvr_from_text_assignment_copies_momentum_after_loading(pretrained):
    ta = ALBEFTextAssignment(_cfg())
    load_checkpoint(ta, dict(pretrained), verbose=False)
    nlvr = ALBEFNLVR(_cfg(image_res=24))
    report = load_checkpoint(nlvr, ta.state_dict(), verbose=False)
    assert report["momentum_from_online"] and _top(report["missing"]) == ["cls_head"]
    assert set(_top(report["dropped"])) == {"ta_head", "temp", "text_proj", "vision_proj"}
    for (name, p), p_m in zip(nlvr.text_encoder.named_parameters(), nlvr.text_encoder_m.parameters()):
        assert torch.equal(p, p_m), name  # the teacher is the loaded model (the original's NLVR.py: random init)
    torch.testing.assert_close(nlvr.text_encoder.encoder.layer[FUSION + 1].crossattention.self.key.weight,
                               pretrained[f"text_encoder.bert.encoder.layer.{FUSION}.crossattention.self.key.weight"])
    torch.testing.assert_close(nlvr.cls_head_m[0].weight, nlvr.cls_head[0].weight)


@pytest.mark.parametrize("cls", [ALBEFVQA, ALBEFVE, ALBEFNLVR, ALBEFTextAssignment])
def test_task_checkpoints_load_back_strictly(tmp_path, cls):
    torch.manual_seed(1)
    model = cls(_cfg())
    torch.save({"model": {"module." + k: v for k, v in model.state_dict().items()}}, tmp_path / "ft.pth")
    torch.manual_seed(2)
    again = cls(_cfg())
    report = load_checkpoint(again, str(tmp_path / "ft.pth"), verbose=False)
    assert report["missing"] == [] and report["dropped"] == [] and not report["momentum_from_online"]
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    if cls in (ALBEFVQA, ALBEFVE, ALBEFNLVR):  # a model without a teacher drops the checkpoint's
        lean = cls(_cfg(), distill=False)
        report = load_checkpoint(lean, str(tmp_path / "ft.pth"), verbose=False)
        assert report["dropped"] and all(k.split(".")[0].endswith("_m") for k in report["dropped"])


def test_wrong_layouts_are_refused(pretrained):
    retrieval = ALBEFRetrieval(_cfg()).state_dict()
    with pytest.raises(ValueError, match="cannot map a retrieval checkpoint to the vqa layout"):
        load_checkpoint(ALBEFVQA(_cfg()), retrieval, verbose=False)
    with pytest.raises(ValueError, match="text-assignment"):
        load_checkpoint(ALBEFNLVR(_cfg()), dict(pretrained), verbose=False)
    ve = ALBEFVE(_cfg()).state_dict()
    with pytest.raises(ValueError, match="cannot map a ve checkpoint"):
        load_checkpoint(ALBEFRetrieval(_cfg()), ve, verbose=False)
    with pytest.raises(ValueError, match="fusion_layer"):  # a model whose fusion layer differs from the checkpoint's
        load_checkpoint(ALBEFVQA(_cfg(fusion=1)), dict(pretrained), verbose=False)


def test_convert_tool_for_task_layouts(tmp_path, pretrained):
    from tools.convert_checkpoint import main as convert_main

    torch.save({"model": pretrained}, tmp_path / "pre.pth")
    convert_main([str(tmp_path / "pre.pth"), str(tmp_path / "vqa.pth"), "--to", "vqa", "--image_res", "24"])
    ALBEFVQA(_cfg(image_res=24)).load_state_dict(torch.load(tmp_path / "vqa.pth", weights_only=True)["model"],
                                                 strict=True)
    convert_main([str(tmp_path / "pre.pth"), str(tmp_path / "ve.pth"), "--to", "ve", "--no_momentum"])
    missing, unexpected = ALBEFVE(_cfg(), distill=False).load_state_dict(
        torch.load(tmp_path / "ve.pth", weights_only=True)["model"], strict=False)
    assert _top(missing) == ["cls_head"] and not unexpected
    convert_main([str(tmp_path / "pre.pth"), str(tmp_path / "ta.pth"), "--to", "nlvr_ta"])
    ta = torch.load(tmp_path / "ta.pth", weights_only=True)["model"]
    ta["ta_head.weight"], ta["ta_head.bias"] = torch.zeros(3, 32), torch.zeros(3)  # as after TA pre-training
    torch.save(ta, tmp_path / "ta_trained.pth")
    convert_main([str(tmp_path / "ta_trained.pth"), str(tmp_path / "nlvr.pth"), "--to", "nlvr", "--raw"])
    missing, unexpected = ALBEFNLVR(_cfg(), distill=False).load_state_dict(
        torch.load(tmp_path / "nlvr.pth", weights_only=True), strict=False)
    assert _top(missing) == ["cls_head"] and not unexpected
    with pytest.raises(SystemExit, match="text-assignment"):
        convert_main([str(tmp_path / "pre.pth"), str(tmp_path / "x.pth"), "--to", "nlvr"])


@pytest.mark.parametrize("to,make,head,distill", [("ve", ALBEFVE, "cls_head", True),
                                                  ("ve", ALBEFVE, "cls_head", False),
                                                  ("nlvr_ta", ALBEFTextAssignment, "ta_head", False),
                                                  ("nlvr", ALBEFNLVR, "cls_head", True)])
def test_converted_task_files_load_into_their_scripts_models(tmp_path, pretrained, to, make, head, distill):
    """tools.convert_checkpoint leaves out the heads a task trains from scratch, so its ve / nlvr_ta / nlvr files have
    no key that tells their layout (they look like retrieval ones): the scripts' loader takes a file that is exactly
    its model's keys but the head as the model's own layout (it used to refuse them as 'a retrieval checkpoint')."""
    from tools.convert_checkpoint import main as convert_main

    torch.save({"model": pretrained}, tmp_path / "pre.pth")
    source = tmp_path / "pre.pth"
    if to == "nlvr":  # from a trained text-assignment checkpoint, as the paper
        convert_main([str(source), str(tmp_path / "ta.pth"), "--to", "nlvr_ta"])
        ta = torch.load(tmp_path / "ta.pth", weights_only=True)["model"]
        ta["ta_head.weight"], ta["ta_head.bias"] = torch.zeros(3, 32), torch.zeros(3)
        torch.save({"model": ta}, tmp_path / "ta_trained.pth")
        source = tmp_path / "ta_trained.pth"
    convert_main([str(source), str(tmp_path / "out.pth"), "--to", to] + ([] if distill else ["--no_momentum"]))
    converted = torch.load(tmp_path / "out.pth", weights_only=True)["model"]
    assert detect_layout(converted) == "retrieval"  # nothing in the keys tells them apart
    torch.manual_seed(1)
    model = make(_cfg(), distill=distill) if make is not ALBEFTextAssignment else make(_cfg())
    init = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_checkpoint(model, str(tmp_path / "out.pth"), verbose=False)
    assert report["source"] == report["target"] == to
    state = model.state_dict()
    for k, v in state.items():
        if k.startswith(head):
            assert torch.equal(v, init[k]), k  # the head keeps its initial values
        elif k in converted:
            assert torch.equal(v, converted[k]), k
    if to == "nlvr":  # no momentum weights in a TA checkpoint: copied from the loaded online ones
        assert report["momentum_from_online"]
    # a file of another task's head is still refused
    if to == "ve":
        with pytest.raises(ValueError, match="cannot map a retrieval checkpoint to the nlvr layout"):
            load_checkpoint(ALBEFNLVR(_cfg(), distill=distill), str(tmp_path / "out.pth"), verbose=False)


def test_checkpoints_of_other_depths_name_the_keys_to_set(pretrained):
    from models.layouts import LayoutError

    with pytest.raises(LayoutError, match=r"ViT has 1 blocks \(set vit.depth: 1\)") as info:
        load_checkpoint(ALBEFRetrieval(_cfg(vit_depth=2)), dict(pretrained), verbose=False)
    assert "BERT layers" not in str(info.value)
    with pytest.raises(LayoutError, match=rf"text encoder has {LAYERS} BERT layers, the model {LAYERS + 2} \(set "
                                          r"num_hidden_layers and fusion_layer in bert_config"):
        load_checkpoint(ALBEFRetrieval(_cfg(layers=LAYERS + 2)), dict(pretrained), verbose=False)


def test_checkpoint_files_with_benign_python_objects_load(tmp_path, pretrained):
    """Forks of ALBEF save ``args`` (an argparse.Namespace) or numpy metrics beside the weights: loaded
    (weights_only with those classes allowed); any other object is refused naming it."""
    import argparse

    import numpy as np

    from models.layouts import CheckpointError
    from models.pretrained import load_state_dict_file

    torch.save({"model": pretrained, "args": argparse.Namespace(lr=1e-4, text_encoder="bert-base-uncased"),
                "best": np.float64(0.5), "epoch": np.int64(3)}, tmp_path / "fork.pth")
    sd = load_state_dict_file(str(tmp_path / "fork.pth"))
    assert set(sd) == set(pretrained)
    torch.save({"model": pretrained, "loss": F.cross_entropy}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"evil.pth: the checkpoint holds Python objects besides tensors "
                                              r"\(a torch.nn.functional.cross_entropy\)"):
        load_state_dict_file(str(tmp_path / "evil.pth"))
    (tmp_path / "ann.json").write_text("[]")
    with pytest.raises(CheckpointError, match="ann.json: not a readable PyTorch checkpoint"):
        load_state_dict_file(str(tmp_path / "ann.json"))


# ------------------------------------------------------------------------------------------------- Grad-CAM

def test_itm_gradcam_by_hand():
    from models.gradcam import itm_gradcam

    torch.manual_seed(0)
    model = ALBEFRetrieval(_cfg(image_res=32)).eval()  # 4 x 4 patches
    image = torch.randn(2, 3, 32, 32)
    ids, mask = _text(2)
    cam = itm_gradcam(model, image, ids, mask, block_num=FUSION + 1)
    assert cam.shape == (2, ids.shape[1], 4, 4) and (cam >= 0).all()
    assert (cam[mask == 0] == 0).all() and cam[mask == 1].sum() > 0
    assert all(p.grad is None for p in model.parameters())  # weights untouched
    assert not model.text_encoder.encoder.layer[FUSION + 1].crossattention.self.save_attention
    # by hand: the same layer with its attention written out, probabilities kept, gradient by autograd
    sa = model.text_encoder.encoder.layer[FUSION + 1].crossattention.self
    kept = {}

    def explicit(hidden_states, attn_mask=None, kv_states=None):
        q, k, v = (sa._split_heads(f(x)) for f, x in ((sa.query, hidden_states), (sa.key, kv_states),
                                                       (sa.value, kv_states)))
        kept["probs"] = (q @ k.transpose(-1, -2) / sa.head_dim ** 0.5).softmax(-1)
        out = kept["probs"] @ v
        return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)

    sa.forward = explicit
    try:
        img, txt = model.encode_image(image), model.encode_text(ids, mask)
        score = model.itm_logits(model.fuse(txt.embeds, mask, img.embeds))[:, 1].sum()
    finally:
        del sa.forward
    probs = kept["probs"]
    grad = torch.autograd.grad(score, probs)[0]
    by_hand = (probs[..., 1:] * grad[..., 1:].clamp(min=0)).mean(1) * mask[:, :, None]
    torch.testing.assert_close(cam.flatten(2), by_hand.detach())
    with pytest.raises(ValueError, match="text-only"):
        itm_gradcam(model, image, ids, mask, block_num=0)


def test_text_assignment_non_finite_features_never_raise():
    """A diverged step gives nan/inf image features: the pair draw must not raise (torch.multinomial rejects nan
    rows); finite features give exactly the old weights and draws."""
    torch.manual_seed(0)
    model = ALBEFTextAssignment(_cfg())
    bsz = 6
    own = torch.arange(bsz)

    def check(img0, img1, label):
        assert torch.all(img0 != img1) and torch.all((label >= 0) & (label <= 2))
        assert torch.all((img0 == own) == (label == 0)) and torch.all((img1 == own) == (label == 1))

    g = torch.Generator().manual_seed(0)
    for bad in (float("nan"), float("inf"), -float("inf")):
        embeds = torch.randn(bsz, 5, 32)
        embeds[2, 0, 3] = bad
        weights = model.pair_weights(embeds)
        assert torch.isfinite(weights).all() and torch.all(weights.diagonal() == 0) and torch.all(weights >= 0)
        for _ in range(50):
            check(*model.sample_assignments(weights, g))
        ids, mask = _text(bsz)
        image = torch.randn(bsz, 3, 16, 16)
        image[1] = bad
        model(image, ids, mask, generator=g)  # no exception (the loss itself may be nan)
    # weights handed in directly: nan, inf, negative rows, a row with one positive entry, all zeros
    nan, inf = float("nan"), float("inf")
    weights = torch.rand(bsz, bsz, generator=torch.Generator().manual_seed(1)).fill_diagonal_(0)
    weights[0, 3], weights[1, 4], weights[2, 0] = nan, inf, -0.5
    weights[3] = 0.0
    weights[4] = 0.0
    weights[4, 1] = 1.0  # only one other image possible: fine for one draw, too few for the draw of two
    for w in (weights, torch.zeros(bsz, bsz), torch.full((bsz, bsz), nan)):
        for _ in range(50):
            check(*model.sample_assignments(w, g))

    # finite features: the weights and the draws are bitwise those of the formula before the fallback
    embeds = torch.randn(bsz, 5, 32)
    with torch.no_grad():
        feat = F.normalize(model.vision_proj(embeds[:, 0, :]).float(), dim=-1)
        old_weights = F.softmax(feat @ feat.T / 0.07, dim=1).fill_diagonal_(0)
    weights = model.pair_weights(embeds)
    assert torch.equal(weights, old_weights)
    ga, gb = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for _ in range(10):
        new = model.sample_assignments(weights, ga)
        u = torch.rand(2, bsz, generator=gb)
        j = torch.multinomial(old_weights, 1, generator=gb).squeeze(1)
        two = torch.multinomial(old_weights, 2, generator=gb)
        label = torch.where(u[0] > 1 / 3, torch.where(u[1] > 0.5, 0, 1), 2)
        img0 = torch.where(label == 0, own, torch.where(label == 1, j, two[:, 0]))
        img1 = torch.where(label == 0, j, torch.where(label == 1, own, two[:, 1]))
        assert all(torch.equal(a, b) for a, b in zip(new, [img0, img1, label]))
