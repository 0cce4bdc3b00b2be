"""The training RandAugment equals the original ALBEF's RandomAugment (dataset/randaugment.py there)."""
import math
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as F

from dataset.transforms import ALBEFRandAugment, AugmentConfig, ToContiguousImage, train_transform
from utils.config import ConfigError, from_dict

ORIGINAL_OPS = {"Identity", "AutoContrast", "Equalize", "Brightness", "Sharpness",
                "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate"}
# the original's arguments at level 7 of 10, before the random sign (enhancement factor, shear, pixels, degrees)
ORIGINAL_AT_7 = {"Identity": None, "AutoContrast": None, "Equalize": None, "Brightness": 1.36, "Sharpness": 1.36,
                 "ShearX": 0.21, "ShearY": 0.21, "TranslateX": 7.0, "TranslateY": 7.0, "Rotate": 21.0}


def _noise_image(size=24, seed=0):
    """RGB noise in [40, 200]: every op but Identity changes it (AutoContrast and Equalize included)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(40, 201, (size, size, 3), dtype=np.uint8))


def _dot(size, y, x):
    img = Image.new("RGB", (size, size))
    img.putpixel((x, y), (255, 255, 255))
    return img


def _centroid(img):
    w = torch.from_numpy(np.asarray(img)[..., 0].astype(np.float64))
    ys, xs = torch.meshgrid(torch.arange(w.shape[0], dtype=torch.double),
                            torch.arange(w.shape[1], dtype=torch.double), indexing="ij")
    return (w * ys).sum().item() / w.sum().item(), (w * xs).sum().item() / w.sum().item()


def test_op_space_and_magnitudes_equal_the_original():
    assert set(ALBEFRandAugment.OPS) == ORIGINAL_OPS and len(ALBEFRandAugment.OPS) == 10
    assert ALBEFRandAugment.MAX_LEVEL == 10
    table = ALBEFRandAugment.magnitudes(7)
    assert set(table) == ORIGINAL_OPS
    for op, want in ORIGINAL_AT_7.items():
        assert table[op] == (None if want is None else pytest.approx(want, abs=1e-12)), op
    # level 10 = the original's maxima; level 0 = no geometric change and factor 0.1
    assert ALBEFRandAugment.magnitudes(10)["Rotate"] == pytest.approx(30.0)
    assert ALBEFRandAugment.magnitudes(0)["Brightness"] == pytest.approx(0.1)
    ra = ALBEFRandAugment()
    assert isinstance(ra, T.RandAugment) and ra.num_ops == 2 and ra.magnitude == 7 and ra.p == 0.5
    assert set(ra._AUGMENTATION_SPACE) == ORIGINAL_OPS  # torchvision's introspection hook agrees
    with pytest.raises(ValueError, match="magnitude"):
        ALBEFRandAugment(magnitude=11)


def test_each_op_is_applied_with_probability_half_and_drawn_with_replacement(monkeypatch):
    ra = ALBEFRandAugment(num_ops=2, magnitude=7)
    img = _noise_image()
    calls, per_sample = Counter(), []
    original = ra._apply_image_or_video_transform

    def record(image, op, magnitude, **kw):
        calls[op] += 1
        per_sample[-1].append(op)
        return original(image, op, magnitude, **kw)

    monkeypatch.setattr(ra, "_apply_image_or_video_transform", record)
    n, unchanged = 2000, 0
    ref = np.asarray(img)
    torch.manual_seed(0)
    for _ in range(n):
        per_sample.append([])
        unchanged += np.array_equal(np.asarray(ra(img)), ref)
    applied = sum(calls.values())
    assert abs(applied / (2 * n) - 0.5) < 0.03  # p = 0.5 per drawn op
    assert set(calls) == ORIGINAL_OPS and all(abs(c / applied - 0.1) < 0.03 for c in calls.values())
    # no op at all in 25 % of samples; Identity (1 in 10) also leaves the image as it is: 0.55² = 0.3025
    assert abs(unchanged / n - 0.55 ** 2) < 0.04
    assert abs(sum(len(s) == 0 for s in per_sample) / n - 0.25) < 0.04
    twice = [s for s in per_sample if len(s) == 2]
    assert 0.05 < sum(s[0] == s[1] for s in twice) / len(twice) < 0.15  # with replacement: same op 1 in 10


@pytest.mark.parametrize("size", [64, 256])
@pytest.mark.parametrize("op", ["TranslateX", "TranslateY"])
def test_translation_is_seven_pixels_whatever_the_size(op, size):
    ra = ALBEFRandAugment(num_ops=1, magnitude=7, p=1.0, ops=[op])
    c = size // 2
    shifts = set()
    for s in range(12):
        torch.manual_seed(s)
        out = ra(_dot(size, c, c))
        (y, x), = np.argwhere(np.asarray(out)[..., 0] == 255).tolist()
        dy, dx = y - c, x - c
        shifts.add(dx if op == "TranslateX" else dy)
        assert (dy if op == "TranslateX" else dx) == 0
    assert shifts == {-7, 7}


def test_shear_and_rotate_magnitudes_are_applied():
    n = 64
    shear = ALBEFRandAugment(num_ops=1, magnitude=7, p=1.0, ops=["ShearX"], fill=0)
    dx = set()
    for s in range(10):
        torch.manual_seed(s)
        cy, cx = _centroid(shear(_dot(n, 40, 32)))
        # x -> x + s·y about the image's top-left corner (y = 40.5 from it; cv2 shears about the first pixel's
        # centre, half a pixel away: a 0.1 px difference at this row)
        dx.add(round((cx - 32) / 40.5, 2))
        assert cy == pytest.approx(40, abs=1e-6)
    assert dx == {-0.21, 0.21}
    rot = ALBEFRandAugment(num_ops=1, magnitude=7, p=1.0, ops=["Rotate"], fill=0)
    angles = set()

    def angle(cy, cx):  # counter-clockwise about the image centre (31.5, 31.5), in degrees
        return math.degrees(math.atan2(-(cy - 31.5), cx - 31.5))

    for s in range(10):
        torch.manual_seed(s)
        angles.add(round(angle(*_centroid(rot(_dot(n, 32, 52)))) - angle(32, 52)))  # 20 px right of the centre
    assert angles == {-21, 21}


def test_brightness_and_sharpness_always_use_factor_1_36():
    img = _noise_image(16)
    for op, fn in (("Brightness", F.adjust_brightness), ("Sharpness", F.adjust_sharpness)):
        ra = ALBEFRandAugment(num_ops=1, magnitude=7, p=1.0, ops=[op])
        want = np.asarray(fn(img, 1.36))
        for s in range(5):  # never a random sign
            torch.manual_seed(s)
            assert np.array_equal(np.asarray(ra(img)), want), op


def _hue_breaks(space, draws=300):
    """Samples of the train transform in which a pixel of a solid red image stops being clearly red.

    The pixels that carry no grey fill are found by transforming a black image with the same seed (the
    randomness does not depend on the content; black stays 0 under every op, the 128 fill does not). The
    transform is ``train_transform``'s without its deterministic tail (to tensor, CLIP normalisation)."""
    tf = train_transform(64, AugmentConfig(randaugment_space=space))
    assert [type(t) for t in tf.transforms[3:]] == [ToContiguousImage, T.ToDtype, T.Normalize]
    tf = T.Compose(tf.transforms[:3])
    red, black = Image.new("RGB", (64, 64), (220, 20, 30)), Image.new("RGB", (64, 64), (0, 0, 0))
    broken, min_content = 0, 1.0
    for s in range(draws):
        torch.manual_seed(s)
        out = np.asarray(tf(red), dtype=np.int32)
        torch.manual_seed(s)
        content = (np.asarray(tf(black)) == 0).all(-1)
        min_content = min(min_content, content.mean())
        r, g, b = out[content].T
        broken += bool((r < 2 * np.maximum(g, b)).any())
    return broken, min_content


def test_solid_red_keeps_its_hue():
    broken, min_content = _hue_breaks("albef")
    assert broken == 0 and min_content > 0.5  # and the grey fill never covers most of the image
    assert _hue_breaks("torchvision", draws=100)[0] > 0  # Solarize & co.: the check does see colour ops


def test_seeded_calls_are_reproducible():
    tf = train_transform(32, AugmentConfig())
    img = _noise_image(40)
    outs = []
    for s in (1, 1, 2):
        torch.manual_seed(s)
        outs.append(tf(img))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], outs[2])
    ra = ALBEFRandAugment()
    for s in range(20):
        torch.manual_seed(s)
        a = np.asarray(ra(img))
        torch.manual_seed(s)
        assert np.array_equal(a, np.asarray(ra(img)))


def test_config_switch():
    assert AugmentConfig().randaugment_space == "albef"
    assert isinstance(train_transform(32, AugmentConfig()).transforms[2], ALBEFRandAugment)
    tv = train_transform(32, AugmentConfig(randaugment_space="torchvision", randaugment_magnitude=20)).transforms[2]
    assert type(tv) is T.RandAugment and tv.num_magnitude_bins == 31 and tv.magnitude == 20 and tv.num_ops == 2
    assert not any(isinstance(t, T.RandAugment)
                   for t in train_transform(32, AugmentConfig(randaugment=False)).transforms)
    with pytest.raises(ValueError, match=r"augment\.randaugment_space"):
        AugmentConfig(randaugment_space="cv2")
    with pytest.raises(ConfigError, match=r"augment\.randaugment_space"):
        from_dict(AugmentConfig, {"randaugment_space": "RandAugment"}, "x.yaml: augment")
    with pytest.raises(ConfigError, match=r"augment\.randaugment_space: expected a string"):
        from_dict(AugmentConfig, {"randaugment_space": 3}, "x.yaml: augment")
    with pytest.raises(ValueError, match=r"augment\.randaugment_magnitude.*\[0, 10\]"):
        AugmentConfig(randaugment_magnitude=11)
    with pytest.raises(ValueError, match=r"augment\.randaugment_magnitude"):
        AugmentConfig(randaugment_magnitude=31, randaugment_space="torchvision")


@pytest.mark.parametrize("size", [(256, 256), (384, 288), (31, 17)])
def test_whole_pixel_translation_is_the_warp_pixel_for_pixel(size, monkeypatch):
    """The shift that replaces TranslateX/Y on RGB PIL images gives torchvision's bilinear warp's pixels (fill 128
    included), and the op takes that path for every translation it draws."""
    import dataset.transforms as tr

    ra = ALBEFRandAugment()
    img = Image.fromarray(np.random.default_rng(size[0]).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    warp = super(ALBEFRandAugment, ra)._apply_image_or_video_transform  # torchvision's, without the shortcut
    for op in ("TranslateX", "TranslateY"):
        for value in (7.0, -7.0, 3.0, -1.0, 10.0):
            m = ra._to_torchvision(op, value)
            warped = warp(img, op, m, interpolation=T.InterpolationMode.BILINEAR, fill=ra._fill)
            ours = ra._apply_image_or_video_transform(img, op, m, interpolation=T.InterpolationMode.BILINEAR,
                                                      fill=ra._fill)
            assert np.array_equal(np.asarray(warped), np.asarray(ours)), (op, value)
    calls = []
    real = tr.shift_pil
    monkeypatch.setattr(tr, "shift_pil", lambda *a: calls.append(a[1:3]) or real(*a))
    only = ALBEFRandAugment(num_ops=1, p=1.0, ops=["TranslateX", "TranslateY"])
    for s in range(8):
        torch.manual_seed(s)
        only(img)
    assert len(calls) == 8 and all(sorted(map(abs, c)) == [0, 7] for c in calls)
    calls.clear()
    ALBEFRandAugment(num_ops=2, p=1.0, ops=["ShearX", "Rotate"])(img)
    only(torch.from_numpy(np.array(img)).permute(2, 0, 1))  # a tensor image: torchvision's warp
    assert not calls


def test_contiguous_to_image_gives_torchvision_values():
    from torchvision import tv_tensors

    from dataset.transforms import CLIP_MEAN, CLIP_STD, eval_transform

    img = _noise_image(37)
    tail = [T.ToDtype(torch.float32, scale=True), T.Normalize(CLIP_MEAN, CLIP_STD)]
    ours, theirs = T.Compose([ToContiguousImage()] + tail), T.Compose([T.ToImage()] + tail)
    a, b = ours(img), theirs(img)
    assert isinstance(a, tv_tensors.Image) and a.is_contiguous() and not b.is_contiguous()
    assert torch.equal(a, b)
    assert torch.equal(ToContiguousImage()(img), T.ToImage()(img))  # uint8 (normalize_on_device) too
    wide = Image.fromarray(np.random.default_rng(1).integers(0, 256, (23, 41, 3), dtype=np.uint8))
    for im in (wide, wide.convert("L"), wide.convert("RGBA")):  # RGB by bands; other modes through torchvision
        out = ToContiguousImage()(im)
        assert isinstance(out, tv_tensors.Image) and out.is_contiguous() and torch.equal(out, T.ToImage()(im))
    assert torch.equal(torch.stack([a, a]), torch.stack([b, b]))
    assert isinstance(eval_transform(32).transforms[1], ToContiguousImage)


def test_no_crop_is_the_whole_image_resized():
    """crop_scale [1, 1]: for square images the pixels RandomResizedCrop at scale 1 gives (its tries fall back to the
    whole image), without drawing; other shapes are resized whole (RandomResizedCrop would cut the sides)."""
    cfg = AugmentConfig(crop_scale=[1.0, 1.0], hflip=False, randaugment=False)
    tf = train_transform(64, cfg)
    assert type(tf.transforms[0]) is T.Resize
    rrc = T.Compose([T.RandomResizedCrop(64, scale=(1.0, 1.0), interpolation=T.InterpolationMode.BICUBIC,
                                         antialias=True)] + tf.transforms[1:])
    for size in (96, 64, 37, 300):
        img = _noise_image(size, seed=size)
        for s in range(3):
            torch.manual_seed(s)
            assert torch.equal(tf(img), rrc(img)), size
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 120, 3), dtype=np.uint8))
    torch.manual_seed(0)
    state = torch.get_rng_state()
    out = tf(wide)
    assert torch.equal(torch.get_rng_state(), state)  # no random draw
    tail = T.Compose(tf.transforms[1:])
    assert torch.equal(out, tail(F.resize(wide, [64, 64], interpolation=T.InterpolationMode.BICUBIC, antialias=True)))
    assert type(train_transform(64, AugmentConfig(crop_scale=[0.9, 1.0])).transforms[0]) is T.RandomResizedCrop
