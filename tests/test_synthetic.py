"""The synthetic world: determinism, file formats, true captions, boxes and relations, tokenizer, manifest reuse."""
from __future__ import annotations

import itertools
import json
import os
import re

import pytest
from PIL import Image

from dataset.synthetic import (BACKGROUNDS, COLORS, SHAPES, SIZE_JITTER, SIZES, SPLITS, VERSION, generate, main,
                               relation)

ARGS = dict(seed=0, num_train=30, num_val=10, num_test=10, image_size=96, captions_per_image=5)
JSON_FILES = ("pretrain.json", "retrieval_train.json", "retrieval_val.json", "retrieval_test.json", "scenes.json",
              "manifest.json")


def _load(world, name):
    with open(os.path.join(world, name)) as f:
        return json.load(f)


def _tree_bytes(root) -> dict:
    out = {}
    for dirpath, _, files in os.walk(root):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    generate(str(out), **ARGS)
    return str(out)


@pytest.fixture(scope="module")
def scenes(world):
    return {rec["image"]: rec for rec in _load(world, "scenes.json")["images"]}


# ------------------------------------------------------------------------------------- an independent checker

_SIZE, _COLOR, _SHAPE = "|".join(SIZES), "|".join(COLORS), "|".join(SHAPES)
_PLURAL = "|".join(s + ("es" if s.endswith("s") else "s") for s in SHAPES)
_NP = rf"(?:a|an|the) (?:(?:{_SIZE}) )?(?:{_COLOR}) (?:{_SHAPE})"
_NUM = {"one": 1, "two": 2, "three": 3}
_REL = {"to the left of": "left", "left of": "left", "to the right of": "right", "right of": "right",
        "above": "above", "below": "below"}


def _np(phrase: str) -> dict:
    """'a large red circle' -> {'size': 'large', 'color': 'red', 'shape': 'circle'} (size optional)."""
    words = phrase.split()[1:]
    return dict(zip(("size", "color", "shape") if len(words) == 3 else ("color", "shape"), words))


def _matches(obj: dict, attrs: dict) -> bool:
    return all(obj[k] == v for k, v in attrs.items())


def _centre(box):
    return box[0] + box[2] / 2, box[1] + box[3] / 2


def _relation_holds(a: dict, b: dict, rel: str, size: int) -> bool:
    """Weaker than the generator's rule on purpose: the centres differ by 10 % of the side the right way."""
    (ax, ay), (bx, by), m = _centre(a["box"]), _centre(b["box"]), 0.1 * size
    return {"left": bx - ax > m, "right": ax - bx > m, "above": by - ay > m, "below": ay - by > m}[rel]


def _count(objs, attrs) -> int:
    return sum(_matches(o, attrs) for o in objs)


def caption_is_true(caption: str, scene: dict) -> bool:
    """Parse a caption with the generator's grammar and check it against ``scenes.json`` (unknown form: False)."""
    objs, bg, size = scene["objects"], scene["background"]["color"], scene["width"]
    exists = lambda phrase: any(_matches(o, _np(phrase)) for o in objs)  # noqa: E731
    m = re.fullmatch(rf"(?:there is |an image of |just )?({_NP})", caption)
    if m:
        return exists(m.group(1))
    m = re.fullmatch(rf"a ({_SIZE}) ({_SHAPE}|shape) that is ({_COLOR})", caption)
    if m:
        attrs = {"size": m.group(1), "color": m.group(3), **({"shape": m.group(2)} if m.group(2) != "shape" else {})}
        return _count(objs, attrs) > 0
    m = re.fullmatch(rf"({_NP}) that is ({_SIZE})", caption)
    if m:
        return _count(objs, {**_np(m.group(1)), "size": m.group(2)}) > 0
    m = re.fullmatch(rf"({_NP}) on a (\w+) background|a (\w+) background with ({_NP})", caption)
    if m:
        return (m.group(2) or m.group(3)) == bg and exists(m.group(1) or m.group(4))
    m = re.fullmatch(rf"({_NP}) (?:is )?({'|'.join(_REL)}) ({_NP})", caption)
    if m:
        rel = _REL[m.group(2)]
        pairs = [(a, b) for a, b in itertools.permutations(objs, 2)
                 if _matches(a, _np(m.group(1))) and _matches(b, _np(m.group(3)))]
        if caption.startswith("the ") and (_count(objs, _np(m.group(1))) != 1 or _count(objs, _np(m.group(3))) != 1):
            return False
        return any(_relation_holds(a, b, rel, size) and relation(a["box"], b["box"], size) == rel for a, b in pairs)
    m = re.fullmatch(rf"(?:a single|only one) (?:({_SIZE}) )?({_COLOR}) ({_SHAPE}|shape)(?: on a (\w+) background)?",
                     caption)
    if m:
        attrs = {k: v for k, v in zip(("size", "color", "shape"), m.groups()[:3]) if v and v != "shape"}
        return len(objs) == 1 and _matches(objs[0], attrs) and m.group(4) in (None, bg)
    m = re.fullmatch(rf"(?:there are )?(one|two|three) (?:({_SIZE}) )?(?:({_COLOR}) )?({_PLURAL}|shapes?|objects?)"
                     rf"(?: on a (\w+) background)?", caption)
    if m:
        attrs = {k: v for k, v in (("size", m.group(2)), ("color", m.group(3))) if v}
        noun = m.group(4)
        if noun not in ("shape", "shapes", "object", "objects"):
            attrs["shape"] = noun[:-2] if noun.endswith("sses") else noun[:-1]
        return _count(objs, attrs) == _NUM[m.group(1)] and m.group(5) in (None, bg)
    m = re.fullmatch(rf"(one|two|three) objects? ({_NP}) ({'|'.join(_REL)}) ({_NP})((?: and {_NP})*)"
                     rf"(?: on a (\w+) background)?", caption)
    if m:  # a complete list whose first two objects are in a relation
        phrases = [m.group(2), m.group(4)] + re.findall(_NP, m.group(5))
        if _NUM[m.group(1)] != len(objs) or len(phrases) != len(objs) or m.group(6) not in (None, bg):
            return False
        return any(all(_matches(o, _np(p)) for o, p in zip(perm, phrases))
                   and relation(perm[0]["box"], perm[1]["box"], size) == _REL[m.group(3)]
                   for perm in itertools.permutations(objs))
    m = re.fullmatch(rf"(?:(?:a (\w+) background with )?(one|two|three) objects? |a picture with |"
                     rf"(from left to right) )?((?:{_NP} )*)(?:and )?({_NP})(?: on a (\w+) background)?", caption)
    if m and (m.group(4) or m.group(2) or m.group(3) or caption.startswith("a picture with")):
        if m.group(1) and m.group(6):
            return False  # not the grammar: the background once
        if (m.group(1) or m.group(6)) and (m.group(1) or m.group(6)) != bg:
            return False
        phrases = re.findall(_NP, m.group(4) + m.group(5))
        if len(phrases) != len(objs) or (m.group(2) and _NUM[m.group(2)] != len(objs)):
            return False
        if len(phrases) > 1 and " and " + m.group(5) not in caption:
            return False
        for perm in itertools.permutations(objs):
            if all(_matches(o, _np(p)) for o, p in zip(perm, phrases)):
                if not m.group(3) or all(relation(a["box"], b["box"], size) == "left" for a, b in zip(perm, perm[1:])):
                    return True
        return False
    return False


# ------------------------------------------------------------------------------------- tests


def test_files_and_formats(world, scenes):
    n = {"train": 30, "val": 10, "test": 10}
    for name in JSON_FILES:
        assert os.path.isfile(os.path.join(world, name)), name
    pretrain = _load(world, "pretrain.json")
    assert [r["image"] for r in pretrain] == [f"images/train_{i:05d}.jpg" for i in range(n["train"])]
    for rec in pretrain:
        assert set(rec) == {"image", "caption"} and len(rec["caption"]) == 5 and len(set(rec["caption"])) == 5
    rtrain = _load(world, "retrieval_train.json")
    assert len(rtrain) == n["train"] * 5
    for j, rec in enumerate(rtrain):
        assert set(rec) == {"image", "caption", "image_id"} and isinstance(rec["caption"], str)
        assert rec["image_id"] == j // 5 and rec["image"] == pretrain[j // 5]["image"]
        assert rec["caption"] == pretrain[j // 5]["caption"][j % 5]
    for split in ("val", "test"):
        recs = _load(world, f"retrieval_{split}.json")
        assert [r["image"] for r in recs] == [f"images/{split}_{i:05d}.jpg" for i in range(n[split])]
        assert all(set(r) == {"image", "caption"} and len(r["caption"]) == 5 for r in recs)
    data = _load(world, "scenes.json")
    assert set(data["vocabulary"]) >= {"shapes", "colors", "sizes"}
    assert data["vocabulary"]["shapes"] == list(SHAPES) and data["vocabulary"]["colors"] == list(COLORS)
    assert [r["split"] for r in data["images"]] == [s for s in SPLITS for _ in range(n[s])]
    captions = {r["image"]: r["caption"] for r in pretrain}
    captions.update({r["image"]: r["caption"] for s in ("val", "test") for r in _load(world, f"retrieval_{s}.json")})
    for rec in data["images"]:
        assert set(rec) == {"image", "split", "width", "height", "background", "objects", "captions"}
        assert [c["text"] for c in rec["captions"]] == captions[rec["image"]]  # each with its logical form
        assert all(set(c) == {"text", "lf"} and isinstance(c["lf"]["objects"], list) for c in rec["captions"])
        assert rec["background"]["kind"] in ("solid", "gradient", "noise")
        assert rec["background"]["color"] in BACKGROUNDS
        assert 1 <= len(rec["objects"]) <= 3
        for o in rec["objects"]:
            assert set(o) == {"shape", "color", "size", "box"}
            assert o["shape"] in SHAPES and o["color"] in COLORS and o["size"] in SIZES
        with Image.open(os.path.join(world, rec["image"])) as im:
            assert im.format == "JPEG" and im.mode == "RGB" and im.size == (96, 96) == (rec["width"], rec["height"])
    manifest = _load(world, "manifest.json")
    assert manifest["version"] == VERSION and manifest["args"] == ARGS
    assert manifest["counts"]["images"] == 50 and manifest["counts"]["captions"] == 250


def _reversed(caption: str):
    """The caption with its relation or left-to-right order reversed (None if it has neither)."""
    m = re.fullmatch(rf"(.*) (to the left of|left of|to the right of|right of|above|below) (.*)", caption)
    if m and m.group(2) in _REL:
        swap = {"left": "right", "right": "left", "above": "below", "below": "above"}
        return f"{m.group(1)} {m.group(2).replace(_REL[m.group(2)], swap[_REL[m.group(2)]])} {m.group(3)}"
    if caption.startswith("from left to right "):
        phrases = re.findall(_NP, caption)[::-1]
        background = re.search(r" on a \w+ background$", caption)
        return "from left to right " + " ".join(phrases[:-1]) + " and " + phrases[-1] + \
            (background.group(0) if background else "")
    return None


def test_captions_are_clean_and_true(world, scenes):
    captions = {r["image"]: r["caption"] for r in _load(world, "pretrain.json")}
    for split in ("val", "test"):
        captions.update({r["image"]: r["caption"] for r in _load(world, f"retrieval_{split}.json")})
    assert set(captions) == set(scenes)
    for image, caps in captions.items():
        scene = scenes[image]
        for c in caps:
            assert re.fullmatch(r"[a-z]+( [a-z]+)*", c), c
            assert len(c.split()) <= 23, c  # the demo's max_tokens 25 holds [CLS], the words and [SEP]
            assert caption_is_true(c, scene), (c, scene)
            reverse = _reversed(c)
            if reverse:  # relations are informative: the reversed caption is false
                assert not caption_is_true(reverse, scene), (c, reverse, scene)
            words = set(c.split()) - ({scene["background"]["color"]} if " background" in c else set())
            assert words & set(COLORS) <= {o["color"] for o in scene["objects"]}, (c, scene)
            assert {w for w in words if w in SHAPES} <= {o["shape"] for o in scene["objects"]}, (c, scene)


def test_checker_rejects_false_captions(scenes):
    scene = next(s for s in scenes.values() if len(s["objects"]) == 2 and s["objects"][0]["color"] != "red")
    a = scene["objects"][0]
    absent = next(c for c in COLORS if all(o["color"] != c for o in scene["objects"]))
    other_bg = next(b for b in BACKGROUNDS if b != scene["background"]["color"])
    assert caption_is_true(f"a {a['color']} {a['shape']}" if a["color"] != "orange" else
                           f"an orange {a['shape']}", scene)
    for false in (f"a {absent} {a['shape']}".replace("a orange", "an orange"), "three shapes", "one shape",
                  f"a {a['color']} {a['shape']} on a {other_bg} background".replace("a orange", "an orange"),
                  "this is not a caption"):
        assert not caption_is_true(false, scene), false


def test_boxes_inside_apart_and_relations(world, scenes):
    templates_seen = set()
    for rec in scenes.values():
        W = rec["width"]
        objs = rec["objects"]
        for o in objs:
            x, y, w, h = o["box"]
            assert all(isinstance(v, int) for v in o["box"]) and w == h > 0
            assert 0 <= x and 0 <= y and x + w <= W and y + h <= rec["height"]
            assert abs(w / W - SIZES[o["size"]]) <= SIZES[o["size"]] * SIZE_JITTER + 1 / W, o
        for a, b in itertools.combinations(objs, 2):  # no overlap
            ax, ay, aw, ah = a["box"]
            bx, by, bw, bh = b["box"]
            assert ax + aw <= bx or bx + bw <= ax or ay + ah <= by or by + bh <= ay
            rel = relation(a["box"], b["box"], W)
            if rel:
                templates_seen.add(rel)
                assert _relation_holds(a, b, rel, W)
                assert relation(b["box"], a["box"], W) == {"left": "right", "right": "left", "above": "below",
                                                           "below": "above"}[rel]
    assert templates_seen == {"left", "right", "above", "below"}


def test_relation_rule():
    assert relation([0, 40, 10, 10], [60, 45, 10, 10], 96) == "left"
    assert relation([60, 45, 10, 10], [0, 40, 10, 10], 96) == "right"
    assert relation([40, 0, 10, 10], [45, 70, 10, 10], 96) == "above"
    assert relation([45, 70, 10, 10], [40, 0, 10, 10], 96) == "below"
    assert relation([40, 40, 10, 10], [45, 46, 10, 10], 96) is None  # within the margin


def test_objects_visible(world, scenes):
    """The pixel at an object's centre has (roughly) its colour, and differs from the background corner."""
    for rec in list(scenes.values())[:20]:
        with Image.open(os.path.join(world, rec["image"])) as im:
            px = im.convert("RGB").load()
        for o in rec["objects"]:
            if o["shape"] == "star" and o["size"] == "small":
                continue  # a small star's centre is still the star, but keep the check robust to JPEG
            x, y, w, h = o["box"]
            cx, cy = x + w // 2, y + h // 2 + (h // 6 if o["shape"] == "triangle" else 0)
            got, want = px[cx, cy], COLORS[o["color"]]
            assert max(abs(g - t) for g, t in zip(got, want)) < 60, (rec["image"], o, got)


def test_determinism(tmp_path, world):
    again = tmp_path / "again"
    generate(str(again), **ARGS)
    assert _tree_bytes(world) == _tree_bytes(str(again))
    other = tmp_path / "other"
    generate(str(other), **{**ARGS, "seed": 1})
    a, b = _tree_bytes(world), _tree_bytes(str(other))
    assert a.keys() == b.keys()
    assert a["scenes.json"] != b["scenes.json"] and a["pretrain.json"] != b["pretrain.json"]
    assert a["images/train_00000.jpg"] != b["images/train_00000.jpg"]


def test_determinism_across_processes(tmp_path, world):
    """The tokenizer trainer's tie-breaking differs between processes; the written files must not."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cmd = [sys.executable, "-m", "dataset.synthetic", "--out", str(tmp_path)] + \
        [f"--{k.replace('_', '-')}={v}" for k, v in ARGS.items()]
    subprocess.run(cmd, cwd=root, check=True, capture_output=True)
    assert _tree_bytes(world) == _tree_bytes(str(tmp_path))


def test_worker_processes_write_the_same_world(tmp_path):
    """Images drawn by a pool of processes (the default for worlds of PARALLEL_MIN_IMAGES images or more) give the
    same files, byte for byte, as drawn in the calling process."""
    from dataset import synthetic

    args = dict(seed=3, num_train=synthetic.PARALLEL_MIN_IMAGES - 8, num_val=4, num_test=4, image_size=48,
                captions_per_image=2)
    generate(str(tmp_path / "pool"), **args, workers=2)
    generate(str(tmp_path / "one"), **args, workers=1)
    pool, one = _tree_bytes(str(tmp_path / "pool")), _tree_bytes(str(tmp_path / "one"))
    assert len(pool) > synthetic.PARALLEL_MIN_IMAGES and pool == one


def test_val_test_do_not_depend_on_num_train(tmp_path, world):
    generate(str(tmp_path), **{**ARGS, "num_train": 12})
    assert _load(world, "retrieval_test.json") == _load(str(tmp_path), "retrieval_test.json")
    with open(os.path.join(world, "images/test_00003.jpg"), "rb") as f1, \
            open(tmp_path / "images/test_00003.jpg", "rb") as f2:
        assert f1.read() == f2.read()


def test_tokenizer(world):
    from transformers import AutoTokenizer, BertTokenizerFast

    folder = os.path.join(world, "tokenizer")
    with open(os.path.join(folder, "vocab.txt"), encoding="utf-8") as f:
        vocab = f.read().splitlines()
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and len(vocab) <= 512
    config = _load(folder, "tokenizer_config.json")
    assert config["tokenizer_class"] == "BertTokenizer" and config["do_lower_case"] is True
    assert config["model_max_length"] == 512
    assert os.path.isfile(os.path.join(folder, "special_tokens_map.json"))
    captions = [c for r in _load(world, "pretrain.json") for c in r["caption"]]
    for cls in (AutoTokenizer, BertTokenizerFast):
        tok = cls.from_pretrained(folder)
        assert len(tok) == len(vocab) > 100  # not a silently tiny tokenizer
        assert (tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id) == \
            (0, 1, 2, 3, 4)
        ids = tok("a red circle")["input_ids"]
        assert ids[0] == 2 and ids[-1] == 3 and tok.unk_token_id not in ids
        assert tok.convert_ids_to_tokens(ids[1:-1]) == ["a", "red", "circle"]
        assert tok("A RED Circle")["input_ids"] == ids  # lower-casing
        for c in captions:  # every caption word is one whole token
            assert tok.tokenize(c) == c.split()


def test_reuse_and_regenerate(tmp_path, capsys):
    args = {**ARGS, "num_train": 8, "num_val": 2, "num_test": 2, "image_size": 32}
    generate(str(tmp_path), **args)
    capsys.readouterr()
    mtime = os.path.getmtime(tmp_path / "scenes.json")
    generate(str(tmp_path), **args)
    assert "reusing" in capsys.readouterr().out
    assert os.path.getmtime(tmp_path / "scenes.json") == mtime
    os.remove(tmp_path / "images" / "val_00001.jpg")  # a missing file forces regeneration
    generate(str(tmp_path), **args)
    assert "reusing" not in capsys.readouterr().out and (tmp_path / "images" / "val_00001.jpg").exists()
    generate(str(tmp_path), **{**args, "num_train": 4})  # different arguments: regenerated, stale images removed
    assert "reusing" not in capsys.readouterr().out
    assert not (tmp_path / "images" / "train_00004.jpg").exists()
    assert _load(str(tmp_path), "manifest.json")["args"]["num_train"] == 4
    with Image.open(tmp_path / "images" / "train_00000.jpg") as im:
        assert im.size == (32, 32)


def test_cli(tmp_path, capsys):
    main(["--out", str(tmp_path), "--seed", "3", "--num-train", "6", "--num-val", "2", "--num-test", "2",
          "--image-size", "48", "--captions-per-image", "3"])
    assert "6/2/2" in capsys.readouterr().out
    assert _load(str(tmp_path), "manifest.json")["args"] == {"seed": 3, "num_train": 6, "num_val": 2, "num_test": 2,
                                                            "image_size": 48, "captions_per_image": 3}
    assert all(len(r["caption"]) == 3 for r in _load(str(tmp_path), "pretrain.json"))
