"""What a synthetic-world caption asserts, whether it is true of a scene, and the retrieval scores that are achievable.

A caption of :mod:`dataset.synthetic` has a *logical form* (LF), a small JSON structure stored with it in
``scenes.json`` (``images[i]["captions"] = [{"text", "lf"}]``, world version >= 2) and recovered from the text by
:func:`parse_caption` (which also reads the captions of version-1 worlds)::

    {"objects": [{"size": "small", "color": "red", "shape": "circle"}, {"color": "blue"}],   # always present
     "exact": True,                 # the list is complete: the scene has exactly these objects, one each
     "definite": True,              # "the ...": every description fits exactly one object of the scene
     "background": "gray",          # the background colour
     "relation": {"a": 0, "b": 1, "rel": "left"},   # the object taken for objects[a] is REL of the one for b
     "order": "left_to_right",      # each listed object is left of the next one
     "count": {"n": 2, "of": {"color": "red"}}}     # exactly n objects fit the description "of"

Only ``"objects"`` is always present; the other keys appear only when the caption says so (this is the canonical
form: the parser and the generator write the same dict). A description names some of ``size``, ``color`` and
``shape``; an object *fits* it when those attributes are equal (``{}`` fits any object). :func:`holds` is true when
there is an assignment of distinct scene objects to the listed descriptions (a one-to-one one onto all objects
when ``exact``) such that each object fits its description and the relation and order hold for the assigned
objects (:func:`dataset.synthetic.relation`, box centres), and the background, count and definiteness conditions
hold. So "a red circle to the left of a blue star" is true when *some* red circle is left of *some* blue star.

Retrieval ceilings. The best a model can know about a pair is whether the caption is true of the image; if caption
``t`` is true of ``c_t`` images, each of them is its ground-truth image with probability ``1 / c_t`` (the
:func:`posterior`). A *perfect model* scores pairs by that posterior and, where scores tie, ranks in uniformly random
order; :func:`ceiling_recall` gives its *expected* R@K (not the worst case over tie orders):

* text-to-image: the ``c`` consistent images come first, tied, so a caption's hit@K is ``min(1, K / c)``;
* image-to-text: the image's consistent captions come first, those true of fewer images first (a caption true of
  this image only is surely its own); within a tie group of ``m`` captions holding ``g`` of its own, the chance that
  the top ``K'`` places left for the group hold one is ``1 - C(m - g, K') / C(m, K')``. Ranking all consistent
  captions alike instead would give a meaningless ceiling (~15 for R@1 on a version-1 world, whose generic captions
  such as "three shapes" are true of dozens of images).

A ground truth that is false (never for generated captions) ranks after every consistent candidate.
:func:`consistent_at_1` is the share of captions whose top-ranked image makes the caption true: what retrieval cannot
tell apart does not count against it. The keys follow :func:`engine.retrieval.recall_metrics`: ``img_*`` is
text-to-image, ``txt_*`` image-to-text, percentages.

    python -m dataset.caption_logic --world DIR [--split test]

prints the ceilings of a world's split and how many images its captions fit.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
from math import comb
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from dataset.synthetic import BACKGROUNDS, COLORS, SHAPES, SIZES, relation

LF = Dict[str, Any]
Desc = Dict[str, str]

_NUMBERS = {"one": 1, "two": 2, "three": 3}


# ----------------------------------------------------------------------------------------------- the checker


def _fits(obj: Mapping[str, Any], desc: Mapping[str, str]) -> bool:
    return all(obj[k] == v for k, v in desc.items())


def holds(lf: Mapping[str, Any], scene: Mapping[str, Any]) -> bool:
    """Whether the caption with logical form ``lf`` is true of ``scene`` (a ``scenes.json`` image record: its
    ``width``, ``background`` and ``objects`` are used)."""
    objs, descs = scene["objects"], lf["objects"]
    if "background" in lf and scene["background"]["color"] != lf["background"]:
        return False
    if "count" in lf and sum(_fits(o, lf["count"]["of"]) for o in objs) != lf["count"]["n"]:
        return False
    if lf.get("exact") and len(descs) != len(objs):
        return False
    if lf.get("definite") and any(sum(_fits(o, d) for o in objs) != 1 for d in descs):
        return False
    side = scene["width"]
    rel = lf.get("relation")
    for chosen in itertools.permutations(objs, len(descs)):  # distinct objects for the listed descriptions
        if not all(_fits(o, d) for o, d in zip(chosen, descs)):
            continue
        if rel and relation(chosen[rel["a"]]["box"], chosen[rel["b"]]["box"], side) != rel["rel"]:
            continue
        if lf.get("order") == "left_to_right" and any(relation(a["box"], b["box"], side) != "left"
                                                      for a, b in zip(chosen, chosen[1:])):
            continue
        return True
    return False


# ----------------------------------------------------------------------------------------------- the parser

_ALT = lambda words: "|".join(sorted(words, key=len, reverse=True))  # noqa: E731
_SIZE, _COLOR, _SHAPE, _BG = _ALT(SIZES), _ALT(COLORS), _ALT(SHAPES), _ALT(BACKGROUNDS)
_PLURALS = {s + ("es" if s.endswith("s") else "s"): s for s in SHAPES}
_REL_WORDS = {"to the left of": "left", "left of": "left", "to the right of": "right", "right of": "right",
              "above": "above", "below": "below"}
_REL = _ALT(_REL_WORDS)
_NUM = _ALT(_NUMBERS)
_DESC = rf"(?:(?:{_SIZE}) )?(?:{_COLOR}) (?:{_SHAPE})"  # "small red circle", "blue star"
_NP, _THE = rf"(?:a|an) {_DESC}", rf"the {_DESC}"  # "a small red circle"; "the blue star"
_LIST = rf"(?:{_NP}(?: {_NP})* and {_NP}|{_NP})"  # "A", "A and B", "A B and C"
_ON_BG = rf"(?: on a (?P<bg>{_BG}) background)?"


def _np(phrase: str) -> Desc:
    """'a small red circle' -> {'size': 'small', 'color': 'red', 'shape': 'circle'}; checks the article."""
    article, *words = phrase.split(" ")
    if article in ("a", "an") and article != ("an" if words[0][0] in "aeiou" else "a"):
        raise ValueError(f"wrong article in {phrase!r}")
    return dict(zip(("size", "color", "shape") if len(words) == 3 else ("color", "shape"), words))


def _nps(text: str) -> List[Desc]:
    return [_np(p) for p in re.findall(_NP, text)]


def _canonical(objects: Sequence[Desc], exact: bool = False, definite: bool = False, background: Optional[str] = None,
               rel: Optional[Dict[str, Any]] = None, order: Optional[str] = None,
               count: Optional[Dict[str, Any]] = None) -> LF:
    lf: LF = {"objects": [dict(d) for d in objects]}
    for key, value in (("exact", exact or None), ("definite", definite or None), ("background", background),
                       ("relation", rel), ("order", order), ("count", count)):
        if value is not None:
            lf[key] = value
    return lf


def _counted_list(m: re.Match, **kw: Any) -> LF:
    objects = _nps(m.group("list"))
    if m.groupdict().get("num") and _NUMBERS[m.group("num")] != len(objects):
        raise ValueError(f"{m.string!r}: the count disagrees with the list")
    return _canonical(objects, exact=True, background=m.groupdict().get("bg"), **kw)


def _scene_relation(m: re.Match) -> LF:
    objects = [_np(m.group("a")), _np(m.group("b"))] + _nps(m.group("rest"))
    if _NUMBERS[m.group("num")] != len(objects):
        raise ValueError(f"{m.string!r}: the count disagrees with the list")
    return _canonical(objects, exact=True, background=m.group("bg"),
                      rel={"a": 0, "b": 1, "rel": _REL_WORDS[m.group("rel")]})


def _pair_relation(m: re.Match, definite: bool) -> LF:
    return _canonical([_np(m.group("a")), _np(m.group("b"))], definite=definite,
                      rel={"a": 0, "b": 1, "rel": _REL_WORDS[m.group("rel")]})


def _single(m: re.Match) -> LF:
    """"a single [size] colour shape|shape [on a B background]", "only one colour shape": the only object."""
    groups = m.groupdict()
    desc = {k: groups[k] for k in ("size", "color", "shape") if groups.get(k) and groups[k] != "shape"}
    return _canonical([desc], exact=True, background=groups.get("bg"))


def _group_count(m: re.Match) -> LF:
    of = {k: m.group(k) for k in ("size", "color") if m.group(k)}
    if m.group("noun") != "shapes":
        of["shape"] = _PLURALS[m.group("noun")]
    return _canonical([], count={"n": _NUMBERS[m.group("num")], "of": of})


# (pattern, LF builder), tried in order; every pattern must match the whole caption.
_FORMS = [
    # complete lists: counts, the background and a left-to-right order inside them
    (rf"(?P<num>{_NUM}) objects? (?P<list>{_LIST}){_ON_BG}", _counted_list),
    (rf"a (?P<bg>{_BG}) background with (?P<num>{_NUM}) objects? (?P<list>{_LIST})", _counted_list),
    (rf"from left to right (?P<list>{_LIST}){_ON_BG}", lambda m: _counted_list(m, order="left_to_right")),
    (rf"a picture with (?P<list>{_LIST}){_ON_BG}", _counted_list),
    (rf"just (?P<list>{_NP})", _counted_list),
    (rf"(?P<list>{_NP}(?: {_NP})* and {_NP})", _counted_list),
    (rf"(?P<num>{_NUM}) objects? (?P<a>{_NP}) (?P<rel>{_REL}) (?P<b>{_NP})(?P<rest>(?: and {_NP})*){_ON_BG}",
     _scene_relation),
    # relations between two described objects
    (rf"(?P<a>{_THE}) is (?P<rel>{_REL}) (?P<b>{_THE})", lambda m: _pair_relation(m, True)),
    (rf"(?P<a>{_NP}) (?P<rel>{_REL}) (?P<b>{_NP})", lambda m: _pair_relation(m, False)),
    # one object, the background
    (rf"(?:there is |an image of )?(?P<np>{_NP})", lambda m: _canonical([_np(m.group("np"))])),
    (rf"a (?P<size>{_SIZE}) (?P<shape>{_SHAPE}|shape) that is (?P<color>{_COLOR})",
     lambda m: _canonical([{k: m.group(k) for k in ("size", "color", "shape") if m.group(k) != "shape"}])),
    (rf"(?P<np>{_NP}) that is (?P<size>{_SIZE})",
     lambda m: _canonical([{**_np(m.group("np")), "size": m.group("size")}])),
    (rf"(?P<np>{_NP}) on a (?P<bg>{_BG}) background", lambda m: _canonical([_np(m.group("np"))],
                                                                            background=m.group("bg"))),
    (rf"a (?P<bg>{_BG}) background with (?P<np>{_NP})", lambda m: _canonical([_np(m.group("np"))],
                                                                              background=m.group("bg"))),
    # counts of version-1 worlds: "a single ...", "only one ...", "three shapes", "two red circles"
    (rf"a single (?:(?P<size>{_SIZE}) )?(?P<color>{_COLOR}) (?P<shape>{_SHAPE}|shape){_ON_BG}", _single),
    (rf"only one (?P<color>{_COLOR}) (?P<shape>{_SHAPE})", _single),
    (rf"(?:there are )?(?P<num>{_NUM}) (?:shapes?|objects?){_ON_BG}",
     lambda m: _canonical([{}] * _NUMBERS[m.group("num")], exact=True, background=m.group("bg"))),
    (rf"(?P<num>{_NUM}) (?:(?P<size>{_SIZE}) )?(?:(?P<color>{_COLOR}) )?(?P<noun>{_ALT(_PLURALS)}|shapes)",
     _group_count),
]
_COMPILED = [(re.compile(pattern), build) for pattern, build in _FORMS]


def parse_caption(text: str) -> LF:
    """The logical form of a caption of the synthetic world's grammar (version 1 or 2); ``ValueError`` for text
    outside it."""
    for pattern, build in _COMPILED:
        m = pattern.fullmatch(text)
        if m:
            return build(m)
    raise ValueError(f"not a caption of the synthetic world's grammar: {text!r}")


# ----------------------------------------------------------------------------------------------- retrieval


def consistency(lfs_or_captions: Sequence[Union[str, Mapping[str, Any]]],
                scenes: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """``[n_captions, n_images]`` bool: whether caption t is true of scene i (a string is parsed first)."""
    lfs = [parse_caption(c) if isinstance(c, str) else c for c in lfs_or_captions]
    return np.array([[holds(lf, scene) for scene in scenes] for lf in lfs], dtype=bool).reshape(len(lfs),
                                                                                                  len(scenes))


def _p_hit(m: int, g: int, k: int) -> float:
    """The probability that at least one of ``g`` marked items is among the first ``k`` of ``m`` items in a
    uniformly random order."""
    if g <= 0 or k <= 0:
        return 0.0
    if k >= m:
        return 1.0
    return 1.0 - comb(m - g, k) / comb(m, k)


def expected_hit(scores: np.ndarray, truth: np.ndarray, k: int) -> float:
    """The probability that a ranking by ``scores`` (descending, ties in uniformly random order) puts at least one
    candidate with ``truth`` among the first ``k``."""
    scores, truth = np.asarray(scores, dtype=float), np.asarray(truth, dtype=bool)
    for value in np.unique(scores)[::-1]:  # tie groups, best first
        group = scores == value
        m, g = int(group.sum()), int((group & truth).sum())
        if m >= k:
            return _p_hit(m, g, k)
        if g:
            return 1.0
        k -= m
    return 0.0


def posterior(consistent: np.ndarray) -> np.ndarray:
    """``[n_txt, n_img]``: the probability that image i is caption t's image when every image the caption is true of
    is equally likely (``consistent[t, i] / c_t``; 0 for a caption true of no image). The scores of a perfect model."""
    consistent = np.asarray(consistent, dtype=bool)
    c = consistent.sum(1, keepdims=True)
    return np.where(consistent, 1.0 / np.maximum(c, 1), 0.0)


def _as_lists(txt2img: Union[Mapping[int, int], Sequence[int]], img2txt: Union[Mapping[int, Sequence[int]],
              Sequence[Sequence[int]]], n_txt: int, n_img: int):
    t2i = [int(txt2img[t]) for t in range(n_txt)]
    i2t = [list(img2txt[i]) for i in range(n_img)]
    return t2i, i2t


def ceiling_recall(consistent: np.ndarray, txt2img: Union[Mapping[int, int], Sequence[int]],
                   img2txt: Union[Mapping[int, Sequence[int]], Sequence[Sequence[int]]],
                   ks: Sequence[int] = (1, 5, 10)) -> Dict[str, float]:
    """The expected R@K (percent) of a perfect model: one whose score of a pair is :func:`posterior`, ties broken
    in uniformly random order (the module docstring says why).

    Args:
        consistent: ``[n_txt, n_img]`` bool, from :func:`consistency`.
        txt2img, img2txt: the retrieval protocol's ground truth (as in ``RetrievalEvalDataset``).

    Returns:
        ``ceiling_img_r{k}`` (text-to-image: a caption's image is at a random place among its ``c`` consistent
        images, hit ``min(1, k / c)``) and ``ceiling_txt_r{k}`` (image-to-text: the image's consistent captions
        come first, those true of fewer images first; a hit is any of its own captions in the top k), their means
        ``ceiling_img_r_mean``, ``ceiling_txt_r_mean`` and ``ceiling_r_mean``. A ground truth that is *not*
        consistent (a false caption) ranks after every consistent candidate.
    """
    consistent = np.asarray(consistent, dtype=bool)
    n_txt, n_img = consistent.shape
    t2i, i2t = _as_lists(txt2img, img2txt, n_txt, n_img)
    scores = posterior(consistent)
    own = np.zeros((n_txt, n_img), dtype=bool)
    own[np.arange(n_txt), t2i] = True
    out: Dict[str, float] = {}
    for k in ks:
        hits = [expected_hit(scores[t], own[t], k) for t in range(n_txt)]
        out[f"ceiling_img_r{k}"] = 100.0 * float(np.mean(hits))
        truth = np.zeros(n_txt, dtype=bool)
        hits = []
        for i, captions in enumerate(i2t):
            truth[:] = False
            truth[captions] = True
            hits.append(expected_hit(scores[:, i], truth, k))
        out[f"ceiling_txt_r{k}"] = 100.0 * float(np.mean(hits))
    for side in ("img", "txt"):
        out[f"ceiling_{side}_r_mean"] = float(np.mean([out[f"ceiling_{side}_r{k}"] for k in ks]))
    out["ceiling_r_mean"] = (out["ceiling_img_r_mean"] + out["ceiling_txt_r_mean"]) / 2
    return out


def consistent_at_1(t2i_scores: Any, consistent: np.ndarray) -> float:
    """Percent of captions whose top-ranked image makes the caption true.

    ``t2i_scores`` is ``[n_txt, n_img]`` (a tensor or array; the top image is picked as ``recall_metrics`` ranks
    them). For image-to-text pass ``scores_i2t`` and ``consistent.T``: the share of images whose top caption is
    true of them."""
    if hasattr(t2i_scores, "detach"):
        t2i_scores = t2i_scores.detach().cpu().numpy()
    scores, consistent = np.asarray(t2i_scores), np.asarray(consistent, dtype=bool)
    if scores.shape != consistent.shape:
        raise ValueError(f"scores {scores.shape} and consistency {consistent.shape} differ in shape")
    top = [int(np.argsort(row)[::-1][0]) for row in scores]
    return 100.0 * float(np.mean([consistent[t, i] for t, i in enumerate(top)]))


def world_consistency(world_dir: str, split: str = "test"
                      ) -> Tuple[np.ndarray, List[int], List[List[int]], List[str], bool]:
    """``(consistent [captions, images], txt2img, img2txt, texts, stored)`` of a world's retrieval split, in the
    order of ``retrieval_{split}.json`` (as ``RetrievalEvalDataset`` numbers them); ``stored``: the logical forms
    came from ``scenes.json`` (else every caption was parsed: a version-1 world)."""
    with open(os.path.join(world_dir, "scenes.json")) as f:
        scenes = {rec["image"]: rec for rec in json.load(f)["images"]}
    with open(os.path.join(world_dir, f"retrieval_{split}.json")) as f:
        records = json.load(f)
    images, lfs, all_texts, txt2img, img2txt, stored = [], [], [], [], [], True
    for i, rec in enumerate(records):
        scene = scenes[rec["image"]]
        images.append(scene)
        texts = rec["caption"] if isinstance(rec["caption"], list) else [rec["caption"]]
        known = scene.get("captions")
        use = known is not None and [c["text"] for c in known] == texts
        stored &= use
        img2txt.append(list(range(len(txt2img), len(txt2img) + len(texts))))
        txt2img += [i] * len(texts)
        all_texts += texts
        lfs += [c["lf"] for c in known] if use else [parse_caption(t) for t in texts]
    return consistency(lfs, images), txt2img, img2txt, all_texts, stored


def world_ceilings(world_dir: str, split: str = "test") -> Dict[str, Any]:
    """The ceilings of a world's retrieval split, and how many images its captions fit.

    Images and captions are taken in the order of ``retrieval_{split}.json`` (as ``RetrievalEvalDataset`` numbers
    them). The logical forms stored in ``scenes.json`` are used when they go with the same texts; otherwise (a
    version-1 world) every caption is parsed.

    Returns:
        :func:`ceiling_recall`'s keys, plus ``captions``, ``images``, ``fits_mean`` / ``fits_median`` (images a
        caption is true of), ``unique`` (percent of captions true of their own image only) and ``lf_source``
        (``"stored"`` or ``"parsed"``).
    """
    consistent, txt2img, img2txt, texts, stored = world_consistency(world_dir, split)
    fits = consistent.sum(1)
    out: Dict[str, Any] = dict(ceiling_recall(consistent, txt2img, img2txt))
    out.update(captions=len(texts), images=len(img2txt), fits_mean=float(fits.mean()),
               fits_median=float(np.median(fits)), unique=100.0 * float(np.mean(fits == 1)),
               lf_source="stored" if stored else "parsed")
    return out


def main(argv: Optional[Sequence[str]] = None) -> None:
    p = argparse.ArgumentParser(description="Retrieval ceilings of a synthetic world's split.")
    p.add_argument("--world", required=True, help="the world directory (python -m dataset.synthetic --out DIR)")
    p.add_argument("--split", default="test", choices=("val", "test"))
    a = p.parse_args(argv)
    r = world_ceilings(a.world, a.split)
    print(f"{a.world} {a.split}: {r['images']} images, {r['captions']} captions (logical forms {r['lf_source']}); "
          f"a caption fits {r['fits_mean']:.2f} images on average (median {r['fits_median']:g}), "
          f"{r['unique']:.1f} % only their own")
    img, txt = ([f"{r[f'ceiling_{s}_r{k}']:.1f}" for k in (1, 5, 10)] for s in ("img", "txt"))
    print(f"ceiling  text->image R@1/5/10 {' / '.join(img)}   image->text R@1/5/10 {' / '.join(txt)}")


if __name__ == "__main__":
    main()
