"""Image decoding for every data set: a file -> an 8-bit RGB ``PIL.Image``, or a :class:`BadImageError` that says
which file and why.

Decoding rules (``to_rgb``):

* ``RGB`` is kept; ``1`` / ``L`` greys are replicated to three channels; ``CMYK``, ``YCbCr``, ``RGBX``, ``HSV``
  and ``LAB`` are converted by PIL. ICC profiles are not applied (as the original).
* 16- and 32-bit integer greys (``I;16``, ``I;16L``, ``I;16B``, ``I;16N``, ``I``) are scaled to 8 bit by their bit
  depth with ``round(v * 255 / (2**bits - 1))``: a 16-bit 65535 -> 255, 32768 -> 128 (PIL's own
  ``convert('RGB')`` clips them at 255, so a 16-bit photo becomes white). ``bits`` is 16 for the ``I;16*`` modes;
  for ``I`` it is the TIFF ``BitsPerSample`` (signed TIFF samples: negatives clip to 0 and the scale is
  ``2**(bits-1) - 1``), 16 for a PNG (older Pillow opened 16-bit PNGs as ``I``), else 32.
* ``F`` (32-bit float) greys: values already in [0, 1] are scaled by 255; any other range is stretched linearly from
  its minimum to its maximum onto [0, 255] (a constant image gives 0). NaN counts as the minimum, +/-inf are
  clipped to the finite range.
* Transparency (``RGBA``, ``LA``, ``PA``, ``RGBa``, ``La``, and ``P`` / ``L`` / ``RGB`` with a ``transparency``
  entry, e.g. a PNG ``tRNS`` palette) is alpha-composited onto a **white** background (:data:`BACKGROUND`).
  ``convert('RGB')``, the original's, dropped alpha and kept the colour stored under transparent pixels, often
  black or junk.
* EXIF orientation is deliberately *not* applied (no ``exif_transpose``): the original did not either, and the
  released checkpoints were trained on the stored pixel order.
* Multi-frame files (GIF, TIFF, APNG) give their first frame.

Bad files: a missing or unreadable path, a file PIL cannot identify, a truncated or corrupt file (the image is fully
decoded with ``im.load()`` while PIL's ``LOAD_TRUNCATED_IMAGES`` is off, so a torn JPEG is an error rather than a
grey-filled picture), an image with zero pixels, or one with more than ``max_image_pixels`` pixels (PIL's
decompression-bomb guard; default :data:`DEFAULT_MAX_IMAGE_PIXELS`, PIL's own default; ``None`` = no limit). The
limit is checked on the header's size before anything is decoded.
"""
from __future__ import annotations

import contextlib
import itertools
import logging
import os
import threading
import warnings
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageFile

log = logging.getLogger(__name__)

#: PIL's default ``Image.MAX_IMAGE_PIXELS`` (``1024 * 1024 * 1024 // 4 // 3`` = 89,478,485 pixels, about a
#: 9,459 x 9,459 image): the default of the ``max_image_pixels`` config key.
DEFAULT_MAX_IMAGE_PIXELS: int = int(1024 * 1024 * 1024 // 4 // 3)
#: The values of the ``on_bad_image`` config key.
ON_BAD_IMAGE_CHOICES = ("skip", "raise")
#: Colour transparent pixels are composited onto.
BACKGROUND = (255, 255, 255)
#: ``BadImageError.reason`` values.
REASONS = ("missing", "unreadable", "not_an_image", "truncated", "corrupt", "too_large", "empty", "unsupported_mode")

_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_INT_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_PIL_GLOBALS_LOCK = threading.Lock()


class BadImageError(OSError):
    """An image that cannot be used: ``path``, ``reason`` (one of :data:`REASONS`) and ``detail``."""

    def __init__(self, path: str, reason: str, detail: str = ""):
        self.path, self.reason, self.detail = path, reason, detail
        super().__init__(f"bad image {path}: {reason}" + (f" ({detail})" if detail else ""))

    def __reduce__(self):  # picklable across loader workers and multiprocessing pools
        return BadImageError, (self.path, self.reason, self.detail)


def check_image_options(on_bad_image: str, max_image_pixels: Optional[int]) -> None:
    """Validate the ``on_bad_image`` and ``max_image_pixels`` config keys (errors name the key)."""
    if on_bad_image not in ON_BAD_IMAGE_CHOICES:
        raise ValueError(f"on_bad_image must be 'skip' or 'raise', got {on_bad_image!r}")
    if max_image_pixels is not None and (isinstance(max_image_pixels, bool) or not isinstance(max_image_pixels, int)
                                         or max_image_pixels < 1):
        raise ValueError(f"max_image_pixels must be a positive integer or null (no limit), got {max_image_pixels!r}")


# ------------------------------------------------------------------------------------------------ conversion
def _round_u8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8)


def _int_bit_depth(im: Image.Image) -> Tuple[int, bool]:
    """(bits, signed) of an integer grey image."""
    if im.mode.startswith("I;16"):
        return 16, False
    tags = getattr(im, "tag_v2", None)
    if tags is not None:  # TIFF: BitsPerSample (258), SampleFormat (339: 1 unsigned, 2 signed)
        bits = tags.get(258)
        fmt = tags.get(339)
        bits = bits[0] if isinstance(bits, (tuple, list)) and bits else bits
        fmt = fmt[0] if isinstance(fmt, (tuple, list)) and fmt else fmt
        if isinstance(bits, int) and 1 <= bits <= 32:
            return bits, fmt == 2
    if im.format == "PNG":
        return 16, False
    return 32, False


def _int_grey_to_u8(im: Image.Image) -> np.ndarray:
    bits, signed = _int_bit_depth(im)
    top = float(2 ** (bits - 1) - 1 if signed else 2 ** bits - 1)
    a = np.asarray(im).astype(np.float64)
    return _round_u8(np.clip(a, 0.0, top) * (255.0 / top))


def _float_grey_to_u8(im: Image.Image) -> np.ndarray:
    a = np.asarray(im).astype(np.float64)
    finite = np.isfinite(a)
    if not finite.any():
        return np.zeros(a.shape, np.uint8)
    lo, hi = float(a[finite].min()), float(a[finite].max())
    a = np.where(np.isnan(a), lo, np.clip(a, lo, hi))
    if lo >= 0.0 and hi <= 1.0:
        return _round_u8(a * 255.0)
    if hi == lo:
        return np.zeros(a.shape, np.uint8)
    return _round_u8((a - lo) * (255.0 / (hi - lo)))


def to_rgb(im: Image.Image, background: Tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """A new 8-bit RGB image from a loaded PIL image of any mode (rules in the module docstring).

    Raises ``ValueError`` for a mode PIL cannot convert."""
    mode = im.mode
    if mode in _INT_GREY_MODES:
        return Image.fromarray(_int_grey_to_u8(im), "L").convert("RGB")
    if mode == "F":
        return Image.fromarray(_float_grey_to_u8(im), "L").convert("RGB")
    if mode in _ALPHA_MODES or (mode in ("P", "L", "RGB") and "transparency" in im.info):
        if mode == "La":  # PIL converts premultiplied La only to LA
            im = im.convert("LA")
        rgba = im.convert("RGBA")
        out = Image.new("RGBA", rgba.size, tuple(background) + (255,))
        out.alpha_composite(rgba)
        return out.convert("RGB")
    return im.convert("RGB")  # a copy for RGB; 1 / L replicated; P, CMYK, YCbCr, RGBX, HSV, LAB by PIL


# ------------------------------------------------------------------------------------------------ decoding
@contextlib.contextmanager
def _pil_guards(max_image_pixels: Optional[int]) -> Iterator[None]:
    """Make PIL refuse what we refuse, for this call only.

    PIL checks ``Image.MAX_IMAGE_PIXELS`` inside ``Image.open`` (an error over twice the limit, a warning over it)
    and reads ``ImageFile.LOAD_TRUNCATED_IMAGES`` while decoding. Both are process globals: they are changed only
    when they would let through less than asked (a looser pixel limit than PIL's; truncated loading turned on by
    some other code), under a lock, and restored afterwards. The warning is made an error."""
    current = Image.MAX_IMAGE_PIXELS
    loosen = current is not None and (max_image_pixels is None or max_image_pixels > current)
    strict_truncation = ImageFile.LOAD_TRUNCATED_IMAGES
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        if not loosen and not strict_truncation:
            yield
            return
        with _PIL_GLOBALS_LOCK:
            saved = Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES
            if loosen:
                Image.MAX_IMAGE_PIXELS = max_image_pixels
            ImageFile.LOAD_TRUNCATED_IMAGES = False
            try:
                yield
            finally:
                Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES = saved


def _reason(e: BaseException) -> str:
    if isinstance(e, FileNotFoundError):
        return "missing"
    if isinstance(e, (IsADirectoryError, NotADirectoryError, PermissionError)):
        return "unreadable"
    if isinstance(e, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        return "too_large"
    if isinstance(e, Image.UnidentifiedImageError):
        return "not_an_image"
    if "truncated" in str(e).lower():
        return "truncated"
    return "corrupt"


def load_rgb(path: str, max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
             background: Tuple[int, int, int] = BACKGROUND) -> Image.Image:
    """Open, fully decode and convert ``path`` to 8-bit RGB; any problem raises :class:`BadImageError`."""
    try:
        with _pil_guards(max_image_pixels), Image.open(path) as im:
            w, h = im.size
            if w <= 0 or h <= 0:
                raise BadImageError(path, "empty", f"size {w}x{h}")
            if max_image_pixels is not None and w * h > max_image_pixels:
                raise BadImageError(path, "too_large", f"{w}x{h} = {w * h} pixels > max_image_pixels "
                                                       f"{max_image_pixels}")
            im.load()  # decodes everything: a truncated or corrupt file fails here, not in the transform
            try:
                return to_rgb(im, background)
            except ValueError as e:
                raise BadImageError(path, "unsupported_mode", f"mode {im.mode}: {e}") from e
    except BadImageError:
        raise
    except MemoryError as e:
        raise BadImageError(path, "too_large", f"out of memory decoding it: {e}") from e
    except Exception as e:  # PIL's plugins raise OSError, SyntaxError, ValueError, struct.error, IndexError, ...
        reason = _reason(e)
        raise BadImageError(path, reason, "" if reason == "missing" else f"{type(e).__name__}: {e}") from e


class ImageLoader:
    """Loads images with :func:`load_rgb`. A bad image raises :class:`BadImageError` (``on_bad_image='raise'``) or
    (``'skip'``) returns ``None``, counted in ``num_bad`` (per process: each loader worker has its own copy) and
    logged for the first ``max_warnings`` skips (then every 1000th); the last error is kept in ``last_error``. A file
    once skipped is skipped again without being read (per process). Exact totals come from the ``bad_images`` key the
    data sets put in every sample."""

    def __init__(self, on_bad_image: str = "skip", max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS,
                 max_warnings: int = 20):
        check_image_options(on_bad_image, max_image_pixels)
        self.on_bad_image = on_bad_image
        self.max_image_pixels = max_image_pixels
        self.max_warnings = max_warnings
        self.num_bad = 0
        self.last_error: Optional[BadImageError] = None
        self._known_bad: Dict[str, BadImageError] = {}  # skipped files are not read again by this process

    def __call__(self, path: str) -> Optional[Image.Image]:
        known = self._known_bad.get(path)
        if known is not None:  # a block of missing files (a lost sub-folder) would be re-read by every sample in it
            self.last_error = known
            return None
        try:
            return load_rgb(path, self.max_image_pixels)
        except BadImageError as e:
            self.last_error = e
            if self.on_bad_image == "raise":
                raise
            if len(self._known_bad) < 1_000_000:
                self._known_bad[path] = e
            self.num_bad += 1
            if self.num_bad <= self.max_warnings or self.num_bad % 1000 == 0:
                from torch.utils.data import get_worker_info

                where = "loader worker" if get_worker_info() is not None else "process"
                log.warning("skipping %s; %d skipped so far in this %s (pid %d)", e, self.num_bad, where, os.getpid())
            return None


class BadImagePolicy:
    """Mixin of the training data sets that take ``on_bad_image``: ``self.load`` is their :class:`ImageLoader`,
    ``self.where`` describes their files and image root for the error raised when no record loads."""

    load: ImageLoader
    where: str = ""

    def set_image_options(self, on_bad_image: str, max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS):
        """Replace the loader (for data sets built by someone else's factory); returns ``self``."""
        self.load = ImageLoader(on_bad_image, max_image_pixels)
        return self

    def check_image_sample(self, k: int = 64):
        """Raise :class:`MissingDataError` when none of ``k`` records spread over the data set has its image files:
        a wrong ``image_root`` (or image paths relative to another folder) is then named at start-up, in one line,
        instead of every loader worker trying every record of the data set before it gives up. Returns ``self``."""
        records = getattr(self, "records", None)
        if not records:
            return self
        picks = sorted({round(j * (len(records) - 1) / max(k - 1, 1)) for j in range(min(k, len(records)))})
        paths = [p for i in picks for p in (records[i]["images"] if "images" in records[i] else [records[i]["image"]])]
        if paths and not any(os.path.exists(p) for p in paths):
            raise MissingDataError(f"none of the images of {len(picks)} records spread over the training data exists "
                                   f"(e.g. {paths[0]}): {self.where or type(self).__name__}. Check image_root (and "
                                   "that the JSON's image paths are relative to it); `python -m tools.check_data "
                                   "--config <config>` lists every bad record")
        return self

    def require_images(self):
        """Check that every record's image files exist (:func:`require_images`; for evaluation sets); returns
        ``self``. The records are ``self.records``, each with an ``image`` path or a list of ``images``."""
        records = getattr(self, "records")
        require_images(((i, p) for i, rec in enumerate(records)
                        for p in (rec["images"] if "images" in rec else [rec["image"]])),
                       self.where or type(self).__name__)
        return self


class DataError(ValueError):
    """A data file or one of its records is malformed (the message names the file and the record)."""


class MissingDataError(FileNotFoundError):
    """An annotation file, or images of an evaluation set, do not exist (the message names them, their records and
    the roots searched)."""


def require_images(paths: Iterable[Tuple[int, str]], where: str) -> None:
    """Raise :class:`MissingDataError` naming the images of ``paths`` (``(record index, path)``) that do not exist.
    Evaluation needs every image: its data sets check this when they are built, so that a missing file stops the run
    at start-up, not after a training epoch."""
    seen, missing = set(), []
    for i, p in paths:
        if p not in seen:
            seen.add(p)
            if not os.path.isfile(p):
                missing.append(f"record {i}: {p}")
    if missing:
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        raise MissingDataError(
            f"{len(missing)} of the {len(seen)} images do not exist ({where}); evaluation needs every image: "
            + "; ".join(missing[:5]) + more + ". Check image_root; `python -m tools.check_data` lists every bad "
            "record.")


def describe_roots(ann_files: Sequence[str], image_root: Optional[str]) -> str:
    """Where relative image paths were looked for, for error messages."""
    if image_root:
        return f"image_root: {image_root!r} (resolved: {os.path.abspath(image_root)})"
    folders = sorted({os.path.dirname(os.path.abspath(f)) for f in ann_files})
    return "image_root is not set, so relative paths were resolved against the JSON file's folder: " + \
        ", ".join(folders)


RANDOM_SUBSTITUTES = 64  # substitutes drawn at random for a bad record before the search turns sequential


def substitute_record(index: int, attempt: int, num_records: int) -> int:
    """The record tried in place of ``index`` at ``attempt`` (>= 1): drawn at random, but a fixed function of
    ``(index, attempt)`` (a splitmix64 hash), so that a resumed epoch substitutes as the uninterrupted one did and the
    sample's own random stream (its augmentation) is not consumed."""
    x = (index * 0x9E3779B97F4A7C15 + attempt * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) % num_records


def load_first_readable(index: int, num_records: int, paths_of: Callable[[int], Sequence[str]],
                        loader: ImageLoader, where: str) -> Tuple[int, List[Image.Image], List[str]]:
    """The images of record ``index`` or, when one of them is bad and ``loader`` skips, of another record whose
    images all load: ``(record used, its images, the bad paths met on the way)``. A whole record is substituted,
    never one image of it, so captions, labels and pairs stay with their images.

    Substitutes are drawn at random (:func:`substitute_record`; the first :data:`RANDOM_SUBSTITUTES` tries), not taken
    in file order: a block of consecutive bad records (a lost sub-folder) then neither makes every sample in it read
    the rest of the block nor hands the record after it many times, and the bad paths a sample reports are an
    unbiased sample of the data set's bad share (what ``max_bad_image_fraction`` compares). After that the search
    goes through the records in order from ``index`` (wrapping around); when no record loads, raises
    ``RuntimeError`` naming the first failures and ``where`` (the annotation files and :func:`describe_roots`)."""
    bad: List[str] = []
    errors: Dict[str, str] = {}  # the first few distinct failing paths -> error
    tries = itertools.chain((index,),  # lazily: most samples load at once
                            (substitute_record(index, a, num_records) for a in range(1, RANDOM_SUBSTITUTES + 1)),
                            ((index + a) % num_records for a in range(1, num_records)))
    for i in tries:
        images = []
        for p in paths_of(i):
            image = loader(p)
            if image is None:
                bad.append(p)
                if len(errors) < 3 and p not in errors:
                    errors[p] = str(loader.last_error) if loader.last_error is not None else f"bad image {p}"
                break
            images.append(image)
        else:
            return i, images, bad
    raise RuntimeError(
        f"no readable image in the whole data set: all {num_records} records failed ({where}). First failures: "
        + "; ".join(errors.values()) + ". Check image_root (and that the image paths in the JSON are right); "
        "`python -m tools.check_data --config <config>` lists every bad record.")
