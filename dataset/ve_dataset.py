"""SNLI-VE in the original JSON format: ``[{"image": id, "sentence": str, "label": str}]``.

``image`` is a path *without* extension (Flickr30k ids in the real set); the file is ``<image_root>/<image>.jpg``
as the original's ``ve_dataset``. Labels: contradiction 0, neutral 1, entailment 2.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

from torch.utils.data import Dataset

from dataset.caption_dataset import load_json_list, resolve_image
from dataset.images import DEFAULT_MAX_IMAGE_PIXELS, BadImagePolicy, ImageLoader, describe_roots, load_first_readable
from dataset.text import pre_caption

VE_LABELS = {"contradiction": 0, "neutral": 1, "entailment": 2}


class VEDataset(BadImagePolicy, Dataset):
    """Returns ``{'image', 'caption' (the hypothesis, cleaned), 'label', 'bad_images'}``.

    ``on_bad_image='skip'`` replaces a record with a bad image by the next one that loads (image, hypothesis and
    label together); ``bad_images`` lists the skipped paths. Keep ``'raise'`` for val/test."""

    def __init__(self, ann_file: str, transform, image_root: Optional[str] = None, max_words: int = 30,
                 on_bad_image: str = "raise", max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS):
        self.records = []
        for i, rec in enumerate(load_json_list(ann_file, ("image", "sentence", "label"))):
            if rec["label"] not in VE_LABELS:
                raise ValueError(f"{ann_file}: record {i} has label {rec['label']!r}; expected one of "
                                 f"{sorted(VE_LABELS)}")
            self.records.append({"image": resolve_image(f"{rec['image']}.jpg", image_root, ann_file),
                                 "caption": pre_caption(rec["sentence"], max_words), "label": VE_LABELS[rec["label"]]})
        if not self.records:
            raise ValueError(f"{ann_file}: no records")
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
