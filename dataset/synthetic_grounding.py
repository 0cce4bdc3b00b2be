"""A weakly-supervised grounding set (RefCOCO+ layout) derived from a synthetic world's ``scenes.json``.

The files use the ORIGINAL formats read by ``Grounding.py`` (see :mod:`dataset.grounding`), so grounding runs on
the synthetic world without downloads:

    python -m dataset.synthetic_grounding --world DIR [--out OUT] [--seed 0] [--sentences-per-ref 2]
                                          [--distractors 3]

writes into ``OUT`` (default ``DIR/grounding``):

* ``refcoco+_train.json``, ``refcoco+_val.json``, ``refcoco+_test.json``: ``[{"image": "images/val_00003.jpg",
  "text", "ref_id"}]``, one record per expression; image paths are relative to the world ``DIR``, as in its
  ``retrieval_*.json`` (configs set ``image_root: DIR``); the test file holds the testA and testB refs;
* ``refcoco+/refs(unc).p``: a protocol-2 pickle of plain containers (read it with
  :func:`dataset.grounding.safe_load_pickle`): a list of refs ``{"ref_id", "ann_id", "image_id", "split",
  "category_id", "file_name", "sent_ids", "sentences": [{"sent_id", "sent", "raw", "tokens"}]}``;
* ``refcoco+/instances.json``: COCO ``{"images": [{"id", "file_name", "height", "width"}], "annotations": [{"id",
  "image_id", "category_id", "bbox": [x, y, w, h], "area", "iscrowd": 0}], "categories": [{"id", "name",
  "supercategory": "shape"}]}`` with every object of every used image (referent or not); categories are shapes;
* ``refcoco+/dets.json``: proposals ``{str(image_id): [[x, y, w, h], ...]}``: every object's box plus
  ``distractors`` boxes, in a seeded random order.

So a config sets ``refcoco_data: OUT``, ``det_file: OUT/refcoco+/dets.json``, ``image_root: DIR``.

Rules:

* Images: the scenes with at least two objects; world split train -> ``train``, val -> ``val``, test ->
  ``testA`` or ``testB``. RefCOCO's testA holds images with several people and testB images with several other
  objects: the split is by image and by the kind of distractors. Here an image goes to **testA when two of its
  objects have the same shape** (a distractor of the referent's category: the expression must use colour, size or
  position) and to testB when all its shapes differ.
* Boxes: an object's ``box`` ``[x, y, w, h]`` in ``scenes.json`` is its true pixel box in the saved image: the
  renderer draws every shape so that its outline touches all four sides of the box (pixels ``x .. x + w - 1``,
  ``y .. y + h - 1``). Image ids are ``(split index + 1) * 10**6 + image index``, annotation ids ``10 * image_id +
  object index``, ref ids ``(split index + 1) * 10**7`` plus a counter in the split and sentence ids ``10 * ref_id
  + k``: all stable (val/test do not depend on the number of train images) and below ``2**31``.
* Expressions (one ref per object that has one): a description fits an object when every attribute it names
  (size, colour, shape; "shape"/"object" when the shape is not named) equals the object's. Attribute expressions
  are *minimal* unique descriptions ("the small red circle", "the blue star", "the large shape": it fits exactly
  one object and no description naming a subset of its attributes does). Relational expressions "the A REL the
  B" ("the square left of the blue star") name a landmark B by one of its minimal unique descriptions and a
  relation REL from :func:`dataset.synthetic.relation` (``left`` / ``right`` / ``above`` / ``below`` by box
  centres, clear relations only); they are emitted only if exactly one object other than B fits A and stands in
  REL to B, and A names a minimal set of attributes for that. Each ref gets up to ``sentences_per_ref`` distinct
  expressions, attribute and relational ones taking turns. Every word is in :func:`dataset.synthetic.lexicon` and
  in the world's tokenizer vocabulary, so each is one whole token.
* Proposals: the object boxes plus ``distractors`` boxes: mostly shifted and rescaled copies of object boxes, some
  random boxes, inside the image, each with IoU below 0.5 to every object box (both the continuous IoU and the
  original evaluation's pixel-inclusive one) and below 0.8 to the other proposals. Exactly one proposal is then
  correct for every ref, and chance accuracy is ``1 / proposals`` of its image.

Image ``i`` of a split gets its expressions and proposals from ``random.Random`` seeded with ``(seed, split, i)``,
so the same world and arguments give byte-identical files.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import random
import time
from itertools import combinations
from typing import Any, Dict, List, Optional, Sequence, Tuple

from PIL import Image

from dataset.synthetic import _REL_WORDS, SHAPES, SPLITS, _write_json, lexicon, relation
from dataset.synthetic_tasks import load_scenes

DATASET = "refcoco+"
SPLIT_BY = "unc"
REF_SPLITS = ("train", "val", "testA", "testB")
FILE_SPLITS = {"train": "train", "val": "val", "test": "test"}  # world split -> refcoco+_{name}.json
DEFAULT_SENTENCES_PER_REF = 2
DEFAULT_DISTRACTORS = 3
IMAGE_ID_SPLIT = 10 ** 6  # image ids: (split + 1) * 10**6 + image index
REF_ID_SPLIT = 10 ** 7  # ref ids: (split + 1) * 10**7 + counter
MAX_OBJECTS = 10  # annotation ids: 10 * image_id + object index
MAX_SENTENCES = 10  # sentence ids: 10 * ref_id + k
ATTRIBUTES = ("size", "color", "shape")  # word order in a description
DISTRACTOR_MAX_IOU = 0.5  # with every object box: exactly one correct proposal per ref
PROPOSAL_MAX_IOU = 0.8  # between proposals: no near-duplicates

Scene = Dict[str, Any]
Obj = Dict[str, Any]
Desc = Dict[str, str]  # a subset of {"size", "color", "shape"} with values
Box = List[int]

# Attribute subsets of a description, smallest first; () is "the shape" / "the object".
KEY_SETS: Tuple[Tuple[str, ...], ...] = tuple(c for n in range(len(ATTRIBUTES) + 1)
                                              for c in combinations(ATTRIBUTES, n))


# ----------------------------------------------------------------------------------------------- expressions


def _fits(obj: Obj, desc: Desc) -> bool:
    return all(obj[k] == v for k, v in desc.items())


def _desc(obj: Obj, keys: Sequence[str]) -> Desc:
    return {k: obj[k] for k in keys}


def _minimal(ok: Dict[Tuple[str, ...], bool]) -> List[Tuple[str, ...]]:
    """The key sets for which ``ok`` holds while it holds for none of their proper subsets."""
    return [keys for keys, good in ok.items()
            if good and not any(ok[sub] for sub in ok if sub != keys and set(sub) <= set(keys))]


def minimal_descriptions(obj: Obj, objs: Sequence[Obj]) -> List[Desc]:
    """The minimal descriptions fitting ``obj`` alone among ``objs`` (at least one attribute)."""
    ok = {keys: sum(_fits(o, _desc(obj, keys)) for o in objs) == 1 for keys in KEY_SETS if keys}
    return [_desc(obj, keys) for keys in _minimal(ok)]


def noun_phrase(desc: Desc, rng: random.Random) -> str:
    """``the small red circle`` / ``the red shape`` / ``the object`` (``shape`` or ``object`` at random when the
    shape is not named)."""
    head = desc["shape"] if "shape" in desc else rng.choice(("shape", "object"))
    return " ".join(["the"] + [desc[k] for k in ("size", "color") if k in desc] + [head])


def attribute_expressions(obj: Obj, objs: Sequence[Obj], rng: random.Random) -> List[str]:
    """Minimal unique attribute descriptions of ``obj``: "the blue star", "the large square"."""
    return [noun_phrase(d, rng) for d in minimal_descriptions(obj, objs)]


def relational_expressions(obj: Obj, objs: Sequence[Obj], image_size: int, rng: random.Random) -> List[str]:
    """"the square left of the blue star": true of ``obj`` and of no other object (see the module docstring)."""
    out = []
    for landmark in objs:
        rel = relation(obj["box"], landmark["box"], image_size) if landmark is not obj else None
        if rel is None:
            continue
        landmark_descs = minimal_descriptions(landmark, objs)
        if not landmark_descs:
            continue
        related = [o for o in objs if o is not landmark and relation(o["box"], landmark["box"], image_size) == rel]
        ok = {}
        for keys in KEY_SETS:
            hits = [o for o in related if _fits(o, _desc(obj, keys))]
            ok[keys] = len(hits) == 1 and hits[0] is obj
        for keys in _minimal(ok):
            where = rng.choice(_REL_WORDS[rel])
            for d in landmark_descs:
                out.append(f"{noun_phrase(_desc(obj, keys), rng)} {where} {noun_phrase(d, rng)}")
    return out


def referring_expressions(obj: Obj, objs: Sequence[Obj], image_size: int, rng: random.Random, k: int) -> List[str]:
    """Up to ``k`` distinct expressions designating ``obj`` alone, attribute and relational ones taking turns
    (from a random start); empty if ``obj`` cannot be singled out."""
    pools = [attribute_expressions(obj, objs, rng), relational_expressions(obj, objs, image_size, rng)]
    for pool in pools:
        rng.shuffle(pool)
    turn, out = rng.randrange(2), []
    while len(out) < k and any(pools):
        pool = pools[turn] if pools[turn] else pools[1 - turn]
        text = pool.pop()
        if text not in out:
            out.append(text)
        turn = 1 - turn
    return out


def split_of_test_image(scene: Scene) -> str:
    """``'testA'`` when two objects of the scene share a shape, else ``'testB'`` (module docstring)."""
    shapes = [o["shape"] for o in scene["objects"]]
    return "testA" if len(set(shapes)) < len(shapes) else "testB"


# ----------------------------------------------------------------------------------------------- proposals


def box_iou(a: Sequence[float], b: Sequence[float], inclusive: bool = False) -> float:
    """IoU of two ``[x, y, w, h]`` boxes; ``inclusive=True`` is the original evaluation's ``computeIoU`` (pixel
    boxes ``x .. x + w - 1``, an overlap of one pixel row or column counting as none)."""
    one = 1 if inclusive else 0
    x1, y1 = max(a[0], b[0]), max(a[1], b[1])
    x2, y2 = min(a[0] + a[2] - one, b[0] + b[2] - one), min(a[1] + a[3] - one, b[1] + b[3] - one)
    inter = (x2 - x1 + one) * (y2 - y1 + one) if x1 < x2 and y1 < y2 else 0
    return inter / (a[2] * a[3] + b[2] * b[3] - inter)


def _clip_box(cx: float, cy: float, w: float, h: float, width: int, height: int) -> Optional[Box]:
    x0, y0 = max(0, round(cx - w / 2)), max(0, round(cy - h / 2))
    x1, y1 = min(width, round(cx + w / 2)), min(height, round(cy + h / 2))
    return [x0, y0, x1 - x0, y1 - y0] if x1 - x0 >= 2 and y1 - y0 >= 2 else None


def proposals(scene: Scene, rng: random.Random, distractors: int) -> List[Box]:
    """Every object's box plus up to ``distractors`` distractor boxes (module docstring), shuffled."""
    width, height = scene["width"], scene["height"]
    gts = [list(o["box"]) for o in scene["objects"]]
    boxes = [list(b) for b in gts]
    for _ in range(distractors):
        for _ in range(100):
            if rng.random() < 0.7:  # a shifted, rescaled copy of an object box
                x, y, w, h = rng.choice(gts)
                cx, cy = x + w / 2 + rng.uniform(-0.9, 0.9) * w, y + h / 2 + rng.uniform(-0.9, 0.9) * h
                box = _clip_box(cx, cy, w * rng.uniform(0.5, 1.8), h * rng.uniform(0.5, 1.8), width, height)
            else:  # anywhere
                w, h = (rng.uniform(0.1, 0.45) * width for _ in range(2))
                box = _clip_box(rng.uniform(0, width), rng.uniform(0, height), w, h, width, height)
            if (box is not None
                    and all(max(box_iou(box, g), box_iou(box, g, True)) < DISTRACTOR_MAX_IOU for g in gts)
                    and all(box_iou(box, p) < PROPOSAL_MAX_IOU for p in boxes)):
                boxes.append(box)
                break
    rng.shuffle(boxes)
    return boxes


# ----------------------------------------------------------------------------------------------- files


def grounding_files(out_dir: str) -> Dict[str, str]:
    """The paths :func:`generate_grounding` writes, by name."""
    paths = {s: os.path.join(out_dir, f"{DATASET}_{name}.json") for s, name in FILE_SPLITS.items()}
    folder = os.path.join(out_dir, DATASET)
    paths.update(refs=os.path.join(folder, f"refs({SPLIT_BY}).p"), instances=os.path.join(folder, "instances.json"),
                 dets=os.path.join(folder, "dets.json"))
    return paths


def _rng(seed: int, split: str, index: int) -> random.Random:
    return random.Random(f"synthetic_grounding/{seed}/{SPLITS.index(split)}/{index}")


def _vocabulary(world_dir: str) -> frozenset:
    """The words expressions may use: :func:`lexicon`, and the world tokenizer's whole-word tokens when present."""
    words = set(lexicon())
    vocab_file = os.path.join(world_dir, "tokenizer", "vocab.txt")
    if os.path.isfile(vocab_file):
        with open(vocab_file, encoding="utf-8") as f:
            words &= {line.rstrip("\n") for line in f}
    return frozenset(words)


def _check_image(world_dir: str, scene: Scene) -> None:
    path = os.path.join(world_dir, scene["image"])
    try:
        with Image.open(path) as im:  # reads the header only
            size = im.size
    except OSError as e:
        raise FileNotFoundError(f"{path}: the world's image cannot be opened ({e}); regenerate the world") from e
    if size != (scene["width"], scene["height"]):
        raise ValueError(f"{path} is {size[0]}x{size[1]} but scenes.json says {scene['width']}x{scene['height']}")


def generate_grounding(world_dir: str, out_dir: Optional[str] = None, seed: int = 0,
                       sentences_per_ref: int = DEFAULT_SENTENCES_PER_REF,
                       distractors: int = DEFAULT_DISTRACTORS) -> Dict[str, str]:
    """Write the grounding files (module docstring) for the world in ``world_dir`` into ``out_dir`` (default
    ``world_dir/grounding``); returns their paths."""
    if not 1 <= sentences_per_ref <= MAX_SENTENCES:
        raise ValueError(f"sentences_per_ref must be in 1..{MAX_SENTENCES}, got {sentences_per_ref}")
    if distractors < 0:
        raise ValueError(f"distractors must be non-negative, got {distractors}")
    out_dir = out_dir or os.path.join(world_dir, "grounding")
    scenes = load_scenes(world_dir)
    if max(len(v) for v in scenes.values()) >= IMAGE_ID_SPLIT:
        raise ValueError(f"at most {IMAGE_ID_SPLIT - 1} images per split (image ids)")
    vocabulary = _vocabulary(world_dir)
    categories = {shape: i + 1 for i, shape in enumerate(SHAPES)}
    records: Dict[str, List[Dict[str, Any]]] = {s: [] for s in FILE_SPLITS}
    refs: List[Dict[str, Any]] = []
    images: List[Dict[str, Any]] = []
    annotations: List[Dict[str, Any]] = []
    dets: Dict[str, List[Box]] = {}
    for split in SPLITS:
        next_ref = (SPLITS.index(split) + 1) * REF_ID_SPLIT
        for i, scene in enumerate(scenes[split]):
            objs = scene["objects"]
            if len(objs) < 2:
                continue
            if len(objs) > MAX_OBJECTS:
                raise ValueError(f"{scene['image']}: more than {MAX_OBJECTS} objects (annotation ids)")
            rng = _rng(seed, split, i)
            image_id = (SPLITS.index(split) + 1) * IMAGE_ID_SPLIT + i
            file_name = os.path.basename(scene["image"])
            ref_split = split_of_test_image(scene) if split == "test" else split
            new_refs = []
            for j, obj in enumerate(objs):
                texts = referring_expressions(obj, objs, scene["width"], rng, sentences_per_ref)
                if not texts:
                    continue
                for text in texts:
                    unknown = [w for w in text.split(" ") if w not in vocabulary]
                    if unknown:
                        raise ValueError(f"{scene['image']}: {text!r} uses words outside the world's vocabulary: "
                                         f"{unknown}")
                ref_id = next_ref
                next_ref += 1
                sentences = [{"sent_id": ref_id * MAX_SENTENCES + k, "sent": t, "raw": t, "tokens": t.split(" ")}
                             for k, t in enumerate(texts)]
                new_refs.append({"ref_id": ref_id, "ann_id": image_id * MAX_OBJECTS + j, "image_id": image_id,
                                 "split": ref_split, "category_id": categories[obj["shape"]],
                                 "file_name": file_name, "sent_ids": [s["sent_id"] for s in sentences],
                                 "sentences": sentences})
            if not new_refs:  # no object can be singled out (e.g. two identical objects)
                continue
            _check_image(world_dir, scene)
            refs += new_refs
            records[split] += [{"image": scene["image"], "text": s["sent"], "ref_id": r["ref_id"]}
                               for r in new_refs for s in r["sentences"]]
            images.append({"id": image_id, "file_name": file_name, "height": scene["height"],
                           "width": scene["width"]})
            annotations += [{"id": image_id * MAX_OBJECTS + j, "image_id": image_id, "bbox": list(o["box"]),
                             "area": o["box"][2] * o["box"][3], "category_id": categories[o["shape"]],
                             "iscrowd": 0} for j, o in enumerate(objs)]
            dets[str(image_id)] = proposals(scene, rng, distractors)

    paths = grounding_files(out_dir)
    os.makedirs(os.path.dirname(paths["refs"]), exist_ok=True)
    for split, recs in records.items():
        _write_json(paths[split], recs)
    with open(paths["refs"], "wb") as f:
        pickle.dump(refs, f, protocol=2)  # plain containers only, like REFER's Python 2 file
    _write_json(paths["instances"], {"images": images, "annotations": annotations,
                                     "categories": [{"id": c, "name": s, "supercategory": "shape"}
                                                    for s, c in categories.items()]})
    _write_json(paths["dets"], dets)
    return paths


def summary(out_dir: str) -> str:
    """Refs and expressions per split, proposals per image and chance accuracy (mean ``1 / proposals`` over the
    evaluation expressions)."""
    from dataset.grounding import Refer, load_dets

    paths = grounding_files(out_dir)
    refer = Refer(out_dir, DATASET, SPLIT_BY)
    dets = load_dets(paths["dets"])
    expressions = {s: 0 for s in REF_SPLITS}
    chance = {s: 0.0 for s in REF_SPLITS}
    for name in FILE_SPLITS:
        with open(paths[name]) as f:
            for rec in json.load(f):
                split = refer.split(rec["ref_id"])
                expressions[split] += 1
                chance[split] += 1.0 / len(dets[str(refer.image_id(rec["ref_id"]))])
    refs = {s: len(refer.ref_ids(s)) for s in REF_SPLITS}
    per_image = sum(len(v) for v in dets.values()) / max(1, len(dets))
    evals = ("val", "testA", "testB")
    overall = sum(chance[s] for s in evals) / max(1, sum(expressions[s] for s in evals))
    by_split = ", ".join(f"{s} {chance[s] / max(1, expressions[s]):.3f}" for s in evals)
    return (f"refs {' / '.join(f'{s} {refs[s]}' for s in REF_SPLITS)}; expressions "
            f"{' / '.join(f'{s} {expressions[s]}' for s in REF_SPLITS)}; {len(dets)} images, "
            f"{per_image:.2f} proposals per image; chance accuracy {overall:.3f} ({by_split})")


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description="Derive a RefCOCO+-format grounding set from a synthetic world.")
    p.add_argument("--world", required=True, help="a directory written by python -m dataset.synthetic")
    p.add_argument("--out", default=None, help="output directory (default: WORLD/grounding)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sentences-per-ref", type=int, default=DEFAULT_SENTENCES_PER_REF)
    p.add_argument("--distractors", type=int, default=DEFAULT_DISTRACTORS, help="distractor proposals per image")
    a = p.parse_args(argv)
    start = time.time()
    paths = generate_grounding(a.world, a.out, seed=a.seed, sentences_per_ref=a.sentences_per_ref,
                               distractors=a.distractors)
    out = os.path.dirname(paths["train"])
    print(f"synthetic grounding in {out} ({time.time() - start:.1f} s): {summary(out)}")


if __name__ == "__main__":
    main()
