"""Grounding data: the restricted unpickler, the REFER files, proposals, the grounding data set, and the synthetic
grounding set with its labels recomputed independently from scenes.json."""
from __future__ import annotations

import json
import os
import pickle
import re

import numpy as np
import pytest
import torch
from PIL import Image

from dataset.caption_dataset import RetrievalTrainDataset
from dataset.grounding import (GroundingCollator, GroundingDataset, Refer, UnsafePickleError, check_dets_cover,
                               load_dets, safe_load_pickle)
from dataset.images import BadImageError, DataError
from dataset.synthetic import COLORS, RELATION_MARGIN, SHAPES, SIZES, render_scene
from dataset.synthetic_grounding import generate_grounding, grounding_files, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(path, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


# ------------------------------------------------------------------------------------- restricted unpickler

# What Python 2's pickle.dumps(..., 0) writes for [{'ref_id': 7, 'split': 'testA', 'bbox': [1.5, 2, 2**64 long,
# True, None], 'pair': (1, 2), 'u': u'caf\xe9'}] (str as STRING, longs with an L suffix, True as I01).
PY2_PROTOCOL0 = (b"(lp0\n(dp1\nS'ref_id'\np2\nI7\nsS'split'\np3\nS'testA'\np4\nsS'bbox'\np5\n(lp6\nF1.5\naI2\n"
                 b"aL12345678901234567890L\naI01\naNasS'pair'\np7\n(I1\nI2\ntp8\nsS'u'\np9\nVcaf\\u00e9\np10\nsa.")
# Python 2, protocol 2: [{'ref_id': 7, 'split': 'testB', 'sent': 'caf\xc3\xa9 '}] (a UTF-8 encoded byte str).
PY2_PROTOCOL2_UTF8 = b"\x80\x02]q\x00}q\x01(U\x06ref_idq\x02K\x07U\x05splitq\x03U\x05testBq\x04U\x04sentq\x05" \
                     b"U\x06caf\xc3\xa9 q\x06ua."
# Python 2, protocol 2: ['caf\xe9'] (a Latin-1 byte str, not valid UTF-8).
PY2_PROTOCOL2_LATIN1 = b"\x80\x02]q\x00U\x04caf\xe9q\x01a."


def test_unpickler_loads_python2_plain_pickles(tmp_path):
    assert safe_load_pickle(_write(tmp_path / "p0.p", PY2_PROTOCOL0)) == [
        {"ref_id": 7, "split": "testA", "bbox": [1.5, 2, 12345678901234567890, True, None], "pair": (1, 2),
         "u": "caf\u00e9"}]
    assert safe_load_pickle(_write(tmp_path / "p2.p", PY2_PROTOCOL2_UTF8)) == [
        {"ref_id": 7, "split": "testB", "sent": "caf\u00e9 "}]
    assert safe_load_pickle(_write(tmp_path / "l1.p", PY2_PROTOCOL2_LATIN1)) == ["caf\u00e9"]
    with pytest.raises(UnicodeDecodeError):  # why an encoding must be given: pickle's default is ASCII
        pickle.loads(PY2_PROTOCOL2_UTF8)


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_unpickler_loads_python3_plain_pickles(tmp_path, protocol):
    data = {"a": [1, 2.5, "x", None, True, (1, (2,))], "n": {"k": -(2 ** 70)}, 3: []}
    assert safe_load_pickle(_write(tmp_path / "p.p", pickle.dumps(data, protocol=protocol))) == data
    if protocol >= 3:  # bytes opcodes; below, Python 3 spells bytes as a call of the global _codecs.encode
        assert safe_load_pickle(_write(tmp_path / "b.p", pickle.dumps([b"y"], protocol=protocol))) == [b"y"]
    else:
        with pytest.raises(UnsafePickleError, match=r"_codecs\.encode"):
            safe_load_pickle(_write(tmp_path / "b.p", pickle.dumps([b"y"], protocol=protocol)))


def test_unpickler_sets_only_without_globals(tmp_path):
    data = {"s": {1, 2}, "f": frozenset({"a"})}
    assert safe_load_pickle(_write(tmp_path / "s4.p", pickle.dumps(data, protocol=4))) == data  # set opcodes
    with pytest.raises(UnsafePickleError, match=r"__builtin__\.set"):  # protocols <= 3 call the global set
        safe_load_pickle(_write(tmp_path / "s2.p", pickle.dumps(data, protocol=2)))


class _Evil:
    def __init__(self, sentinel):
        self.sentinel = sentinel

    def __reduce__(self):
        return os.system, (f"touch {self.sentinel}",)


@pytest.mark.parametrize("protocol", [0, 2, 4])
def test_unpickler_refuses_code_execution(tmp_path, protocol):
    sentinel = tmp_path / "pwned"
    path = _write(tmp_path / "refs(unc).p", pickle.dumps([{"ref_id": 1}, _Evil(sentinel)], protocol=protocol))
    with pytest.raises(UnsafePickleError) as info:
        safe_load_pickle(path)
    message = str(info.value)
    assert path in message and re.search(r"(posix|os|nt)\.system", message)
    assert "plain containers and numbers" in message
    assert isinstance(info.value, ValueError)
    assert not sentinel.exists()


def test_unpickler_refuses_globals_and_other_objects(tmp_path):
    path = _write(tmp_path / "arr.p", pickle.dumps({"a": np.zeros(3)}, protocol=2))
    with pytest.raises(UnsafePickleError, match=r"arr\.p: refused to load the global numpy"):
        safe_load_pickle(path)
    with pytest.raises(UnsafePickleError, match="bytearray"):  # built by a protocol-5 opcode, caught afterwards
        safe_load_pickle(_write(tmp_path / "ba.p", pickle.dumps([bytearray(b"x")], protocol=5)))
    with pytest.raises(UnsafePickleError, match="persistent id"):
        safe_load_pickle(_write(tmp_path / "pid.p", b"Pfoo\n."))
    with pytest.raises(ValueError, match=r"junk\.p: not a valid pickle") as info:
        safe_load_pickle(_write(tmp_path / "junk.p", b"hello"))
    assert not isinstance(info.value, UnsafePickleError)
    with pytest.raises(FileNotFoundError, match="nothere"):
        safe_load_pickle(str(tmp_path / "nothere.p"))


def test_grounding_modules_never_use_plain_pickle_load():
    for name in ("grounding.py", "synthetic_grounding.py"):
        with open(os.path.join(ROOT, "dataset", name)) as f:
            source = f.read()
        assert "pickle.load(" not in source and "pickle.loads(" not in source, name


# ------------------------------------------------------------------------------------- REFER files

REFS = [
    {"ref_id": 11, "ann_id": 101, "image_id": 1, "split": "train", "category_id": 1, "file_name": "a_101.jpg",
     "sentences": [{"sent_id": 0, "sent": "man left", "raw": "man left", "tokens": ["man", "left"]}]},
    {"ref_id": 12, "ann_id": 202, "image_id": 2, "split": "testA", "category_id": 1, "file_name": "b_202.jpg",
     "sentences": []},
    {"ref_id": 13, "ann_id": 203, "image_id": 2, "split": "testB", "category_id": 2, "file_name": "b_203.jpg",
     "sentences": []},
]
INSTANCES = {
    "images": [{"id": 1, "file_name": "a.jpg", "height": 480, "width": 640},
               {"id": 2, "file_name": "b.jpg", "height": 300, "width": 200}],
    "annotations": [{"id": 101, "image_id": 1, "bbox": [10.5, 20, 30, 40], "category_id": 1},
                    {"id": 202, "image_id": 2, "bbox": [0, 0, 5, 6], "category_id": 1},
                    {"id": 203, "image_id": 2, "bbox": [50, 60, 70, 80.25], "category_id": 2}],
    "categories": [{"id": 1, "name": "person"}, {"id": 2, "name": "dog"}],
}


def _refer_folder(tmp_path, refs=REFS, instances=INSTANCES, protocol=2):
    folder = tmp_path / "data" / "refcoco+"
    folder.mkdir(parents=True, exist_ok=True)
    _write(folder / "refs(unc).p", pickle.dumps(refs, protocol=protocol))
    (folder / "instances.json").write_text(json.dumps(instances))
    return str(tmp_path / "data")


def test_refer_reads_the_refer_layout(tmp_path):
    root = _refer_folder(tmp_path)
    refer = Refer(root)
    assert len(refer) == 3 and refer.ref_ids() == [11, 12, 13]
    assert refer.ref_ids("test") == [12, 13] and refer.ref_ids("testB") == [13] and refer.ref_ids("val") == []
    assert refer.split(12) == "testA" and refer.image_id(13) == 2
    assert refer.box(11) == [10.5, 20.0, 30.0, 40.0] and refer.box(13) == [50.0, 60.0, 70.0, 80.25]
    assert refer.image_size(11) == (480, 640) and refer.image_size(12) == (300, 200)
    with pytest.raises(KeyError, match="99"):
        refer.split(99)
    folder = os.path.join(root, "refcoco+")
    same = Refer.from_files(os.path.join(folder, "refs(unc).p"), os.path.join(folder, "instances.json"))
    assert same.refs == refer.refs and same.anns == refer.anns


def test_refer_reads_a_python2_refs_file(tmp_path):
    root = _refer_folder(tmp_path)
    refs = [{"ref_id": 7, "ann_id": 101, "image_id": 1, "split": "testB"}]
    py2 = b"\x80\x02]q\x00}q\x01(U\x06ref_idq\x02K\x07U\x06ann_idq\x03Ke" \
          b"U\x08image_idq\x04K\x01U\x05splitq\x05U\x05testBq\x06ua."
    assert pickle.loads(py2, encoding="latin1") == refs
    _write(os.path.join(root, "refcoco+", "refs(unc).p"), py2)
    refer = Refer(root)
    assert refer.split(7) == "testB" and refer.box(7) == [10.5, 20.0, 30.0, 40.0]


def test_refer_missing_files_name_file_and_config_key(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        Refer(str(tmp_path / "nowhere"))
    message = str(info.value)
    assert "refs(unc).p" in message and "refcoco_data" in message and "\n" not in message
    root = _refer_folder(tmp_path)
    os.remove(os.path.join(root, "refcoco+", "instances.json"))
    with pytest.raises(FileNotFoundError, match=r"instances\.json.*refcoco_data"):
        Refer(root)


@pytest.mark.parametrize("break_it, match", [
    (lambda refs, inst: refs[1].pop("ann_id"), r"refs\(unc\)\.p: ref 1: key 'ann_id'"),
    (lambda refs, inst: refs[2].update(ann_id=999), r"refs\(unc\)\.p: ref 2: ann_id 999"),
    (lambda refs, inst: refs[2].update(image_id=1), r"ref 2: image_id 1 differs"),
    (lambda refs, inst: refs[0].update(split=None), r"ref 0: key 'split'"),
    (lambda refs, inst: refs.append(dict(refs[0])), r"ref 3: duplicate ref_id 11"),
    (lambda refs, inst: inst["annotations"][1].update(bbox=[1, 2, 3]), r"instances\.json: annotations\[1\]: 'bbox'"),
    (lambda refs, inst: inst["images"][0].pop("height"), r"instances\.json: images\[0\]: 'height'"),
    (lambda refs, inst: inst.pop("annotations"), r"instances\.json: key 'annotations'"),
])
def test_refer_malformed_content_names_file_and_record(tmp_path, break_it, match):
    refs, instances = json.loads(json.dumps(REFS)), json.loads(json.dumps(INSTANCES))
    break_it(refs, instances)
    root = _refer_folder(tmp_path, refs, instances)
    with pytest.raises(DataError, match=match):  # a ValueError that the scripts print in one line (exit 2)
        Refer(root)


def test_refer_refuses_an_unsafe_refs_file(tmp_path):
    sentinel = tmp_path / "pwned"
    root = _refer_folder(tmp_path, refs=[_Evil(sentinel)])
    with pytest.raises(UnsafePickleError, match=r"refs\(unc\)\.p") as info:
        Refer(root)
    assert not sentinel.exists() and isinstance(info.value, DataError)


# ------------------------------------------------------------------------------------- proposals


def test_load_dets(tmp_path):
    path = tmp_path / "dets.json"
    path.write_text(json.dumps({"1": [[1, 2, 3, 4], [0.5, 0.5, 10, 20, 0.9, 3]], "2": [[0, 0, 1, 1]]}))
    dets = load_dets(str(path))
    assert dets == {"1": [[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 10.0, 20.0, 0.9, 3.0]], "2": [[0.0, 0.0, 1.0, 1.0]]}
    refer = Refer(_refer_folder(tmp_path))
    check_dets_cover(dets, refer, refer.ref_ids())
    with pytest.raises(ValueError, match=r"no proposals for image 2 \(ref_id 12\)"):
        check_dets_cover({"1": dets["1"]}, refer, refer.ref_ids())


@pytest.mark.parametrize("content, match", [
    ({"5": [[1, 2, 3, 4], [1, 2, 0, 4]]}, r"image '5': proposal 1"),
    ({"5": [[1, 2, 3]]}, r"image '5': proposal 0"),
    ({"5": [["1", 2, 3, 4]]}, r"image '5': proposal 0"),
    ({"5": [[1, 2, True, 4]]}, r"image '5': proposal 0"),
    ({"5": {"x": 1}}, r"image '5': expected a list of boxes"),
    ([[1, 2, 3, 4]], r"expected \{str\(image_id\)"),
])
def test_load_dets_errors_name_file_and_entry(tmp_path, content, match):
    path = tmp_path / "dets.json"
    path.write_text(json.dumps(content))
    with pytest.raises(DataError, match=match) as info:
        load_dets(str(path))
    assert str(path) in str(info.value) and "det_file" in str(info.value)


def test_load_dets_missing_and_invalid_json(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dets\.json.*det_file"):
        load_dets(str(tmp_path / "dets.json"))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match=r"bad\.json \(det_file\): not valid JSON"):
        load_dets(str(tmp_path / "bad.json"))


# ------------------------------------------------------------------------------------- data set


def _to_tensor(image):
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


@pytest.fixture
def small_files(tmp_path):
    for folder, name, color in (("a", "x.jpg", (255, 0, 0)), ("b", "y.jpg", (0, 255, 0)), ("c", "x.jpg", (0, 0, 255))):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (8, 6), color).save(tmp_path / folder / name)
    records = [{"image": "a/x.jpg", "text": "The Red, Thing!", "ref_id": 5},
               {"image": "b/y.jpg", "text": "the green one", "ref_id": 6},
               {"image": "a/x.jpg", "text": "left  red", "ref_id": 7},
               {"image": "c/x.jpg", "text": "blue (same basename)", "ref_id": 8}]
    path = tmp_path / "refcoco+_train.json"
    path.write_text(json.dumps(records))
    return tmp_path, str(path)


def test_grounding_dataset_train_matches_retrieval_training_items(small_files):
    root, path = small_files
    ds = GroundingDataset([path], _to_tensor, str(root))
    assert len(ds) == 4
    items = [ds[i] for i in range(4)]
    assert [it["idx"] for it in items] == [0, 1, 0, 0]  # image index by file basename, as the original
    assert items[0]["caption"] == "the red thing" and items[2]["caption"] == "left red"
    assert items[0]["image"].shape == (3, 6, 8) and items[0]["bad_images"] == []
    retrieval_file = root / "re.json"
    retrieval_file.write_text(json.dumps([{"image": "a/x.jpg", "caption": "a", "image_id": 0}]))
    retrieval = RetrievalTrainDataset([str(retrieval_file)], _to_tensor, str(root))[0]
    assert set(items[0]) == set(retrieval) and type(items[0]["idx"]) is type(retrieval["idx"])


def test_grounding_dataset_eval_items_and_collator(small_files, tiny_world):
    from models.tokenizer import load_tokenizer

    root, path = small_files
    ds = GroundingDataset(path, _to_tensor, str(root), mode="eval")
    assert [ds[i]["ref_id"] for i in range(4)] == [5, 6, 7, 8] and "idx" not in ds[0]
    assert ds[1]["caption"] == "the green one" and GroundingDataset(path, _to_tensor, str(root), mode="test")
    collate = GroundingCollator(load_tokenizer(str(tiny_world / "tokenizer")), 30)
    batch = collate([ds[0], ds[1]])
    assert batch["ref_id"].tolist() == [5, 6] and batch["image"].shape == (2, 3, 6, 8)
    assert batch["input_ids"].shape[0] == 2 and batch["bad_images"] == []


def test_grounding_dataset_validates_records_and_images(small_files):
    root, path = small_files
    bad = root / "bad.json"
    bad.write_text(json.dumps([{"image": "a/x.jpg", "text": "ok"}, {"image": "b/y.jpg"}]))
    with pytest.raises(ValueError, match=r"bad\.json: record 1 lacks key\(s\) \['text'\]"):
        GroundingDataset(str(bad), _to_tensor, str(root))
    no_ref = root / "noref.json"
    no_ref.write_text(json.dumps([{"image": "a/x.jpg", "text": "ok"}]))
    GroundingDataset(str(no_ref), _to_tensor, str(root))  # train files need no ref_id
    with pytest.raises(ValueError, match=r"noref\.json: record 0 lacks key\(s\) \['ref_id'\]"):
        GroundingDataset(str(no_ref), _to_tensor, str(root), mode="eval")
    bad.write_text(json.dumps([{"image": "a/x.jpg", "text": "ok", "ref_id": "5"}]))
    with pytest.raises(ValueError, match=r"bad\.json: record 0: 'ref_id' must be an int"):
        GroundingDataset(str(bad), _to_tensor, str(root), mode="eval")
    bad.write_text(json.dumps([{"image": "a/x.jpg", "text": "  "}]))
    with pytest.raises(ValueError, match=r"record 0: 'text'"):
        GroundingDataset(str(bad), _to_tensor, str(root))
    with pytest.raises(ValueError, match="mode"):
        GroundingDataset(path, _to_tensor, str(root), mode="val")

    os.remove(root / "b" / "y.jpg")
    skip = GroundingDataset(path, _to_tensor, str(root), on_bad_image="skip")
    item = skip[1]  # replaced by another record that loads (drawn at random), with its own caption and idx
    by_caption = {skip[i]["caption"]: skip[i]["idx"] for i in (0, 2, 3)}
    assert item["caption"] in by_caption and item["idx"] == by_caption[item["caption"]]
    assert item["bad_images"][0] == str(root / "b" / "y.jpg") and set(item["bad_images"]) == {str(root / "b" / "y.jpg")}
    with pytest.raises(BadImageError):
        GroundingDataset(path, _to_tensor, str(root))[1]
    with pytest.raises(BadImageError):
        GroundingDataset(path, _to_tensor, str(root), mode="eval", on_bad_image="skip")[1]


# ------------------------------------------------------------------------------------- synthetic grounding set
# An independent checker: its own parser of the expressions and its own relation and IoU.

_REL = {"to the left of": "left", "left of": "left", "to the right of": "right", "right of": "right",
        "above": "above", "below": "below"}
_EXPR = re.compile(r"^the (.+?)(?: (" + "|".join(sorted(_REL, key=len, reverse=True)) + r") the (.+))?$")


def _parse_desc(phrase):
    out = {}
    for w in phrase.split(" "):
        if w in SIZES:
            out["size"] = w
        elif w in COLORS:
            out["color"] = w
        elif w in SHAPES:
            out["shape"] = w
        else:
            assert w in ("shape", "object"), phrase
    assert len(out) == len(phrase.split(" ")) - ("shape" not in out), phrase  # one word per attribute, noun last
    return out


def _relation(a, b, size):
    dx = (b[0] + b[2] / 2) - (a[0] + a[2] / 2)
    dy = (b[1] + b[3] / 2) - (a[1] + a[3] / 2)
    if abs(dx) >= abs(dy) and abs(dx) > RELATION_MARGIN * size:
        return "left" if dx > 0 else "right"
    if abs(dy) > abs(dx) and abs(dy) > RELATION_MARGIN * size:
        return "above" if dy > 0 else "below"
    return None


def _designated(scene, text):
    """The objects the expression is true of (a relational landmark must be unique)."""
    m = _EXPR.match(text)
    assert m, text
    fits = [o for o in scene["objects"] if all(o[k] == v for k, v in _parse_desc(m.group(1)).items())]
    if m.group(2) is None:
        return fits, "attribute"
    landmarks = [o for o in scene["objects"] if all(o[k] == v for k, v in _parse_desc(m.group(3)).items())]
    assert len(landmarks) == 1, text
    rel = _REL[m.group(2)]
    return [o for o in fits if o is not landmarks[0]
            and _relation(o["box"], landmarks[0]["box"], scene["width"]) == rel], "relation"


def _iou(a, b):
    w = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    h = min(a[1] + a[3], b[1] + b[3]) - max(a[1], b[1])
    inter = max(0, w) * max(0, h)
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


@pytest.fixture(scope="module")
def grounding(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("grounding")
    paths = generate_grounding(str(tiny_world), str(out), seed=0)
    with open(os.path.join(str(tiny_world), "scenes.json")) as f:
        scenes = {s["image"]: s for s in json.load(f)["images"]}
    return str(tiny_world), str(out), paths, scenes


def test_synthetic_boxes_are_the_rendered_pixel_boxes():
    for shape in SHAPES:
        for box in ([5, 7, 20, 20], [30, 11, 37, 37], [3, 60, 11, 11]):
            scene = {"background": {"kind": "solid", "color": "white"},
                     "objects": [{"shape": shape, "color": "black", "size": "large", "box": box}]}
            pixels = np.asarray(render_scene(scene, 96, np.random.default_rng(0))).astype(int)
            ys, xs = np.nonzero(np.abs(pixels - pixels[0, 0]).max(-1) > 40)
            assert [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1] == box, shape


def test_synthetic_grounding_labels_recomputed(grounding):
    world, out, paths, scenes = grounding
    refer = Refer(out)
    dets = load_dets(paths["dets"])
    with open(os.path.join(world, "tokenizer", "vocab.txt")) as f:
        vocab = {line.rstrip("\n") for line in f}
    kinds, images_of, refs_seen = set(), {}, set()
    for name, splits in (("train", {"train"}), ("val", {"val"}), ("test", {"testA", "testB"})):
        with open(paths[name]) as f:
            records = json.load(f)
        assert records and all(set(r) == {"image", "text", "ref_id"} for r in records)
        images_of[name] = {r["image"] for r in records}
        for rec in records:
            scene = scenes[rec["image"]]
            assert scene["split"] == name and len(scene["objects"]) >= 2
            assert set(rec["text"].split(" ")) <= vocab, rec
            hits, kind = _designated(scene, rec["text"])
            kinds.add(kind)
            assert len(hits) == 1, rec  # the expression picks exactly one object ...
            assert refer.box(rec["ref_id"]) == [float(v) for v in hits[0]["box"]], rec  # ... the referent
            ref = refer.refs[rec["ref_id"]]
            assert ref["file_name"] == os.path.basename(rec["image"]) and rec["text"] in [s["sent"] for s in
                                                                                      ref["sentences"]]
            assert refer.split(rec["ref_id"]) in splits
            if name == "test":  # testA: a shape occurs twice in the image
                shapes = [o["shape"] for o in scene["objects"]]
                assert refer.split(rec["ref_id"]) == ("testA" if len(set(shapes)) < len(shapes) else "testB")
            with Image.open(os.path.join(world, rec["image"])) as im:
                assert refer.image_size(rec["ref_id"]) == (im.height, im.width)
            boxes = dets[str(refer.image_id(rec["ref_id"]))]
            gt = hits[0]["box"]
            assert [b for b in boxes if b == gt] == [gt]  # the proposals include the gt box once ...
            assert all(_iou(b, gt) < 0.5 for b in boxes if b != gt)  # ... and no other correct one
            refs_seen.add(rec["ref_id"])
    assert kinds == {"attribute", "relation"}
    assert refs_seen == set(refer.ref_ids())
    assert not (images_of["train"] & images_of["val"] or images_of["train"] & images_of["test"]
                or images_of["val"] & images_of["test"])
    assert {refer.split(r) for r in refer.ref_ids()} == {"train", "val", "testA", "testB"}


def test_synthetic_grounding_instances_and_proposals(grounding):
    world, out, paths, scenes = grounding
    with open(paths["instances"]) as f:
        instances = json.load(f)
    dets = load_dets(paths["dets"])
    refer = Refer(out)
    by_image = {}
    for ann in instances["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann["bbox"])
    by_name = {os.path.basename(k): v for k, v in scenes.items()}
    assert len(instances["images"]) == len(dets)
    for img in instances["images"]:
        scene = by_name[img["file_name"]]
        assert (img["height"], img["width"]) == (scene["height"], scene["width"])
        assert sorted(by_image[img["id"]]) == sorted(o["box"] for o in scene["objects"])  # every object
        boxes = dets[str(img["id"])]
        assert all(0 <= b[0] and 0 <= b[1] and b[0] + b[2] <= img["width"] and b[1] + b[3] <= img["height"]
                   for b in boxes)
        assert len(boxes) > len(scene["objects"])  # some distractors
    with open(paths["val"]) as f:
        records = json.load(f)
    ds = GroundingDataset(paths["val"], _to_tensor, world, mode="eval")  # image_root: the world
    assert ds[0]["ref_id"] == records[0]["ref_id"] and ds[0]["image"].shape == (3, 32, 32)
    check_dets_cover(dets, refer, refer.ref_ids())


def test_synthetic_grounding_is_deterministic_and_has_a_cli(grounding, tmp_path, capsys):
    world, out, paths, _ = grounding
    main(["--world", world, "--out", str(tmp_path)])
    printed = capsys.readouterr().out
    assert "chance accuracy" in printed and "proposals per image" in printed and "testA" in printed
    again = grounding_files(str(tmp_path))
    for name, path in paths.items():
        with open(path, "rb") as a, open(again[name], "rb") as b:
            assert a.read() == b.read(), name
    other = generate_grounding(world, str(tmp_path / "seed1"), seed=1)
    with open(paths["dets"]) as a, open(other["dets"]) as b:
        assert a.read() != b.read()
