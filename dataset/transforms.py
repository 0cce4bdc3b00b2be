"""Image transforms (torchvision transforms v2) with the original ALBEF's CLIP normalisation."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

RANDAUGMENT_SPACES = ("albef", "torchvision")


def _enhance(v: float) -> float:  # enhancement factor; > 1 brightens / sharpens
    return v * 1.8 + 0.1


def _shear(v: float) -> float:
    return v * 0.3


def _translate(v: float) -> float:  # absolute pixels (the original's translate_const = 10)
    return v * 10.0


def _rotate(v: float) -> float:  # degrees
    return v * 30.0


class ALBEFRandAugment(T.RandAugment):
    """The original ALBEF's ``RandomAugment(2, 7, isPIL=True, augs=[...])`` on torchvision v2 ops.

    ``num_ops`` ops are drawn uniformly *with replacement* from the 10 ops in ``OPS`` (no Color, Contrast,
    Posterize or Solarize: captions name colours); each drawn op is then applied with probability ``p``
    (0.5). ``magnitude`` is a level on the original's 0..``MAX_LEVEL`` (10) scale, with the original's
    level-to-argument maps (see ``magnitudes``): Brightness and Sharpness use the factor ``v*1.8 + 0.1``
    (always that factor, no random sign), ShearX/Y ``±0.3 v``, TranslateX/Y ``±10 v`` *pixels* whatever the
    image size, Rotate ``±30 v`` degrees, with ``v = magnitude / 10`` and a random sign; geometric ops fill
    with ``fill`` (128 grey) and interpolate bilinearly (the original's cv2 ``INTER_LINEAR``). Signs follow
    the original's cv2 functions: a positive shear maps ``x -> x + s·y``, a positive translation moves the
    content left / up, a positive rotation is counter-clockwise. AutoContrast and Equalize work per channel,
    as the original's. All randomness comes from torch's global RNG (``torch.randint`` / ``torch.rand``), in
    the original's order: all ops are drawn first, then per op the coin and the sign.

    ``ops`` restricts the space to a subset of ``OPS`` (the original's ``augs`` argument).

    TranslateX/Y of an RGB PIL image by whole pixels (every integer level) is a plain shift (:func:`shift_pil`): the
    bilinear warp samples exactly at pixel centres there, so the pixels are the same (tested), at a fortieth of the
    cost.
    """

    _v1_transform_cls = None  # torchvision v1 has no equivalent

    MAX_LEVEL = 10
    # op -> (level-to-argument map of v = level / MAX_LEVEL, in the original's units; random sign)
    _LEVEL_TO_ARG: Dict[str, Tuple[Optional[Callable[[float], float]], bool]] = {
        "Identity": (None, False),
        "AutoContrast": (None, False),
        "Equalize": (None, False),
        "Brightness": (_enhance, False),
        "Sharpness": (_enhance, False),
        "ShearX": (_shear, True),
        "ShearY": (_shear, True),
        "TranslateX": (_translate, True),
        "TranslateY": (_translate, True),
        "Rotate": (_rotate, True),
    }
    OPS: Tuple[str, ...] = tuple(_LEVEL_TO_ARG)

    # The same space in torchvision's ``_AUGMENTATION_SPACE`` form (bins = levels 0..MAX_LEVEL, magnitudes in
    # the units of ``_apply_image_or_video_transform``, before the sign), for code that introspects it.
    _AUGMENTATION_SPACE: Dict[str, Tuple[Callable[[int, int, int], Optional[torch.Tensor]], bool]] = {}

    def __init__(self, num_ops: int = 2, magnitude: int = 7, p: float = 0.5, ops: Optional[Sequence[str]] = None,
                 interpolation: T.InterpolationMode = T.InterpolationMode.BILINEAR, fill: Any = 128) -> None:
        super().__init__(num_ops=num_ops, magnitude=magnitude, num_magnitude_bins=self.MAX_LEVEL + 1,
                         interpolation=interpolation, fill=fill)
        if isinstance(magnitude, bool) or not isinstance(magnitude, int) or not 0 <= magnitude <= self.MAX_LEVEL:
            raise ValueError(f"magnitude must be an integer level in [0, {self.MAX_LEVEL}], got {magnitude!r}")
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p!r}")
        ops = tuple(self.OPS if ops is None else ops)
        unknown = [o for o in ops if o not in self._LEVEL_TO_ARG]
        if unknown or not ops:
            raise ValueError(f"ops must be a non-empty subset of {list(self.OPS)}, got {list(ops)}")
        self.p = float(p)
        self.ops = ops

    @classmethod
    def magnitudes(cls, level: int = 7) -> Dict[str, Optional[float]]:
        """``{op: argument at level}`` in the original's units before the random sign (enhancement factor,
        shear factor, pixels, degrees; None for ops without a magnitude)."""
        v = level / cls.MAX_LEVEL
        return {name: None if fn is None else fn(v) for name, (fn, _) in cls._LEVEL_TO_ARG.items()}

    @staticmethod
    def _to_torchvision(op: str, value: float) -> float:
        """An argument in the original's units and sign convention -> ``_apply_image_or_video_transform``'s."""
        if op in ("Brightness", "Sharpness"):
            return value - 1.0  # torchvision applies the factor 1 + magnitude
        if op in ("ShearX", "ShearY", "TranslateX", "TranslateY"):
            return -value  # torchvision's positive shear maps x -> x - s·y and translates right / down
        return value

    def _apply_image_or_video_transform(self, image: Any, transform_id: str, magnitude: float,
                                        interpolation: Any, fill: Any) -> Any:
        """torchvision's op (``magnitude`` in its units), with a whole-pixel translation of an RGB PIL image done as
        the equal shift."""
        value = fill.get("others") if isinstance(fill, dict) else None
        if (transform_id in ("TranslateX", "TranslateY") and float(magnitude).is_integer()
                and isinstance(image, Image.Image) and image.mode == "RGB" and isinstance(value, int)
                and interpolation in _WHOLE_PIXEL_SAFE):
            d = int(magnitude)  # torchvision's positive translation moves the content right / down
            return shift_pil(image, d if transform_id == "TranslateX" else 0, d if transform_id == "TranslateY" else 0,
                             (value,) * 3)
        return super()._apply_image_or_video_transform(image, transform_id, magnitude, interpolation=interpolation,
                                                       fill=fill)

    def forward(self, *inputs: Any) -> Any:
        flat_inputs_with_spec, image = self._flatten_and_extract_image_or_video(inputs)
        v = self.magnitude / self.MAX_LEVEL
        drawn = torch.randint(len(self.ops), (self.num_ops,)).tolist()  # with replacement, as np.random.choice
        for idx in drawn:
            op = self.ops[idx]
            if float(torch.rand(())) > self.p:  # the original: `if np.random.random() > prob: continue`
                continue
            fn, signed = self._LEVEL_TO_ARG[op]
            value = 0.0
            if fn is not None:
                value = fn(v)
                if signed and float(torch.rand(())) < 0.5:
                    value = -value
            image = self._apply_image_or_video_transform(image, op, self._to_torchvision(op, value),
                                                         interpolation=self.interpolation, fill=self._fill)
        return self._unflatten_and_insert_image_or_video(flat_inputs_with_spec, image)


_WHOLE_PIXEL_SAFE = (T.InterpolationMode.BILINEAR, T.InterpolationMode.NEAREST)


def shift_pil(image: Image.Image, dx: int, dy: int, fill) -> Image.Image:
    """``image`` with its content moved by whole pixels ``(dx, dy)`` (positive: right / down), the uncovered pixels
    ``fill``: what an affine warp by that translation gives (bilinear or nearest), without interpolating."""
    out = Image.new(image.mode, image.size, fill)
    out.paste(image, (dx, dy))
    return out


def _space_entry(op: str) -> Callable[[int, int, int], Optional[torch.Tensor]]:
    fn, signed = ALBEFRandAugment._LEVEL_TO_ARG[op]
    if fn is None:
        return lambda num_bins, height, width: None
    sign = abs if signed else (lambda x: x)  # a signed op's sign is drawn at random
    return lambda num_bins, height, width: torch.tensor(
        [sign(ALBEFRandAugment._to_torchvision(op, fn(i / (num_bins - 1)))) for i in range(num_bins)],
        dtype=torch.float64)


ALBEFRandAugment._AUGMENTATION_SPACE = {op: (_space_entry(op), signed)
                                        for op, (_, signed) in ALBEFRandAugment._LEVEL_TO_ARG.items()}


@dataclass
class AugmentConfig:
    """Training augmentation; defaults are the original pre-training pipeline."""

    # RandomResizedCrop scale range; [1, 1]: no crop (the whole image resized to a square)
    crop_scale: List[float] = field(default_factory=lambda: [0.2, 1.0])
    hflip: bool = True  # random horizontal flip (flips "left"/"right" relations, as the original)
    randaugment: bool = True  # RandAugment(num_ops, magnitude)
    randaugment_ops: int = 2
    randaugment_magnitude: int = 7  # albef: level 0..10; torchvision: bin 0..30
    # albef: the original's RandomAugment (ALBEFRandAugment); torchvision: v2.RandAugment (14 ops, 31 bins)
    randaugment_space: str = "albef"

    def __post_init__(self):
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"augment.crop_scale must be [low, high] with 0 < low <= high <= 1, got {self.crop_scale}")
        if self.randaugment_space not in RANDAUGMENT_SPACES:
            raise ValueError(f"augment.randaugment_space must be one of {', '.join(RANDAUGMENT_SPACES)}, "
                             f"got {self.randaugment_space!r}")
        if self.randaugment_ops < 0:
            raise ValueError(f"augment.randaugment_ops must be >= 0, got {self.randaugment_ops}")
        top = ALBEFRandAugment.MAX_LEVEL if self.randaugment_space == "albef" else 30
        if not 0 <= self.randaugment_magnitude <= top:
            raise ValueError(f"augment.randaugment_magnitude must be in [0, {top}] for randaugment_space "
                             f"{self.randaugment_space}, got {self.randaugment_magnitude}")


class ToContiguousImage(T.ToImage):
    """``v2.ToImage`` with a contiguous ``[3, H, W]`` result. torchvision's gives a PIL image as a channel-first *view*
    of its ``H x W x 3`` bytes, so the float conversion, the normalisation and the batch's ``torch.stack`` all walk
    strided memory. Here an RGB image's three bands are copied out one after the other by PIL (as fast as the view),
    so those steps run on contiguous memory: the same values, about a quarter less time for the whole tail of the
    transform (``bench/bench_loader.py``)."""

    def transform(self, inpt: Any, params: Dict[str, Any]) -> tv_tensors.Image:
        if isinstance(inpt, Image.Image) and inpt.mode == "RGB":
            data = bytearray().join(band.tobytes() for band in inpt.split())
            return tv_tensors.Image(torch.frombuffer(data, dtype=torch.uint8).view(3, inpt.height, inpt.width))
        image = super().transform(inpt, params)
        return image if image.is_contiguous() else tv_tensors.wrap(image.contiguous(), like=image)


def _to_normalized_tensor() -> List[T.Transform]:
    return [ToContiguousImage(), T.ToDtype(torch.float32, scale=True), T.Normalize(CLIP_MEAN, CLIP_STD)]


def uint8_output(transform: T.Compose) -> T.Compose:
    """``transform`` (``train_transform`` / ``grounding_train_transform`` / ``eval_transform``) without its last
    two steps, ``ToDtype`` and ``Normalize``: it gives the same ``uint8`` image tensor (same random draws, same
    pixels) that those two would have turned into floats; :func:`normalize_images` does the rest later, on the
    training device, with the same results. Raises ``ValueError`` for a transform that does not end like ours."""
    steps = list(getattr(transform, "transforms", ()))
    tail = steps[-3:]
    ours = (len(tail) == 3 and isinstance(tail[0], T.ToImage) and [type(t) for t in tail[1:]] == [T.ToDtype,
                                                                                                  T.Normalize]
            and tail[1].dtype == torch.float32 and tail[1].scale
            and tuple(tail[2].mean) == CLIP_MEAN and tuple(tail[2].std) == CLIP_STD and not tail[2].inplace)
    if not ours:
        raise ValueError(f"expected a transform ending in ToImage, ToDtype(float32, scale=True), Normalize(CLIP "
                         f"mean / std), got {transform!r}")
    return T.Compose(steps[:-2])


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """A ``uint8`` image batch ``(..., 3, H, W)`` (from :func:`uint8_output` transforms) -> the float32 batch the
    whole transform would have given, bit for bit: torchvision's ``to_dtype(scale=True)`` and ``normalize`` with
    the CLIP mean / std, as ``ToDtype`` and ``Normalize`` apply them (element-wise, so on any device and batch)."""
    if images.dtype != torch.uint8:
        raise TypeError(f"normalize_images expects uint8 images, got {images.dtype}")
    images = TF.to_dtype(images, torch.float32, scale=True)
    mean, std = _clip_constants(images.device)
    return images.sub_(mean).div_(std)  # torchvision's normalize, in place on the fresh tensor


_CLIP_CONSTANTS: Dict[torch.device, Tuple[torch.Tensor, torch.Tensor]] = {}


def _clip_constants(device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """The CLIP mean and std as ``[3, 1, 1]`` float32 tensors on ``device``, made once: torchvision's ``normalize``
    builds them from the Python lists at every call, and on CUDA that copy from pageable host memory waits for
    everything queued on the stream (a host sync per training step)."""
    if device not in _CLIP_CONSTANTS:
        _CLIP_CONSTANTS[device] = tuple(torch.as_tensor(v, dtype=torch.float32, device=device).view(-1, 1, 1)
                                        for v in (CLIP_MEAN, CLIP_STD))
    return _CLIP_CONSTANTS[device]


def randaugment(cfg: AugmentConfig) -> T.RandAugment:
    """The RandAugment of ``cfg`` (``ALBEFRandAugment`` or torchvision's ``v2.RandAugment``)."""
    if cfg.randaugment_space == "albef":
        return ALBEFRandAugment(num_ops=cfg.randaugment_ops, magnitude=cfg.randaugment_magnitude, fill=128)
    return T.RandAugment(num_ops=cfg.randaugment_ops, magnitude=cfg.randaugment_magnitude, fill=[128, 128, 128])


def train_transform(image_res: int, cfg: AugmentConfig) -> T.Compose:
    """RandomResizedCrop (bicubic) -> flip -> RandAugment -> tensor -> CLIP normalisation, as ``cfg`` says.
    ``crop_scale: [1, 1]`` (no crop) resizes the whole image to a square, as the evaluation transform: for a square
    image exactly what RandomResizedCrop at scale 1 gives, without its ten failing tries for a crop (a third of the
    demo's loading time); for another shape RandomResizedCrop would have cut the sides off."""
    if tuple(cfg.crop_scale) == (1.0, 1.0):
        first: T.Transform = T.Resize((image_res, image_res), interpolation=T.InterpolationMode.BICUBIC,
                                      antialias=True)
    else:
        first = T.RandomResizedCrop(image_res, scale=tuple(cfg.crop_scale), interpolation=T.InterpolationMode.BICUBIC,
                                    antialias=True)
    ops: List[T.Transform] = [first]
    if cfg.hflip:
        ops.append(T.RandomHorizontalFlip())
    if cfg.randaugment:
        ops.append(randaugment(cfg))
    return T.Compose(ops + _to_normalized_tensor())


def grounding_train_transform(image_res: int, cfg: AugmentConfig) -> T.Compose:
    """The original's grounding training transform: bicubic resize to a square (no crop: the whole image, where
    the referred object is), then flip and RandAugment as ``cfg`` says (``crop_scale`` is not used)."""
    ops: List[T.Transform] = [T.Resize((image_res, image_res), interpolation=T.InterpolationMode.BICUBIC,
                                       antialias=True)]
    if cfg.hflip:
        ops.append(T.RandomHorizontalFlip())
    if cfg.randaugment:
        ops.append(randaugment(cfg))
    return T.Compose(ops + _to_normalized_tensor())


def eval_transform(image_res: int) -> T.Compose:
    """Bicubic resize to a square (aspect ratio not kept), as the original evaluation."""
    return T.Compose([T.Resize((image_res, image_res), interpolation=T.InterpolationMode.BICUBIC, antialias=True)]
                     + _to_normalized_tensor())
