"""Image decoding (dataset.images): modes to 8-bit RGB, bad files, the pixel limit, bad_images reporting, and the
tools.check_data command."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from dataset import CaptionCollator
from dataset.caption_dataset import ImageLoader as ReExported
from dataset.caption_dataset import PretrainDataset, RetrievalTrainDataset
from dataset.images import (BACKGROUND, DEFAULT_MAX_IMAGE_PIXELS, BadImageError, ImageLoader, check_image_options,
                            load_rgb)
from dataset.nlvr_dataset import NLVRDataset
from dataset.transforms import eval_transform
from dataset.vqa_dataset import VQACollator, VQADataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _rgb(path, **kw) -> np.ndarray:
    im = load_rgb(str(path), **kw)
    assert im.mode == "RGB"
    return np.asarray(im)


def _jpeg(path, size=(48, 40), seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, quality=95)
    return path


def _truncated(path):
    data = _jpeg(path).read_bytes()
    path.write_bytes(data[: int(len(data) * 0.6)])
    return path


# ------------------------------------------------------------------------------------------------ modes
def test_16bit_png_is_scaled_not_clipped(tmp_path):
    p = tmp_path / "g16.png"
    Image.fromarray(np.full((4, 5), 32768, np.uint16)).save(p)
    assert Image.open(p).mode == "I;16"
    out = _rgb(p)
    assert out.shape == (4, 5, 3) and (out == 128).all()  # PIL's convert('RGB') gives 255 here
    ramp = (np.arange(16, dtype=np.uint32) * 4369).astype(np.uint16).reshape(2, 8)  # 0 .. 65535
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    got = _rgb(tmp_path / "ramp.png")[..., 0].ravel()
    assert got[0] == 0 and got[-1] == 255 and (np.diff(got.astype(int)) > 0).all()
    assert (got == np.round(ramp.ravel() / 257)).all()


def test_16bit_big_endian_and_32bit_int_and_float(tmp_path):
    be = Image.frombytes("I;16B", (3, 1), np.array([0, 32768, 65535], ">u2").tobytes())
    be.save(tmp_path / "be.tif")
    assert Image.open(tmp_path / "be.tif").mode == "I;16B"
    assert _rgb(tmp_path / "be.tif")[0, :, 1].tolist() == [0, 128, 255]
    Image.fromarray(np.array([[0, 2 ** 30, 2 ** 31 - 1]], np.int32)).save(tmp_path / "i32.tif")
    assert Image.open(tmp_path / "i32.tif").mode == "I"
    assert _rgb(tmp_path / "i32.tif")[0, :, 2].tolist() == [0, 128, 255]
    # float: [0, 1] -> x 255; any other range -> min-max stretch
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)).save(tmp_path / "f01.tif")
    assert _rgb(tmp_path / "f01.tif")[0, :, 0].tolist() == [0, 128, 255]
    Image.fromarray(np.array([[-10.0, 0.0, 30.0]], np.float32)).save(tmp_path / "fr.tif")
    assert _rgb(tmp_path / "fr.tif")[0, :, 0].tolist() == [0, 64, 255]


def test_palette_grey_and_cmyk(tmp_path):
    pal = Image.new("P", (6, 4))
    pal.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    pal.putpixel((0, 0), 1)
    pal.save(tmp_path / "pal.png")
    out = _rgb(tmp_path / "pal.png")
    assert tuple(out[0, 0]) == (0, 0, 255) and tuple(out[1, 1]) == (255, 0, 0)
    Image.new("L", (5, 3), 77).save(tmp_path / "grey.png")
    assert (_rgb(tmp_path / "grey.png") == 77).all()
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95)
    assert Image.open(tmp_path / "cmyk.jpg").mode == "CMYK"
    r, g, b = _rgb(tmp_path / "cmyk.jpg")[4, 4].tolist()
    assert r > 240 and g < 15 and b < 15  # red


def test_transparency_is_composited_on_white(tmp_path):
    assert BACKGROUND == (255, 255, 255)
    pal = Image.new("P", (4, 2))
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.putpixel((0, 0), 1)
    pal.info["transparency"] = 0  # index 0 (black) is transparent
    pal.save(tmp_path / "trns.png", transparency=0)
    out = _rgb(tmp_path / "trns.png")
    assert tuple(out[0, 0]) == (10, 200, 30) and tuple(out[1, 3]) == (255, 255, 255)

    rgba = np.zeros((2, 3, 4), np.uint8)  # transparent black junk everywhere ...
    rgba[0, 0] = (200, 10, 10, 255)  # ... an opaque red pixel ...
    rgba[0, 1] = (0, 0, 0, 128)  # ... and half-transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    out = _rgb(tmp_path / "rgba.png")
    assert tuple(out[0, 0]) == (200, 10, 10) and tuple(out[1, 2]) == (255, 255, 255)
    assert all(abs(v - 127) <= 1 for v in out[0, 1])

    la = np.zeros((2, 2, 2), np.uint8)
    la[0, 0] = (40, 255)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    out = _rgb(tmp_path / "la.png")
    assert tuple(out[0, 0]) == (40, 40, 40) and tuple(out[1, 1]) == (255, 255, 255)


# ------------------------------------------------------------------------------------------------ bad files
@pytest.mark.parametrize("kind,reason", [("truncated", "truncated"), ("corrupt", "not_an_image"),
                                         ("missing", "missing")])
def test_bad_files_raise_or_skip(tmp_path, kind, reason):
    p = tmp_path / f"{kind}.jpg"
    if kind == "truncated":
        _truncated(p)
    elif kind == "corrupt":
        p.write_bytes(np.random.default_rng(1).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    with pytest.raises(BadImageError, match=f"{kind}.jpg") as info:
        ImageLoader("raise")(str(p))
    assert info.value.reason == reason and info.value.path == str(p)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # no global switch any more

    _jpeg(tmp_path / "good.jpg")
    (tmp_path / "a.json").write_text(json.dumps([{"image": p.name, "caption": "bad"},
                                                 {"image": "good.jpg", "caption": "good"}]))
    strict = PretrainDataset(str(tmp_path / "a.json"), eval_transform(16), on_bad_image="raise")
    with pytest.raises(OSError, match=f"{kind}.jpg"):
        strict[0]
    ds = PretrainDataset(str(tmp_path / "a.json"), eval_transform(16), on_bad_image="skip")
    s0, s1 = ds[0], ds[1]
    assert s0["caption"] == "good" and s0["bad_images"] == [str(p)]
    assert s1["caption"] == "good" and s1["bad_images"] == []


def test_pixel_limit(tmp_path, monkeypatch):
    p = tmp_path / "big.png"
    Image.new("RGB", (20, 20), (1, 2, 3)).save(p)
    assert DEFAULT_MAX_IMAGE_PIXELS == 89478485 == Image.MAX_IMAGE_PIXELS  # PIL's default, left untouched
    with pytest.raises(BadImageError, match="big.png") as info:
        load_rgb(str(p), max_image_pixels=100)
    assert info.value.reason == "too_large"
    assert ImageLoader("skip", max_image_pixels=100)(str(p)) is None
    assert load_rgb(str(p), max_image_pixels=400).size == (20, 20)
    assert load_rgb(str(p), max_image_pixels=None).size == (20, 20)
    # a limit looser than PIL's global is honoured for the call, and the global is restored
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)
    assert load_rgb(str(p), max_image_pixels=None).size == (20, 20)
    assert Image.MAX_IMAGE_PIXELS == 50
    with pytest.raises(BadImageError, match="too_large"):
        load_rgb(str(p), max_image_pixels=300)
    assert Image.MAX_IMAGE_PIXELS == 50


def test_options_are_validated_with_key_names():
    with pytest.raises(ValueError, match="on_bad_image"):
        check_image_options("ignore", None)
    for bad in (0, -5, True, 1.5):
        with pytest.raises(ValueError, match="max_image_pixels"):
            check_image_options("skip", bad)
    assert ReExported is ImageLoader
    from engine.classification import ClassifierConfig
    from Pretrain import PretrainConfig
    from Retrieval import RetrievalConfig
    from utils.config import ConfigError, from_dict
    from VQA import VQAConfig

    assert PretrainConfig(train_file=["x.json"]).on_bad_image == "skip"
    assert RetrievalConfig().on_bad_image == VQAConfig().on_bad_image == "raise"
    assert ClassifierConfig(train_file=["x.json"]).max_image_pixels == DEFAULT_MAX_IMAGE_PIXELS
    with pytest.raises(ConfigError, match="max_image_pixels"):
        from_dict(RetrievalConfig, {"max_image_pixels": 0})
    with pytest.raises(ConfigError, match="on_bad_image"):
        from_dict(VQAConfig, {"on_bad_image": "drop"})
    assert from_dict(PretrainConfig, {"train_file": "x.json", "max_image_pixels": None}).max_image_pixels is None


# ------------------------------------------------------------------------------------------------ data sets
def test_all_images_missing_names_image_root(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"image": f"img/{i}.jpg", "caption": "x"} for i in range(7)]))
    ds = PretrainDataset(str(tmp_path / "a.json"), eval_transform(16), image_root=str(tmp_path / "wrong"))
    with pytest.raises(RuntimeError, match="image_root") as info:
        ds[3]
    msg = str(info.value)
    assert "img/3.jpg" in msg and str(tmp_path / "wrong") in msg and "all 7 records" in msg


class _Tok:  # minimal stand-in with BERT's ids
    cls_token_id, sep_token_id, pad_token_id = 2, 3, 0

    def __call__(self, texts, **kw):
        n = len(texts)
        return {"input_ids": torch.tensor([[2, 7, 3]] * n), "attention_mask": torch.ones(n, 3, dtype=torch.long)}


def test_bad_records_are_replaced_by_records_drawn_at_random():
    """A block of consecutive bad records (a lost sub-folder): substitutes are drawn at random, so the samples in the
    block do not read the rest of it, no record stands in for the whole block, and the share of bad paths the
    samples report is the data set's bad share (what max_bad_image_fraction compares); each bad file is read once
    per process."""
    from dataset.images import load_first_readable, substitute_record

    n, block = 400, range(100, 200)  # 25 % bad, contiguous
    reads = []

    class Loader:
        last_error = None

        def __call__(self, p):
            reads.append(p)
            return None if int(p) in block else "image"

    loader = Loader()
    used, n_bad = [], 0
    for index in range(n):
        i, images, bad = load_first_readable(index, n, lambda j: (str(j),), loader, "test")
        assert images == ["image"] and i not in block and (i == index) == (index not in block)
        assert bad[:1] == ([str(index)] if index in block else [])
        used.append(i)
        n_bad += len(bad)
    assert 0.2 < n_bad / (n_bad + n) < 0.3  # the bad share, not inflated by walking through the block
    assert max(used.count(i) for i in set(used)) <= 4  # the record after the block is not used 100 times
    assert all(substitute_record(7, a, n) == substitute_record(7, a, n) for a in range(1, 5))
    # the real loader skips a file it found bad without reading it again
    real = ImageLoader("skip")
    assert real("/nonexistent/a.jpg") is None and real("/nonexistent/a.jpg") is None
    assert real.num_bad == 1 and real.last_error is not None and real.last_error.reason == "missing"


def test_collators_report_bad_images(tmp_path):
    _jpeg(tmp_path / "ok.jpg")
    (tmp_path / "a.json").write_text(json.dumps([
        {"image": "gone1.jpg", "caption": "a"}, {"image": "gone2.jpg", "caption": "b"},
        {"image": "ok.jpg", "caption": "c"}, {"image": "ok.jpg", "caption": "d"}]))
    ds = PretrainDataset(str(tmp_path / "a.json"), eval_transform(16))
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=CaptionCollator(_Tok(), 25))
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, 16, 16)
    gone = [str(tmp_path / "gone1.jpg"), str(tmp_path / "gone2.jpg")]
    s0, s1 = ds[0], ds[1]  # substitutes are a fixed function of (index, attempt): the same every time
    assert s0["bad_images"][0] == gone[0] and s1["bad_images"][0] == gone[1]
    assert set(s0["bad_images"] + s1["bad_images"]) == set(gone) and {s0["caption"], s1["caption"]} <= {"c", "d"}
    assert batch["bad_images"] == s0["bad_images"] + s1["bad_images"]
    from engine.trainer import move_to

    assert move_to(batch, torch.device("cpu"))["bad_images"] == batch["bad_images"]
    clean = CaptionCollator(_Tok(), 25)([ds[2], ds[3]])
    assert clean["bad_images"] == []

    # fine-tuning sets raise by default and substitute whole records when skipping
    (tmp_path / "r.json").write_text(json.dumps([{"image": "gone1.jpg", "caption": "a", "image_id": 5},
                                                 {"image": "ok.jpg", "caption": "b", "image_id": 6}]))
    with pytest.raises(BadImageError):
        RetrievalTrainDataset(str(tmp_path / "r.json"), eval_transform(16))[0]
    r = RetrievalTrainDataset(str(tmp_path / "r.json"), eval_transform(16)).set_image_options("skip")[0]
    assert (r["caption"], r["idx"], r["bad_images"]) == ("b", 1, [str(tmp_path / "gone1.jpg")])
    (tmp_path / "n.json").write_text(json.dumps([
        {"images": ["ok.jpg", "gone1.jpg"], "sentence": "first", "label": "True"},
        {"images": ["ok.jpg", "ok.jpg"], "sentence": "second", "label": "False"}]))
    n = NLVRDataset(str(tmp_path / "n.json"), eval_transform(16), on_bad_image="skip")[0]
    assert (n["caption"], n["label"], n["bad_images"]) == ("second", 0, [str(tmp_path / "gone1.jpg")])
    (tmp_path / "q.json").write_text(json.dumps([{"question": "q1?", "image": "gone1.jpg", "answer": ["x"]},
                                                 {"question": "q2?", "image": "ok.jpg", "answer": ["y"]}]))
    vqa = VQADataset(str(tmp_path / "q.json"), eval_transform(16), str(tmp_path), on_bad_image="skip")
    vb = VQACollator(_Tok(), 25)([vqa[0], vqa[1]])
    assert vb["bad_images"] == [str(tmp_path / "gone1.jpg")] and vb["k"].tolist() == [1, 1]
    with pytest.raises(ValueError, match="test split"):
        VQADataset(str(tmp_path / "q.json"), eval_transform(16), split="test", on_bad_image="skip")


# ------------------------------------------------------------------------------------------------ check_data
def _run_check(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "tools.check_data", "--no_progress", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_check_data_cli(tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    for i in range(3):
        _jpeg(img / f"{i}.jpg", seed=i)
    _truncated(img / "torn.jpg")
    records = [{"image": f"{i}.jpg", "caption": ["a cat", "a dog"] if i else "a cat"} for i in range(3)]
    (tmp_path / "clean.json").write_text(json.dumps(records))
    (tmp_path / "bad.json").write_text(json.dumps(records + [
        {"image": "torn.jpg", "caption": "torn"}, {"image": "gone.jpg", "caption": "lost"},
        {"image": "0.jpg", "caption": "  "}]))
    out = tmp_path / "bad_records.jsonl"
    res = _run_check("--ann", str(tmp_path / "bad.json"), "--image_root", str(img), "--workers", "2",
                     "--out", str(out))
    assert res.returncode == 1, res.stdout + res.stderr
    bad = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(b["index"], b["reason"]) for b in bad] == [(3, "truncated image"), (4, "missing image"),
                                                         (5, "empty caption")]
    assert bad[0]["image"] == str(img / "torn.jpg") and bad[0]["file"] == str(tmp_path / "bad.json")
    assert "bad records: 3" in res.stdout and "bad captions: 1" in res.stdout and "truncated: 1" in res.stdout

    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"train_file: ['{tmp_path / 'clean.json'}']\ntest_file: '{tmp_path / 'clean.json'}'\n"
                   f"image_root: '{img}'\n")
    res = _run_check("--config", str(cfg), "--workers", "1", "--out", str(out))
    assert res.returncode == 0, res.stdout + res.stderr
    assert out.read_text() == "" and "checked 6 records" in res.stdout

    # RefCOCO+ (grounding) records carry their expression as "text"
    (tmp_path / "refs.json").write_text(json.dumps([{"image": "1.jpg", "text": "the left cat", "ref_id": 3}]))
    res = _run_check("--ann", str(tmp_path / "refs.json"), "--image_root", str(img), "--workers", "1",
                     "--out", str(out))
    assert res.returncode == 0 and "checked 1 records" in res.stdout, res.stdout + res.stderr


def test_check_data_reads_labels_as_the_task_data_sets(tmp_path):
    """SNLI-VE and NLVR2 labels their data sets would refuse (the original mapped every NLVR2 label but 'True' to
    0, so 'true' trained as False) are bad records."""
    img = tmp_path / "img"
    img.mkdir()
    _jpeg(img / "1.jpg")
    (tmp_path / "ve.json").write_text(json.dumps([{"image": "1", "sentence": "a cat", "label": "entailment"},
                                                  {"image": "1", "sentence": "a cat", "label": "Entailment"}]))
    (tmp_path / "nlvr.json").write_text(json.dumps([{"images": ["1.jpg", "1.jpg"], "sentence": "two", "label": "True"},
                                                    {"images": ["1.jpg", "1.jpg"], "sentence": "two", "label": "true"}]))
    out = tmp_path / "bad.jsonl"
    res = _run_check("--ann", str(tmp_path / "ve.json"), "--ann", str(tmp_path / "nlvr.json"), "--image_root",
                     str(img), "--workers", "1", "--out", str(out))
    assert res.returncode == 1, res.stdout + res.stderr
    bad = [(b["file"], b["index"], b["reason"]) for b in map(json.loads, out.read_text().splitlines())]
    assert bad == [(str(tmp_path / "ve.json"), 1, "label 'Entailment'; expected one of ['contradiction', 'entailment', "
                                                 "'neutral']"),
                   (str(tmp_path / "nlvr.json"), 1, "label 'true'; expected 'True' or 'False'")]


def test_evaluation_sets_require_every_image(tmp_path):
    """Evaluation sets check at build time that every image exists, naming the record, the path and the roots."""
    from dataset.caption_dataset import RetrievalEvalDataset

    _jpeg(tmp_path / "ok.jpg")
    (tmp_path / "n.json").write_text(json.dumps([
        {"images": ["ok.jpg", "ok.jpg"], "sentence": "first", "label": "True"},
        {"images": ["ok.jpg", "gone1.jpg"], "sentence": "second", "label": "False"}]))
    n = NLVRDataset(str(tmp_path / "n.json"), eval_transform(16))
    with pytest.raises(FileNotFoundError, match=r"1 of the 2 images do not exist \(annotation files .*n.json.*; "
                                                r"image_root is not set.*record 1: .*gone1.jpg"):
        n.require_images()
    (tmp_path / "q.json").write_text(json.dumps([{"question": "q1?", "image": "ok.jpg", "answer": ["x"]}]))
    vqa = VQADataset(str(tmp_path / "q.json"), eval_transform(16), str(tmp_path))
    assert vqa.require_images() is vqa
    (tmp_path / "r.json").write_text(json.dumps([{"image": "ok.jpg", "caption": ["a"]}]
                                                + [{"image": f"gone{i}.jpg", "caption": ["b"]} for i in range(7)]))
    with pytest.raises(FileNotFoundError, match=r"7 of the 8 images .*record 1: .*gone0.jpg.*\(and 2 more\)"):
        RetrievalEvalDataset(str(tmp_path / "r.json"), eval_transform(16))
