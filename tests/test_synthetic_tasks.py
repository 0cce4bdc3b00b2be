"""SNLI-VE / NLVR2 / VQA files derived from the synthetic world: formats, determinism, vocabulary, labels recomputed
independently from scenes.json, balance, answer list and split separation."""
from __future__ import annotations

import json
import os
import re
import shutil
from collections import Counter

import pytest

from dataset.synthetic import BACKGROUNDS, COLORS, SHAPES, SIZES, lexicon, relation
from dataset.synthetic_tasks import generate_tasks, main, task_files

FILES = ("ve_train", "ve_val", "ve_test", "nlvr_train", "nlvr_dev", "nlvr_test", "vqa_train", "vqa_val", "vqa_test",
         "vg_qa", "answer_list")
SPLIT_OF = {"ve_train": "train", "ve_val": "val", "ve_test": "test", "nlvr_train": "train", "nlvr_dev": "val",
            "nlvr_test": "test", "vqa_train": "train", "vqa_val": "val", "vqa_test": "test", "vg_qa": "train"}


def _load(world, name):
    with open(os.path.join(world, name + ".json")) as f:
        return json.load(f)


def _copy_world(src, dst) -> str:
    shutil.copytree(str(src), str(dst))
    return str(dst)


@pytest.fixture(scope="module")
def tasks(tiny_world, tmp_path_factory):
    """The tiny world (copied, so the shared one is untouched) with its task files, generated with defaults."""
    world = _copy_world(tiny_world, tmp_path_factory.mktemp("tasks") / "world")
    paths = generate_tasks(world, seed=0)
    return world, paths


@pytest.fixture(scope="module")
def data(tasks):
    world, _ = tasks
    return {name: _load(world, name) for name in FILES}


@pytest.fixture(scope="module")
def scenes(tasks):
    return {rec["image"]: rec for rec in _load(tasks[0], "scenes")["images"]}


# ------------------------------------------------------------------------------------- an independent checker

_PLURALS = {s + ("es" if s.endswith("s") else "s"): s for s in SHAPES}
_REL = {"to the left of": "left", "left of": "left", "to the right of": "right", "right of": "right",
        "above": "above", "below": "below"}
_REL_RE = "|".join(sorted(_REL, key=len, reverse=True))
_OPP = {"left": "right", "right": "left", "above": "below", "below": "above"}
_NUM = {w: i for i, w in enumerate(("zero", "one", "two", "three", "four", "five", "six"))}


def _desc(phrase: str) -> dict:
    """'a large red circle' / 'the red shape' / 'large stars' -> {'size': ..., 'color': ..., 'shape': ...}."""
    words = phrase.split()
    if words and words[0] in ("a", "an", "the"):
        words = words[1:]
    out = {}
    for w in words:
        if w in SIZES:
            out["size"] = w
        elif w in COLORS:
            out["color"] = w
        elif w in SHAPES or w in _PLURALS:
            out["shape"] = _PLURALS.get(w, w)
        else:
            assert w in ("shape", "shapes", "object", "objects"), (w, phrase)
    return out


def _fits(scene, phrase):
    d = _desc(phrase)
    return [o for o in scene["objects"] if all(o[k] == v for k, v in d.items())]


def _rel(a, b, scene):
    return relation(a["box"], b["box"], scene["width"])


# ------------------------------------------------------------------------------------- formats and vocabulary


def test_files_and_formats(tasks, data):
    world, paths = tasks
    assert sorted(paths) == sorted(FILES)
    assert all(os.path.isfile(p) and os.path.dirname(p) == world for p in paths.values())
    assert paths == task_files(world)
    for name in ("ve_train", "ve_val", "ve_test"):
        for rec in data[name]:
            assert set(rec) == {"image", "sentence", "label"}
            assert re.fullmatch(r"images/(train|val|test)_\d{5}", rec["image"])  # no extension: the loader adds it
            assert os.path.isfile(os.path.join(world, rec["image"] + ".jpg"))
            assert rec["label"] in ("entailment", "neutral", "contradiction")
    for name in ("nlvr_train", "nlvr_dev", "nlvr_test"):
        for rec in data[name]:
            assert set(rec) == {"images", "sentence", "label"}
            assert isinstance(rec["images"], list) and len(rec["images"]) == 2
            assert all(p.endswith(".jpg") and os.path.isfile(os.path.join(world, p)) for p in rec["images"])
            assert rec["images"][0] != rec["images"][1]
            assert rec["label"] in ("True", "False")
    for name in ("vqa_train", "vqa_val", "vqa_test"):
        for rec in data[name]:
            assert set(rec) == {"question_id", "question", "image", "dataset", "answer"}
            assert isinstance(rec["question_id"], int) and rec["dataset"] == "vqa"
            assert os.path.isfile(os.path.join(world, rec["image"])) and rec["image"].endswith(".jpg")
            assert isinstance(rec["answer"], list) and len(rec["answer"]) == 10
            assert all(isinstance(a, str) and a for a in rec["answer"])
    for rec in data["vg_qa"]:
        assert set(rec) == {"question", "image", "dataset", "answer"}
        assert rec["dataset"] == "vg" and isinstance(rec["answer"], str) and rec["answer"]
    ids = [r["question_id"] for n in ("vqa_train", "vqa_val", "vqa_test") for r in data[n]]
    assert len(ids) == len(set(ids)) and 0 < min(ids) and max(ids) < 2 ** 31  # unique, fit an int32
    # the default counts per image on 64 / 8 / 16 images
    assert (len(data["ve_train"]), len(data["ve_val"]), len(data["ve_test"])) == (192, 24, 48)
    assert (len(data["nlvr_train"]), len(data["nlvr_dev"]), len(data["nlvr_test"])) == (128, 16, 32)
    assert (len(data["vqa_train"]), len(data["vqa_val"]), len(data["vqa_test"])) == (320, 40, 80)
    assert len(data["vg_qa"]) == 64


def test_split_separation(data):
    for name, split in SPLIT_OF.items():
        for rec in data[name]:
            images = rec["images"] if "images" in rec else [rec["image"]]
            assert all(os.path.basename(p).startswith(split + "_") for p in images), (name, rec)


def _texts(data):
    for name in FILES[:-1]:
        for rec in data[name]:
            yield rec.get("sentence", rec.get("question"))
            answers = rec.get("answer", [])
            yield from ([answers] if isinstance(answers, str) else answers)


def test_every_word_is_a_whole_token(tasks, data):
    from models.tokenizer import load_tokenizer

    vocabulary = set(lexicon())
    texts = sorted(set(_texts(data)) | set(data["answer_list"]))
    for text in texts:
        assert text and text == text.strip() and "  " not in text
        assert set(text.split(" ")) <= vocabulary, text
    tok = load_tokenizer(os.path.join(tasks[0], "tokenizer"))
    for text in texts:
        assert tok.tokenize(text) == text.split(" "), text  # each word one whole token
        assert tok.unk_token_id not in tok(text)["input_ids"], text


def test_answer_list(data):
    answers = data["answer_list"]
    assert answers == sorted(set(answers)) and "" not in answers
    used = {a for n in ("vqa_train", "vqa_val", "vqa_test") for r in data[n] for a in r["answer"]}
    used |= {r["answer"] for r in data["vg_qa"]}
    assert used == set(answers)


def test_deterministic_and_reproducible(tiny_world, tasks, tmp_path):
    other = _copy_world(tiny_world, tmp_path / "again")
    for name in FILES:
        if os.path.exists(os.path.join(other, name + ".json")):
            os.remove(os.path.join(other, name + ".json"))
    paths = generate_tasks(other, seed=0)
    for name, path in tasks[1].items():
        with open(path, "rb") as a, open(paths[name], "rb") as b:
            assert a.read() == b.read(), name
    generate_tasks(other, seed=1)
    with open(tasks[1]["ve_train"], "rb") as a, open(paths["ve_train"], "rb") as b:
        assert a.read() != b.read()  # the seed matters


def test_per_image_counts_errors_and_cli(tiny_world, tmp_path, capsys):
    world = _copy_world(tiny_world, tmp_path / "w")
    generate_tasks(world, per_image={"ve": 6, "nlvr": 1, "vqa": 2, "vg": 0})
    ve = _load(world, "ve_val")
    assert len(ve) == 48 and Counter(r["label"] for r in ve) == {"entailment": 16, "neutral": 16,
                                                                 "contradiction": 16}
    assert len(_load(world, "nlvr_dev")) == 8 and len(_load(world, "vqa_val")) == 16
    assert _load(world, "vg_qa") == []
    with pytest.raises(ValueError, match="unknown key"):
        generate_tasks(world, per_image={"gqa": 1})
    with pytest.raises(ValueError, match="non-negative"):
        generate_tasks(world, per_image={"ve": -1})
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="scenes.json"):
        generate_tasks(str(empty))
    main(["--world", world, "--vqa-per-image", "3"])
    out = capsys.readouterr().out
    assert "ve:" in out and "nlvr:" in out and "vqa:" in out
    assert len(_load(world, "vqa_val")) == 24 and len(_load(world, "ve_val")) == 24


# ------------------------------------------------------------------------------------- SNLI-VE


def _ve_truth(scene, sentence):
    """(kind, truth) of a hypothesis where this checker understands it: truth True / False, or None for a
    definite description that fits no object (neutral). ``None`` if the form is not checked here."""
    bg = scene["background"]["color"]
    m = re.fullmatch(rf"the (.+?) is ({_REL_RE}) the (.+)", sentence)
    if m:
        a, b = _fits(scene, m.group(1)), _fits(scene, m.group(3))
        if not a or not b:
            return "definite", None
        assert len(a) == 1 and len(b) == 1, sentence  # definite descriptions fit one object or none
        return "definite", _rel(a[0], b[0], scene) == _REL[m.group(2)]
    m = re.fullmatch(r"the (.+?) is (.+)", sentence)
    if m:
        fits = _fits(scene, m.group(1))
        if not fits:
            return "definite", None
        assert len(fits) == 1, sentence
        o, pred = fits[0], m.group(2).split()
        if pred[-1] == "background":  # "on a pink background"
            return "definite", pred[2] == bg
        return "definite", {pred[-1]} <= {o["size"], o["color"], o["shape"]}
    m = re.fullmatch(r"(?:there (?:is|are)|the image contains) exactly (\w+) (.+)", sentence)
    if m:
        return "count", len(_fits(scene, m.group(2))) == _NUM[m.group(1)]
    m = re.fullmatch(r"(?:there is|the image contains|an image of) ((?:a|an) [a-z ]+)", sentence)
    if m and not re.search(_REL_RE, m.group(1)):
        return "exist", bool(_fits(scene, m.group(1)))
    m = re.fullmatch(r"((?:a|an) [a-z ]+) on (?:a|an) (\w+) background", sentence)
    if m and not re.search(_REL_RE, m.group(1)):
        return "background", bool(_fits(scene, m.group(1))) and m.group(2) == bg
    m = re.fullmatch(r"(?:a|an) (\w+) background with ((?:a|an) [a-z ]+)", sentence)
    if m:
        return "background", bool(_fits(scene, m.group(2))) and m.group(1) == bg
    m = re.fullmatch(r"(?:(?:one|two|three) objects? |a picture with |from left to right |just )?(.+)", sentence)
    phrases = re.findall(r"(?:a|an) (?:(?!a |an )\w+ ?)+", m.group(1).replace(" and ", " "))  # "a red circle a ..."
    if (m.group(1) != sentence or " and " in sentence) and \
            all(re.fullmatch(r"(a|an)( \w+){2,3}", p.strip()) for p in phrases):
        # a complete object list (a caption, or one with an attribute changed): true only if the listed
        # descriptions are the scene's objects, as a multiset
        listed = sorted(tuple(p.split()[1:]) for p in phrases)
        assert " ".join(" ".join(p.split()) for p in phrases) == m.group(1).replace(" and ", " "), sentence
        keys = ("size", "color", "shape") if len(listed[0]) == 3 else ("color", "shape")
        return "list", listed == sorted(tuple(o[k] for k in keys) for o in scene["objects"])
    m = re.fullmatch(rf"((?:a|an) [a-z ]+?) ({_REL_RE}) ((?:a|an) [a-z ]+)", sentence)
    if m:
        xs, ys = _fits(scene, m.group(1)), _fits(scene, m.group(3))
        return "relation", any(x is not y and _rel(x, y, scene) == _REL[m.group(2)] for x in xs for y in ys)
    return None


def test_ve_labels_follow_the_rules(data, scenes):
    expected = {"entailment": True, "contradiction": False, "neutral": None}
    checked = Counter()
    for name in ("ve_train", "ve_val", "ve_test"):
        for rec in data[name]:
            scene = scenes[rec["image"] + ".jpg"]
            result = _ve_truth(scene, rec["sentence"])
            if rec["label"] == "neutral":  # always a definite description that fits nothing
                assert result == ("definite", None), rec
            if rec["label"] == "contradiction":  # every false statement is of a form checked here
                assert result is not None, rec
            if result is not None:
                assert result[1] is expected[rec["label"]], rec
                checked[result[0], rec["label"]] += 1
    total = sum(len(data[n]) for n in ("ve_train", "ve_val", "ve_test"))
    assert sum(checked.values()) >= 0.85 * total, checked  # the rest: the world's true captions (counts, ...)
    for kind in ("definite", "count", "exist", "list"):  # both truth values of the main forms occur
        assert checked[kind, "entailment"] and checked[kind, "contradiction"], checked


def test_ve_balance(data):
    for name in ("ve_train", "ve_val", "ve_test"):
        labels = Counter(r["label"] for r in data[name])
        assert set(labels) == {"entailment", "neutral", "contradiction"}
        assert max(labels.values()) - min(labels.values()) <= 1
        assert all(len(set(r["sentence"] for r in data[name] if r["image"] == img)) == 3
                   for img in {r["image"] for r in data[name]})  # distinct hypotheses per image
    # the definite form is not a give-away for "neutral": entailments and contradictions use it too
    definite = Counter(r["label"] for r in data["ve_train"] if r["sentence"].startswith("the ")
                       and not r["sentence"].startswith("the image"))
    assert definite["neutral"] < 0.6 * sum(definite.values()), definite


# ------------------------------------------------------------------------------------- NLVR2

_BOTH = ("both", "neither", "exactly_one", "compare", "total", "same_background")


def _nlvr_truth(left, right, sentence):
    """(family, truth) of an NLVR2 sentence, recomputed from the two scenes; every form must be understood."""
    side = {"left": left, "right": right}
    m = re.fullmatch(r"the (left|right) image has (?:a|an) (\w+) background", sentence)
    if m:
        return "background", side[m.group(1)]["background"]["color"] == m.group(2)
    m = re.fullmatch(r"the (left|right) image has exactly (\w+) (?:shapes?|objects?)", sentence) or \
        re.fullmatch(r"there (?:is|are) exactly (\w+) (?:shapes?|objects?) in the (left|right) image", sentence)
    if m:
        s, n = (m.group(1), m.group(2)) if m.group(1) in side else (m.group(2), m.group(1))
        return "count", len(side[s]["objects"]) == _NUM[n]
    m = re.fullmatch(r"the (left|right) image (?:contains|has) ((?:a|an) .+)", sentence) or \
        re.fullmatch(r"there is ((?:a|an) .+) in the (left|right) image", sentence)
    if m:
        s, np_ = (m.group(1), m.group(2)) if m.group(1) in side else (m.group(2), m.group(1))
        return "contains", bool(_fits(side[s], np_))
    m = re.fullmatch(r"(?:both images contain|each image contains) (.+)", sentence) or \
        re.fullmatch(r"there is (.+) in both images", sentence)
    if m:
        return "both", bool(_fits(left, m.group(1))) and bool(_fits(right, m.group(1)))
    m = re.fullmatch(r"neither image contains (.+)", sentence)
    if m:
        return "neither", not _fits(left, m.group(1)) and not _fits(right, m.group(1))
    m = re.fullmatch(r"exactly one image contains (.+)", sentence)
    if m:
        return "exactly_one", bool(_fits(left, m.group(1))) != bool(_fits(right, m.group(1)))
    m = re.fullmatch(r"the (left|right) image has (more|fewer) (.+) than the (left|right) image", sentence)
    if m:
        a, b = len(_fits(side[m.group(1)], m.group(3))), len(_fits(side[m.group(4)], m.group(3)))
        assert m.group(1) != m.group(4)
        return "compare", a > b if m.group(2) == "more" else a < b
    m = re.fullmatch(r"(?:both images|the two images) have the same number of (.+)", sentence)
    if m:
        return "compare", len(_fits(left, m.group(1))) == len(_fits(right, m.group(1)))
    m = re.fullmatch(r"there are exactly (\w+) (?:shapes|objects) in the two images together", sentence) or \
        re.fullmatch(r"the two images contain exactly (\w+) (?:shapes|objects) together", sentence)
    if m:
        return "total", len(left["objects"]) + len(right["objects"]) == _NUM[m.group(1)]
    same = left["background"]["color"] == right["background"]["color"]
    if sentence in ("the background color is the same in both images", "the two images have the same background color"):
        return "same_background", same
    if sentence == "the background color is different in the two images":
        return "same_background", not same
    raise AssertionError(f"unknown NLVR2 form: {sentence!r}")


def test_nlvr_labels_follow_the_rules(data, scenes):
    families = Counter()
    for name in ("nlvr_train", "nlvr_dev", "nlvr_test"):
        for rec in data[name]:
            left, right = (scenes[p] for p in rec["images"])
            family, truth = _nlvr_truth(left, right, rec["sentence"])
            assert str(truth) == rec["label"], rec
            families[family, rec["label"]] += 1
    both = sum(v for (f, _), v in families.items() if f in _BOTH)
    assert both >= 0.4 * sum(families.values()), families  # a good share needs both images
    for family in ("contains", "both", "compare"):  # no family is (almost) always true or always false
        assert families[family, "True"] and families[family, "False"], families
    for family in {f for f, _ in families}:
        n = families[family, "True"] + families[family, "False"]
        assert n < 8 or 0.15 <= families[family, "True"] / n <= 0.85, families
    assert len({f for f, _ in families}) >= 7, families


def test_nlvr_balance(data):
    for name in ("nlvr_train", "nlvr_dev", "nlvr_test"):
        labels = Counter(r["label"] for r in data[name])
        assert labels["True"] == labels["False"], (name, labels)  # 2 per image, taking turns


# ------------------------------------------------------------------------------------- VQA


def _vqa_answer(scene, q):
    """(kind, answer) recomputed from the scene; every question form must be understood."""
    objs = scene["objects"]

    def the(phrase):
        fits = _fits(scene, phrase)
        assert len(fits) == 1, (q, phrase)  # definite descriptions are unique
        return fits[0]

    if q in ("what color is the background", "what is the color of the background", "what is the background color"):
        return "background", scene["background"]["color"]
    m = re.fullmatch(r"how many (.+?) are (?:there|in the image)|what is the number of (shapes)", q)
    if m:
        return "count", ("zero", "one", "two", "three")[len(_fits(scene, m.group(1) or m.group(2)))]
    m = re.fullmatch(r"(?:is there|does the image contain) (.+)|are there any (.+)", q)
    if m:
        return "exist", "yes" if _fits(scene, m.group(1) or m.group(2)) else "no"
    m = re.fullmatch(rf"is (the .+?) ({_REL_RE}) (the .+)", q)
    if m:
        return "relation_yesno", "yes" if _rel(the(m.group(1)), the(m.group(3)), scene) == _REL[m.group(2)] else "no"
    m = re.fullmatch(rf"what (shape|color) is (?:the (?:shape|object) )?({_REL_RE}) (the .+)|what is ({_REL_RE}) (the .+)",
                     q)
    if m:
        attr = m.group(1) or "shape"
        ref, where = the(m.group(3) or m.group(5)), _REL[m.group(2) or m.group(4)]
        if m.group(1) == "color":
            assert q.startswith("what color is the shape ") or q.startswith("what color is the object ")
        hits = [o for o in objs if o is not ref and _rel(o, ref, scene) == where]
        assert len(hits) == 1, q
        return "relation", hits[0][attr]
    m = re.fullmatch(r"(?:what color is|what is the color of|which color is) (the .+)", q)
    if m:
        return "color", the(m.group(1))["color"]
    m = re.fullmatch(r"(?:what shape is|what kind of shape is|which shape is) (the .+)", q)
    if m:
        return "shape", the(m.group(1))["shape"]
    m = re.fullmatch(r"what size is (the .+)|is (the .+) (?:large or small|small or large)", q)
    if m:
        return "size", the(m.group(1) or m.group(2))["size"]
    raise AssertionError(f"unknown VQA form: {q!r}")


def test_vqa_answers_follow_the_rules(data, scenes):
    kinds = Counter()
    for name in ("vqa_train", "vqa_val", "vqa_test", "vg_qa"):
        for rec in data[name]:
            kind, answer = _vqa_answer(scenes[rec["image"]], rec["question"])
            kinds[kind] += 1
            if name == "vg_qa":
                assert rec["answer"] == answer, rec
            else:  # the correct answer has at least 8 of the 10 votes
                votes = Counter(rec["answer"])
                assert votes.most_common(1)[0][0] == answer and votes[answer] >= 8, rec
    assert len(kinds) >= 6, kinds  # several question kinds even in the tiny world


def test_vqa_noise_and_balance(data):
    records = [r for n in ("vqa_train", "vqa_val", "vqa_test") for r in data[n]]
    agreement = Counter(Counter(r["answer"]).most_common(1)[0][1] for r in records)
    assert set(agreement) <= {8, 9, 10} and agreement[10] > agreement[9] > 0 and agreement[8] > 0, agreement
    groups = (("yes", "no"), tuple(SIZES), SHAPES, ("zero", "one", "two", "three"), tuple(COLORS) + tuple(BACKGROUNDS))
    noisy = Counter()
    for r in records:  # wrong answers are plausible: of the same type as the correct one
        correct = Counter(r["answer"]).most_common(1)[0][0]
        wrong = set(r["answer"]) - {correct}
        group = next(g for g in groups if correct in g)
        assert wrong <= set(group), r
        noisy[group, bool(wrong)] += 1
    for group in groups:  # every answer type gets some noise
        assert noisy[group, False] + noisy[group, True] < 20 or noisy[group, True] > 0, noisy
    majority = Counter(Counter(r["answer"]).most_common(1)[0][0] for r in records)
    yes, no = majority["yes"], majority["no"]
    assert yes + no >= 0.15 * len(records) and abs(yes - no) <= 0.2 * (yes + no), majority
    numbers = {a for a in majority if a in ("zero", "one", "two", "three")}
    assert len(numbers) >= 3, majority
