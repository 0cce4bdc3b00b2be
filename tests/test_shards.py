"""Sharded data: tools.make_shards (round trip, pre-resize, bad images) and dataset.shards (rank / worker split,
epoch length, determinism, set_epoch through persistent workers, resume by skipping, bad samples)."""
import hashlib
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import v2 as T

import webdataset as wds
from dataset.images import load_rgb
from dataset.shards import ShardDataset, ShardSampler, create_shard_loader, expand_urls
from dataset.text import pre_caption
from dataset.transforms import AugmentConfig, train_transform
from tools import make_shards as ms

PIXELS = T.PILToTensor()  # identity-like transform: lets a test recognise every image by its exact pixels


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha1(t.numpy().tobytes() + str(tuple(t.shape)).encode()).hexdigest()


def _records(world):
    with open(world / "pretrain.json") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def shards(tiny_world, tmp_path_factory):
    """The tiny world's 64 pre-training records in 4 shards of 16, original bytes."""
    out = tmp_path_factory.mktemp("shards")
    s = ms.make_shards([str(tiny_world / "pretrain.json")], str(out / "pt-%06d.tar"), samples_per_shard=16)
    assert s["samples"] == 64 and len(s["shards"]) == 4 and not s["bad"]
    assert s["pattern"] == str(out / "pt-{000000..000003}.tar")
    return s["pattern"]


@pytest.fixture(scope="module")
def by_digest(tiny_world):
    """Image pixels -> record index, for the 64 training images."""
    out = {}
    for i, rec in enumerate(_records(tiny_world)):
        out[_digest(PIXELS(load_rgb(str(tiny_world / rec["image"]))))] = i
    assert len(out) == 64
    return out


def _raw_samples(pattern):
    return list(wds.DataPipeline(wds.SimpleShardList(expand_urls(pattern)), wds.tarfile_to_samples()))


# ------------------------------------------------------------------------------------------------ make_shards
def test_round_trip_keeps_bytes_captions_and_keys(tiny_world, shards, by_digest):
    records = _records(tiny_world)
    raw = _raw_samples(shards)
    assert [r["__key__"] for r in raw] == [f"{i:09d}" for i in range(64)]
    for i, r in enumerate(raw):
        meta = json.loads(r["json"])
        assert meta["caption"] == records[i]["caption"] and meta["image"] == records[i]["image"]
        assert meta["image_path"] == os.path.join(str(tiny_world), records[i]["image"])
        assert r["jpg"] == (tiny_world / records[i]["image"]).read_bytes()  # a JPEG without max_side: its bytes
    # through the data set, one pass (shard order shuffled): every sample once, captions cleaned and drawn from
    # the record's list
    ds = ShardDataset(shards, PIXELS, 30, 64, shuffle_buffer=0, resampled=False)
    seen = list(ds)
    assert len(seen) == 64 == len(ds)
    indices = [by_digest[_digest(s["image"])] for s in seen]
    assert sorted(indices) == list(range(64))
    for i, s in zip(indices, seen):
        assert s["caption"] in {pre_caption(c, 30) for c in records[i]["caption"]}
        assert s["bad_images"] == []


def test_pre_resize_respects_max_side_and_aspect(tiny_world, tmp_path):
    records = _records(tiny_world)[:6]
    rgba = np.zeros((24, 40, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :20, 3] = 255  # left half opaque red, right half transparent -> white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "wide.png")
    records.append({"image": str(tmp_path / "wide.png"), "caption": "a wide picture", "image_id": 7})
    for r in records[:6]:
        r["image"] = str(tiny_world / r["image"])
    (tmp_path / "ann.json").write_text(json.dumps(records))
    s = ms.make_shards([str(tmp_path / "ann.json")], str(tmp_path / "sh" / "r-%03d.tar"), max_side=20, quality=95,
                       samples_per_shard=100, workers=2)
    assert s["samples"] == 7 and s["pattern"] == str(tmp_path / "sh" / "r-000.tar")
    raw = _raw_samples(s["pattern"])
    sizes = [Image.open(io.BytesIO(r["jpg"])).size for r in raw]
    assert sizes[:6] == [(20, 20)] * 6 and sizes[6] == (20, 12)
    assert all(Image.open(io.BytesIO(r["jpg"])).format == "JPEG" for r in raw)
    wide = np.asarray(Image.open(io.BytesIO(raw[6]["jpg"])).convert("RGB")).astype(int)
    assert abs(wide[6, 2] - [200, 0, 0]).max() < 12 and (wide[6, -2] > 240).all()  # alpha composited on white
    assert json.loads(raw[6]["json"])["image_id"] == 7  # other keys are kept
    # already small enough: the JPEG's own bytes
    s2 = ms.make_shards([str(tmp_path / "ann.json")], str(tmp_path / "sh2" / "r-%03d.tar"), max_side=64)
    assert _raw_samples(s2["pattern"])[0]["jpg"] == open(records[0]["image"], "rb").read()


def test_bad_images_are_skipped_and_listed(tiny_world, tmp_path, capsys):
    records = [dict(r, image=str(tiny_world / r["image"])) for r in _records(tiny_world)[:5]]
    data = open(records[1]["image"], "rb").read()
    (tmp_path / "torn.jpg").write_bytes(data[: len(data) // 2])
    records[1]["image"] = str(tmp_path / "torn.jpg")
    records[3]["image"] = str(tmp_path / "missing.jpg")
    (tmp_path / "ann.json").write_text(json.dumps(records))
    out = tmp_path / "sh" / "x-%04d.tar"
    rc = ms.main(["--ann", str(tmp_path / "ann.json"), "--out", str(out), "--samples_per_shard", "2", "--workers",
                  "0", "--no_progress"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "samples: 3 written, 2 bad image(s) skipped (missing: 1, truncated: 1)" in text
    assert "shards: 2" in text and "bytes: " in text and "seconds: " in text
    bad = [json.loads(line) for line in open(tmp_path / "sh" / "bad_records.jsonl")]
    assert [(b["index"], b["reason"]) for b in bad] == [(1, "truncated"), (3, "missing")]
    keys = [r["__key__"] for r in _raw_samples(str(tmp_path / "sh" / "x-{0000..0001}.tar"))]
    assert keys == ["000000000", "000000002", "000000004"]  # stable keys: the bad ones leave gaps
    assert ms.main(["--ann", str(tmp_path / "ann.json"), "--out", str(out), "--no_progress"]) == 2  # exists


def test_brace_pattern():
    assert ms.brace_pattern("a/pt-%06d.tar", 13) == "a/pt-{000000..000012}.tar"
    assert ms.brace_pattern("a/pt-%d.tar", 1) == "a/pt-0.tar"
    assert expand_urls("a/pt-{000000..000002}.tar") == [f"a/pt-00000{i}.tar" for i in range(3)]


# ------------------------------------------------------------------------------------------------ the stream
def _first(samples):
    return samples[0]


def _indices(batches, by_digest):
    return [by_digest[_digest(img)] for b in batches for img in b["image"]]


def test_one_pass_split_over_ranks_and_workers_is_disjoint(shards, by_digest):
    seen = []
    for rank in range(2):
        ds = ShardDataset(shards, PIXELS, 30, 64, shuffle_buffer=8, seed=1, resampled=False, rank=rank,
                          world_size=2)
        loader = DataLoader(ds, batch_size=1, num_workers=2, collate_fn=_first)
        seen.append([by_digest[_digest(s["image"])] for s in loader])
    assert len(seen[0]) == len(seen[1]) == 32
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(64))


def test_resampled_epoch_length_per_rank_and_worker(shards, by_digest, monkeypatch):
    streams = []
    for rank in range(2):
        monkeypatch.setattr("utils.distributed.get_rank", lambda: rank)
        monkeypatch.setattr("utils.distributed.get_world_size", lambda: 2)
        loader, sampler = create_shard_loader(shards, PIXELS, 30, batch_size=4, num_workers=2, seed=0,
                                              epoch_samples=50, collate_fn=_stack, shuffle_buffer=16,
                                              persistent_workers=False)
        sampler.set_epoch(0)
        assert isinstance(sampler, ShardSampler) and sampler.dataset.rank == rank
        assert len(loader) == 50 // (4 * 2) == 6 and len(sampler) == 24
        batches = list(loader)
        assert len(batches) == 6 and all(len(b["image"]) == 4 for b in batches)
        streams.append(_indices(batches, by_digest))
    assert streams[0] != streams[1]  # ranks read different streams
    with pytest.raises(ValueError, match="no whole batch"):
        create_shard_loader(shards, PIXELS, 30, 4, 0, 0, 7, _stack)
    with pytest.raises(FileNotFoundError, match="do not exist"):
        ShardDataset(shards.replace("pt-", "nope-"), PIXELS, 30, 64)


def _stack(samples):
    return {"image": torch.stack([s["image"] for s in samples]), "caption": [s["caption"] for s in samples],
            "bad_images": [p for s in samples for p in s["bad_images"]]}


def _epoch(loader, sampler, epoch, start=0):
    sampler.set_epoch(epoch)
    if start:
        sampler.set_start(start)
    return [(b["image"], b["caption"]) for b in loader]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and x[1] == y[1] for x, y in zip(a, b))


def test_determinism_epochs_and_resume(shards):
    tf = train_transform(32, AugmentConfig(crop_scale=[0.5, 1.0]))  # random crops, flips, RandAugment
    loader, sampler = create_shard_loader(shards, tf, 30, 4, 2, 3, 40, _stack, 16)  # persistent workers
    e0, e1, e0_again = _epoch(loader, sampler, 0), _epoch(loader, sampler, 1), _epoch(loader, sampler, 0)
    assert len(e0) == 10 and _same(e0, e0_again) and not _same(e0, e1)  # set_epoch reaches persistent workers
    other, osampler = create_shard_loader(shards, tf, 30, 4, 2, 3, 40, _stack, 16, persistent_workers=False)
    assert _same(_epoch(other, osampler, 1), e1)  # a new loader, same seed and epoch: the same batches
    seed4, s4 = create_shard_loader(shards, tf, 30, 4, 2, 4, 40, _stack, 16, persistent_workers=False)
    assert not _same(_epoch(seed4, s4, 0), e0)
    # resume inside the epoch: exactly the remaining batches, augmentations included
    for start in (1, 4, 7, 9):
        assert _same(_epoch(loader, sampler, 1, start=4 * start), e1[start:])
        assert len(loader) == 10 - start
    sampler.set_epoch(2)
    assert len(loader) == 10  # set_epoch clears the offset
    with pytest.raises(ValueError, match="whole number of batches"):
        sampler.set_start(6)
    # in the main process: deterministic too, and the global RNG is left as it was
    main, msampler = create_shard_loader(shards, tf, 30, 4, 0, 3, 40, _stack, 16)
    state = torch.get_rng_state()
    first = _epoch(main, msampler, 0)
    assert torch.equal(torch.get_rng_state(), state)
    assert _same(first, _epoch(main, msampler, 0)) and len(first) == 10
    assert _same(_epoch(main, msampler, 0, start=8), first[2:])


def test_bad_sample_in_a_shard_is_skipped_and_reported(tiny_world, tmp_path):
    records = _records(tiny_world)
    with wds.TarWriter(str(tmp_path / "b-0.tar")) as w:
        for i in range(6):
            data = (tiny_world / records[i]["image"]).read_bytes()
            if i == 2:
                data = data[: len(data) // 2]
            w.write({"__key__": f"{i:03d}", "jpg": data,
                     "json": json.dumps({"caption": records[i]["caption"], "image": records[i]["image"]})})
    with wds.TarWriter(str(tmp_path / "t-0.tar")) as w:  # img2dataset style: caption in txt
        w.write({"__key__": "0", "jpg": (tiny_world / records[0]["image"]).read_bytes(), "txt": "A Dog, Running!"})
    got = list(ShardDataset(str(tmp_path / "b-0.tar"), PIXELS, 30, 5, shuffle_buffer=0, resampled=False))
    assert len(got) == 5
    assert [len(s["bad_images"]) for s in got] == [0, 0, 1, 0, 0]
    assert "b-0.tar:002 (images/train_00002.jpg): truncated" in got[2]["bad_images"][0]
    txt = list(ShardDataset(str(tmp_path / "t-0.tar"), PIXELS, 30, 1, resampled=False))
    assert txt[0]["caption"] == "a dog running"


def test_a_torn_shard_is_passed_over_with_its_complete_samples(tiny_world, tmp_path, caplog):
    """A shard truncated in the middle of a sample (a failed copy): the samples before the damage are kept but the
    one being assembled when it broke (it may lack a member; here sample 2, whose end the reader had not seen), the
    torn one is dropped (not merged into the next shard's first sample), the next shard is read, and the shard is
    named in a warning and in the next sample's bad_images; the same epoch twice gives the same samples. Only broken
    shards (lost or overwritten files): the stream stops naming them instead of looping."""
    records = _records(tiny_world)
    for name, first in (("s-0.tar", 0), ("s-1.tar", 6)):
        with wds.TarWriter(str(tmp_path / name)) as w:
            for i in range(first, first + 6):
                w.write({"__key__": f"{i:03d}", "jpg": (tiny_world / records[i]["image"]).read_bytes(),
                         "json": json.dumps({"caption": records[i]["caption"], "image": records[i]["image"]})})
    torn = tmp_path / "s-0.tar"
    data = torn.read_bytes()
    cut = data.index(b"003.jpg") + 1024  # inside the 4th sample's image
    torn.write_bytes(data[:cut])
    pattern = str(tmp_path / "s-{0..1}.tar")

    def epoch():
        ds = ShardDataset(pattern, PIXELS, 30, 8, shuffle_buffer=0, resampled=False)
        return list(ds)

    got = epoch()
    expected = [_digest(PIXELS(load_rgb(str(tiny_world / records[i]["image"])))) for i in (0, 1, 6, 7, 8, 9, 10, 11)]
    assert [_digest(s["image"]) for s in got] == expected
    assert [len(s["bad_images"]) for s in got] == [0, 0, 1, 0, 0, 0, 0, 0]
    assert got[2]["bad_images"][0].startswith(f"{torn}: shard passed over (ReadError")
    assert f"{torn}: shard passed over" in caplog.text
    assert [_digest(s["image"]) for s in epoch()] == [_digest(s["image"]) for s in got]
    from dataset.shards import BrokenShards

    for i in range(2):
        (tmp_path / f"junk-{i}.tar").write_bytes(b"not a tar file " * 200)
    junk = ShardDataset(str(tmp_path / "junk-{0..1}.tar"), PIXELS, 30, 4, shuffle_buffer=0)  # resampled
    with pytest.raises(RuntimeError, match=r"50 shards in a row could not be read, the last: .*junk-\d.tar"):
        list(junk)
    assert BrokenShards().limit == 50


def test_crash_with_persistent_workers_exits(shards, tmp_path):
    """An exception out of the training loop leaves the loader referenced by the traceback until exit, where
    multiprocessing SIGTERMs the workers (which ignore it) and joins them: the loader stops them first."""
    import subprocess
    import sys

    script = tmp_path / "crash.py"
    script.write_text(
        "from dataset.shards import create_shard_loader\n"
        "from torchvision.transforms import v2 as T\n"
        f"loader, sampler = create_shard_loader({shards!r}, T.PILToTensor(), 30, 4, 2, 0, 64)\n"
        "sampler.set_epoch(0)\n"
        "for i, batch in enumerate(loader):\n"
        "    if i == 2:\n"
        "        raise RuntimeError('boom')\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, str(script)], cwd=root, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=root))
    assert proc.returncode == 1 and "RuntimeError: boom" in proc.stderr


# ------------------------------------------------------------------------------------------------ retrieval on shards
def test_image_index_is_stable_and_keeps_ints():
    from dataset.shards import image_index

    assert image_index(17) == 17 and image_index(0) == 0
    a, b = image_index("coco_123"), image_index("coco_124")
    assert a == image_index("coco_123") and a != b and 0 <= a < 2 ** 62
    assert image_index(-3) == image_index(-3) >= 0 and image_index(True) != 1


def test_retrieval_finetunes_on_shards(tiny_world, tmp_path, pretrained):
    """Retrieval.py with train_shards: each sample's idx comes from its record's image_id (all captions of an image
    share it), and the run trains and evaluates as with train_file."""
    import Retrieval
    from tests.test_retrieval import _retrieval_config

    s = ms.make_shards([str(tiny_world / "retrieval_train.json")], str(tmp_path / "rt-%06d.tar"),
                       samples_per_shard=64)
    records = json.load(open(tiny_world / "retrieval_train.json"))
    ds = ShardDataset(s["pattern"], PIXELS, 30, len(records), shuffle_buffer=0, resampled=False, id_key="image_id")
    by_caption = {}
    for sample in ds:
        by_caption.setdefault(sample["idx"], set()).add(sample["caption"])
    expected = {}
    for r in records:
        expected.setdefault(r["image_id"], set()).add(pre_caption(r["caption"], 30))
    assert sorted(map(sorted, by_caption.values())) == sorted(map(sorted, expected.values()))
    config = _retrieval_config(tmp_path / "r.yaml", tiny_world, train_shards=s["pattern"],
                               train_samples_per_epoch=64, train_file=[])
    out = tmp_path / "ft"
    Retrieval.main(["--config", config, "--output_dir", str(out), "--device", "cpu", "--checkpoint", str(pretrained)])
    line = json.loads((out / "log.txt").read_text().splitlines()[0])
    assert {"train_loss_ita", "train_loss_itm", "val_r_mean"} <= set(line)
    with pytest.raises(Exception, match="train_samples_per_epoch"):
        Retrieval.main(["--config", _retrieval_config(tmp_path / "bad.yaml", tiny_world, train_shards=s["pattern"]),
                        "--output_dir", str(tmp_path / "bad"), "--device", "cpu"])
