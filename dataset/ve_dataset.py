"""SNLI-VE in the original JSON format: ``[{"image": id, "sentence": str, "label": str}]``.

``image`` is a path *without* extension (Flickr30k ids in the real set); the file is ``<image_root>/<image>.jpg``
as the original's ``ve_dataset``. Labels: contradiction 0, neutral 1, entailment 2.

:func:`record_fields` and :func:`image_paths` turn a record into a sample's fields and image paths; the JSON data
set (:class:`VEDataset`), the shard stream (:class:`VEShardSample`) and ``tools.make_shards --task ve`` share them.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from torch.utils.data import Dataset

from dataset.caption_dataset import load_json_list, resolve_image
from dataset.images import (DEFAULT_MAX_IMAGE_PIXELS, BadImagePolicy, DataError, ImageLoader, describe_roots,
                            load_first_readable)
from dataset.shards import ShardSample
from dataset.text import pre_caption

VE_LABELS = {"contradiction": 0, "neutral": 1, "entailment": 2}
REQUIRED = ("image", "sentence", "label")


def record_fields(rec: Dict[str, Any], max_words: int, where: str) -> Dict[str, Any]:
    """``{'caption' (the hypothesis, cleaned), 'label'}`` of a record; ``ValueError`` (prefixed ``where``) for an
    unknown label."""
    if rec["label"] not in VE_LABELS:
        raise DataError(f"{where} has label {rec['label']!r}; expected one of {sorted(VE_LABELS)}")
    return {"caption": pre_caption(rec["sentence"], max_words), "label": VE_LABELS[rec["label"]]}


def image_paths(rec: Dict[str, Any], image_root: Optional[str], ann_file: str) -> List[str]:
    """``[<image_root>/<image>.jpg]`` (relative to the JSON's folder without ``image_root``)."""
    return [resolve_image(f"{rec['image']}.jpg", image_root, ann_file)]


class VEDataset(BadImagePolicy, Dataset):
    """Returns ``{'image', 'caption' (the hypothesis, cleaned), 'label', 'bad_images'}``.

    ``on_bad_image='skip'`` replaces a record with a bad image by another one that loads (image, hypothesis and
    label together); ``bad_images`` lists the skipped paths. Keep ``'raise'`` for val/test."""

    def __init__(self, ann_file: str, transform, image_root: Optional[str] = None, max_words: int = 30,
                 on_bad_image: str = "raise", max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS):
        self.records = []
        for i, rec in enumerate(load_json_list(ann_file, REQUIRED)):
            fields = record_fields(rec, max_words, f"{ann_file}: record {i}")
            self.records.append({"image": image_paths(rec, image_root, ann_file)[0], **fields})
        if not self.records:
            raise DataError(f"{ann_file}: no records")
        self.transform = transform
        self.load = ImageLoader(on_bad_image, max_image_pixels)
        self.where = f"annotation file {ann_file}; {describe_roots([ann_file], image_root)}"

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        i, (image,), bad = load_first_readable(index, len(self.records), lambda j: (self.records[j]["image"],),
                                               self.load, self.where)
        rec = self.records[i]
        return {"image": self.transform(image), "caption": rec["caption"], "label": rec["label"], "bad_images": bad}


class VEShardSample(ShardSample):
    """:class:`VEDataset`'s training samples from shards written by ``tools.make_shards --task ve`` (the json
    member holds the record: ``sentence``, ``label``, ...)."""

    task = "ve"
    keys = ("sentence", "label")

    def __init__(self, transform, max_words: int = 30):
        self.transform, self.max_words = transform, max_words

    def __call__(self, meta: Dict[str, Any], images: List[Any], where: str) -> Dict[str, Any]:
        fields = record_fields(meta, self.max_words, where)
        return {"image": self.transform(images[0]), **fields}
