"""Weakly-supervised grounding evaluation (RefCOCO+), the original ``dataset/utils.py`` ``grounding_eval``.

Per referring expression: its Grad-CAM map (:func:`models.gradcam.grounding_cam`) is upsampled bicubically to
the COCO image's height x width; every detector proposal ``[x, y, w, h]`` of that image gets
``sum(map inside the box) / (w * h) ** alpha``; the best-scoring proposal is the prediction, correct when its
pixel-inclusive IoU with the ground-truth box is at least 0.5. Accuracy per split (``val_d``, ``testA_d``,
``testB_d``) is a **fraction** in [0, 1], as the original returns, logs to ``log.txt`` and prints (``.3f``).

Deliberate difference (reference §8.3): the original starts from ``max_score = 0`` and, when no proposal
scores above 0 (or the image has none), silently keeps the previous sample's box. Here such a sample has no
prediction, counts as a miss in its split and is counted in ``no_positive``. Everything else follows the
original's arithmetic exactly (same slicing, same float32 sums, same strict ``>`` so the first of tied boxes
wins, same IoU).
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Optional, Protocol, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

SPLITS = ("val", "testA", "testB")
Box = Sequence[float]  # [x, y, w, h] (extra entries, e.g. a detector's class or score, are ignored)


class ReferLike(Protocol):
    """What the evaluation reads of a RefCOCO+ annotation set (REFER): per ``ref_id``, its split
    (``'val'``, ``'testA'``, ``'testB'``, ...), the ground-truth box ``[x, y, w, h]``, its COCO image id and
    that image's ``(height, width)``."""

    def split(self, ref_id: int) -> str: ...

    def box(self, ref_id: int) -> Box: ...

    def image_size(self, ref_id: int) -> Tuple[int, int]: ...

    def image_id(self, ref_id: int) -> int: ...


def upsample_cam(cam: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """A map ``[h, w]`` (or maps ``[B, h, w]``) resized to ``size = (H, W)``: ``[H, W]`` (``[B, H, W]``).

    ``F.interpolate(mode='bicubic')`` with its default ``align_corners=False``, as the original (bicubic can
    overshoot: values slightly below 0 appear near sharp peaks). Half-precision maps are computed in float32.
    """
    if cam.dtype in (torch.float16, torch.bfloat16):
        cam = cam.float()
    if cam.dim() == 2:
        return F.interpolate(cam[None, None], size=tuple(size), mode="bicubic")[0, 0]
    if cam.dim() == 3:
        return F.interpolate(cam[:, None], size=tuple(size), mode="bicubic")[:, 0]
    raise ValueError(f"cam must be [h, w] or [B, h, w], got shape {tuple(cam.shape)}")


def proposal_scores(cam_hw: torch.Tensor, boxes: Union[Sequence[Box], torch.Tensor], alpha: float = 0.5
                    ) -> torch.Tensor:
    """Score ``[N]`` of each proposal ``[x, y, w, h]`` on the upsampled map ``cam_hw`` [H, W]:
    ``cam_hw[int(y):int(y + h), int(x):int(x + w)].sum() / (w * h) ** alpha``.

    Computed as the original does, box by box (Python slicing, so a box reaching past the border is cut;
    float32 sum over the slice; area in Python floats), so that the chosen box is the original's even between
    nearly tied proposals (an integral image would change the sums' rounding). Pass the coordinates as the
    detector's JSON gives them (lists of Python numbers) or a float64 tensor: float32 would round them before
    ``int()``. A zero-area box scores NaN, which never wins.
    """
    rows = boxes.tolist() if isinstance(boxes, torch.Tensor) else boxes
    scores = []
    for det in rows:
        x, y, w, h = det[:4]
        if w < 0 or h < 0:
            raise ValueError(f"box {list(det[:4])} has a negative width or height")
        scores.append(cam_hw[int(y):int(y + h), int(x):int(x + w)].sum() / (w * h) ** alpha)
    return torch.stack(scores) if scores else cam_hw.new_zeros(0)


def pick_box(scores: torch.Tensor, boxes: Sequence) -> Optional[int]:
    """Index of the winning proposal: the first one whose score is the largest, provided it is above 0
    (the original starts from ``max_score = 0`` and keeps a box only when ``score > max_score``).

    None when no score is above 0 or there are no proposals (the original then reuses the previous sample's
    box, reference §8.3).
    """
    if len(scores) != len(boxes):
        raise ValueError(f"{len(scores)} scores for {len(boxes)} boxes")
    best, max_score = None, 0.0
    for i, s in enumerate(scores.tolist()):  # float32 -> Python float is exact: same comparisons
        if s > max_score:
            best, max_score = i, s
    return best


def iou_inclusive(box1: Box, box2: Box) -> float:
    """IoU of two ``[x, y, w, h]`` boxes with pixel-inclusive corners ``x2 = x + w - 1`` (REFER's ``computeIoU``
    as the original uses it).

    As there, the intersection counts only when ``x1 < x2`` and ``y1 < y2`` strictly: boxes sharing a single
    column or row of pixels have intersection 0. Returns 0.0 where the original would divide by a zero union.
    """
    inter_x1, inter_y1 = max(box1[0], box2[0]), max(box1[1], box2[1])
    inter_x2 = min(box1[0] + box1[2] - 1, box2[0] + box2[2] - 1)
    inter_y2 = min(box1[1] + box1[3] - 1, box2[1] + box2[3] - 1)
    if inter_x1 < inter_x2 and inter_y1 < inter_y2:
        inter = (inter_x2 - inter_x1 + 1) * (inter_y2 - inter_y1 + 1)
    else:
        inter = 0
    union = box1[2] * box1[3] + box2[2] * box2[3] - inter
    return float(inter) / union if union else 0.0


def grounding_accuracy(results: Sequence[Mapping], refer: ReferLike, dets: Mapping[str, Sequence[Box]],
                       alpha: float = 0.5, iou_threshold: float = 0.5) -> Tuple[Dict[str, float], List[dict]]:
    """The original ``grounding_eval`` over ``results`` = ``[{'ref_id': int, 'cam': Tensor[h, w]}, ...]``.

    ``dets`` maps ``str(image_id)`` to that image's proposals ``[[x, y, w, h, ...], ...]`` (MAttNet's
    ``dets.json``); an image missing from it has no proposals. Returns ``(metrics, predictions)``:

    * ``metrics``: ``val_d``, ``testA_d``, ``testB_d`` = correct / samples of that split, a fraction as the
      original (NaN for a split without samples, where the original divides by zero); ``num_val``,
      ``num_testA``, ``num_testB`` (samples); ``no_positive`` = samples with no proposal scoring above 0 (or
      none at all), each counted as a miss. Samples of other splits are predicted but enter no accuracy.
    * ``predictions``: per sample ``{'ref_id', 'split', 'pred_box' ([x, y, w, h] or None), 'score', 'iou',
      'correct'}``, JSON-serialisable.
    """
    correct = dict.fromkeys(SPLITS, 0)
    total = dict.fromkeys(SPLITS, 0)
    no_positive = 0
    predictions = []
    for res in results:
        ref_id = int(res["ref_id"])
        split = refer.split(ref_id)
        boxes = dets.get(str(refer.image_id(ref_id)), [])
        height, width = refer.image_size(ref_id)
        cam = upsample_cam(res["cam"], (int(height), int(width)))
        scores = proposal_scores(cam, boxes, alpha)
        k = pick_box(scores, boxes)
        if k is None:
            no_positive += 1
            pred_box, score, iou = None, None, 0.0
        else:
            pred_box = [float(v) for v in boxes[k][:4]]
            score, iou = float(scores[k]), iou_inclusive(list(refer.box(ref_id)), pred_box)
        hit = pred_box is not None and iou >= iou_threshold
        if split in total:
            total[split] += 1
            correct[split] += int(hit)
        predictions.append({"ref_id": ref_id, "split": split, "pred_box": pred_box, "score": score, "iou": iou,
                            "correct": hit})
    metrics: Dict[str, float] = {f"{s}_d": correct[s] / total[s] if total[s] else math.nan for s in SPLITS}
    metrics.update({f"num_{s}": total[s] for s in SPLITS})
    metrics["no_positive"] = no_positive
    return metrics, predictions
