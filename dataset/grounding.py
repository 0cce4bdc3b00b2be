"""Weakly-supervised visual grounding data (RefCOCO+, the original ``Grounding.py`` protocol).

Files, in the original formats (config keys in brackets):

* ``refcoco+_train.json`` [``train_file``], ``refcoco+_val.json`` and ``refcoco+_test.json`` [``test_file``]: a
  JSON list of ``{"image": path, "text": referring expression, "ref_id": int}``, one record per expression;
  ``ref_id`` is needed by the evaluation files only. Read by :class:`GroundingDataset`.
* ``<refcoco_data>/refcoco+/refs(unc).p`` [``refcoco_data``]: a pickle (written by Python 2) of a list of refs
  ``{"ref_id", "ann_id", "image_id", "split": "train" | "val" | "testA" | "testB", "sentences", "category_id",
  "file_name", ...}``; ``<refcoco_data>/refcoco+/instances.json``: COCO ``{"images": [{"id", "file_name",
  "height", "width"}], "annotations": [{"id", "image_id", "bbox": [x, y, w, h], "category_id"}], "categories"}``.
  Read by :class:`Refer` (the original's ``REFER(refcoco_data, 'refcoco+', 'unc')``, reduced to what the
  evaluation uses).
* ``dets.json`` [``det_file``]: detector proposals ``{str(image_id): [[x, y, w, h, ...], ...]}``. Read by
  :func:`load_dets`.

The refs pickle is read by :func:`safe_load_pickle`, never by ``pickle.load``: a pickle can name any importable
function and call it while loading, so only plain containers, strings and numbers are admitted.

Training can also stream shards of ``refcoco+_train.json`` (``tools.make_shards --task grounding``) through
:class:`GroundingShardSample`; it shares :func:`record_fields` and :func:`image_key` with :class:`GroundingDataset`.
"""
from __future__ import annotations

import io
import json
import math
import os
import pickle
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from torch.utils.data import Dataset

from dataset import CaptionCollator
from dataset.caption_dataset import load_json_list, resolve_image
from dataset.images import (DEFAULT_MAX_IMAGE_PIXELS, BadImagePolicy, DataError, ImageLoader, MissingDataError,
                            describe_roots, load_first_readable)
from dataset.shards import ShardSample, image_index
from dataset.text import pre_caption

# ------------------------------------------------------------------------------------------------ safe pickles

#: The types :func:`safe_load_pickle` returns. Sets and frozensets only arrive through the protocol-4 opcodes
#: ``EMPTY_SET`` / ``ADDITEMS`` / ``FROZENSET``, which build them without any global; protocols 0-3 (and so every
#: Python 2 pickle) spell a set as a call of the global ``builtins.set`` / ``__builtin__.set``, which is refused.
#: Likewise Python 3 ``bytes`` load from protocols 3+ only (0-2 call ``_codecs.encode``); Python 2 byte strings are
#: ``str`` opcodes and load at any protocol.
PLAIN_TYPES = (dict, list, tuple, str, bytes, int, float, bool, type(None), set, frozenset)
_PLAIN_WORDS = "plain containers and numbers (dict, list, tuple, str, bytes, int, float, bool, None)"


class UnsafePickleError(DataError):
    """A pickle that needs something other than plain containers and numbers (a global, a persistent id, ...)."""


class _PlainUnpickler(pickle.Unpickler):
    """An unpickler that can build only what the pickle opcodes build by themselves: every global (the only way a
    pickle reaches a callable: ``GLOBAL``, ``STACK_GLOBAL``, ``INST``, ``OBJ``, ``EXT*``, hence ``REDUCE`` and
    ``NEWOBJ``) and every persistent id is refused."""

    def __init__(self, file, path: str, encoding: str):
        super().__init__(file, encoding=encoding, errors="strict")
        self.path = path

    def find_class(self, module: str, name: str):
        raise UnsafePickleError(f"{self.path}: refused to load the global {module}.{name}: this file must hold only "
                                f"{_PLAIN_WORDS}; a pickle that names a global can run arbitrary code when loaded")

    def persistent_load(self, pid: Any):
        raise UnsafePickleError(f"{self.path}: refused a persistent id ({pid!r}): this file must hold only "
                                f"{_PLAIN_WORDS}")


def _check_plain(obj: Any, path: str) -> None:
    """Every object reachable from ``obj`` has one of :data:`PLAIN_TYPES` (protocol 5 builds ``bytearray`` and
    out-of-band buffers without a global; they are refused here)."""
    stack, seen = [obj], set()
    while stack:
        x = stack.pop()
        if type(x) not in PLAIN_TYPES:
            raise UnsafePickleError(f"{path}: refused an object of type {type(x).__name__}: this file must hold only "
                                    f"{_PLAIN_WORDS}")
        if isinstance(x, (dict, list, tuple, set, frozenset)) and id(x) not in seen:
            seen.add(id(x))  # containers may be shared or self-referencing
            stack.extend(x.items() if isinstance(x, dict) else x)


def safe_load_pickle(path: str) -> Any:
    """Load a pickle that holds only :data:`PLAIN_TYPES`, refusing anything that needs a global.

    Python 2 ``str`` objects (e.g. in REFER's ``refs(unc).p``) are decoded as UTF-8 and, if some are not valid
    UTF-8, the whole file is read again decoding them as Latin-1 (which never fails). Python 2 ``unicode`` objects
    are stored as UTF-8 and need no choice.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        UnsafePickleError: the pickle needs a global (e.g. ``os.system`` through ``__reduce__``, a numpy array),
            a persistent id, or builds an object of another type; nothing it names is imported or called.
        ValueError: the file is not a valid pickle.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist")
    with open(path, "rb") as f:
        data = f.read()
    for encoding in ("utf-8", "latin1"):
        try:
            obj = _PlainUnpickler(io.BytesIO(data), path, encoding).load()
            break
        except UnsafePickleError:
            raise
        except UnicodeDecodeError:
            if encoding == "latin1":
                raise
        except Exception as e:  # UnpicklingError, EOFError, ValueError (unknown extension code), ...
            raise DataError(f"{path}: not a valid pickle ({type(e).__name__}: {e})") from e
    _check_plain(obj, path)
    return obj


# ------------------------------------------------------------------------------------------------ REFER files


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_box(box: Any, positive: bool = True) -> bool:
    """``[x, y, w, h, ...]``: at least four finite numbers, ``w`` and ``h`` positive (or non-negative)."""
    if not (isinstance(box, list) and len(box) >= 4 and all(_is_number(v) for v in box[:4])):
        return False
    return min(box[2], box[3]) > 0 if positive else min(box[2], box[3]) >= 0


def _short(x: Any) -> str:
    text = repr(x)
    return text if len(text) <= 200 else text[:200] + "..."


class Refer:
    """The REFER annotations of one data set (the original's ``refTools.refer_python3.REFER``, the parts that
    grounding evaluation uses), with every record checked on load.

    ``Refer(root)`` reads ``<root>/refcoco+/refs(unc).p`` and ``<root>/refcoco+/instances.json`` like
    ``REFER(root, 'refcoco+', 'unc')`` (``root`` is the config key ``refcoco_data``); :meth:`from_files` takes the
    two paths. Attributes ``refs`` (ref_id -> ref), ``anns`` (ann_id -> annotation) and ``imgs`` (image_id ->
    image record) are the original's ``Refs``, ``Anns`` and ``Imgs``.

    Raises:
        FileNotFoundError: a file is missing (one line naming it and the config key).
        ValueError: malformed content (naming the file and the record or key); :class:`UnsafePickleError` for a
            refs pickle that is not plain data.
    """

    def __init__(self, root: str, dataset: str = "refcoco+", split_by: str = "unc", config_key: str = "refcoco_data"):
        folder = os.path.join(root, dataset)
        self._load(os.path.join(folder, f"refs({split_by}).p"), os.path.join(folder, "instances.json"),
                   f"config key {config_key}: {root!r} must be the folder holding {dataset}/refs({split_by}).p and "
                   f"{dataset}/instances.json")

    @classmethod
    def from_files(cls, refs_file: str, instances_file: str, config_key: str = "refcoco_data") -> "Refer":
        """Read the two files from explicit paths."""
        self = cls.__new__(cls)
        self._load(refs_file, instances_file, f"config key {config_key}")
        return self

    def _load(self, refs_file: str, instances_file: str, hint: str) -> None:
        for path in (refs_file, instances_file):
            if not os.path.isfile(path):
                raise MissingDataError(f"REFER file {path} does not exist ({hint})")
        self.refs_file, self.instances_file = refs_file, instances_file
        instances = self._read_instances(instances_file)
        self.imgs: Dict[int, Dict[str, Any]] = {}
        for i, img in enumerate(instances["images"]):
            where = f"{instances_file}: images[{i}]"
            if not isinstance(img, dict) or not _is_int(img.get("id")):
                raise DataError(f"{where}: needs an int 'id': {_short(img)}")
            if not (_is_int(img.get("height")) and _is_int(img.get("width")) and img["height"] > 0
                    and img["width"] > 0):
                raise DataError(f"{where}: 'height' and 'width' must be positive ints: {_short(img)}")
            if img["id"] in self.imgs:
                raise DataError(f"{where}: duplicate image id {img['id']}")
            self.imgs[img["id"]] = img
        self.anns: Dict[int, Dict[str, Any]] = {}
        for i, ann in enumerate(instances["annotations"]):
            where = f"{instances_file}: annotations[{i}]"
            if not isinstance(ann, dict) or not _is_int(ann.get("id")) or not _is_int(ann.get("image_id")):
                raise DataError(f"{where}: needs int 'id' and 'image_id': {_short(ann)}")
            if not _check_box(ann.get("bbox"), positive=False):
                raise DataError(f"{where}: 'bbox' must be [x, y, w, h] with w, h >= 0: {_short(ann)}")
            if ann["image_id"] not in self.imgs:
                raise DataError(f"{where}: image_id {ann['image_id']} is not in 'images'")
            if ann["id"] in self.anns:
                raise DataError(f"{where}: duplicate annotation id {ann['id']}")
            self.anns[ann["id"]] = ann

        refs = safe_load_pickle(refs_file)
        if not isinstance(refs, list):
            raise DataError(f"{refs_file}: expected a list of refs, got {type(refs).__name__}")
        self.refs: Dict[int, Dict[str, Any]] = {}
        for i, ref in enumerate(refs):
            where = f"{refs_file}: ref {i}"
            if not isinstance(ref, dict):
                raise DataError(f"{where} is not a dict: {_short(ref)}")
            for key in ("ref_id", "ann_id", "image_id"):
                if not _is_int(ref.get(key)):
                    raise DataError(f"{where}: key {key!r} must be an int: {_short(ref)}")
            if not isinstance(ref.get("split"), str):
                raise DataError(f"{where}: key 'split' must be a str: {_short(ref)}")
            ann = self.anns.get(ref["ann_id"])
            if ann is None:
                raise DataError(f"{where}: ann_id {ref['ann_id']} is not an annotation of {instances_file}")
            if ann["image_id"] != ref["image_id"]:
                raise DataError(f"{where}: image_id {ref['image_id']} differs from its annotation's "
                                 f"({ann['image_id']} in {instances_file})")
            if ref["ref_id"] in self.refs:
                raise DataError(f"{where}: duplicate ref_id {ref['ref_id']}")
            self.refs[ref["ref_id"]] = ref

    @staticmethod
    def _read_instances(path: str) -> Dict[str, Any]:
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(data, dict):
            raise DataError(f"{path}: expected a COCO object with 'images' and 'annotations', "
                             f"got {type(data).__name__}")
        for key in ("images", "annotations"):
            if not isinstance(data.get(key), list):
                raise DataError(f"{path}: key {key!r} must be a list")
        return data

    def _ref(self, ref_id: int) -> Dict[str, Any]:
        try:
            return self.refs[ref_id]
        except KeyError:
            raise KeyError(f"ref_id {ref_id!r} is not in {self.refs_file}") from None

    def __len__(self) -> int:
        return len(self.refs)

    def ref_ids(self, split: Optional[str] = None) -> List[int]:
        """All ref ids, or those of ``split`` (``'test'``: every split whose name starts with ``test``)."""
        if split is None:
            return list(self.refs)
        if split == "test":
            return [r for r, ref in self.refs.items() if ref["split"].startswith("test")]
        return [r for r, ref in self.refs.items() if ref["split"] == split]

    def split(self, ref_id: int) -> str:
        return self._ref(ref_id)["split"]

    def image_id(self, ref_id: int) -> int:
        return self._ref(ref_id)["image_id"]

    def box(self, ref_id: int) -> List[float]:
        """The ground-truth box ``[x, y, w, h]`` of the ref's annotation (the original's
        ``refToAnn[ref_id]['bbox']``)."""
        return [float(v) for v in self.anns[self._ref(ref_id)["ann_id"]]["bbox"][:4]]

    def image_size(self, ref_id: int) -> Tuple[int, int]:
        """``(height, width)`` of the ref's image."""
        img = self.imgs[self._ref(ref_id)["image_id"]]
        return img["height"], img["width"]


def load_dets(path: str, config_key: str = "det_file") -> Dict[str, List[List[float]]]:
    """The proposals file: ``{str(image_id): [[x, y, w, h, ...], ...]}`` with every box checked (four finite
    numbers first, ``w, h > 0``); extra fields (scores, classes) are kept. An image may have no proposals."""
    if not os.path.isfile(path):
        raise MissingDataError(f"proposals file {path} does not exist (config key {config_key})")
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} ({config_key}): not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise DataError(f"{path} ({config_key}): expected {{str(image_id): [[x, y, w, h, ...], ...]}}, "
                         f"got {type(data).__name__}")
    dets: Dict[str, List[List[float]]] = {}
    for key, boxes in data.items():
        if not isinstance(boxes, list):
            raise DataError(f"{path} ({config_key}): image {key!r}: expected a list of boxes, got {_short(boxes)}")
        for j, box in enumerate(boxes):
            if not _check_box(box):
                raise DataError(f"{path} ({config_key}): image {key!r}: proposal {j} must be [x, y, w, h, ...] "
                                 f"with finite numbers and w, h > 0, got {_short(box)}")
        dets[key] = [[float(v) for v in box] for box in boxes]
    return dets


def check_dets_cover(dets: Dict[str, List[List[float]]], refer: Refer, ref_ids: Sequence[int],
                     det_file: str = "dets.json") -> None:
    """Raise ``ValueError`` naming the first image of ``ref_ids`` that has no proposals in ``dets``."""
    for ref_id in ref_ids:
        image_id = refer.image_id(ref_id)
        if not dets.get(str(image_id)):
            raise DataError(f"{det_file} (det_file) has no proposals for image {image_id} (ref_id {ref_id})")


# ------------------------------------------------------------------------------------------------ data set


def required_keys(mode: str) -> Tuple[str, ...]:
    """The keys every record needs in ``mode`` (``'train'`` or ``'eval'``)."""
    return ("image", "text") if mode == "train" else ("image", "text", "ref_id")


def record_fields(rec: Dict[str, Any], mode: str, max_words: int, where: str) -> Dict[str, Any]:
    """A record's sample fields but the image and ``idx``: ``{'caption'}`` (train), ``{'caption', 'ref_id'}``
    (eval); ``ValueError`` (prefixed ``where``) for a malformed record."""
    if not isinstance(rec["image"], str) or not rec["image"]:
        raise DataError(f"{where}: 'image' must be a non-empty path: {json.dumps(rec)[:200]}")
    if not isinstance(rec["text"], str) or not rec["text"].strip():
        raise DataError(f"{where}: 'text' must be a non-empty string: {json.dumps(rec)[:200]}")
    if mode == "eval" and not _is_int(rec["ref_id"]):
        raise DataError(f"{where}: 'ref_id' must be an int: {json.dumps(rec)[:200]}")
    fields: Dict[str, Any] = {"caption": pre_caption(rec["text"], max_words)}
    if mode == "eval":
        fields["ref_id"] = rec["ref_id"]
    return fields


def image_key(image: str) -> str:
    """What identifies a record's image for same-image positives: its file name (the path's basename), as the
    original."""
    return image.replace("\\", "/").split("/")[-1]


class GroundingDataset(BadImagePolicy, Dataset):
    """(image, referring expression) records of the original ``grounding_dataset``.

    ``mode='train'`` returns ``{'image', 'caption', 'idx', 'bad_images'}`` like
    :class:`dataset.caption_dataset.RetrievalTrainDataset`, so that the retrieval training step is reused:
    ``idx`` numbers the distinct image file names (the path's basename, as the original) in order of first
    appearance, so all expressions of an image are positives of each other. ``on_bad_image='skip'`` replaces a
    record whose image is bad by another one that loads; ``bad_images`` lists the skipped paths.

    ``mode='eval'`` (``'test'``, the original's name, is accepted) returns ``{'image', 'caption', 'ref_id',
    'bad_images'}``; every record needs an int ``ref_id``, and a bad image raises (every ref counts) unless the
    policy is changed with ``set_image_options``.
    """

    def __init__(self, ann_files: Union[str, Sequence[str]], transform, image_root: Optional[str] = None,
                 max_words: int = 30, mode: str = "train", on_bad_image: str = "raise",
                 max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS):
        if mode == "test":
            mode = "eval"
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        if isinstance(ann_files, str):
            ann_files = [ann_files]
        self.mode = mode
        self.records: List[Dict[str, Any]] = []
        self.img_ids: Dict[str, int] = {}
        for f in ann_files:
            for i, rec in enumerate(load_json_list(f, required_keys(mode))):
                out = {"image": resolve_image(rec["image"], image_root, f),
                       **record_fields(rec, mode, max_words, f"{f}: record {i}")}
                if mode == "train":
                    out["idx"] = self.img_ids.setdefault(image_key(rec["image"]), len(self.img_ids))
                self.records.append(out)
        if not self.records:
            raise DataError(f"no records in {list(ann_files)}")
        self.transform = transform
        self.max_words = max_words
        self.load = ImageLoader(on_bad_image if mode == "train" else "raise", max_image_pixels)
        self.where = f"annotation files {list(ann_files)}; {describe_roots(ann_files, image_root)}"

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        i, (image,), bad = load_first_readable(index, len(self.records), lambda j: (self.records[j]["image"],),
                                               self.load, self.where)
        rec = self.records[i]
        item = {"image": self.transform(image), "caption": rec["caption"]}
        if self.mode == "train":
            item["idx"] = rec["idx"]
        else:
            item["ref_id"] = rec["ref_id"]
        item["bad_images"] = bad
        return item


class GroundingShardSample(ShardSample):
    """:class:`GroundingDataset`'s training samples (``mode='train'``: ``{'image', 'caption', 'idx'}``) from shards
    written by ``tools.make_shards --task grounding`` (the json member holds the record: ``image``, ``text``, ...).

    ``idx`` is :func:`dataset.shards.image_index` of the image's file name (:func:`image_key`) rather than the
    JSON data set's numbering in order of first appearance, which a stream cannot know: equal for the same file
    name in every shard, process and conversion, which is all the training step uses (same-image positives)."""

    task = "grounding"
    keys = ("image", "text")

    def __init__(self, transform, max_words: int = 30):
        self.transform, self.max_words = transform, max_words

    def __call__(self, meta: Dict[str, Any], images: List[Any], where: str) -> Dict[str, Any]:
        fields = record_fields(meta, "train", self.max_words, where)
        return {"image": self.transform(images[0]), **fields, "idx": image_index(image_key(meta["image"]))}


class GroundingCollator(CaptionCollator):
    """:class:`dataset.CaptionCollator` plus ``ref_id`` (a long tensor) for evaluation batches."""

    def __call__(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        import torch

        batch = super().__call__(samples)
        if "ref_id" in samples[0]:
            batch["ref_id"] = torch.tensor([s["ref_id"] for s in samples], dtype=torch.long)
        return batch
