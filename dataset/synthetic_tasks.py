"""Downstream-task annotations (SNLI-VE, NLVR2, VQA) derived from a synthetic world's ``scenes.json``.

The files use the ORIGINAL ALBEF repository's JSON formats, so that the task scripts fine-tune and evaluate on
the synthetic world without downloads. Every label and answer is a deterministic function of the ground truth in
``scenes.json`` (so it is visible in the pixels), and every word of every sentence, question and answer is in
:func:`dataset.synthetic.lexicon` (so the world's tokenizer encodes each as one whole token; punctuation is never
used). Only scenes of the matching split are used: train scenes for the train files, val scenes for val/dev, test
scenes for test.

    python -m dataset.synthetic_tasks --world DIR [--seed 0] [--ve-per-image 3] [--nlvr-per-image 2]
                                      [--vqa-per-image 5] [--vg-per-image 1]

writes into the world directory ``DIR`` (image paths relative to it, as in ``retrieval_*.json``):

* ``ve_train.json``, ``ve_val.json``, ``ve_test.json`` (SNLI-VE): ``[{"image": "images/train_00003" (no
  ".jpg": the loader appends it, as the original does with Flickr ids), "sentence", "label"}]``, ``label`` one of
  ``"entailment"``, ``"neutral"``, ``"contradiction"``; ``ve_per_image`` hypotheses per image, the labels taking
  turns (3 per image: one of each);
* ``nlvr_train.json``, ``nlvr_dev.json``, ``nlvr_test.json`` (NLVR2): ``[{"images": [left, right] (with
  ".jpg"), "sentence", "label": "True" | "False"}]``; each image is the left image of ``nlvr_per_image`` pairs
  with other images of its split, the labels taking turns (exactly half True when ``nlvr_per_image`` is even);
* ``vqa_train.json``, ``vqa_val.json``, ``vqa_test.json`` (VQA v2): ``[{"question_id", "question", "image"
  (with ".jpg"), "dataset": "vqa", "answer": [10 annotator answers]}]``; the test file keeps its answers (the
  real one has none) so that a local VQA accuracy can be computed;
* ``vg_qa.json`` (the Visual Genome QA the original trains on as well): ``[{"question", "image", "dataset": "vg",
  "answer": str}]`` over the train images, with the original's single-answer form;
* ``answer_list.json``: every answer string occurring in the files above, sorted (the candidate list).

Image ``i`` of a split gets its records from ``random.Random`` seeded with ``(task, seed, split, i)`` only, so the
same world and arguments give byte-identical files, and the val/test files do not change with ``num_train``
(NLVR2 partners are drawn among the images of the split, so its files depend on the split's size).

Rules (``relation`` is :func:`dataset.synthetic.relation`, "a red circle" matches any object with that colour and
shape whatever its size; counts are exact; relations are only ever stated between objects whose relation is
clear, i.e. not ``None``):

SNLI-VE. The premise is an image of a fully observable world, so every statement about *existing* objects is
either true or false. The one classical kind of statement that is neither is a definite description whose
presupposition fails (Strawson's "the king of France is bald"): "the green star is large" asserts nothing about
a scene without a green star. Hence:

* entailment: a statement that is true of the scene: a caption from :data:`dataset.synthetic.TEMPLATES`, an
  existential ("there is a red circle"), an exact count ("there are exactly two red shapes"), an indefinite
  relation ("a red circle to the left of a blue star"), or a predication about a *uniquely* described object
  ("the red circle is large", "the large shape is red", "the red shape is a circle", "the red circle is on a pink
  background", "the red circle is left of the blue star");
* contradiction: a checkably false statement of the same kinds: a complete object list (a caption) with one
  colour, shape or size changed, a caption with the wrong background, a false existential (an existing object
  with one attribute changed, such that nothing matches), a wrong count, a reversed relation, or a uniquely
  described object with a wrong size, colour, shape, background or relation;
* neutral: a predication in the same definite forms whose subject matches NO object of the scene (an existing
  object's description with its colour, shape or size changed: "the red star is large" when there is a red
  circle but no red star). Telling neutral from contradiction needs the pixels: "there is a red star" is a
  contradiction and "the red star is large" neutral in the same scene, while "the red circle is small" is a
  contradiction when the red circle is large. About half of the entailments and contradictions use the
  definite forms too, so the form alone does not give the label away.

NLVR2. A sentence about the (left, right) pair, true or false by the recomputed ground truth: about one image
("the left image contains a red circle", "the right image has exactly two shapes", "the left image has a pink
background") or needing both ("both images contain a star", "neither image contains a blue square", "exactly one
image contains a red object", "the left image has more shapes than the right image", "the right image has fewer
stars than the left image", "both images have the same number of shapes", "there are exactly four shapes in the
two images together", "the background color is the same in both images" / "... is different in the two
images"). Two thirds of the sentences are drawn from the families that need both images.

VQA. Questions with single-word answers: the colour of a uniquely described object ("what color is the circle";
asked only when the description fits exactly one object), the shape of one ("what shape is the red object"),
its size ("is the red circle large or small"), counts ("how many shapes are there", "how many stars are there":
"zero" ... "three"), existence ("is there a blue square", "are there any red shapes": "no" when an existing
object's description with one attribute changed fits nothing), the background colour ("what color is the
background"), relations ("what shape is left of the star", asked when exactly one object is in that relation and
every other object's relation to the star is clear; "is the red circle left of the blue star": "yes" for the true
relation, "no" for the reversed one). The yes/no questions of an image take turns between "yes" and "no".
Each of the 10 VQA answers is the correct one, except that 0, 1 or 2 of them (probabilities 0.5, 0.3, 0.2) are
replaced by a plausible wrong answer of the same type (annotator noise: another colour, shape or size, a
neighbouring number, the other of yes/no), so the correct answer always has at least 8 votes. ``question_id``
is ``(split index + 1) * 10**8 + image index * 100 + question index``: unique across all files, stable, and
below 2**31.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time
from collections import Counter
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from dataset.synthetic import (BACKGROUNDS, COLORS, SHAPES, SIZES, SPLITS, TEMPLATES, _OPPOSITE, _REL_WORDS,
                               _article, _cap_list, _plural, _weighted_choice, _write_json, lexicon, relation)

DEFAULT_PER_IMAGE: Dict[str, int] = {"ve": 3, "nlvr": 2, "vqa": 5, "vg": 1}
VE_LABELS = ("entailment", "neutral", "contradiction")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six")
QUESTION_ID_STRIDE = 100  # question ids: (split + 1) * 10**8 + image index * 100 + question index (< 2**31)
QUESTION_ID_SPLIT = 10 ** 8
NOISE_WEIGHTS = {0: 0.5, 1: 0.3, 2: 0.2}  # how many of the 10 VQA answers an annotator gets wrong
FILE_SPLITS = {"ve": {"train": "train", "val": "val", "test": "test"},
               "nlvr": {"train": "train", "val": "dev", "test": "test"},
               "vqa": {"train": "train", "val": "val", "test": "test"}}

Scene = Dict[str, Any]
Obj = Dict[str, Any]
Desc = Dict[str, str]  # a description: a subset of {"size", "color", "shape"} with values

# Which attributes a description uses. Definite descriptions ("the ...") must fit exactly one object.
DESC_KEYS: Tuple[Tuple[str, ...], ...] = (("shape",), ("color",), ("size",), ("color", "shape"), ("size", "shape"),
                                          ("size", "color"), ("size", "color", "shape"))
# Indefinite noun phrases ("a red circle", "a star", "a red shape", "a large star", "a large red circle").
INDEF_KEYS: Dict[Tuple[str, ...], float] = {("shape",): 2.0, ("color",): 1.5, ("color", "shape"): 3.0,
                                            ("size", "shape"): 1.0, ("size", "color", "shape"): 1.0}
VALUES: Dict[str, Tuple[str, ...]] = {"size": tuple(SIZES), "color": tuple(COLORS), "shape": SHAPES}


# ----------------------------------------------------------------------------------------------- descriptions


def _matches(obj: Obj, desc: Desc) -> bool:
    return all(obj[k] == v for k, v in desc.items())


def _fits(objs: Sequence[Obj], desc: Desc) -> List[Obj]:
    return [o for o in objs if _matches(o, desc)]


def _desc_of(obj: Obj, keys: Sequence[str]) -> Desc:
    return {k: obj[k] for k in keys}


def _noun(desc: Desc, rng: random.Random, plural: bool = False, noun: Optional[str] = None) -> str:
    """``red circle`` / ``large shape`` / ``red object`` (``noun``, or at random ``shape`` or ``object``, when the
    shape is not given)."""
    head = desc["shape"] if "shape" in desc else noun or rng.choice(("shape", "object"))
    words = [desc[k] for k in ("size", "color") if k in desc] + [_plural(head) if plural else head]
    return " ".join(words)


def _indef(desc: Desc, rng: random.Random) -> str:
    text = _noun(desc, rng)
    return f"{_article(text)} {text}"


def _the(desc: Desc, rng: random.Random, noun: Optional[str] = None) -> str:
    return "the " + _noun(desc, rng, noun=noun)


def _unique_keys(obj: Obj, objs: Sequence[Obj], without: Sequence[str] = ()) -> List[Tuple[str, ...]]:
    """The attribute sets (not using ``without``) whose description of ``obj`` fits ``obj`` alone."""
    return [keys for keys in DESC_KEYS
            if not set(keys) & set(without) and len(_fits(objs, _desc_of(obj, keys))) == 1]


def _absent_variant(rng: random.Random, desc: Desc, objs: Sequence[Obj]) -> Optional[Desc]:
    """``desc`` with one attribute changed such that no object of ``objs`` fits it (``None`` if impossible)."""
    options = [dict(desc, **{k: v}) for k in desc for v in VALUES[k] if v != desc[k]]
    options = [d for d in options if not _fits(objs, d)]
    return rng.choice(options) if options else None


def _random_desc(rng: random.Random, objs: Sequence[Obj], p_absent: float = 0.0) -> Desc:
    """An indefinite description taken from a random object of ``objs``, with probability ``p_absent`` changed
    in one attribute (which may or may not still fit another object)."""
    keys = _weighted_choice(rng, INDEF_KEYS)
    desc = _desc_of(rng.choice(objs), keys)
    if rng.random() < p_absent:
        k = rng.choice(list(desc))
        desc[k] = rng.choice([v for v in VALUES[k] if v != desc[k]])
    return desc


def _clear_pairs(objs: Sequence[Obj], size: int) -> List[Tuple[Obj, Obj, str]]:
    return [(a, b, r) for a in objs for b in objs if a is not b for r in [relation(a["box"], b["box"], size)] if r]


def _number(n: int) -> str:
    return NUMBER_WORDS[n]


def _count_phrase(n: int, noun_singular: str, noun_plural: str, rng: random.Random) -> str:
    """``there is exactly one red shape`` / ``there are exactly two stars`` / ``the image contains exactly ...``."""
    noun = noun_singular if n == 1 else noun_plural
    if rng.random() < 0.5:
        return f"there {'is' if n == 1 else 'are'} exactly {_number(n)} {noun}"
    return f"the image contains exactly {_number(n)} {noun}"


def _count_subject(scene: Scene, rng: random.Random) -> Tuple[Desc, str, str]:
    """What to count: all shapes (``{}``) or the objects sharing a random object's colour, shape, colour and
    shape, or size; returns the description and its singular and plural nouns."""
    keys = rng.choice(((), ("color",), ("shape",), ("color", "shape"), ("size",)))
    desc = _desc_of(rng.choice(scene["objects"]), keys)
    head = desc.get("shape", rng.choice(("shape", "object")))
    words = [desc[k] for k in ("size", "color") if k in desc]
    return desc, " ".join(words + [head]), " ".join(words + [_plural(head)])


# ----------------------------------------------------------------------------------------------- SNLI-VE


def _ve_caption(scene: Scene, rng: random.Random, size: int, truth: bool) -> Optional[str]:
    """A caption of the synthetic world (true), or a false one: a complete object list with one colour, shape or
    size changed (the listed multiset no longer equals the scene's), or a background caption with the wrong
    background."""
    if truth:
        name = _weighted_choice(rng, {n: w for n, (_, w) in TEMPLATES.items()})
        return TEMPLATES[name][0](scene, rng, size)
    if rng.random() < 0.6:
        words = _cap_list(scene, rng, size).split()
        positions = [i for i, w in enumerate(words) if w in COLORS or w in SHAPES or w in SIZES]
        i = rng.choice(positions)
        category = next(v for v in VALUES.values() if words[i] in v)
        words[i] = rng.choice([v for v in category if v != words[i]])
        for j in range(len(words) - 1):  # "a red" -> "an orange"
            if words[j] in ("a", "an"):
                words[j] = _article(words[j + 1])
        return " ".join(words)
    bg = rng.choice([b for b in BACKGROUNDS if b != scene["background"]["color"]])
    np_ = _indef(_desc_of(rng.choice(scene["objects"]), rng.choice((("color", "shape"), ("size", "color", "shape")))),
                 rng)
    return rng.choice([f"{np_} on {_article(bg)} {bg} background", f"{_article(bg)} {bg} background with {np_}"])


def _ve_exist(scene: Scene, rng: random.Random, size: int, truth: bool) -> Optional[str]:
    objs = scene["objects"]
    desc = _desc_of(rng.choice(objs), _weighted_choice(rng, INDEF_KEYS))
    if not truth:
        desc = _absent_variant(rng, desc, objs)
        if desc is None:
            return None
    np_, bg = _indef(desc, rng), scene["background"]["color"]
    return rng.choice([f"there is {np_}", f"the image contains {np_}", f"an image of {np_}",
                       f"{np_} on {_article(bg)} {bg} background"])


def _ve_count(scene: Scene, rng: random.Random, size: int, truth: bool) -> Optional[str]:
    desc, singular, plural = _count_subject(scene, rng)
    n = len(_fits(scene["objects"], desc))
    if not truth:
        n = rng.choice([k for k in (1, 2, 3) if k != n])
    return _count_phrase(n, singular, plural, rng)


def _ve_relation(scene: Scene, rng: random.Random, size: int, truth: bool) -> Optional[str]:
    """"a red circle to the left of a blue star": true when some object fitting the first description is in that
    relation to another fitting the second; the false version states the reverse of a clear relation."""
    objs = scene["objects"]
    pairs = _clear_pairs(objs, size)
    if not pairs:
        return None
    a, b, rel = rng.choice(pairs)
    da = _desc_of(a, _weighted_choice(rng, INDEF_KEYS))
    db = _desc_of(b, _weighted_choice(rng, INDEF_KEYS))
    if not truth:
        rel = _OPPOSITE[rel]
        if any(x is not y and relation(x["box"], y["box"], size) == rel
               for x in _fits(objs, da) for y in _fits(objs, db)):
            return None
    return f"{_indef(da, rng)} {rng.choice(_REL_WORDS[rel])} {_indef(db, rng)}"


PREDICATES = {"size": 1.0, "color": 1.5, "shape": 1.0, "background": 0.7, "relation": 1.3}


def _ve_definite(scene: Scene, rng: random.Random, size: int, truth: Optional[bool]) -> Optional[str]:
    """"the {subject} is {predicate}". ``truth`` True/False: the subject fits exactly one object and the predicate
    is true/false of it (entailment/contradiction). ``truth`` None: the subject fits no object (neutral)."""
    objs, bg = scene["objects"], scene["background"]["color"]
    pred = _weighted_choice(rng, PREDICATES)
    o = rng.choice(objs)
    without = (pred,) if pred in ("size", "color", "shape") else ()
    if truth is None:  # presupposition failure: an existing object's description, changed to fit nothing
        keys = rng.choice([k for k in DESC_KEYS if not set(k) & set(without)])
        subject = _absent_variant(rng, _desc_of(o, keys), objs)
        if subject is None:
            return None
    else:
        options = _unique_keys(o, objs, without)
        if not options:
            return None
        subject = _desc_of(o, rng.choice(options))

    def value(pool: Sequence[str], actual: str) -> str:
        if truth is None:
            return rng.choice(pool)
        return actual if truth else rng.choice([v for v in pool if v != actual])

    if pred == "size":
        return f"{_the(subject, rng)} is {value(tuple(SIZES), o['size'])}"
    if pred == "color":
        return f"{_the(subject, rng)} is {value(tuple(COLORS), o['color'])}"
    if pred == "shape":
        s = value(SHAPES, o["shape"])
        return f"{_the(subject, rng)} is {_article(s)} {s}"
    if pred == "background":
        b = value(tuple(BACKGROUNDS), bg)
        return f"{_the(subject, rng)} is on {_article(b)} {b} background"
    # relation: the other object must be uniquely described too (and, for a true or false one, clearly related)
    if truth is None:
        other = rng.choice(objs)
        rel = rng.choice(list(_OPPOSITE))
    else:
        others = [b for b in objs if b is not o and relation(o["box"], b["box"], size)]
        if not others:
            return None
        other = rng.choice(others)
        rel = relation(o["box"], other["box"], size)
        rel = rel if truth else _OPPOSITE[rel]
    other_keys = _unique_keys(other, objs)
    if not other_keys:
        return None
    first, second = _the(subject, rng), _the(_desc_of(other, rng.choice(other_keys)), rng)
    if truth is None and rng.random() < 0.5:  # the absent object may be either side of the relation
        first, second, rel = second, first, _OPPOSITE[rel]
    return f"{first} is {rng.choice(_REL_WORDS[rel])} {second}"


VE_FAMILIES: Dict[str, Tuple[Callable[..., Optional[str]], float]] = {
    "caption": (_ve_caption, 1.0), "exist": (_ve_exist, 1.0), "count": (_ve_count, 1.0),
    "relation": (_ve_relation, 1.0), "definite": (_ve_definite, 4.0),
}


def ve_hypothesis(scene: Scene, rng: random.Random, size: int, label: str) -> str:
    """One hypothesis with the given label for ``scene`` (see the module docstring for the rules)."""
    for _ in range(100):
        if label == "neutral":
            text = _ve_definite(scene, rng, size, None)
        else:
            name = _weighted_choice(rng, {n: w for n, (_, w) in VE_FAMILIES.items()})
            text = VE_FAMILIES[name][0](scene, rng, size, label == "entailment")
        if text:
            return text
    if label == "neutral":  # an absent colour-shape combination always exists (at most three objects)
        o = scene["objects"][0]
        subject = _absent_variant(rng, _desc_of(o, ("color", "shape")), scene["objects"])
        return f"{_the(subject, rng)} is {rng.choice(tuple(SIZES))}"
    return _ve_count(scene, rng, size, label == "entailment")


def _ve_records(scene: Scene, index: int, rng: random.Random, k: int) -> List[Dict[str, str]]:
    records, seen = [], set()
    for j in range(k):
        label = VE_LABELS[(index + j) % 3]
        for _ in range(10):  # prefer distinct sentences
            text = ve_hypothesis(scene, rng, scene["width"], label)
            if text not in seen:
                break
        seen.add(text)
        records.append({"image": os.path.splitext(scene["image"])[0], "sentence": text, "label": label})
    return records


# ----------------------------------------------------------------------------------------------- NLVR2

Pair = Tuple[Scene, Scene]


def _side(pair: Pair, rng: random.Random) -> Tuple[str, Scene]:
    i = rng.randrange(2)
    return ("left", "right")[i], pair[i]


def _pair_desc(pair: Pair, rng: random.Random) -> Desc:
    return _random_desc(rng, pair[0]["objects"] + pair[1]["objects"], p_absent=0.3)


def _has(scene: Scene, desc: Desc) -> bool:
    return bool(_fits(scene["objects"], desc))


def _nl_contains(pair: Pair, rng: random.Random) -> Tuple[str, bool]:
    side, scene = _side(pair, rng)
    desc = _pair_desc(pair, rng)
    np_ = _indef(desc, rng)
    text = rng.choice([f"the {side} image contains {np_}", f"there is {np_} in the {side} image",
                       f"the {side} image has {np_}"])
    return text, _has(scene, desc)


def _nl_count(pair: Pair, rng: random.Random) -> Tuple[str, bool]:
    side, scene = _side(pair, rng)
    n = len(scene["objects"]) if rng.random() < 0.5 else rng.choice((1, 2, 3))
    noun = rng.choice(("shape", "object")) + ("" if n == 1 else "s")
    text = rng.choice([f"the {side} image has exactly {_number(n)} {noun}",
                       f"there {'is' if n == 1 else 'are'} exactly {_number(n)} {noun} in the {side} image"])
    return text, n == len(scene["objects"])


def _nl_background(pair: Pair, rng: random.Random) -> Tuple[str, bool]:
    side, scene = _side(pair, rng)
    b = rng.choice(pair)["background"]["color"] if rng.random() < 0.6 else rng.choice(tuple(BACKGROUNDS))
    return f"the {side} image has {_article(b)} {b} background", b == scene["background"]["color"]


def _nl_both(pair: Pair, rng: random.Random) -> Tuple[str, bool]:
    desc = _pair_desc(pair, rng)
    np_ = _indef(desc, rng)
    text = rng.choice([f"both images contain {np_}", f"there is {np_} in both images", f"each image contains {np_}"])
    return text, _has(pair[0], desc) and _has(pair[1], desc)


def _nl_neither(pair: Pair, rng: random.Random) -> Tuple[str, bool]:
    desc = _pair_desc(pair, rng)
    return f"neither image contains {_indef(desc, rng)}", not _has(pair[0], desc) and not _has(pair[1], desc)


def _nl_exactly_one(pair: Pair, rng: random.Random) -> Tuple[str, bool]:
    desc = _pair_desc(pair, rng)
    return f"exactly one image contains {_indef(desc, rng)}", _has(pair[0], desc) != _has(pair[1], desc)


def _nl_compare(pair: Pair, rng: random.Random) -> Tuple[str, bool]:
    """More / fewer / the same number of shapes (or of the objects fitting a colour or a shape)."""
    if rng.random() < 0.5:
        desc: Desc = {}
        noun = rng.choice(("shapes", "objects"))
    else:
        keys = rng.choice((("color",), ("shape",)))
        desc = _desc_of(rng.choice(pair[0]["objects"] + pair[1]["objects"]), keys)
        noun = _noun(desc, rng, plural=True)
    n = {"left": len(_fits(pair[0]["objects"], desc)), "right": len(_fits(pair[1]["objects"], desc))}
    a, b = ("left", "right") if rng.random() < 0.5 else ("right", "left")
    form = rng.choice(("more", "fewer", "same"))
    if form == "more":
        return f"the {a} image has more {noun} than the {b} image", n[a] > n[b]
    if form == "fewer":
        return f"the {a} image has fewer {noun} than the {b} image", n[a] < n[b]
    text = rng.choice([f"both images have the same number of {noun}",
                       f"the two images have the same number of {noun}"])
    return text, n["left"] == n["right"]


def _nl_total(pair: Pair, rng: random.Random, target: Optional[bool] = None) -> Tuple[str, bool]:
    total = len(pair[0]["objects"]) + len(pair[1]["objects"])
    truth = rng.random() < 0.5 if target is None else target
    n = total if truth else rng.choice([k for k in range(2, 7) if k != total])
    noun = rng.choice(("shapes", "objects"))
    text = rng.choice([f"there are exactly {_number(n)} {noun} in the two images together",
                       f"the two images contain exactly {_number(n)} {noun} together"])
    return text, truth


def _nl_same_background(pair: Pair, rng: random.Random) -> Tuple[str, bool]:
    same = pair[0]["background"]["color"] == pair[1]["background"]["color"]
    if rng.random() < 0.5:
        text = rng.choice(["the background color is the same in both images",
                           "the two images have the same background color"])
        return text, same
    return "the background color is different in the two images", not same


NLVR_SINGLE = {"contains": (_nl_contains, 1.0), "count": (_nl_count, 0.5), "background": (_nl_background, 0.5)}
NLVR_BOTH = {"both": (_nl_both, 1.0), "neither": (_nl_neither, 0.6), "exactly_one": (_nl_exactly_one, 0.6),
             "compare": (_nl_compare, 1.0), "total": (_nl_total, 0.5), "same_background": (_nl_same_background, 0.3)}
NLVR_P_BOTH = 2 / 3  # share of the sentences drawn from the families that need both images


def nlvr_sentence(pair: Pair, rng: random.Random, target: bool) -> str:
    """A sentence about the (left, right) pair whose truth is ``target``: a family is drawn, then its parameters
    are redrawn until the truth is ``target`` (so that each family is about as often true as false, and its form
    says little about the label), another family if that fails; a direct construction is the fallback."""
    for _ in range(10):
        families = NLVR_BOTH if rng.random() < NLVR_P_BOTH else NLVR_SINGLE
        name = _weighted_choice(rng, {n: w for n, (_, w) in families.items()})
        for _ in range(30):
            text, truth = families[name][0](pair, rng)
            if truth == target:
                return text
    return _nl_total(pair, rng, target)[0]


def _nlvr_records(scenes: Sequence[Scene], index: int, rng: random.Random, k: int) -> List[Dict[str, Any]]:
    records, n = [], len(scenes)
    for j in range(k):
        partner = rng.randrange(n - 1) if n > 1 else index  # another image of the split (itself if alone)
        partner += int(n > 1 and partner >= index)
        pair = (scenes[index], scenes[partner])
        target = (index + j) % 2 == 0
        records.append({"images": [pair[0]["image"], pair[1]["image"]],
                        "sentence": nlvr_sentence(pair, rng, target), "label": str(target)})
    return records


# ----------------------------------------------------------------------------------------------- VQA

QA = Tuple[str, str, str]  # question, answer, answer type (for the annotator noise)


_ATTRIBUTE_QUESTIONS = {
    "color": ["what color is {}", "what is the color of {}", "which color is {}"],
    "shape": ["what shape is {}", "what kind of shape is {}", "which shape is {}"],
    "size": ["what size is {}", "is {} large or small", "is {} small or large"],
}


def _q_attribute(scene: Scene, rng: random.Random, attr: str) -> Optional[QA]:
    """The ``attr`` of an object described uniquely by its other attributes ("what color is the large star")."""
    o = rng.choice(scene["objects"])
    options = _unique_keys(o, scene["objects"], without=(attr,))
    if not options:
        return None
    noun = {"noun": "object"} if attr == "shape" else {}  # not "what shape is the red shape"
    the = _the(_desc_of(o, rng.choice(options)), rng, **noun)
    return rng.choice(_ATTRIBUTE_QUESTIONS[attr]).format(the), o[attr], attr


def _q_color(scene: Scene, rng: random.Random, size: int, yes: bool) -> Optional[QA]:
    return _q_attribute(scene, rng, "color")


def _q_shape(scene: Scene, rng: random.Random, size: int, yes: bool) -> Optional[QA]:
    return _q_attribute(scene, rng, "shape")


def _q_size(scene: Scene, rng: random.Random, size: int, yes: bool) -> Optional[QA]:
    return _q_attribute(scene, rng, "size")


def _q_count(scene: Scene, rng: random.Random, size: int, yes: bool) -> Optional[QA]:
    objs = scene["objects"]
    if rng.random() < 0.3:
        q = rng.choice(["how many shapes are there", "how many objects are in the image",
                        "what is the number of shapes"])
        return q, _number(len(objs)), "number"
    keys = rng.choice((("shape",), ("color",), ("color", "shape"), ("size",)))
    if rng.random() < 0.7:  # a counted kind present in the scene, otherwise any (often "zero")
        desc = _desc_of(rng.choice(objs), keys)
    else:
        desc = {k: rng.choice(VALUES[k]) for k in keys}
    plural = _noun(desc, rng, plural=True)
    q = rng.choice([f"how many {plural} are there", f"how many {plural} are in the image"])
    return q, _number(len(_fits(objs, desc))), "number"


def _q_exist(scene: Scene, rng: random.Random, size: int, yes: bool) -> Optional[QA]:
    objs = scene["objects"]
    desc = _desc_of(rng.choice(objs), _weighted_choice(rng, INDEF_KEYS))
    if not yes:
        desc = _absent_variant(rng, desc, objs)
        if desc is None:
            return None
    q = rng.choice([f"is there {_indef(desc, rng)}", f"does the image contain {_indef(desc, rng)}",
                    f"are there any {_noun(desc, rng, plural=True)}"])
    return q, "yes" if yes else "no", "yesno"


def _q_background(scene: Scene, rng: random.Random, size: int, yes: bool) -> Optional[QA]:
    q = rng.choice(["what color is the background", "what is the color of the background",
                    "what is the background color"])
    return q, scene["background"]["color"], "background"


def _q_relation(scene: Scene, rng: random.Random, size: int, yes: bool) -> Optional[QA]:
    """"what shape is left of the star" / "what color is the shape above the red circle": the reference is
    uniquely described, exactly one object is in the relation, every other object is clearly related to it."""
    objs = scene["objects"]
    ref = rng.choice(objs)
    options = _unique_keys(ref, objs)
    others = [o for o in objs if o is not ref]
    if not options or not others:
        return None
    rels = {id(o): relation(o["box"], ref["box"], size) for o in others}
    if None in rels.values():
        return None
    rel = rels[id(rng.choice(others))]
    hits = [o for o in others if rels[id(o)] == rel]
    if len(hits) != 1:
        return None
    where, the = rng.choice(_REL_WORDS[rel]), _the(_desc_of(ref, rng.choice(options)), rng)
    if rng.random() < 0.5:
        return rng.choice([f"what shape is {where} {the}", f"what is {where} {the}"]), hits[0]["shape"], "shape"
    noun = rng.choice(("shape", "object"))
    return f"what color is the {noun} {where} {the}", hits[0]["color"], "color"


def _q_relation_yesno(scene: Scene, rng: random.Random, size: int, yes: bool) -> Optional[QA]:
    objs = scene["objects"]
    pairs = [(a, b, r) for a, b, r in _clear_pairs(objs, size) if _unique_keys(a, objs) and _unique_keys(b, objs)]
    if not pairs:
        return None
    a, b, rel = rng.choice(pairs)
    rel = rel if yes else _OPPOSITE[rel]
    first = _the(_desc_of(a, rng.choice(_unique_keys(a, objs))), rng)
    second = _the(_desc_of(b, rng.choice(_unique_keys(b, objs))), rng)
    return f"is {first} {rng.choice(_REL_WORDS[rel])} {second}", "yes" if yes else "no", "yesno"


VQA_KINDS: Dict[str, Tuple[Callable[[Scene, random.Random, int, bool], Optional[QA]], float]] = {
    "color": (_q_color, 2.0), "shape": (_q_shape, 1.5), "size": (_q_size, 1.0), "count": (_q_count, 2.0),
    "exist": (_q_exist, 2.0), "background": (_q_background, 1.0), "relation": (_q_relation, 1.0),
    "relation_yesno": (_q_relation_yesno, 1.0),
}
ANSWER_POOLS: Dict[str, Tuple[str, ...]] = {"color": tuple(COLORS), "shape": SHAPES, "size": tuple(SIZES),
                                            "background": tuple(BACKGROUNDS), "yesno": ("yes", "no")}


def vqa_questions(scene: Scene, rng: random.Random, k: int) -> List[QA]:
    """Up to ``k`` distinct questions about ``scene`` (fewer only if the scene admits fewer). The yes/no
    questions of an image take turns between "yes" and "no" (from a random start), so the two are balanced."""
    weights = {n: w for n, (_, w) in VQA_KINDS.items()}
    out: List[QA] = []
    yes = rng.random() < 0.5
    for _ in range(50 * k):
        if len(out) == k:
            break
        qa = VQA_KINDS[_weighted_choice(rng, weights)][0](scene, rng, scene["width"], yes)
        if qa and qa[0] not in {q for q, _, _ in out}:
            out.append(qa)
            yes ^= qa[2] == "yesno"
    return out


def _wrong_answer(answer: str, kind: str, rng: random.Random) -> str:
    if kind == "number":  # a neighbouring count
        n = NUMBER_WORDS.index(answer)
        return _number(rng.choice([m for m in (n - 1, n + 1) if 0 <= m <= 3]))
    return rng.choice([a for a in ANSWER_POOLS[kind] if a != answer])


def annotator_answers(answer: str, kind: str, rng: random.Random, n: int = 10) -> List[str]:
    """``n`` annotator answers: ``answer``, with 0-2 of them replaced by a plausible wrong one."""
    answers = [answer] * n
    for i in rng.sample(range(n), _weighted_choice(rng, NOISE_WEIGHTS)):
        answers[i] = _wrong_answer(answer, kind, rng)
    return answers


# ----------------------------------------------------------------------------------------------- files


def _rng(task: str, seed: int, split: str, index: int) -> random.Random:
    return random.Random(f"synthetic_tasks/{task}/{seed}/{SPLITS.index(split)}/{index}")


def _question_id(split: str, index: int, j: int) -> int:
    return (SPLITS.index(split) + 1) * QUESTION_ID_SPLIT + index * QUESTION_ID_STRIDE + j


_LEXICON = frozenset(lexicon())


def _check_words(text: str, where: str) -> None:
    unknown = [w for w in text.split(" ") if w not in _LEXICON]
    if unknown:
        raise AssertionError(f"{where}: {text!r} uses words outside synthetic.lexicon(): {unknown}")


def task_files(world_dir: str) -> Dict[str, str]:
    """The paths :func:`generate_tasks` writes, by name."""
    names = [f"ve_{s}" for s in FILE_SPLITS["ve"].values()] + [f"nlvr_{s}" for s in FILE_SPLITS["nlvr"].values()]
    names += [f"vqa_{s}" for s in FILE_SPLITS["vqa"].values()] + ["vg_qa", "answer_list"]
    return {n: os.path.join(world_dir, n + ".json") for n in names}


def load_scenes(world_dir: str) -> Dict[str, List[Scene]]:
    """The world's scenes by split, in image order."""
    path = os.path.join(world_dir, "scenes.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: generate the world first "
                                f"(python -m dataset.synthetic --out {world_dir})")
    with open(path) as f:
        images = json.load(f)["images"]
    by_split: Dict[str, List[Scene]] = {s: [] for s in SPLITS}
    for rec in images:
        by_split[rec["split"]].append(rec)
    for split, scenes in by_split.items():
        scenes.sort(key=lambda r: r["image"])
    return by_split


def generate_tasks(world_dir: str, seed: int = 0, per_image: Optional[Mapping[str, int]] = None) -> Dict[str, str]:
    """Write the SNLI-VE, NLVR2 and VQA files (see the module docstring) into ``world_dir``; returns their paths.

    Args:
        per_image: records per image, overriding :data:`DEFAULT_PER_IMAGE` key by key: ``"ve"`` hypotheses,
            ``"nlvr"`` pairs (as the left image), ``"vqa"`` questions and ``"vg"`` single-answer questions (train
            images only).
    """
    counts = dict(DEFAULT_PER_IMAGE)
    for key, value in (per_image or {}).items():
        if key not in counts:
            raise ValueError(f"per_image: unknown key {key!r}; expected some of {sorted(counts)}")
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"per_image[{key!r}] must be a non-negative int, got {value!r}")
        counts[key] = value
    if counts["vqa"] >= QUESTION_ID_STRIDE:
        raise ValueError(f"per_image['vqa'] must be below {QUESTION_ID_STRIDE} (question ids)")
    scenes = load_scenes(world_dir)
    if max(len(v) for v in scenes.values()) * QUESTION_ID_STRIDE > QUESTION_ID_SPLIT:
        raise ValueError(f"at most {QUESTION_ID_SPLIT // QUESTION_ID_STRIDE} images per split (question ids)")
    paths = task_files(world_dir)
    outputs: Dict[str, List[Dict[str, Any]]] = {}
    vg: List[Dict[str, Any]] = []
    for split in SPLITS:
        ve, nlvr, vqa = [], [], []
        for i, scene in enumerate(scenes[split]):
            ve += _ve_records(scene, i, _rng("ve", seed, split, i), counts["ve"])
            nlvr += _nlvr_records(scenes[split], i, _rng("nlvr", seed, split, i), counts["nlvr"])
            rng = _rng("vqa", seed, split, i)
            for j, (q, a, kind) in enumerate(vqa_questions(scene, rng, counts["vqa"])):
                vqa.append({"question_id": _question_id(split, i, j), "question": q, "image": scene["image"],
                            "dataset": "vqa", "answer": annotator_answers(a, kind, rng)})
            if split == "train":
                for q, a, _ in vqa_questions(scene, _rng("vg", seed, split, i), counts["vg"]):
                    vg.append({"question": q, "image": scene["image"], "dataset": "vg", "answer": a})
        outputs["ve_" + FILE_SPLITS["ve"][split]] = ve
        outputs["nlvr_" + FILE_SPLITS["nlvr"][split]] = nlvr
        outputs["vqa_" + FILE_SPLITS["vqa"][split]] = vqa
    outputs["vg_qa"] = vg

    answers = set()
    for name, records in outputs.items():  # every word must be a whole token of the world's tokenizer
        for rec in records:
            _check_words(rec.get("sentence", rec.get("question", "")), name)
            for a in ([rec["answer"]] if isinstance(rec.get("answer"), str) else rec.get("answer", [])):
                _check_words(a, name)
                answers.add(a)
    for name, records in outputs.items():
        _write_json(paths[name], records)
    _write_json(paths["answer_list"], sorted(answers))
    return paths


def summary(world_dir: str) -> str:
    """Counts and label / answer balance of the task files in ``world_dir``."""
    paths = task_files(world_dir)
    data = {}
    for name, path in paths.items():
        with open(path) as f:
            data[name] = json.load(f)

    def share(counter: Counter) -> str:
        total = sum(counter.values()) or 1
        return " ".join(f"{k} {100 * v / total:.0f}%" for k, v in counter.most_common())

    lines = []
    for task, key in (("ve", "label"), ("nlvr", "label")):
        names = [n for n in paths if n.startswith(task + "_")]
        sizes = " / ".join(f"{n.split('_', 1)[1]} {len(data[n])}" for n in names)
        labels = Counter(r[key] for n in names for r in data[n])
        lines.append(f"{task}: {sizes} records; labels {share(labels)}")
    names = [n for n in paths if n.startswith("vqa_")]
    sizes = " / ".join(f"{n.split('_', 1)[1]} {len(data[n])}" for n in names)
    majority = Counter(Counter(r["answer"]).most_common(1)[0][0] for n in names for r in data[n])
    total = sum(majority.values()) or 1
    top = " ".join(f"{a} {100 * c / total:.0f}%" for a, c in majority.most_common(10))
    lines.append(f"vqa: {sizes} questions, vg {len(data['vg_qa'])}; {len(data['answer_list'])} answers; "
                 f"yes/no {share(Counter({a: majority[a] for a in ('yes', 'no')}))}; answers {top} ...")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description="Derive SNLI-VE, NLVR2 and VQA files from a synthetic world.")
    p.add_argument("--world", required=True, help="a directory written by python -m dataset.synthetic")
    p.add_argument("--seed", type=int, default=0)
    for key, value in DEFAULT_PER_IMAGE.items():
        p.add_argument(f"--{key}-per-image", type=int, default=value)
    a = p.parse_args(argv)
    start = time.time()
    per_image = {key: getattr(a, f"{key}_per_image") for key in DEFAULT_PER_IMAGE}
    paths = generate_tasks(a.world, seed=a.seed, per_image=per_image)
    print(f"synthetic tasks in {a.world}: {len(paths)} files ({time.time() - start:.1f} s)")
    print(summary(a.world))


if __name__ == "__main__":
    main()
