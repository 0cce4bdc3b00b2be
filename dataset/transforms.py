"""Image transforms (torchvision transforms v2) with the original ALBEF's CLIP normalisation."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
from torchvision.transforms import v2 as T

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class AugmentConfig:
    """Training augmentation; defaults are the original pre-training pipeline."""

    crop_scale: List[float] = field(default_factory=lambda: [0.2, 1.0])  # RandomResizedCrop scale range
    hflip: bool = True  # random horizontal flip (flips "left"/"right" relations, as the original)
    randaugment: bool = True  # RandAugment(num_ops, magnitude)
    randaugment_ops: int = 2
    randaugment_magnitude: int = 7

    def __post_init__(self):
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"augment.crop_scale must be [low, high] with 0 < low <= high <= 1, got {self.crop_scale}")


def _to_normalized_tensor() -> List[T.Transform]:
    return [T.ToImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(CLIP_MEAN, CLIP_STD)]


def train_transform(image_res: int, cfg: AugmentConfig) -> T.Compose:
    ops: List[T.Transform] = [T.RandomResizedCrop(image_res, scale=tuple(cfg.crop_scale),
                                                  interpolation=T.InterpolationMode.BICUBIC, antialias=True)]
    if cfg.hflip:
        ops.append(T.RandomHorizontalFlip())
    if cfg.randaugment:
        ops.append(T.RandAugment(num_ops=cfg.randaugment_ops, magnitude=cfg.randaugment_magnitude,
                                 fill=[128, 128, 128]))
    return T.Compose(ops + _to_normalized_tensor())


def eval_transform(image_res: int) -> T.Compose:
    """Bicubic resize to a square (aspect ratio not kept), as the original evaluation."""
    return T.Compose([T.Resize((image_res, image_res), interpolation=T.InterpolationMode.BICUBIC, antialias=True)]
                     + _to_normalized_tensor())
