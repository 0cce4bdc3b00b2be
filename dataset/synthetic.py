"""A deterministic "synthetic world": images of 1-3 coloured shapes on varied backgrounds, with true captions.

It is the built-in data set of the CPU demo and of the tests (no downloads). Every scene's full ground truth
(background, and each object's shape, colour, size and pixel box) is written to ``scenes.json`` so that VQA,
NLVR2, SNLI-VE and grounding sets can later be derived from the same scenes; :func:`relation` is the spatial
relation the captions use.

    python -m dataset.synthetic --out DIR [--seed 0] [--num-train 8000] [--num-val 200] [--num-test 200]
                                [--image-size 96] [--captions-per-image 5] [--workers N]

writes into ``DIR``:

* ``images/{split}_{i:05d}.jpg``: RGB, ``image_size`` square, JPEG quality 90;
* ``pretrain.json``: ``[{"image", "caption": [c1, ...]}]`` over the train images (paths relative to ``DIR``);
* ``retrieval_train.json``: ``[{"image", "caption": str, "image_id": int}]``, one record per train caption;
* ``retrieval_val.json``, ``retrieval_test.json``: ``[{"image", "caption": [c1, ...]}]``, one record per image;
* ``scenes.json``: ``{"images": [{"image", "split", "width", "height", "background": {"kind", "color"},
  "objects": [{"shape", "color", "size", "box": [x, y, w, h]}], "captions": [{"text", "lf"}]}],
  "vocabulary": {...}}``; ``captions`` (since version 2) are the image's captions in the order of the other files,
  each with its logical form (what it asserts; :mod:`dataset.caption_logic` documents and checks it);
* ``tokenizer/``: a lower-casing BERT WordPiece tokenizer trained on all captions ([PAD]=0 [UNK]=1 [CLS]=2
  [SEP]=3 [MASK]=4), loadable with ``transformers.AutoTokenizer.from_pretrained``;
* ``manifest.json``: the arguments, the counts and :data:`VERSION` (written last; a directory whose manifest
  records the same arguments and whose files all exist is reused as it is).

Image ``i`` of a split depends only on ``(seed, split, i, image_size, captions_per_image)``, so the same
arguments give byte-identical files and the val/test scenes do not change with ``num_train``. Captions are
lower-case words separated by single spaces (at most 23, so 25 tokens with [CLS] and [SEP]) and are true for
their image. Most describe the whole scene, so that a caption identifies its image among the others (see
:data:`CAPTION_TEMPLATES`): every object with its size, the background, the number of objects only inside such a
list ("two objects a small red circle and a large blue star on a gray background"), a relation between two listed
objects (from box centres, see :func:`relation`; "three objects a small red circle to the left of a large blue
star and a small green square"), or a left-to-right order; a few name one object, a pair or the background only.
``python -m dataset.caption_logic --world DIR`` prints the best retrieval scores such captions allow.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import re
import time
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

PARALLEL_MIN_IMAGES = 512  # smaller worlds are drawn in the calling process (a pool costs more than it saves)
VERSION = 2  # 2: larger objects, placement by free positions, scene-identifying captions with logical forms
SPLITS = ("train", "val", "test")
JPEG_QUALITY = 90
SUPERSAMPLE = 2  # scenes are drawn at 2x and downsampled with LANCZOS (antialiasing)

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 35, 35), "green": (40, 170, 60), "blue": (45, 90, 235), "yellow": (250, 220, 40),
    "purple": (145, 55, 190), "orange": (250, 140, 25), "white": (250, 250, 250), "black": (20, 20, 20),
}
# Side of an object's box as a fraction of the image (times 1 +- SIZE_JITTER): a small object is ~17 px and a large
# one ~27 px in the demo's 64 px input (2 and 3.4 patches of 8 px); 3 objects still fit (see PLACEMENT_TRIES).
SIZES: Dict[str, float] = {"small": 0.26, "large": 0.42}
SIZE_JITTER = 0.08
PLACEMENT_TRIES = 20  # placements of a scene's objects before its attributes are re-sampled
BACKGROUNDS: Dict[str, Tuple[int, int, int]] = {
    "white": (236, 236, 232), "gray": (150, 150, 150), "dark": (45, 48, 55), "beige": (225, 205, 160),
    "pink": (240, 185, 200), "blue": (165, 205, 240),
}
BACKGROUND_KINDS = ("solid", "gradient", "noise")
NUM_OBJECTS_WEIGHTS = {1: 0.25, 2: 0.40, 3: 0.35}
RELATION_MARGIN = 0.12  # centres must differ by this fraction of the image side along the dominant axis
NUMBERS = {1: "one", 2: "two", 3: "three"}
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TOKENIZER_VOCAB_SIZE = 512

Scene = Dict[str, Any]
Obj = Dict[str, Any]


# ----------------------------------------------------------------------------------------------- colours


def _luma(rgb: Sequence[int]) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _color_distance(a: Sequence[int], b: Sequence[int]) -> float:
    """'Redmean' weighted RGB distance (a cheap perceptual approximation)."""
    r = (a[0] + b[0]) / 2
    dr, dg, db = (a[0] - b[0]), (a[1] - b[1]), (a[2] - b[2])
    return ((2 + r / 256) * dr * dr + 4 * dg * dg + (2 + (255 - r) / 256) * db * db) ** 0.5


def _contrasts(obj_color: str, background: str) -> bool:
    """An object colour is allowed on a background when both its lightness and its colour differ clearly."""
    o, b = COLORS[obj_color], BACKGROUNDS[background]
    return abs(_luma(o) - _luma(b)) >= 40 and _color_distance(o, b) >= 200


ALLOWED_ON: Dict[str, Tuple[str, ...]] = {b: tuple(c for c in COLORS if _contrasts(c, b)) for b in BACKGROUNDS}


# ----------------------------------------------------------------------------------------------- scenes


def relation(box_a: Sequence[float], box_b: Sequence[float], image_size: int) -> Optional[str]:
    """Where object ``a`` is relative to ``b``: ``'left'``, ``'right'``, ``'above'``, ``'below'`` or ``None``.

    Uses the box centres and the dominant axis only: ``'left'`` means ``b``'s centre is further right than it is
    up or down, by more than ``RELATION_MARGIN * image_size``. ``None`` when neither axis clears the margin.
    """
    dx = (box_b[0] + box_b[2] / 2) - (box_a[0] + box_a[2] / 2)
    dy = (box_b[1] + box_b[3] / 2) - (box_a[1] + box_a[3] / 2)
    margin = RELATION_MARGIN * image_size
    if abs(dx) >= abs(dy) and abs(dx) > margin:
        return "left" if dx > 0 else "right"
    if abs(dy) > abs(dx) and abs(dy) > margin:
        return "above" if dy > 0 else "below"
    return None


def _weighted_choice(rng: random.Random, weights: Dict[Any, float]) -> Any:
    keys = list(weights)
    return rng.choices(keys, weights=[weights[k] for k in keys])[0]


def _sample_attributes(rng: random.Random, n: int) -> List[Dict[str, str]]:
    """``n`` objects' shape/colour/size; later objects sometimes repeat an earlier colour and/or shape (so that
    counts such as "two red circles" occur)."""
    objs: List[Dict[str, str]] = []
    for _ in range(n):
        shape, color, size = rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(SIZES))
        if objs:
            u, ref = rng.random(), rng.choice(objs)
            if u < 0.2:
                shape, color = ref["shape"], ref["color"]
            elif u < 0.35:
                color = ref["color"]
            elif u < 0.5:
                shape = ref["shape"]
        objs.append({"shape": shape, "color": color, "size": size})
    return objs


def _place(rng: random.Random, sides: Sequence[int], image_size: int) -> Optional[List[List[int]]]:
    """Non-overlapping boxes ``[x, y, w, h]`` inside the image for squares of the given sides (or ``None``).

    The boxes are placed largest first, each uniformly among the integer positions where it keeps ``pad`` pixels
    from the border and ``gap`` pixels from every box placed before; ``None`` when some box has no such position.
    The boxes are returned in the order of ``sides``."""
    pad, gap = max(1, round(0.02 * image_size)), max(1.0, 0.03 * image_size)
    boxes: Dict[int, List[int]] = {}
    for i in sorted(range(len(sides)), key=lambda j: -sides[j]):
        side = sides[i]
        coords = np.arange(pad, image_size - side - pad + 1)
        if coords.size == 0:
            return None
        xs, ys = np.meshgrid(coords, coords, indexing="xy")
        xs, ys = xs.ravel(), ys.ravel()
        free = np.ones(xs.shape, dtype=bool)
        for bx, by, bw, bh in boxes.values():  # apart along x or along y, by at least the gap
            free &= (xs + side + gap <= bx) | (bx + bw + gap <= xs) | (ys + side + gap <= by) | (by + bh + gap <= ys)
        candidates = np.flatnonzero(free)
        if candidates.size == 0:
            return None
        k = int(candidates[rng.randrange(candidates.size)])
        boxes[i] = [int(xs[k]), int(ys[k]), side, side]
    return [boxes[i] for i in range(len(sides))]


def sample_scene(rng: random.Random, image_size: int) -> Scene:
    """A random scene: background ``{"kind", "color"}`` and 1-3 objects ``{"shape", "color", "size", "box"}``,
    every object colour contrasting with the background. Objects that do not fit after ``PLACEMENT_TRIES``
    placements are re-sampled."""
    while True:
        n = _weighted_choice(rng, NUM_OBJECTS_WEIGHTS)
        attrs = _sample_attributes(rng, n)
        backgrounds = [b for b in BACKGROUNDS if all(a["color"] in ALLOWED_ON[b] for a in attrs)]
        if not backgrounds:
            continue
        sides = [max(3, round(SIZES[a["size"]] * image_size * rng.uniform(1 - SIZE_JITTER, 1 + SIZE_JITTER)))
                 for a in attrs]
        for _ in range(PLACEMENT_TRIES):
            boxes = _place(rng, sides, image_size)
            if boxes is not None:
                break
        else:
            continue
        background = {"kind": rng.choice(BACKGROUND_KINDS), "color": rng.choice(backgrounds)}
        objects = [dict(a, box=box) for a, box in zip(attrs, boxes)]
        return {"background": background, "objects": objects}


# ----------------------------------------------------------------------------------------------- rendering


def _unit_star(points: int = 5, inner: float = 0.5) -> List[Tuple[float, float]]:
    angles = [np.pi / points * k - np.pi / 2 for k in range(2 * points)]
    return [(float(np.cos(a)) * (1 if k % 2 == 0 else inner), float(np.sin(a)) * (1 if k % 2 == 0 else inner))
            for k, a in enumerate(angles)]


def _fit_unit(poly: Sequence[Tuple[float, float]]) -> List[Tuple[float, float]]:
    """Scale and shift a polygon so that its bounding box is exactly the unit square (boxes are then tight)."""
    xs, ys = [p[0] for p in poly], [p[1] for p in poly]
    return [((x - min(xs)) / (max(xs) - min(xs)), (y - min(ys)) / (max(ys) - min(ys))) for x, y in poly]


_A = 0.17  # half the width of the cross's arms
UNIT_POLYGONS: Dict[str, List[Tuple[float, float]]] = {
    "square": [(0, 0), (1, 0), (1, 1), (0, 1)],
    "triangle": [(0.5, 0), (1, 1), (0, 1)],
    "diamond": [(0.5, 0), (1, 0.5), (0.5, 1), (0, 0.5)],
    "cross": [(0.5 - _A, 0), (0.5 + _A, 0), (0.5 + _A, 0.5 - _A), (1, 0.5 - _A), (1, 0.5 + _A), (0.5 + _A, 0.5 + _A),
              (0.5 + _A, 1), (0.5 - _A, 1), (0.5 - _A, 0.5 + _A), (0, 0.5 + _A), (0, 0.5 - _A), (0.5 - _A, 0.5 - _A)],
    "star": _fit_unit(_unit_star()),
}


def _jitter(rgb: Sequence[int], rng: np.random.Generator, amount: int) -> Tuple[int, int, int]:
    return tuple(int(v) for v in np.clip(np.asarray(rgb) + rng.integers(-amount, amount + 1, 3), 0, 255))


def _background(bg: Dict[str, str], side: int, rng: np.random.Generator) -> np.ndarray:
    """An ``side x side x 3`` uint8 background: solid, a vertical/horizontal gradient, or a light noise texture."""
    base = np.asarray(_jitter(BACKGROUNDS[bg["color"]], rng, 8), dtype=np.float32)
    if bg["kind"] == "solid":
        img = np.broadcast_to(base, (side, side, 3))
    elif bg["kind"] == "gradient":
        delta = float(rng.uniform(15, 30)) * (1 if rng.random() < 0.5 else -1)
        ramp = np.linspace(-delta, delta, side, dtype=np.float32)
        ramp = ramp[:, None] if rng.random() < 0.5 else ramp[None, :]  # vertical or horizontal
        img = base + np.broadcast_to(ramp, (side, side))[..., None]
    else:  # low-frequency blotches plus fine grain
        coarse = rng.normal(0, 9, (6, 6)).astype(np.float32)
        blotches = np.asarray(Image.fromarray(coarse).resize((side, side), Image.BICUBIC))
        img = base + blotches[..., None] + 4 * rng.standard_normal((side, side, 1), dtype=np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def render_scene(scene: Scene, image_size: int, rng: np.random.Generator) -> Image.Image:
    """Draw a scene at ``SUPERSAMPLE`` x resolution and downsample it to ``image_size`` (LANCZOS)."""
    big = image_size * SUPERSAMPLE
    img = Image.fromarray(_background(scene["background"], big, rng))
    draw = ImageDraw.Draw(img)
    for obj in scene["objects"]:
        x, y, w, h = (v * SUPERSAMPLE for v in obj["box"])
        fill = _jitter(COLORS[obj["color"]], rng, 10)
        if obj["shape"] == "circle":
            draw.ellipse([x, y, x + w - 1, y + h - 1], fill=fill)
        else:
            draw.polygon([(x + u * (w - 1), y + v * (h - 1)) for u, v in UNIT_POLYGONS[obj["shape"]]], fill=fill)
    return img.resize((image_size, image_size), Image.LANCZOS)


# ----------------------------------------------------------------------------------------------- captions
#
# Every template returns a caption's text and its logical form (LF), the structure :mod:`dataset.caption_logic`
# documents and checks: {"objects": [descriptions], and only when they apply "exact": True, "definite": True,
# "background": colour, "relation": {"a": i, "b": j, "rel": r}, "order": "left_to_right", "count": {"n", "of"}}.
# A description is a dict of some of "size", "color", "shape".

Caption = Tuple[str, Dict[str, Any]]  # (text, logical form)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _plural(shape: str) -> str:
    return shape + ("es" if shape.endswith("s") else "s")


def _phrase(obj: Obj, with_size: bool, article: str = "a") -> str:
    """``a red circle`` / ``a large red circle`` (``article`` ``"a"`` picks a/an, ``"the"`` or ``""``)."""
    words = ([obj["size"]] if with_size else []) + [obj["color"], obj["shape"]]
    text = " ".join(words)
    if article == "a":
        return f"{_article(words[0])} {text}"
    return f"{article} {text}" if article else text


def _same(obj: Obj, ref: Obj, with_size: bool) -> bool:
    """Whether ``obj`` fits the description of ``ref`` (colour and shape, and size if ``with_size``)."""
    return all(obj[k] == ref[k] for k in (("size", "color", "shape") if with_size else ("color", "shape")))


def _desc(obj: Obj, with_size: bool) -> Dict[str, str]:
    """The description ``_phrase(obj, with_size)`` says."""
    return {k: obj[k] for k in (("size", "color", "shape") if with_size else ("color", "shape"))}


def _lf(objects: Sequence[Dict[str, str]], exact: bool = False, background: Optional[str] = None,
        rel: Optional[Tuple[int, int, str]] = None, order: Optional[str] = None, definite: bool = False
        ) -> Dict[str, Any]:
    """A logical form with only the keys that apply (the canonical form :func:`caption_logic.parse_caption`
    returns too)."""
    lf: Dict[str, Any] = {"objects": [dict(d) for d in objects]}
    if exact:
        lf["exact"] = True
    if definite:
        lf["definite"] = True
    if background is not None:
        lf["background"] = background
    if rel is not None:
        lf["relation"] = {"a": rel[0], "b": rel[1], "rel": rel[2]}
    if order is not None:
        lf["order"] = order
    return lf


def _listed(phrases: Sequence[str]) -> str:
    """``a`` / ``a and b`` / ``a b and c``."""
    return phrases[0] if len(phrases) == 1 else " ".join(phrases[:-1]) + " and " + phrases[-1]


def _counted(n: int) -> str:
    return f"{NUMBERS[n]} {'object' if n == 1 else 'objects'}"


def _left_to_right(objs: Sequence[Obj], image_size: int, with_size: bool) -> Optional[List[Obj]]:
    """The objects sorted by centre x when each is clearly left of the next and the reversed list says something
    else (so "from left to right ..." is informative); else ``None``."""
    by_x = sorted(objs, key=lambda o: o["box"][0] + o["box"][2] / 2)
    ordered = (len(objs) > 1 and all(relation(a["box"], b["box"], image_size) == "left" for a, b in zip(by_x, by_x[1:]))
               and not all(_same(a, b, with_size) for a, b in zip(by_x, by_x[::-1])))
    return by_x if ordered else None


def _cap_attribute(scene: Scene, rng: random.Random, image_size: int) -> Optional[Caption]:
    """One object's attributes ("a large red circle", "a small shape that is red"): true when some object fits."""
    o = rng.choice(scene["objects"])
    s, c, h = o["size"], o["color"], o["shape"]
    sized, plain = _desc(o, True), _desc(o, False)
    text, desc = rng.choice([
        (_phrase(o, True), sized), (_phrase(o, False), plain), (f"a {s} {h} that is {c}", sized),
        (f"a {s} shape that is {c}", {"size": s, "color": c}), (f"{_phrase(o, False)} that is {s}", sized),
        (f"there is {_phrase(o, True)}", sized), (f"an image of {_phrase(o, False)}", plain),
    ])
    return text, _lf([desc])


def _cap_background(scene: Scene, rng: random.Random, image_size: int) -> Optional[Caption]:
    """One object and the background ("a red circle on a gray background")."""
    o, b = rng.choice(scene["objects"]), scene["background"]["color"]
    with_size = rng.random() < 0.5
    np_ = _phrase(o, with_size)
    text = rng.choice([f"{np_} on a {b} background", f"a {b} background with {np_}"])
    return text, _lf([_desc(o, with_size)], background=b)


_REL_WORDS = {"left": ["to the left of", "left of"], "right": ["to the right of", "right of"],
              "above": ["above"], "below": ["below"]}


_OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}


def _informative_pair(objs: Sequence[Obj], rng: random.Random, image_size: int, with_size: Tuple[bool, bool],
                      tries: int = 8) -> Optional[Tuple[Obj, Obj, str]]:
    """Two objects ``a``, ``b`` in a clear relation such that no objects fitting their descriptions stand in the
    opposite relation (so the caption with the relation reversed is false); ``None`` if none was found."""
    pairs = [(a, b) for a in objs for b in objs if a is not b and relation(a["box"], b["box"], image_size)]
    for _ in range(tries if pairs else 0):
        a, b = rng.choice(pairs)
        rel = relation(a["box"], b["box"], image_size)
        fits_a = [o for o in objs if _same(o, a, with_size[0])]
        fits_b = [o for o in objs if _same(o, b, with_size[1])]
        if not any(x is not y and relation(x["box"], y["box"], image_size) == _OPPOSITE[rel]
                   for x in fits_a for y in fits_b):
            return a, b, rel
    return None


def _cap_relation(scene: Scene, rng: random.Random, image_size: int) -> Optional[Caption]:
    """"a blue square to the left of a yellow star" (some such pair exists) or "the blue square is left of the
    yellow star" (each description fits one object); the reversed caption is false."""
    objs = scene["objects"]
    sa, sb = rng.random() < 0.4, rng.random() < 0.25
    found = _informative_pair(objs, rng, image_size, (sa, sb))
    if found is None:
        return None
    a, b, rel = found
    words = rng.choice(_REL_WORDS[rel])
    unique = sum(_same(o, a, sa) for o in objs) == 1 and sum(_same(o, b, sb) for o in objs) == 1
    lf_args = dict(objects=[_desc(a, sa), _desc(b, sb)], rel=(0, 1, rel))
    if rng.random() < 0.3 and unique:
        return f"{_phrase(a, sa, 'the')} is {words} {_phrase(b, sb, 'the')}", _lf(**lf_args, definite=True)
    return f"{_phrase(a, sa)} {words} {_phrase(b, sb)}", _lf(**lf_args)


def _list_caption(scene: Scene, rng: random.Random, image_size: int) -> Caption:
    """All the objects, sized 70 % of the time: "two objects a red circle and a blue square", "a picture with ...",
    "a red circle and a blue square", "just a red circle", "from left to right ..."."""
    objs = list(scene["objects"])
    with_size = rng.random() < 0.7
    by_x = _left_to_right(objs, image_size, with_size)
    form = rng.choice(["count", "picture", "plain"] + (["left_to_right"] if by_x else []))
    if form == "left_to_right":
        objs = by_x
    else:
        rng.shuffle(objs)
    listed = _listed([_phrase(o, with_size) for o in objs])
    lf = _lf([_desc(o, with_size) for o in objs], exact=True,
             order="left_to_right" if form == "left_to_right" else None)
    n = len(objs)
    if form == "count":
        return f"{_counted(n)} {listed}", lf
    if form == "picture":
        return f"a picture with {listed}", lf
    if form == "left_to_right":
        return f"from left to right {listed}", lf
    return (listed if n > 1 else f"just {listed}"), lf


def _cap_list(scene: Scene, rng: random.Random, image_size: int) -> Optional[str]:
    """The text of :func:`_list_caption` (a complete object list without the background)."""
    return _list_caption(scene, rng, image_size)[0]


def _cap_scene(scene: Scene, rng: random.Random, image_size: int) -> Optional[Caption]:
    """The whole scene: every object with its size, and the background, the number of objects inside the list:
    "two objects a small red circle and a large blue star on a gray background", "a gray background with two
    objects ...", "from left to right ... on a gray background"."""
    objs, b = list(scene["objects"]), scene["background"]["color"]
    by_x = _left_to_right(objs, image_size, True)
    form = rng.choice(["count", "background_first"] + (["left_to_right"] if by_x else []))
    if form == "left_to_right":
        objs = by_x
    else:
        rng.shuffle(objs)
    listed = _listed([_phrase(o, True) for o in objs])
    lf = _lf([_desc(o, True) for o in objs], exact=True, background=b,
             order="left_to_right" if form == "left_to_right" else None)
    if form == "count":
        return f"{_counted(len(objs))} {listed} on a {b} background", lf
    if form == "background_first":
        return f"a {b} background with {_counted(len(objs))} {listed}", lf
    return f"from left to right {listed} on a {b} background", lf


def _cap_scene_relation(scene: Scene, rng: random.Random, image_size: int) -> Optional[Caption]:
    """Every object with its size, two of them in a relation, the background half of the time: "three objects a
    small red circle to the left of a large blue star and a small green square on a gray background". The caption
    with the relation reversed is false."""
    objs = scene["objects"]
    found = _informative_pair(objs, rng, image_size, (True, True))
    if found is None:
        return None
    a, b, rel = found
    rest = [o for o in objs if o is not a and o is not b]
    text = f"{_counted(len(objs))} {_phrase(a, True)} {rng.choice(_REL_WORDS[rel])} {_phrase(b, True)}"
    text += "".join(f" and {_phrase(o, True)}" for o in rest)
    background = scene["background"]["color"] if rng.random() < 0.5 else None
    if background:
        text += f" on a {background} background"
    return text, _lf([_desc(o, True) for o in [a, b] + rest], exact=True, background=background, rel=(0, 1, rel))


CaptionTemplate = Callable[[Scene, random.Random, int], Optional[Caption]]
# name: (template, weight when choosing a template for a caption). Most captions describe the whole scene (every
# object sized, the background; counts only inside such lists); a few name one object or a pair.
CAPTION_TEMPLATES: Dict[str, Tuple[CaptionTemplate, float]] = {
    "scene": (_cap_scene, 5.0), "scene_relation": (_cap_scene_relation, 2.5),
    "list": (_list_caption, 1.5), "relation": (_cap_relation, 0.5),
    "background": (_cap_background, 0.25), "attribute": (_cap_attribute, 0.25),
}


def _text_of(template: CaptionTemplate) -> Callable[[Scene, random.Random, int], Optional[str]]:
    def text(scene: Scene, rng: random.Random, image_size: int) -> Optional[str]:
        caption = template(scene, rng, image_size)
        return None if caption is None else caption[0]
    return text


# The same templates returning the text only (what the derived task sets draw true captions from).
TEMPLATES: Dict[str, Tuple[Callable[[Scene, random.Random, int], Optional[str]], float]] = {
    name: (_text_of(fn), weight) for name, (fn, weight) in CAPTION_TEMPLATES.items()}


def caption_scene(scene: Scene, rng: random.Random, image_size: int, k: int) -> List[Caption]:
    """``k`` distinct true captions with their logical forms, each from a template drawn by weight.

    If a scene admits fewer than ``k`` distinct captions (only for very large ``k``) the list is padded by
    repeating it."""
    weights = {n: w for n, (_, w) in CAPTION_TEMPLATES.items()}
    captions: List[Caption] = []
    for _ in range(50 * k):
        if len(captions) == k:
            break
        caption = CAPTION_TEMPLATES[_weighted_choice(rng, weights)][0](scene, rng, image_size)
        if caption and all(caption[0] != text for text, _ in captions):
            captions.append(caption)
    distinct = list(captions)  # never empty: the scene template always applies
    return captions + [distinct[i % len(distinct)] for i in range(k - len(captions))]


def make_captions(scene: Scene, rng: random.Random, image_size: int, k: int) -> List[str]:
    """The texts of :func:`caption_scene`."""
    return [text for text, _ in caption_scene(scene, rng, image_size, k)]


# ----------------------------------------------------------------------------------------------- tokenizer


# Words the derived sets (VQA questions and answers, NLVR2 / SNLI-VE statements, grounding phrases) are likely to
# use, so that they are whole tokens too; ids are stable because the vocabulary is sorted.
EXTRA_WORDS = ("what", "which", "where", "how", "many", "much", "color", "colour", "size", "kind", "number", "is",
               "are", "does", "do", "has", "have", "contain", "contains", "any", "all", "both", "each", "either",
               "neither", "no", "not", "yes", "true", "false", "in", "at", "least", "most", "more", "fewer", "than",
               "same", "different", "exactly", "as", "it", "its", "image", "images", "pictures", "scene", "left",
               "right", "top", "bottom", "middle", "center", "corner", "larger", "smaller", "bigger", "big",
               "zero", "four", "five", "six", "other", "another", "together", "or", "some", "none",
               "colored", "shaped", "next", "side", "near", "far", "between")


def lexicon() -> List[str]:
    """Every word the captions can use, plus :data:`EXTRA_WORDS` (all become whole tokens)."""
    words = set(SHAPES) | {_plural(s) for s in SHAPES} | set(COLORS) | set(SIZES) | set(BACKGROUNDS)
    words |= set(NUMBERS.values()) | {"a", "an", "the", "is", "are", "there", "that", "of", "on", "with", "and",
                                      "to", "left", "right", "above", "below", "background", "shape", "shapes",
                                      "object", "objects", "single", "only", "just", "picture", "image", "from"}
    return sorted(words | set(EXTRA_WORDS))


def train_tokenizer(captions: Iterable[str], out_dir: str, vocab_size: int = TOKENIZER_VOCAB_SIZE) -> int:
    """Train a lower-casing WordPiece tokenizer on ``captions`` (and :func:`lexicon`) and save it for
    ``transformers``; returns the vocabulary size.

    Specials are [PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4. The trainer breaks ties between equally frequent
    merges in hash-map order, which differs between processes, so only the tokens that do not depend on it are
    kept: every whole word of the training text (training must make each one a token), every letter and digit
    (also as ``##`` continuations) and ASCII punctuation. They are sorted, so the files are identical for
    identical captions.
    """
    from tokenizers import BertWordPieceTokenizer
    from transformers import BertTokenizerFast

    alphabet = list("abcdefghijklmnopqrstuvwxyz0123456789")
    punctuation = list("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
    corpus = list(captions) + [" ".join(lexicon())] * 2
    words = {w for line in corpus for w in line.lower().split()}
    wp = BertWordPieceTokenizer(lowercase=True, strip_accents=True, clean_text=True)
    wp.train_from_iterator(corpus, vocab_size=vocab_size, min_frequency=1, special_tokens=SPECIAL_TOKENS,
                           initial_alphabet=alphabet + punctuation, limit_alphabet=len(alphabet) + len(punctuation),
                           show_progress=False)
    trained = set(wp.get_vocab())
    if not words <= trained:
        raise ValueError(f"a WordPiece vocabulary of {vocab_size} cannot hold every caption word whole "
                         f"(missing: {sorted(words - trained)[:10]})")
    chars = set(alphabet) | {"##" + c for c in alphabet} | set(punctuation)
    learned = sorted((t for t in trained if t in words or t in chars), key=lambda t: (t.startswith("##"), t))
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + [t for t in learned if t not in SPECIAL_TOKENS])}
    wp = BertWordPieceTokenizer(vocab, lowercase=True, strip_accents=True, clean_text=True)
    tok = BertTokenizerFast(tokenizer_object=wp._tokenizer, unk_token="[UNK]", pad_token="[PAD]",
                            cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]", do_lower_case=True,
                            model_max_length=512)
    os.makedirs(out_dir, exist_ok=True)
    tok.save_pretrained(out_dir)
    _write_text(os.path.join(out_dir, "vocab.txt"), "".join(t + "\n" for t in vocab))  # in id order, always
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config.update(tokenizer_class="BertTokenizer", do_lower_case=True, model_max_length=512)
    _write_json(config_path, config)
    special = {"unk_token": "[UNK]", "pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]",
               "mask_token": "[MASK]"}
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), special)
    return len(vocab)


# ----------------------------------------------------------------------------------------------- files


def _write_text(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)


def _json_lines(obj: Any, depth: int = 2) -> str:
    """JSON with one item of a list per line (each item compact) and, ``depth`` levels down, one key of a dict per
    line: readable record by record, and written by ``json``'s C encoder (``indent`` makes it use the pure-Python
    one, 4x slower on ``scenes.json``)."""
    if depth and isinstance(obj, list) and obj:
        return "[\n" + ",\n".join(map(_ENCODE, obj)) + "\n]"
    if depth and isinstance(obj, dict) and obj:
        return "{\n" + ",\n".join(f"{json.dumps(str(k))}: {_json_lines(v, depth - 1)}"
                                   for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))) + "\n}"
    return _ENCODE(obj)


_ENCODE = json.JSONEncoder(sort_keys=True, ensure_ascii=True).encode


def _write_json(path: str, obj: Any) -> None:
    _write_text(path, _json_lines(obj) + "\n")


def image_path(split: str, index: int) -> str:
    return f"images/{split}_{index:05d}.jpg"


def _split_seed(seed: int, split: str, index: int) -> List[int]:
    return [seed, SPLITS.index(split), index]


def _make_image(out_dir: str, split: str, index: int, seed: int, image_size: int, k: int) -> Tuple[Scene, List[str]]:
    """Sample, render and save one image; returns its scene record (with its captions' logical forms) and its
    ``k`` captions."""
    rng = random.Random("synthetic/{}/{}/{}".format(*_split_seed(seed, split, index)))
    scene = sample_scene(rng, image_size)
    captions = caption_scene(scene, rng, image_size, k)
    image = render_scene(scene, image_size, np.random.default_rng(_split_seed(seed, split, index)))
    rel = image_path(split, index)
    image.save(os.path.join(out_dir, rel), format="JPEG", quality=JPEG_QUALITY, subsampling=0)
    record = {"image": rel, "split": split, "width": image_size, "height": image_size, **scene,
              "captions": [{"text": text, "lf": lf} for text, lf in captions]}
    return record, [text for text, _ in captions]


def _expected_files(out_dir: str, counts: Dict[str, int]) -> List[str]:
    files = ["pretrain.json", "retrieval_train.json", "retrieval_val.json", "retrieval_test.json", "scenes.json",
             "tokenizer/vocab.txt", "tokenizer/tokenizer.json", "tokenizer/tokenizer_config.json",
             "tokenizer/special_tokens_map.json"]
    files += [image_path(s, i) for s in SPLITS for i in range(counts[s])]
    return [os.path.join(out_dir, f) for f in files]


def _outputs(out_dir: str) -> Dict[str, str]:
    names = {"pretrain": "pretrain.json", "retrieval_train": "retrieval_train.json",
             "retrieval_val": "retrieval_val.json", "retrieval_test": "retrieval_test.json",
             "scenes": "scenes.json", "tokenizer": "tokenizer", "images": "images", "manifest": "manifest.json"}
    return {k: os.path.join(out_dir, v) for k, v in names.items()}


def _reusable(out_dir: str, args: Dict[str, int], counts: Dict[str, int]) -> bool:
    try:
        with open(os.path.join(out_dir, "manifest.json")) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return False
    return (manifest.get("version") == VERSION and manifest.get("args") == args
            and all(os.path.isfile(p) for p in _expected_files(out_dir, counts)))


def generate(out_dir: str, *, seed: int = 0, num_train: int = 8000, num_val: int = 200, num_test: int = 200,
             image_size: int = 96, captions_per_image: int = 5, workers: Optional[int] = None) -> Dict[str, str]:
    """Write the synthetic world into ``out_dir`` (see the module docstring) and return the paths written.

    The images are drawn by ``workers`` processes (default: the CPU count, at most 8; 1 = in this process; worlds
    under :data:`PARALLEL_MIN_IMAGES` images always in this process): the files do not depend on it.

    A directory whose ``manifest.json`` records the same arguments, with all files present, is reused without
    regenerating; otherwise everything is rewritten (the manifest last) and stale images are removed.
    """
    if seed < 0 or min(num_train, num_val, num_test) < 0 or num_train < 1 or captions_per_image < 1:
        raise ValueError("seed and counts must be non-negative, with num_train and captions_per_image >= 1")
    if image_size < 16:
        raise ValueError(f"image_size must be at least 16, got {image_size}")
    args = {"seed": seed, "num_train": num_train, "num_val": num_val, "num_test": num_test,
            "image_size": image_size, "captions_per_image": captions_per_image}
    counts = {"train": num_train, "val": num_val, "test": num_test}
    paths = _outputs(out_dir)
    if _reusable(out_dir, args, counts):
        print(f"synthetic world: reusing {out_dir} (manifest.json records the same arguments)")
        return paths

    if os.path.exists(paths["manifest"]):
        os.remove(paths["manifest"])  # invalid until everything below is written
    os.makedirs(paths["images"], exist_ok=True)
    stale = re.compile(r"^(train|val|test)_(\d{5})\.jpg$")
    for name in os.listdir(paths["images"]):  # images of an earlier, larger generation
        m = stale.match(name)
        if m and int(m.group(2)) >= counts[m.group(1)]:
            os.remove(os.path.join(paths["images"], name))

    jobs = [(out_dir, s, i, seed, image_size, captions_per_image) for s in SPLITS for i in range(counts[s])]
    workers = min(os.cpu_count() or 1, 8) if workers is None else workers
    if workers > 1 and len(jobs) >= PARALLEL_MIN_IMAGES:  # each image depends only on its own arguments
        with multiprocessing.Pool(workers) as pool:
            results = pool.starmap(_make_image, jobs, chunksize=64)
    else:
        results = [_make_image(*job) for job in jobs]

    by_split: Dict[str, List[Tuple[Scene, List[str]]]] = {s: [] for s in SPLITS}
    for record, captions in results:
        by_split[record["split"]].append((record, captions))
    train = by_split["train"]
    _write_json(paths["pretrain"], [{"image": r["image"], "caption": c} for r, c in train])
    _write_json(paths["retrieval_train"], [{"image": r["image"], "caption": cap, "image_id": i}
                                           for i, (r, c) in enumerate(train) for cap in c])
    for split in ("val", "test"):
        _write_json(paths[f"retrieval_{split}"], [{"image": r["image"], "caption": c} for r, c in by_split[split]])
    vocabulary = {"shapes": list(SHAPES), "colors": list(COLORS), "sizes": list(SIZES),
                  "backgrounds": list(BACKGROUNDS), "background_kinds": list(BACKGROUND_KINDS)}
    _write_json(paths["scenes"], {"images": [r for r, _ in results], "vocabulary": vocabulary})
    vocab_size = train_tokenizer((cap for _, caps in results for cap in caps), paths["tokenizer"])
    _write_json(paths["manifest"], {"version": VERSION, "args": args,
                                    "counts": {**counts, "images": len(results),
                                               "captions": sum(len(c) for _, c in results),
                                               "tokenizer_vocab_size": vocab_size}})
    return paths


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description="Generate the synthetic image-caption world (deterministic).")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-train", type=int, default=8000)
    p.add_argument("--num-val", type=int, default=200)
    p.add_argument("--num-test", type=int, default=200)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--captions-per-image", type=int, default=5)
    p.add_argument("--workers", type=int, default=None, help="processes drawing images (default: CPU count, max 8)")
    a = p.parse_args(argv)
    start = time.time()
    paths = generate(a.out, seed=a.seed, num_train=a.num_train, num_val=a.num_val, num_test=a.num_test,
                     image_size=a.image_size, captions_per_image=a.captions_per_image, workers=a.workers)
    with open(paths["manifest"]) as f:
        counts = json.load(f)["counts"]
    print(f"synthetic world in {a.out}: {counts['train']}/{counts['val']}/{counts['test']} train/val/test images, "
          f"{counts['captions']} captions, tokenizer vocabulary {counts['tokenizer_vocab_size']} "
          f"({time.time() - start:.1f} s)")


if __name__ == "__main__":
    main()
