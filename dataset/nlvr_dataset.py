"""NLVR2 in the original JSON format: ``[{"images": [left, right], "sentence": str, "label": "True" | "False"}]``.

Each of the two images gets its own random transform (the original's ``nlvr_dataset``). Labels: False 0, True 1.

:func:`record_fields` and :func:`image_paths` turn a record into a sample's fields and image paths; the JSON data
set (:class:`NLVRDataset`), the shard stream (:class:`NLVRShardSample`) and ``tools.make_shards --task nlvr``
share them. In shards the two images are the members ``left.jpg`` and ``right.jpg`` (:data:`IMAGE_MEMBERS`).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

from torch.utils.data import Dataset

from dataset.caption_dataset import load_json_list, resolve_image
from dataset.images import (DEFAULT_MAX_IMAGE_PIXELS, BadImagePolicy, DataError, ImageLoader, describe_roots,
                            load_first_readable)
from dataset.shards import ShardSample
from dataset.text import pre_caption

_LABELS = {"True": 1, "False": 0, True: 1, False: 0}
REQUIRED = ("images", "sentence", "label")
IMAGE_MEMBERS = ("left", "right")  # shard members left.jpg, right.jpg: image0, image1


def record_fields(rec: Dict[str, Any], max_words: int, where: str) -> Dict[str, Any]:
    """``{'caption' (the sentence, cleaned), 'label'}`` of a record; ``ValueError`` (prefixed ``where``) for an
    unknown label."""
    if rec["label"] not in _LABELS:
        raise DataError(f"{where} has label {rec['label']!r}; expected 'True' or 'False'")
    return {"caption": pre_caption(rec["sentence"], max_words), "label": _LABELS[rec["label"]]}


def image_paths(rec: Dict[str, Any], image_root: Optional[str], ann_file: str, where: str) -> List[str]:
    """The record's two image paths, resolved; ``ValueError`` (prefixed ``where``) unless ``images`` is a list of
    two."""
    images = rec["images"]
    if not isinstance(images, list) or len(images) != 2:
        raise DataError(f"{where}: 'images' must be a list of two paths, got {images!r}")
    return [resolve_image(p, image_root, ann_file) for p in images]


class NLVRDataset(BadImagePolicy, Dataset):
    """Returns ``{'image0', 'image1', 'caption' (the sentence, cleaned), 'label', 'bad_images'}``.

    ``on_bad_image='skip'`` replaces a record with a bad image by another record whose two images load (both
    images, sentence and label together); ``bad_images`` lists the skipped paths. Keep ``'raise'`` for val/test."""

    def __init__(self, ann_files: Union[str, Sequence[str]], transform, image_root: Optional[str] = None,
                 max_words: int = 30, on_bad_image: str = "raise",
                 max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS):
        if isinstance(ann_files, str):
            ann_files = [ann_files]
        self.records: List[Dict[str, Any]] = []
        for f in ann_files:
            for i, rec in enumerate(load_json_list(f, REQUIRED)):
                where = f"{f}: record {i}"
                paths = image_paths(rec, image_root, f, where)
                self.records.append({"images": paths, **record_fields(rec, max_words, where)})
        if not self.records:
            raise DataError(f"no records in {list(ann_files)}")
        self.transform = transform
        self.load = ImageLoader(on_bad_image, max_image_pixels)
        self.where = f"annotation files {list(ann_files)}; {describe_roots(ann_files, image_root)}"

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        i, images, bad = load_first_readable(index, len(self.records), lambda j: self.records[j]["images"],
                                             self.load, self.where)
        rec = self.records[i]
        left, right = (self.transform(im) for im in images)
        return {"image0": left, "image1": right, "caption": rec["caption"], "label": rec["label"], "bad_images": bad}


class NLVRShardSample(ShardSample):
    """:class:`NLVRDataset`'s training samples from shards written by ``tools.make_shards --task nlvr``: the
    members ``left.jpg`` and ``right.jpg`` are ``image0`` and ``image1`` (each under its own draw of the transform,
    left first), the json member holds the record (``sentence``, ``label``, ``images``, ``image_paths``)."""

    task = "nlvr"
    keys = ("sentence", "label")
    images = IMAGE_MEMBERS

    def __init__(self, transform, max_words: int = 30):
        self.transform, self.max_words = transform, max_words

    def __call__(self, meta: Dict[str, Any], images: List[Any], where: str) -> Dict[str, Any]:
        fields = record_fields(meta, self.max_words, where)
        left, right = (self.transform(im) for im in images)
        return {"image0": left, "image1": right, **fields}
