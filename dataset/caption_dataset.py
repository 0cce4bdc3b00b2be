"""Image-caption data sets in the original ALBEF JSON formats.

* pre-training: a list of ``{"image": path, "caption": str | [str, ...]}`` (several files are concatenated;
  a list caption is sampled uniformly each time the image is drawn);
* retrieval evaluation: a list of ``{"image": path, "caption": [str, ...]}`` (one record per image).

Relative image paths are resolved against ``image_root`` when given, else against the JSON file's folder
(absolute paths, as in the original pre-training files, are used as they are). Images are decoded by
:mod:`dataset.images` (``ImageLoader`` is re-exported here).
"""
from __future__ import annotations

import json
import logging
import os
import random
from typing import Any, Dict, List, Optional, Sequence, Union

from torch.utils.data import Dataset

from dataset.images import (DEFAULT_MAX_IMAGE_PIXELS, BadImageError, BadImagePolicy, DataError,  # noqa: F401
                            ImageLoader, MissingDataError, describe_roots, load_first_readable, require_images)
from dataset.text import pre_caption
from utils import distributed as du

log = logging.getLogger(__name__)


def missing_annotation_file(path: str, key: Optional[str] = None) -> str:
    """The message for an annotation file that does not exist (``key``: the config key that names it)."""
    hint = ("; the synthetic world's files are generated: `make demo` (then `make tasks-demo` / "
            "`make grounding-demo` for the task files)") if "synthetic" in path else ""
    return f"annotation file {path} does not exist{f' (config key {key})' if key else ''}{hint}"


def load_json_list(path: str, required: Sequence[str]) -> List[Dict[str, Any]]:
    """Read a JSON list of records and check that each has the ``required`` keys (errors name file and index)."""
    if not os.path.isfile(path):
        raise MissingDataError(missing_annotation_file(path))
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise DataError(f"{path}: record {i} is not an object")
        missing = [k for k in required if k not in rec]
        if missing:
            raise DataError(f"{path}: record {i} lacks key(s) {missing}: {json.dumps(rec)[:200]}")
    return data


def resolve_image(path: str, image_root: Optional[str], ann_file: str) -> str:
    if os.path.isabs(path):
        return path
    return os.path.join(image_root if image_root else os.path.dirname(os.path.abspath(ann_file)), path)


class PretrainDataset(BadImagePolicy, Dataset):
    """(image, caption) pairs for pre-training; returns ``{'image': tensor, 'caption': str, 'bad_images': [path,
    ...]}``. With ``on_bad_image='skip'`` a bad image is replaced by another record that loads (drawn at random:
    :func:`load_first_readable`) and ``bad_images`` lists the paths skipped for this sample (usually none)."""

    def __init__(self, ann_files: Union[str, Sequence[str]], transform, image_root: Optional[str] = None,
                 max_words: int = 30, on_bad_image: str = "skip",
                 max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS):
        if isinstance(ann_files, str):
            ann_files = [ann_files]
        self.records: List[Dict[str, Any]] = []
        for f in ann_files:
            empty = []  # records without a non-empty caption, skipped under on_bad_image='skip'
            for i, rec in enumerate(load_json_list(f, ("image", "caption"))):
                caption = rec["caption"]
                texts = caption if isinstance(caption, list) else [caption]
                if not isinstance(caption, (str, list)) or not all(isinstance(t, str) for t in texts):
                    raise DataError(f"{f}: record {i}: caption must be a string or a list of strings: "
                                    f"{json.dumps(rec)[:200]}")
                kept = [t for t in texts if t.strip()]
                if len(kept) < len(texts) or not texts:
                    if on_bad_image != "skip":
                        raise DataError(f"{f}: record {i}: caption must be a non-empty string or a non-empty list of "
                                        f"them (on_bad_image: skip skips such records): {json.dumps(rec)[:200]}")
                    if not kept:
                        empty.append(i)
                        continue
                    caption = kept if isinstance(caption, list) else caption
                self.records.append({"image": resolve_image(rec["image"], image_root, f), "caption": caption})
            if empty and du.is_main_process():  # web-scale caption files have a few (the original trained on "")
                log.warning("%s: %d record(s) without a non-empty caption skipped (records %s%s); empty captions "
                            "in a list are dropped", f, len(empty), ", ".join(map(str, empty[:5])),
                            " ..." if len(empty) > 5 else "")
        if not self.records:
            raise DataError(f"no records in {list(ann_files)}")
        self.transform = transform
        self.max_words = max_words
        self.load = ImageLoader(on_bad_image, max_image_pixels)
        self.where = f"annotation files {list(ann_files)}; {describe_roots(ann_files, image_root)}"

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        i, (image,), bad = load_first_readable(index, len(self.records), lambda j: (self.records[j]["image"],),
                                               self.load, self.where)
        caption = self.records[i]["caption"]
        if isinstance(caption, list):
            caption = random.choice(caption)
        return {"image": self.transform(image), "caption": pre_caption(caption, self.max_words), "bad_images": bad}


class RetrievalEvalDataset(Dataset):
    """One record per image with its captions (the original ``re_eval_dataset``).

    Attributes:
        text: all cleaned captions, flattened; ``img2txt[i]``: caption ids of image i; ``txt2img[t]``: image id.
    """

    def __init__(self, ann_file: str, transform, image_root: Optional[str] = None, max_words: int = 30,
                 max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS):
        records = load_json_list(ann_file, ("image", "caption"))
        self.transform = transform
        self.images: List[str] = []
        self.text: List[str] = []
        self.img2txt: Dict[int, List[int]] = {}
        self.txt2img: Dict[int, int] = {}
        for i, rec in enumerate(records):
            self.images.append(resolve_image(rec["image"], image_root, ann_file))
            captions = rec["caption"] if isinstance(rec["caption"], list) else [rec["caption"]]
            if not captions or not all(isinstance(c, str) for c in captions):  # every test image needs its texts
                raise DataError(f"{ann_file}: record {i}: caption must be a string or a non-empty list of strings: "
                                f"{json.dumps(rec)[:200]}")
            self.img2txt[i] = []
            for c in captions:
                self.txt2img[len(self.text)] = i
                self.img2txt[i].append(len(self.text))
                self.text.append(pre_caption(c, max_words))
        self.load = ImageLoader("raise", max_image_pixels)  # evaluation: every image counts, a bad one is an error
        require_images(enumerate(self.images), f"annotation file {ann_file}; {describe_roots([ann_file], image_root)}")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        return {"image": self.transform(self.load(self.images[index])), "index": index}


class RetrievalTrainDataset(BadImagePolicy, Dataset):
    """One record per (image, caption) with an ``image_id`` (the original ``re_train_dataset``); returns
    ``{'image', 'caption', 'idx', 'bad_images'}`` where ``idx`` numbers the distinct image ids in order of first
    appearance. ``on_bad_image='skip'`` replaces a record whose image is bad by another one that loads (image,
    caption and ``idx`` together); ``bad_images`` lists the skipped paths."""

    def __init__(self, ann_files: Union[str, Sequence[str]], transform, image_root: Optional[str] = None,
                 max_words: int = 30, on_bad_image: str = "raise",
                 max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS):
        if isinstance(ann_files, str):
            ann_files = [ann_files]
        self.records: List[Dict[str, Any]] = []
        self.img_ids: Dict[Any, int] = {}
        for f in ann_files:
            for rec in load_json_list(f, ("image", "caption", "image_id")):
                key = rec["image_id"]
                if key not in self.img_ids:
                    self.img_ids[key] = len(self.img_ids)
                self.records.append({"image": resolve_image(rec["image"], image_root, f), "caption": rec["caption"],
                                     "idx": self.img_ids[key]})
        self.transform = transform
        self.max_words = max_words
        self.load = ImageLoader(on_bad_image, max_image_pixels)
        self.where = f"annotation files {list(ann_files)}; {describe_roots(ann_files, image_root)}"

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        i, (image,), bad = load_first_readable(index, len(self.records), lambda j: (self.records[j]["image"],),
                                               self.load, self.where)
        rec = self.records[i]
        return {"image": self.transform(image), "caption": pre_caption(rec["caption"], self.max_words),
                "idx": rec["idx"], "bad_images": bad}
