"""The caption checker, parser and retrieval ceilings: hand-written scenes and captions, hand-computed ceilings
(and the same numbers from engine.retrieval.recall_metrics over every tie order), then a generated world."""
from __future__ import annotations

import itertools
import json
import os
import shutil

import numpy as np
import pytest
import torch

from dataset.caption_logic import (ceiling_recall, consistency, consistent_at_1, expected_hit, holds, main,
                                   parse_caption, world_ceilings)
from engine.retrieval import recall_metrics


def _obj(size, color, shape, box):
    return {"size": size, "color": color, "shape": shape, "box": box}


def _scene(background, *objects, side=96):
    return {"width": side, "height": side, "background": {"kind": "solid", "color": background},
            "objects": list(objects)}


# A: a small red circle (centre 22.5, 52.5) clearly left of a large blue star (centre 75, 50), gray background.
A = _scene("gray", _obj("small", "red", "circle", [10, 40, 25, 25]), _obj("large", "blue", "star", [55, 30, 40, 40]))
# B: a large green square at the top (centre 50, 25) above two small red circles at the bottom, left (22.5, 77.5)
# and right (77.5, 77.5); each circle is *below* the square (the vertical offset dominates), white background.
B = _scene("white", _obj("large", "green", "square", [30, 5, 40, 40]), _obj("small", "red", "circle", [10, 65, 25, 25]),
           _obj("small", "red", "circle", [65, 65, 25, 25]))
# C: one large yellow triangle on a dark background.
C = _scene("dark", _obj("large", "yellow", "triangle", [20, 20, 40, 40]))

CASES = [  # (caption, scene, true?)
    ("a small red circle", A, True), ("a red circle", B, True), ("a large red circle", A, False),  # size
    ("a small blue circle", A, False), ("a small red square", A, False),  # colour, shape
    ("there is a large blue star", A, True), ("a small shape that is red", A, True),
    ("a small star that is blue", A, False), ("a blue star that is large", A, True),
    ("two objects a small red circle and a large blue star", A, True),  # complete lists
    ("a picture with a large blue star and a small red circle", A, True),  # in any order
    ("one object a small red circle", A, False),  # an object left out
    ("three objects a small red circle a large blue star and a small green square", A, False),  # one missing
    ("two objects a small red circle and a small red circle", B, False),  # B has a third object
    ("just a large yellow triangle", C, True), ("just a small yellow triangle", C, False),
    ("a large blue star and a small red circle", A, True),
    ("two objects a small red circle and a large blue star on a gray background", A, True),  # background
    ("two objects a small red circle and a large blue star on a white background", A, False),
    ("a gray background with two objects a large blue star and a small red circle", A, True),
    ("a red circle on a white background", B, True), ("a red circle on a gray background", B, False),
    ("a dark background with a yellow triangle", C, True),
    ("a small red circle to the left of a large blue star", A, True),  # relations
    ("a small red circle right of a large blue star", A, False), ("a large blue star right of a red circle", A, True),
    ("a large green square above a red circle", B, True), ("a large green square below a red circle", B, False),
    ("a red circle below a green square", B, True),
    ("a red circle left of a green square", B, False),  # the vertical offset dominates: below, not left
    ("a red circle left of a red circle", B, True),  # two distinct red circles
    ("a red circle above a red circle", B, False),
    ("the small red circle is left of the large blue star", A, True),  # definite: unique descriptions
    ("the red circle is left of the red circle", B, False),  # "the red circle" fits two objects
    ("from left to right a small red circle and a large blue star", A, True),  # order
    ("from left to right a large blue star and a small red circle", A, False),
    ("from left to right a small red circle and a large blue star on a gray background", A, True),
    ("two objects a small red circle left of a large blue star on a gray background", A, True),  # relation in list
    ("two objects a small red circle above a large blue star", A, False),
    ("three objects a large green square above a small red circle and a small red circle on a white background", B,
     True),
    ("three objects a large green square below a small red circle and a small red circle", B, False),
    ("three shapes", B, True), ("three shapes", A, False), ("there are two objects", A, True),  # counts (version 1)
    ("one shape on a dark background", C, True), ("one shape on a gray background", C, False),
    ("a single large yellow triangle", C, True), ("a single large yellow triangle", A, False),
    ("a single yellow shape on a dark background", C, True), ("only one yellow triangle", C, True),
    ("two red circles", B, True), ("two circles", B, True), ("two small shapes", B, True),
    ("two small red shapes", B, True), ("two large shapes", B, False), ("three red circles", B, False),
]


@pytest.mark.parametrize("caption,scene,truth", CASES)
def test_checker_on_hand_written_scenes(caption, scene, truth):
    assert holds(parse_caption(caption), scene) is truth


def test_logical_forms_by_hand():
    assert parse_caption("a picture with a small red circle and a large blue star") == {
        "objects": [{"size": "small", "color": "red", "shape": "circle"},
                    {"size": "large", "color": "blue", "shape": "star"}], "exact": True}
    assert parse_caption("a gray background with one object an orange cross") == {
        "objects": [{"color": "orange", "shape": "cross"}], "exact": True, "background": "gray"}
    assert parse_caption("three objects a red circle to the left of a large blue star and a green star") == {
        "objects": [{"color": "red", "shape": "circle"}, {"size": "large", "color": "blue", "shape": "star"},
                    {"color": "green", "shape": "star"}], "exact": True, "relation": {"a": 0, "b": 1, "rel": "left"}}
    assert parse_caption("the red circle is above the blue star") == {
        "objects": [{"color": "red", "shape": "circle"}, {"color": "blue", "shape": "star"}], "definite": True,
        "relation": {"a": 0, "b": 1, "rel": "above"}}
    assert parse_caption("from left to right a red circle and a blue star") == {
        "objects": [{"color": "red", "shape": "circle"}, {"color": "blue", "shape": "star"}], "exact": True,
        "order": "left_to_right"}
    assert parse_caption("two large red shapes") == {"objects": [], "count": {"n": 2, "of": {"size": "large",
                                                                                              "color": "red"}}}
    assert parse_caption("three shapes") == {"objects": [{}, {}, {}], "exact": True}
    for bad in ("a red circle and", "an red circle", "a orange cross", "two objects a red circle", "a purple sky",
                "three objects a red circle left of a blue star", ""):
        with pytest.raises(ValueError):
            parse_caption(bad)


def test_checker_on_logical_forms_directly():
    circles = [{"color": "red", "shape": "circle"}] * 2
    rel = {"a": 0, "b": 1, "rel": "left"}
    assert holds({"objects": circles, "relation": rel}, B)
    assert not holds({"objects": circles, "relation": rel, "definite": True}, B)
    assert holds({"objects": circles, "order": "left_to_right"}, B)  # not a complete list: the square may be there
    assert not holds({"objects": circles, "order": "left_to_right", "exact": True}, B)
    assert not holds({"objects": circles * 2}, B)  # four red circles need four objects
    assert holds({"objects": []}, C) and holds({"objects": [{}]}, C) and not holds({"objects": [{}, {}]}, C)
    assert holds({"objects": [], "count": {"n": 0, "of": {"color": "red"}}}, C)
    assert holds({"objects": [{"size": "small"}], "background": "gray"}, A)
    assert not holds({"objects": [{"size": "small"}], "background": "pink"}, A)


# ------------------------------------------------------------------------------------- ceilings


def _brute_force_ceilings(consistent, txt2img, img2txt, ks):
    """recall_metrics averaged over every tie order of the perfect model's scores (one global order of the
    candidates, so each query sees every order of its tied candidates equally often)."""
    consistent = np.asarray(consistent, dtype=bool)
    n_txt, n_img = consistent.shape
    scores = np.where(consistent, 1.0 / np.maximum(consistent.sum(1, keepdims=True), 1), 0.0)
    img, txt = [], []
    for perm in itertools.permutations(range(n_img)):  # text -> image
        tie = np.asarray(perm, dtype=float)[None, :] * 1e-6
        m = recall_metrics(np.zeros((n_img, n_txt)), scores + tie, txt2img, img2txt)
        img.append([m[f"img_r{k}"] for k in ks])
    for perm in itertools.permutations(range(n_txt)):  # image -> text
        tie = np.asarray(perm, dtype=float)[:, None] * 1e-6
        m = recall_metrics((scores + tie).T, np.zeros((n_txt, n_img)), txt2img, img2txt)
        txt.append([m[f"txt_r{k}"] for k in ks])
    return np.mean(img, 0), np.mean(txt, 0)


def test_expected_hit_by_hand():
    assert expected_hit([0.5] * 4, [1, 0, 0, 0], 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2)
    assert expected_hit([0.5] * 4, [1, 1, 0, 0], 1) == pytest.approx(0.5)
    assert expected_hit([0.5] * 4, [1, 1, 0, 0], 2) == pytest.approx(5 / 6)  # 1 - C(2,2)/C(4,2)
    assert expected_hit([1, 0.5, 0.5, 0], [0, 0, 1, 1], 1) == 0.0  # the better group holds no answer
    assert expected_hit([1, 0.5, 0.5, 0], [0, 0, 1, 1], 2) == pytest.approx(0.5)
    assert expected_hit([1, 0.5, 0.5, 0], [0, 0, 1, 1], 3) == 1.0
    assert expected_hit([1, 0.5, 0.5, 0], [0, 0, 0, 1], 3) == 0.0 and expected_hit([1, 0.5, 0.5, 0], [0, 0, 0, 1],
                                                                                    4) == 1.0


def test_ceiling_recall_by_hand():
    # captions 0, 1 belong to image 0; 2, 3 to image 1. Captions 0, 1, 3 are true of both images, 2 of image 1 only.
    consistent = np.array([[1, 1], [1, 1], [0, 1], [1, 1]], dtype=bool)
    txt2img, img2txt = {0: 0, 1: 0, 2: 1, 3: 1}, {0: [0, 1], 1: [2, 3]}
    out = ceiling_recall(consistent, txt2img, img2txt, ks=(1, 2))
    # text -> image: 1/2, 1/2, 1, 1/2 at R@1
    assert out["ceiling_img_r1"] == pytest.approx(62.5) and out["ceiling_img_r2"] == pytest.approx(100.0)
    # image -> text: image 0 sees captions 0, 1, 3 tied (posterior 1/2), two of them its own: 2/3 at R@1; image 1
    # sees caption 2 first (true of it alone, posterior 1): a hit
    assert out["ceiling_txt_r1"] == pytest.approx(100 * (2 / 3 + 1) / 2) and out["ceiling_txt_r2"] == 100.0
    assert out["ceiling_img_r_mean"] == pytest.approx(81.25)
    assert out["ceiling_r_mean"] == pytest.approx((out["ceiling_img_r_mean"] + out["ceiling_txt_r_mean"]) / 2)
    img, txt = _brute_force_ceilings(consistent, txt2img, img2txt, (1,))
    assert out["ceiling_img_r1"] == pytest.approx(img[0]) and out["ceiling_txt_r1"] == pytest.approx(txt[0])
    # a caption false of its own image ranks it after the consistent ones
    false = ceiling_recall(np.array([[0, 1]], dtype=bool), [0], [[0], []], ks=(1, 2))
    assert false["ceiling_img_r1"] == 0.0 and false["ceiling_img_r2"] == 100.0


@pytest.mark.parametrize("n_img,per", [(6, 1), (3, 2)])  # 6 captions: 720 tie orders
def test_ceiling_recall_matches_recall_metrics_over_tie_orders(n_img, per):
    rng = np.random.default_rng(n_img)
    txt2img = [i for i in range(n_img) for _ in range(per)]
    img2txt = [[i * per + j for j in range(per)] for i in range(n_img)]
    for _ in range(2):
        consistent = rng.random((n_img * per, n_img)) < 0.6
        consistent[np.arange(n_img * per), txt2img] = True  # captions are true of their own image
        out = ceiling_recall(consistent, txt2img, img2txt)
        img, txt = _brute_force_ceilings(consistent, txt2img, img2txt, (1, 5, 10))
        assert [out[f"ceiling_img_r{k}"] for k in (1, 5, 10)] == pytest.approx(list(img))
        assert [out[f"ceiling_txt_r{k}"] for k in (1, 5, 10)] == pytest.approx(list(txt))


def test_consistent_at_1_by_hand():
    scores = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    consistent = np.array([[1, 0], [0, 0], [1, 1]], dtype=bool)  # top images 0, 1, 0: true, false, true
    assert consistent_at_1(scores, consistent) == pytest.approx(200 / 3)
    assert consistent_at_1(torch.tensor(scores), consistent) == pytest.approx(200 / 3)
    assert consistent_at_1(scores.T, consistent.T) == 50.0  # image -> text: image 0's top caption 0 is true of it
    with pytest.raises(ValueError):
        consistent_at_1(scores, consistent.T)


def test_consistency_matrix():
    got = consistency(["a red circle", {"objects": [{"shape": "star"}]}, "three shapes"], [A, B, C])
    assert got.dtype == bool and got.tolist() == [[True, True, False], [True, False, False], [False, True, False]]


# ------------------------------------------------------------------------------------- a generated world


def test_generated_captions_hold_and_parse(tiny_world):
    with open(os.path.join(str(tiny_world), "scenes.json")) as f:
        scenes = json.load(f)["images"]
    kinds = set()
    for scene in scenes:
        assert scene["captions"]
        for caption in scene["captions"]:
            lf = caption["lf"]
            assert json.loads(json.dumps(lf)) == lf
            assert parse_caption(caption["text"]) == lf, caption
            assert holds(lf, scene), (caption, scene)
            if "relation" in lf:  # relations are informative: reversed, the caption is false
                opposite = {"left": "right", "right": "left", "above": "below", "below": "above"}
                reverse = dict(lf, relation=dict(lf["relation"], rel=opposite[lf["relation"]["rel"]]))
                assert not holds(reverse, scene), caption
            kinds.add((bool(lf.get("exact")), "background" in lf, "relation" in lf))
    assert {(True, True, False), (True, True, True), (True, False, False)} <= kinds  # scene, relation, list
    identifying = sum(bool(c["lf"].get("exact")) for s in scenes for c in s["captions"])
    assert identifying >= 0.7 * sum(len(s["captions"]) for s in scenes)  # most captions list the whole scene


def test_world_ceilings(tiny_world, tmp_path, capsys):
    out = world_ceilings(str(tiny_world))
    assert out["lf_source"] == "stored" and out["images"] == 16 and out["captions"] == 80
    assert 1.0 <= out["fits_median"] <= out["fits_mean"] and 0 < out["unique"] <= 100
    for side in ("img", "txt"):
        assert 0 < out[f"ceiling_{side}_r1"] <= out[f"ceiling_{side}_r5"] <= out[f"ceiling_{side}_r10"] <= 100
    # a world without stored logical forms (version 1) is parsed, to the same numbers
    world = tmp_path / "world"
    shutil.copytree(str(tiny_world), str(world))
    with open(world / "scenes.json") as f:
        data = json.load(f)
    for scene in data["images"]:
        del scene["captions"]
    with open(world / "scenes.json", "w") as f:
        json.dump(data, f)
    parsed = world_ceilings(str(world))
    assert parsed.pop("lf_source") == "parsed" and parsed == {k: v for k, v in out.items() if k != "lf_source"}
    main(["--world", str(tiny_world), "--split", "val"])
    printed = capsys.readouterr().out
    assert "ceiling" in printed and "8 images, 40 captions" in printed
