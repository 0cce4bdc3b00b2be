"""NLVR2 in the original JSON format: ``[{"images": [left, right], "sentence": str, "label": "True" | "False"}]``.

Each of the two images gets its own random transform (the original's ``nlvr_dataset``). Labels: False 0, True 1.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

from torch.utils.data import Dataset

from dataset.caption_dataset import ImageLoader, load_json_list, resolve_image
from dataset.text import pre_caption

_LABELS = {"True": 1, "False": 0, True: 1, False: 0}


class NLVRDataset(Dataset):
    """Returns ``{'image0', 'image1', 'caption' (the sentence, cleaned), 'label'}``."""

    def __init__(self, ann_files: Union[str, Sequence[str]], transform, image_root: Optional[str] = None,
                 max_words: int = 30):
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
        self.load = ImageLoader("raise")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        rec = self.records[index]
        left, right = (self.transform(self.load(p)) for p in rec["images"])
        return {"image0": left, "image1": right, "caption": rec["caption"], "label": rec["label"]}
