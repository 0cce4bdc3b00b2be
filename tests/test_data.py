"""Data: the original JSON formats, caption cleaning, transforms, bad images, samplers."""
import json

import pytest
import torch
from PIL import Image

from dataset import CaptionCollator
from dataset.sampling import create_train_loader
from dataset.caption_dataset import PretrainDataset, RetrievalEvalDataset
from dataset.text import pre_caption, pre_question
from dataset.transforms import AugmentConfig, eval_transform, train_transform


def test_pre_caption_matches_original_rules():
    assert pre_caption("A Man's  dog, (running)!  on the-beach/sand.") == "a mans dog running on the beach sand"
    assert pre_caption("<person> rides a horse") == "person rides a horse"
    assert pre_caption(" ".join(["word"] * 40), max_words=30) == " ".join(["word"] * 30)
    assert pre_question("What colour is the cat?") == "what colour is the cat"


def _images(tmp_path, n):
    (tmp_path / "img").mkdir()
    for i in range(n):
        Image.new("RGB", (40, 30), (10 * i, 0, 0)).save(tmp_path / "img" / f"{i}.jpg")


def test_pretrain_dataset_formats_and_paths(tmp_path):
    _images(tmp_path, 3)
    (tmp_path / "a.json").write_text(json.dumps([
        {"image": "img/0.jpg", "caption": "A red Circle."},
        {"image": str(tmp_path / "img" / "1.jpg"), "caption": ["one", "two"]}]))
    (tmp_path / "b.json").write_text(json.dumps([{"image": "img/2.jpg", "caption": "third"}]))
    ds = PretrainDataset([str(tmp_path / "a.json"), str(tmp_path / "b.json")], eval_transform(16))
    assert len(ds) == 3
    item = ds[0]
    assert item["image"].shape == (3, 16, 16) and item["caption"] == "a red circle"
    assert ds[1]["caption"] in ("one", "two")
    # image_root overrides the JSON folder for relative paths
    ds = PretrainDataset(str(tmp_path / "b.json"), eval_transform(16), image_root=str(tmp_path))
    assert ds[0]["caption"] == "third"


def test_bad_records_are_named(tmp_path):
    (tmp_path / "bad.json").write_text(json.dumps([{"image": "x.jpg"}]))
    with pytest.raises(ValueError, match=r"bad\.json: record 0 lacks key\(s\) \['caption'\]"):
        PretrainDataset(str(tmp_path / "bad.json"), eval_transform(16))
    (tmp_path / "notjson.json").write_text("{oops")
    with pytest.raises(ValueError, match="notjson.json: not valid JSON"):
        PretrainDataset(str(tmp_path / "notjson.json"), eval_transform(16))
    with pytest.raises(FileNotFoundError, match="missing.json"):
        PretrainDataset(str(tmp_path / "missing.json"), eval_transform(16))


def test_missing_image_is_skipped_or_raises(tmp_path, caplog):
    _images(tmp_path, 1)
    (tmp_path / "torn.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "a.json").write_text(json.dumps([
        {"image": "gone.jpg", "caption": "lost"}, {"image": "torn.jpg", "caption": "torn"},
        {"image": "img/0.jpg", "caption": "fine"}]))
    ds = PretrainDataset(str(tmp_path / "a.json"), eval_transform(16))
    assert ds[0]["caption"] == "fine" and ds[1]["caption"] == "fine"
    assert ds.load.num_bad == 2  # gone.jpg and torn.jpg, each read once (a file found bad is not read again)
    assert "gone.jpg" in caplog.text
    strict = PretrainDataset(str(tmp_path / "a.json"), eval_transform(16), on_bad_image="raise")
    with pytest.raises(OSError, match="gone.jpg"):
        strict[0]


def test_train_transform_is_torchvision_v2():
    tf = train_transform(32, AugmentConfig())
    names = [type(t).__name__ for t in tf.transforms]
    assert names[:3] == ["RandomResizedCrop", "RandomHorizontalFlip", "ALBEFRandAugment"]
    rrc, ra = tf.transforms[0], tf.transforms[2]
    assert tuple(rrc.scale) == (0.2, 1.0) and ra.num_ops == 2 and ra.magnitude == 7
    out = tf(Image.new("RGB", (50, 40), (200, 30, 30)))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    # CLIP normalisation: pure red (200,30,30) -> (200/255 - mean) / std in the red channel
    plain = eval_transform(8)(Image.new("RGB", (8, 8), (200, 30, 30)))
    assert plain[0, 0, 0].item() == pytest.approx((200 / 255 - 0.48145466) / 0.26862954, abs=1e-4)
    with pytest.raises(ValueError):
        AugmentConfig(crop_scale=[0.9, 0.1])


def test_retrieval_eval_dataset_index_maps(tmp_path):
    _images(tmp_path, 2)
    (tmp_path / "t.json").write_text(json.dumps([
        {"image": "img/0.jpg", "caption": ["a", "b", "c"]}, {"image": "img/1.jpg", "caption": ["d", "e"]}]))
    ds = RetrievalEvalDataset(str(tmp_path / "t.json"), eval_transform(16))
    assert ds.text == ["a", "b", "c", "d", "e"]
    assert ds.img2txt == {0: [0, 1, 2], 1: [3, 4]} and ds.txt2img[4] == 1
    assert ds[1]["index"] == 1


def test_loader_sampler_and_collate(tmp_path):
    _images(tmp_path, 5)
    (tmp_path / "a.json").write_text(json.dumps([{"image": f"img/{i}.jpg", "caption": "x"} for i in range(5)]))
    ds = PretrainDataset(str(tmp_path / "a.json"), eval_transform(16))

    class Tok:  # minimal stand-in with BERT's ids
        cls_token_id, sep_token_id, pad_token_id = 2, 3, 0

        def __call__(self, texts, **kw):
            n = len(texts)
            return {"input_ids": torch.tensor([[2, 7, 3]] * n), "attention_mask": torch.ones(n, 3, dtype=torch.long)}

    loader, sampler = create_train_loader(ds, batch_size=2, num_workers=0, seed=1, collate_fn=CaptionCollator(Tok(), 25))
    assert len(loader) == 2  # drop_last
    sampler.set_epoch(0)
    order0 = list(iter(sampler))
    sampler.set_epoch(1)
    assert list(iter(sampler)) != order0 or len(order0) < 3
    sampler.set_epoch(0)
    assert list(iter(sampler)) == order0  # epoch-seeded: a resumed run sees the same order
    batch = next(iter(loader))
    assert batch["image"].shape == (2, 3, 16, 16) and batch["input_ids"].tolist() == [[2, 7], [2, 7]]
    with pytest.raises(ValueError, match="fewer than one batch"):
        create_train_loader(ds, batch_size=64, num_workers=0, seed=1)


class _RandomSamples(torch.utils.data.Dataset):
    """Each sample is a draw from torch's and Python's global RNGs: what a random augmentation does."""

    def __len__(self):
        return 20

    def __getitem__(self, i):
        import random

        return {"i": i, "t": torch.rand(()).item(), "p": random.random()}


def _batches(loader):
    return [(b["i"].tolist(), b["t"].tolist(), b["p"].tolist()) for b in loader]


def test_resumable_order_and_per_sample_streams_do_not_depend_on_workers():
    ds = _RandomSamples()
    one, sampler = create_train_loader(ds, batch_size=4, num_workers=0, seed=3)
    sampler.set_epoch(2)
    state = torch.get_rng_state()
    full = _batches(one)
    assert torch.equal(state, torch.get_rng_state())  # loading never moves the model's RNG
    two, sampler2 = create_train_loader(ds, batch_size=4, num_workers=2, seed=3)
    sampler2.set_epoch(2)
    assert _batches(two) == full  # same samples, same random draws, whichever worker made them
    sampler.set_epoch(2)
    sampler.set_start(8)  # a resume after 2 batches: the rest of the epoch, loaded without the first 8
    assert _batches(one) == full[2:]
    assert len(sampler) == 20 and _batches(one) == full  # the offset is for one epoch only
    sampler.set_epoch(3)
    assert _batches(one) != full


def test_crash_with_persistent_workers_exits(tmp_path):
    """Workers ignore SIGTERM (the main process checkpoints first); an exception out of the loop must still end the
    process instead of hanging in multiprocessing's exit hook."""
    import os
    import subprocess
    import sys

    script = tmp_path / "crash.py"
    script.write_text(
        "import torch\n"
        "from dataset.sampling import create_train_loader\n"
        "class D(torch.utils.data.Dataset):\n"
        "    def __len__(self): return 32\n"
        "    def __getitem__(self, i): return torch.zeros(2)\n"
        "loader, sampler = create_train_loader(D(), 4, 2, 0)\n"
        "for i, batch in enumerate(loader):\n"
        "    if i == 2:\n"
        "        raise RuntimeError('boom')\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, str(script)], cwd=root, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=root))
    assert proc.returncode == 1 and "RuntimeError: boom" in proc.stderr
