"""Pictures: tools.explain (Grad-CAM panels, best proposal) and tools.search --save_grid, on tiny random models."""
import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from models.albef import ALBEF, ALBEFConfig, ALBEFRetrieval
from models.bert import BertConfig
from models.gradcam import itm_gradcam
from models.vit import VisionConfig
from tests.conftest import ROOT, write_tiny_config

RES, PATCH = 48, 8  # a 6 x 6 patch grid
BLOCK = 2  # the tiny BERT's first fusion layer (in the last one only [CLS] reaches the ITM head)
TEXT = "a red circle left of a blue square"
W, H = 96, 64  # not square, so that a transposed map would show


def _model_cfg() -> ALBEFConfig:
    return ALBEFConfig(image_res=RES, vision_width=128, embed_dim=32, queue_size=64,
                       vit=VisionConfig(patch_size=PATCH, embed_dim=128, depth=2, num_heads=4),
                       bert=BertConfig.from_json_file(f"{ROOT}/configs/config_bert_tiny.json"),
                       pad_token_id=0, cls_token_id=2, mask_token_id=4)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_world):
    """A tiny random pre-training checkpoint with its config.yaml beside it, a retrieval one, and a photo."""
    d = tmp_path_factory.mktemp("pictures")
    config = write_tiny_config(d / "config.yaml", tiny_world, image_res=RES,
                               vit={"patch_size": PATCH, "embed_dim": 128, "depth": 2, "num_heads": 4})
    torch.manual_seed(0)
    torch.save({"model": ALBEF(_model_cfg()).state_dict()}, d / "pre.pth")
    torch.save({"model": ALBEFRetrieval(_model_cfg()).state_dict()}, d / "ret.pth")
    image = Image.new("RGB", (W, H), (200, 190, 170))
    draw = ImageDraw.Draw(image)
    draw.ellipse((10, 20, 34, 44), fill=(220, 30, 30))
    draw.rectangle((62, 12, 88, 38), fill=(30, 40, 220))
    image.save(d / "photo.png")
    return d


def _explain(setup, tmp_path, *extra, ckpt="pre.pth"):
    from tools.explain import main

    out = tmp_path / "heat.png"
    expl = main(["--checkpoint", str(setup / ckpt), "--image", str(setup / "photo.png"), "--text", TEXT,
                 "--out", str(out), "--block_num", str(BLOCK), "--device", "cpu", *extra])
    return expl, out


def _crop(png, box) -> np.ndarray:
    left, top, w, h = box
    return np.asarray(Image.open(png).convert("RGB"), dtype=np.float64)[top:top + h, left:left + w] / 255


def test_explain_panels(setup, tiny_world, tmp_path):
    from models.tokenizer import load_tokenizer
    from tools.explain import panel_layout

    expl, out = _explain(setup, tmp_path)  # --config: config.yaml beside the checkpoint
    assert expl.tokens == load_tokenizer(str(tiny_world / "tokenizer")).tokenize(TEXT)  # [CLS] skipped
    assert len(expl.tokens) == expl.cam.shape[0] - 1
    n = len(expl.tokens) + 2
    assert n >= 6 and expl.masks.shape == (n - 1, H, W)
    size, boxes = panel_layout(n, (W, H))
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size == size
    assert size[0] > size[1]  # 4 columns of landscape panels, 2 rows
    photo = _crop(out, boxes[0])
    heat = _crop(out, boxes[1])
    assert heat.std(axis=(0, 1)).max() > 0.1 and np.abs(heat - photo).mean() > 0.05  # the heat is drawn
    assert expl.masks[0].max() == 1 and expl.masks[0].min() == 0
    for i in range(2, n):  # token panels show their own map: the photo itself where a token's map is all 0
        flat = bool(expl.cam[i - 1].max() == expl.cam[i - 1].min())
        assert (np.abs(_crop(out, boxes[i]) - photo).mean() > 0.01) != flat, (i, expl.tokens[i - 2])
    assert sum(bool(c.max() > c.min()) for c in expl.cam[1:]) >= 2


def test_explain_retrieval_checkpoint_and_errors(setup, tmp_path):
    from tools.explain import main, panel_layout

    expl, out = _explain(setup, tmp_path, "--config", str(setup / "config.yaml"), "--max_side", "48",
                         ckpt="ret.pth")
    assert expl.expression.shape == (RES // PATCH, RES // PATCH)
    assert expl.masks.shape[1:] == (32, 48)  # rendered at --max_side
    with Image.open(out) as im:
        assert im.size == panel_layout(len(expl.tokens) + 2, (W, H))[0]
    base = ["--out", str(tmp_path / "x.png"), "--block_num", str(BLOCK), "--device", "cpu"]
    with pytest.raises(SystemExit, match="image file not found: .*nope.jpg"):
        main(["--checkpoint", str(setup / "pre.pth"), "--image", str(tmp_path / "nope.jpg"), "--text", TEXT] + base)
    with pytest.raises(SystemExit, match="checkpoint file not found: .*nope.pth"):
        main(["--checkpoint", str(tmp_path / "nope.pth"), "--image", str(setup / "photo.png"), "--text", TEXT]
             + base)
    with pytest.raises(SystemExit, match="tokenises to nothing"):
        main(["--checkpoint", str(setup / "pre.pth"), "--image", str(setup / "photo.png"), "--text", " ?!. "]
             + base)
    with pytest.raises(SystemExit, match="not a fusion layer"):
        main(["--checkpoint", str(setup / "pre.pth"), "--image", str(setup / "photo.png"), "--text", TEXT,
              "--out", str(tmp_path / "x.png"), "--block_num", "1", "--device", "cpu"])
    (tmp_path / "bad.json").write_text(json.dumps([[0, 0, 10]]))
    with pytest.raises(SystemExit, match=r"bad.json: expected a non-empty JSON list of \[x, y, w, h\]"):
        main(["--checkpoint", str(setup / "pre.pth"), "--image", str(setup / "photo.png"), "--text", TEXT,
              "--proposals", str(tmp_path / "bad.json")] + base)
    lone = tmp_path / "lone"
    lone.mkdir()
    shutil.copy(setup / "pre.pth", lone / "pre.pth")
    with pytest.raises(SystemExit, match="config file not found: .*config.yaml"):
        main(["--checkpoint", str(lone / "pre.pth"), "--image", str(setup / "photo.png"), "--text", TEXT] + base)
    assert not (tmp_path / "x.png").exists()


def test_rendered_heat_peaks_where_the_gradcam_peaks(setup, tmp_path):
    """The whole-expression panel shows the upsampled Grad-CAM: its peak in image pixels is the peak of
    ``itm_gradcam`` averaged over the text and resized bicubically to the image, computed here independently."""
    from models import load_model
    from models.tokenizer import tokenize
    from tools.explain import explain, overlay, panel_layout, render

    model = load_model(str(setup / "pre.pth"), str(setup / "config.yaml"))
    image = Image.open(setup / "photo.png").convert("RGB")
    enc = tokenize(model.tokenizer, [TEXT], max_length=30)
    cam = itm_gradcam(model, model.transform(image)[None], enc["input_ids"], enc["attention_mask"], BLOCK)
    ref = F.interpolate(cam.mean(dim=1, keepdim=True), size=(H, W), mode="bicubic", align_corners=False)[0, 0]
    ry, rx = divmod(int(ref.argmax()), W)
    assert ref.max() > ref.mean() * 1.05  # a map with a peak, not a flat one

    sharp = explain(model, image, TEXT, block_num=BLOCK, blur=False)
    torch.testing.assert_close(sharp.expression, cam[0].mean(0))
    y, x = divmod(int(sharp.masks[0].argmax()), W)
    assert abs(y - ry) <= 1 and abs(x - rx) <= 1, ((y, x), (ry, rx))
    blurred = explain(model, image, TEXT, block_num=BLOCK)
    y, x = divmod(int(blurred.masks[0].argmax()), W)
    assert abs(y - ry) <= H // (RES // PATCH) and abs(x - rx) <= W // (RES // PATCH), ((y, x), (ry, rx))

    # the PNG's panel 1, one panel pixel per image pixel, is that blend
    out = tmp_path / "sharp.png"
    render(sharp, str(out), panel=max(W, H))
    _, boxes = panel_layout(len(sharp.tokens) + 2, (W, H), panel=max(W, H))
    shown = _crop(out, boxes[1])
    want = overlay(np.asarray(image, dtype=np.float64) / 255, sharp.masks[0].numpy().astype(np.float64))
    assert shown.shape == want.shape and np.abs(shown - want).mean() < 0.02
    flipped = overlay(np.asarray(image, dtype=np.float64) / 255, sharp.masks[0].flip(0, 1).numpy())
    assert np.abs(shown - flipped).mean() > 2 * np.abs(shown - want).mean()


def _reference_scores(cam_hw, boxes, alpha=0.5):
    """The grounding score: heat inside the box over ``area ** alpha``."""
    return torch.stack([cam_hw[int(y):int(y + h), int(x):int(x + w)].sum() / (w * h) ** alpha
                        for x, y, w, h in boxes])


def _boxes_file(tmp_path):
    boxes = [[4, 4, 30, 24], [50, 34, 30, 24], [60, 8, 30, 24], [20, 30, 30, 24], [40, 20, 0, 10]]
    (tmp_path / "boxes.json").write_text(json.dumps(boxes))
    return boxes


def test_explain_draws_the_best_proposal(setup, tmp_path, monkeypatch):
    """The box is drawn on panel 1 only, along its outline (scoring stubbed with the grounding rule)."""
    import tools.explain as te

    def upsample_cam(cam, size):
        return F.interpolate(cam[None, None], size=size, mode="bicubic", align_corners=False)[0, 0]

    monkeypatch.setattr(te, "_grounding", lambda: (upsample_cam, _reference_scores))
    boxes = _boxes_file(tmp_path)
    plain, plain_png = _explain(setup, tmp_path, "--panel", str(max(W, H)))
    shutil.move(plain_png, tmp_path / "plain.png")
    expl, out = _explain(setup, tmp_path, "--panel", str(max(W, H)), "--proposals", str(tmp_path / "boxes.json"))
    assert len(expl.scores) == len(boxes) and expl.scores[-1].isnan()  # the zero-area box
    assert expl.best == int(expl.scores[:-1].argmax())
    _, panels = te.panel_layout(len(expl.tokens) + 2, (W, H), panel=max(W, H))
    diff = np.abs(_crop(out, panels[1]) - _crop(tmp_path / "plain.png", panels[1])).max(axis=2) > 0.1
    assert diff.sum() > 50
    x, y, w, h = boxes[expl.best]
    yy, xx = np.nonzero(diff)
    near_edge = (np.minimum.reduce([np.abs(xx - x), np.abs(xx - (x + w)), np.abs(yy - y), np.abs(yy - (y + h))])
                 <= 3)
    assert near_edge.all()
    for i in (0, 2):  # other panels untouched
        assert np.abs(_crop(out, panels[i]) - _crop(tmp_path / "plain.png", panels[i])).max() < 0.02


def test_explain_proposals_use_engine_grounding(setup, tmp_path):
    try:
        from engine.grounding import proposal_scores, upsample_cam  # noqa: F401
    except ImportError:
        pytest.skip("engine.grounding (proposal_scores, upsample_cam) is not there yet")
    boxes = _boxes_file(tmp_path)
    expl, _ = _explain(setup, tmp_path, "--proposals", str(tmp_path / "boxes.json"))
    cam_hw = F.interpolate(expl.expression[None, None], size=(H, W), mode="bicubic", align_corners=False)[0, 0]
    ref = _reference_scores(cam_hw, boxes)
    assert expl.best == int(ref[:-1].argmax())
    torch.testing.assert_close(expl.scores.float(), ref, rtol=1e-4, atol=0, equal_nan=True)


def test_search_save_grid(setup, tiny_world, tmp_path):
    from tools.search import grid_layout, main

    base = ["--checkpoint", str(setup / "pre.pth"), "--config", str(setup / "config.yaml"), "--images",
            str(tiny_world / "images"), "--top", "3", "--k_test", "4", "--device", "cpu", "--thumb", "96"]
    rankings = main(base + ["--query", "a red circle", "two blue squares", "--save_grid", str(tmp_path / "g2.png")])
    assert len(rankings) == 2 and all(len(r) == 4 for r in rankings)
    one = main(base + ["--query", "a red circle", "--save_grid", str(tmp_path / "g1.png")])
    assert one == rankings[0]  # one query: its ranking, as before
    size2, boxes = grid_layout(2, 3, 96)
    with Image.open(tmp_path / "g2.png") as a, Image.open(tmp_path / "g1.png") as b:
        assert a.format == b.format == "PNG" and a.size == size2 and b.size == grid_layout(1, 3, 96)[0]
        assert a.size[0] == b.size[0] and a.size[1] == 2 * b.size[1]  # one row per query
    for row in boxes:
        for box in row:  # every thumbnail holds an image (the synthetic scenes are never plain white)
            assert _crop(tmp_path / "g2.png", box).std() > 0.02
