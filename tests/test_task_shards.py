"""Fine-tuning tasks on shards: ``tools.make_shards --task ve|nlvr|vqa|grounding`` writes each task's records, and
``dataset.shards.ShardDataset`` with the task's ``ShardSample`` reads back exactly the samples of the task's JSON
data set; shards of another task are refused with a message; VE.py, NLVR.py, VQA.py and Grounding.py train an
epoch from ``train_shards``."""
import json

import pytest
import torch

import webdataset as wds
from dataset.grounding import GroundingDataset, GroundingShardSample
from dataset.nlvr_dataset import NLVRDataset, NLVRShardSample
from dataset.shards import ShardDataset, expand_urls
from dataset.transforms import eval_transform
from dataset.ve_dataset import VEDataset, VEShardSample
from dataset.vqa_dataset import VQADataset, VQAShardSample
from tests.test_classifiers_e2e import _classifier_config, task_files  # noqa: F401  (fixture)
from tests.test_grounding_e2e import _config as _grounding_config
from tests.test_grounding_e2e import grounding_set  # noqa: F401  (fixture)
from tests.test_vqa_e2e import _vqa_config, vqa_files  # noqa: F401  (fixture)
from tools import make_shards as ms

TF = eval_transform(32)


def _sources(task, world, task_files, vqa_files, grounding_set):  # noqa: F811
    """``(ann files, make_shards roots, the JSON data set, the task's ShardSample)`` of ``task``'s train split."""
    if task == "ve":
        ann = [task_files["ve_train"]]
        return ann, {"image_root": str(world)}, VEDataset(ann[0], TF, str(world)), VEShardSample(TF, 30)
    if task == "nlvr":
        ann = [task_files["nlvr_train"]]
        return ann, {"image_root": str(world)}, NLVRDataset(ann, TF, str(world)), NLVRShardSample(TF, 30)
    if task == "vqa":
        ann = [vqa_files["train"], vqa_files["vg"]]
        return (ann, {"vqa_root": str(world), "vg_root": str(world)},
                VQADataset(ann, TF, str(world), str(world), "train", 30), VQAShardSample(TF, 30))
    ann = [str(grounding_set / "refcoco+_train.json")]
    return ann, {"image_root": str(world)}, GroundingDataset(ann, TF, str(world)), GroundingShardSample(TF, 30)


def _write(task, ann, roots, out):
    s = ms.make_shards(ann, str(out / "x-%06d.tar"), samples_per_shard=10_000, task=task, **roots)
    assert s["bad"] == [] and s["samples"] == s["records"] and len(s["shards"]) == 1
    return s["pattern"]


def _read(pattern, sample, n):
    """One pass over one shard, no shuffle: the records in order."""
    return list(ShardDataset(pattern, None, None, n, shuffle_buffer=0, resampled=False, sample=sample))


@pytest.mark.parametrize("task", ["ve", "nlvr", "vqa", "grounding"])
def test_shards_give_the_json_data_sets_samples(task, tmp_path, tiny_world, task_files, vqa_files,  # noqa: F811
                                                grounding_set):  # noqa: F811
    ann, roots, ds, sample = _sources(task, tiny_world, task_files, vqa_files, grounding_set)
    pattern = _write(task, ann, roots, tmp_path)
    raw = list(wds.DataPipeline(wds.SimpleShardList(expand_urls(pattern)), wds.tarfile_to_samples()))
    records = [r for f in ann for r in json.load(open(f))]
    members = {"json", "left.jpg", "right.jpg"} if task == "nlvr" else {"json", "jpg"}
    for r, rec in zip(raw, records):
        meta = json.loads(r["json"])
        assert {k for k in r if not k.startswith("__")} == members
        assert {k: meta[k] for k in rec} == rec  # the record's keys, as written
        assert ("image_paths" if task == "nlvr" else "image_path") in meta
    got = _read(pattern, sample, len(ds))
    assert len(got) == len(ds) == len(records)
    idx_pairs = set()
    for i, s in enumerate(got):
        want = ds[i]
        assert set(s) == set(want), (set(s), set(want))
        for k, v in want.items():
            if torch.is_tensor(v):
                assert torch.equal(s[k], v), (i, k)
            elif k == "idx":  # grounding: an image-name hash on shards, a running number in the JSON data set
                idx_pairs.add((s[k], v))
            else:
                assert s[k] == v, (i, k, s[k], v)
    if task == "grounding":  # same image <=> same idx, on both paths
        assert len(idx_pairs) == len({a for a, _ in idx_pairs}) == len({b for _, b in idx_pairs}) > 1
        assert len(idx_pairs) < len(got)


def test_shards_of_another_task_are_refused(tmp_path, tiny_world, task_files):  # noqa: F811
    pre = ms.make_shards([str(tiny_world / "pretrain.json")], str(tmp_path / "pt" / "pt-%06d.tar"),
                         samples_per_shard=10_000)["pattern"]
    with pytest.raises(ValueError, match=r"pt-000000\.tar:000000000 \(.*\): no 'sentence', 'label' in the json member"
                                         r".*make_shards --task ve"):
        _read(pre, VEShardSample(TF), 1)
    with pytest.raises(ValueError, match=r"pt-000000\.tar:000000000 .*no 'question', 'answer'"):
        _read(pre, VQAShardSample(TF), 1)
    with pytest.raises(ValueError, match=r"pt-000000\.tar:000000000 .*no 'text'"):
        _read(pre, GroundingShardSample(TF), 1)
    ve = _write("ve", [task_files["ve_train"]], {"image_root": str(tiny_world)}, tmp_path / "ve")
    with pytest.raises(ValueError, match=r"x-000000\.tar:000000000 .*no image member \(left\.jpg/.*\); members: "
                                         r"\['jpg', 'json'\].*--task nlvr"):
        _read(ve, NLVRShardSample(TF), 1)
    with pytest.raises(ValueError, match=r"x-000000\.tar:000000000 .*no caption"):
        list(ShardDataset(ve, TF, 30, 1, shuffle_buffer=0, resampled=False))  # VE shards given to Pretrain.py


def test_make_shards_checks_records_and_skips_bad_pairs(tmp_path, tiny_world, task_files):  # noqa: F811
    nlvr = json.load(open(task_files["nlvr_train"]))[:4]
    nlvr[1]["images"][1] = "images/missing.jpg"
    (tmp_path / "nlvr.json").write_text(json.dumps(nlvr))
    out = tmp_path / "sh" / "n-%03d.tar"
    assert ms.main(["--task", "nlvr", "--ann", str(tmp_path / "nlvr.json"), "--image_root", str(tiny_world),
                    "--out", str(out), "--no_progress", "--workers", "0"]) == 0
    bad = [json.loads(x) for x in open(tmp_path / "sh" / "bad_records.jsonl")]
    missing = str(tiny_world / "images" / "missing.jpg")
    assert [(b["index"], b["reason"], b["image"]) for b in bad] == [(1, "missing", missing)]
    raw = list(wds.DataPipeline(wds.SimpleShardList([str(out) % 0]), wds.tarfile_to_samples()))
    assert [r["__key__"] for r in raw] == ["000000000", "000000002", "000000003"]  # the pair is skipped whole
    assert raw[0]["left.jpg"] == (tiny_world / nlvr[0]["images"][0]).read_bytes()
    assert raw[0]["right.jpg"] == (tiny_world / nlvr[0]["images"][1]).read_bytes()
    # a torn image inside a pair's shard: the pair is dropped, the member named in the next sample's bad_images
    with wds.TarWriter(str(tmp_path / "torn.tar")) as w:
        for i, r in enumerate(raw):
            right = r["right.jpg"][: len(r["right.jpg"]) // 2] if i == 0 else r["right.jpg"]
            w.write({"__key__": r["__key__"], "left.jpg": r["left.jpg"], "right.jpg": right, "json": r["json"]})
    got = _read(str(tmp_path / "torn.tar"), NLVRShardSample(TF), 2)
    assert len(got) == 2 and "torn.tar:000000000.right.jpg (" in got[0]["bad_images"][0] and not got[1]["bad_images"]
    # records the task's data set refuses stop the conversion, with the same message
    ve = json.load(open(task_files["ve_train"]))[:2]
    ve[1]["label"] = "maybe"
    (tmp_path / "ve.json").write_text(json.dumps(ve))
    with pytest.raises(ValueError, match=r"ve\.json: record 1 has label 'maybe'"):
        ms.make_shards([str(tmp_path / "ve.json")], str(tmp_path / "v" / "v-%03d.tar"), task="ve")
    with pytest.raises(ValueError, match=r"record 0 lacks key\(s\) \['sentence', 'label'\]"):
        ms.make_shards([str(tiny_world / "pretrain.json")], str(tmp_path / "v" / "v-%03d.tar"), task="ve")
    with pytest.raises(ValueError, match="--vqa_root / --vg_root"):
        ms.make_shards([str(tmp_path / "ve.json")], str(tmp_path / "v" / "v-%03d.tar"), task="vqa",
                       image_root=str(tiny_world))


# ------------------------------------------------------------------------------------------------ the scripts
def _log(out):
    return [json.loads(x) for x in (out / "log.txt").read_text().splitlines()]


@pytest.mark.parametrize("task", ["ve", "nlvr"])
def test_classifier_trains_from_shards(task, tmp_path, tiny_world, task_files, capsys):  # noqa: F811
    import NLVR
    import VE

    pattern = _write(task, [task_files[f"{task}_train"]], {"image_root": str(tiny_world)}, tmp_path / "sh")
    config = _classifier_config(tmp_path / "c.yaml", tiny_world, task_files, task,  # train_file stays set
                                train_shards=pattern, train_samples_per_epoch=16)
    script = VE if task == "ve" else NLVR
    script.main(["--config", config, "--output_dir", str(tmp_path / "out"), "--device", "cpu"])
    out = capsys.readouterr().out
    assert "data: 16 samples per epoch streamed from" in out
    assert "note: train_shards is set, so the training data are the shards; train_file" in out
    line = _log(tmp_path / "out")[0]
    assert {"train_loss_cls", "val_acc", "test_acc"} <= set(line)
    with pytest.raises(Exception, match="train_samples_per_epoch"):
        script.main(["--config", _classifier_config(tmp_path / "bad.yaml", tiny_world, task_files, task,
                                                    train_shards=pattern),
                     "--output_dir", str(tmp_path / "bad"), "--device", "cpu"])


def test_vqa_trains_from_shards(tmp_path, tiny_world, vqa_files, capsys):  # noqa: F811
    import VQA

    pattern = _write("vqa", [vqa_files["train"], vqa_files["vg"]],
                     {"vqa_root": str(tiny_world), "vg_root": str(tiny_world)}, tmp_path / "sh")
    config = _vqa_config(tmp_path / "v.yaml", tiny_world, vqa_files, train_file=[], train_shards=pattern,
                         train_samples_per_epoch=16)
    metrics = VQA.main(["--config", config, "--output_dir", str(tmp_path / "out"), "--device", "cpu"])
    assert "data: 16 samples per epoch streamed from" in capsys.readouterr().out
    lines = _log(tmp_path / "out")
    assert "train_loss_vqa" in lines[0] and "test_vqa_acc" in metrics


def test_grounding_trains_from_shards(tmp_path, tiny_world, grounding_set, capsys):  # noqa: F811
    import Grounding

    pattern = _write("grounding", [str(grounding_set / "refcoco+_train.json")], {"image_root": str(tiny_world)},
                     tmp_path / "sh")
    config = _grounding_config(tmp_path / "g.yaml", tiny_world, grounding_set, train_file=[], train_shards=pattern,
                               train_samples_per_epoch=16)
    Grounding.main(["--config", config, "--output_dir", str(tmp_path / "out"), "--device", "cpu"])
    assert "data: 16 samples per epoch streamed from" in capsys.readouterr().out
    assert {"train_loss_ita", "train_loss_itm", "test_val_d"} <= set(_log(tmp_path / "out")[0])
