"""NLVR2 in the original JSON format: ``[{"images": [left, right], "sentence": str, "label": "True" | "False"}]``.

Each of the two images gets its own random transform (the original's ``nlvr_dataset``). Labels: False 0, True 1.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

from torch.utils.data import Dataset

from dataset.caption_dataset import load_json_list, resolve_image
from dataset.images import DEFAULT_MAX_IMAGE_PIXELS, BadImagePolicy, ImageLoader, describe_roots, load_first_readable
from dataset.text import pre_caption

_LABELS = {"True": 1, "False": 0, True: 1, False: 0}


class NLVRDataset(BadImagePolicy, Dataset):
    """Returns ``{'image0', 'image1', 'caption' (the sentence, cleaned), 'label', 'bad_images'}``.

    ``on_bad_image='skip'`` replaces a record with a bad image by the next record whose two images load (both
    images, sentence and label together); ``bad_images`` lists the skipped paths. Keep ``'raise'`` for val/test."""

    def __init__(self, ann_files: Union[str, Sequence[str]], transform, image_root: Optional[str] = None,
                 max_words: int = 30, on_bad_image: str = "raise",
                 max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS):
        if isinstance(ann_files, str):
            ann_files = [ann_files]
        self.records: List[Dict[str, Any]] = []
        for f in ann_files:
            for i, rec in enumerate(load_json_list(f, ("images", "sentence", "label"))):
                images = rec["images"]
                if not isinstance(images, list) or len(images) != 2:
                    raise ValueError(f"{f}: record {i}: 'images' must be a list of two paths, got {images!r}")
                if rec["label"] not in _LABELS:
                    raise ValueError(f"{f}: record {i} has label {rec['label']!r}; expected 'True' or 'False'")
                self.records.append({"images": [resolve_image(p, image_root, f) for p in images],
                                     "caption": pre_caption(rec["sentence"], max_words),
                                     "label": _LABELS[rec["label"]]})
        if not self.records:
            raise ValueError(f"no records in {list(ann_files)}")
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
