"""VQA in the original JSON format (VQA v2 + Visual Genome QA).

Records: ``{"question", "image" (relative to the root of its data set), "dataset": "vqa" | "vg",
"answer": [str, ...] (VQA: the annotators' answers) | str (VG), "question_id" (test)}``. Training samples carry
each distinct answer with weight ``count / number of answers`` (VQA) or a single answer with weight 0.5 (VG), as
the original ``vqa_dataset``; test samples carry ``question_id`` and, when the file has them, the annotators'
answers (for a local accuracy; the official test set has none).

:func:`record_fields` and :func:`image_paths` turn a record into a sample's fields and image path; the JSON data
set (:class:`VQADataset`), the shard stream (:class:`VQAShardSample`, training samples) and
``tools.make_shards --task vqa`` share them.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.data import Dataset

from dataset.caption_dataset import load_json_list, resolve_image
from dataset.images import (DEFAULT_MAX_IMAGE_PIXELS, BadImagePolicy, DataError, ImageLoader, describe_roots,
                            load_first_readable)
from dataset.shards import ShardSample
from dataset.text import pre_question


def required_keys(split: str) -> Tuple[str, ...]:
    """The keys every record of ``split`` needs."""
    return ("question", "image", "answer") if split == "train" else ("question", "image", "question_id")


def record_kind(rec: Dict[str, Any], where: str) -> str:
    """``'vqa'`` or ``'vg'``: the record's ``dataset`` (default ``'vqa'``); ``ValueError`` for anything else."""
    kind = rec.get("dataset", "vqa")
    if kind not in ("vqa", "vg"):
        raise DataError(f"{where} has dataset {kind!r}; expected 'vqa' or 'vg'")
    return kind


def answer_weights(answer, kind: str, where: str):
    """``(answers, weights)``: each distinct VQA answer with ``count / number of answers``; a VG answer with 0.5."""
    if kind == "vg":
        if not isinstance(answer, str):
            raise DataError(f"{where}: a 'vg' answer must be a string, got {answer!r}")
        return [answer], [0.5]
    if not isinstance(answer, list) or not answer:
        raise DataError(f"{where}: a 'vqa' answer must be a non-empty list, got {answer!r}")
    counts = Counter(answer)
    return list(counts), [c / len(answer) for c in counts.values()]


def record_fields(rec: Dict[str, Any], split: str, max_ques_words: int, where: str) -> Dict[str, Any]:
    """A record's sample fields but the image: train ``{'question', 'answers', 'weights'}``, test ``{'question',
    'question_id', ('gt')}``; ``ValueError`` (prefixed ``where``) for a malformed record."""
    kind = record_kind(rec, where)
    item: Dict[str, Any] = {"question": pre_question(rec["question"], max_ques_words)}
    if split == "train":
        item["answers"], item["weights"] = answer_weights(rec["answer"], kind, where)
    else:
        item["question_id"] = int(rec["question_id"])
        if "answer" in rec:
            item["gt"] = rec["answer"] if isinstance(rec["answer"], list) else [rec["answer"]]
    return item


def image_paths(rec: Dict[str, Any], vqa_root: Optional[str], vg_root: Optional[str], ann_file: str,
                where: str) -> List[str]:
    """``[path]``: the record's image resolved against ``vg_root`` (``dataset: vg``) or ``vqa_root``."""
    root = vg_root if record_kind(rec, where) == "vg" else vqa_root
    return [resolve_image(rec["image"], root, ann_file)]


class VQADataset(BadImagePolicy, Dataset):
    """Train samples: ``{'question', 'answers', 'weights', 'image', 'bad_images'}``; test samples: ``{'question',
    'question_id', ('gt'), 'image', 'bad_images'}``. ``on_bad_image='skip'`` (training only: every test question
    must be answered) replaces a record with a bad image by another one that loads (image, question and answers
    together); ``bad_images`` lists the skipped paths."""

    def __init__(self, ann_files: Union[str, Sequence[str]], transform, vqa_root: Optional[str] = None,
                 vg_root: Optional[str] = None, split: str = "train", max_ques_words: int = 30,
                 on_bad_image: str = "raise", max_image_pixels: Optional[int] = DEFAULT_MAX_IMAGE_PIXELS):
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        if split == "test" and on_bad_image != "raise":
            raise ValueError("on_bad_image must be 'raise' for the VQA test split (every question is answered)")
        if isinstance(ann_files, str):
            ann_files = [ann_files]
        self.split = split
        self.records: List[Dict[str, Any]] = []
        for f in ann_files:
            for i, rec in enumerate(load_json_list(f, required_keys(split))):
                where = f"{f}: record {i}"
                path = image_paths(rec, vqa_root, vg_root, f, where)[0]
                self.records.append({"image": path, **record_fields(rec, split, max_ques_words, where)})
        if not self.records:
            raise DataError(f"no records in {list(ann_files)}")
        self.transform = transform
        self.load = ImageLoader(on_bad_image, max_image_pixels)
        self.where = (f"annotation files {list(ann_files)}; vqa_root: {describe_roots(ann_files, vqa_root)}; "
                      f"vg_root: {describe_roots(ann_files, vg_root)}")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Dict[str, Any]:
        i, (image,), bad = load_first_readable(index, len(self.records), lambda j: (self.records[j]["image"],),
                                               self.load, self.where)
        out = {k: v for k, v in self.records[i].items() if k != "image"}
        out["image"] = self.transform(image)
        out["bad_images"] = bad
        return out


class VQAShardSample(ShardSample):
    """:class:`VQADataset`'s training samples (``split='train'``) from shards written by ``tools.make_shards --task
    vqa`` (the json member holds the record: ``question``, ``answer``, ``dataset``, ...)."""

    task = "vqa"
    keys = ("question", "answer")

    def __init__(self, transform, max_ques_words: int = 30):
        self.transform, self.max_ques_words = transform, max_ques_words

    def __call__(self, meta: Dict[str, Any], images: List[Any], where: str) -> Dict[str, Any]:
        fields = record_fields(meta, "train", self.max_ques_words, where)
        return {**fields, "image": self.transform(images[0])}


def tokenize_answers(tokenizer, answers: Sequence[str]) -> Dict[str, torch.Tensor]:
    """``[CLS] answer [SEP]`` padded to the longest (the original appends ``eos='[SEP]'`` to each answer): the
    decoder starts from [CLS] and must end with [SEP]."""
    enc = tokenizer(list(answers), padding="longest", return_tensors="pt", return_token_type_ids=False)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


class VQACollator:
    """Train: ``{'image', 'question_ids', 'question_mask', 'answer_ids', 'answer_mask', 'k', 'weights'}`` with
    every question's answers one after another (``k`` answers per question). Test: ``{'image', 'question_ids',
    'question_mask', 'question_id'}`` (+ ``'gt'``, the annotators' answers, a list, when present). Both:
    ``'bad_images'``, the image paths skipped for this batch's samples (a flat list of str, usually empty)."""

    def __init__(self, tokenizer, max_question_tokens: int):
        self.tokenizer, self.max_question_tokens = tokenizer, max_question_tokens

    def __call__(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        from models.tokenizer import tokenize

        q = tokenize(self.tokenizer, [s["question"] for s in samples], self.max_question_tokens)
        batch = {"image": torch.stack([s["image"] for s in samples]), "question_ids": q["input_ids"],
                 "question_mask": q["attention_mask"]}
        if "answers" in samples[0]:
            a = tokenize_answers(self.tokenizer, [a for s in samples for a in s["answers"]])
            batch.update(answer_ids=a["input_ids"], answer_mask=a["attention_mask"],
                         k=torch.tensor([len(s["answers"]) for s in samples]),
                         weights=torch.tensor([w for s in samples for w in s["weights"]], dtype=torch.float))
        else:
            batch["question_id"] = torch.tensor([s["question_id"] for s in samples])
            if "gt" in samples[0]:
                batch["gt"] = [s["gt"] for s in samples]
        batch["bad_images"] = [p for s in samples for p in s.get("bad_images", ())]
        return batch
