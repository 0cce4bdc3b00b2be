"""Tokenizer loading and ALBEF's single-sentence template ``[CLS] w1 ... wn`` (no trailing [SEP]).

The released ALBEF checkpoints were trained with a BERT tokenizer modified to drop the [SEP] that BERT appends
to a single sentence. Any stock Hugging Face BERT tokenizer is used here, and :func:`tokenize` removes that
[SEP] (and the column it leaves empty), so the ids equal the original's for the same vocabulary.
"""
from __future__ import annotations

import os
from typing import Sequence

import torch

from models.pretrained import resolve_hf_path


def load_tokenizer(name_or_path: str):
    """A Hugging Face fast BERT tokenizer from a local folder or a hub name (offline-safe, see ``resolve_hf_path``)."""
    from transformers import AutoTokenizer

    path = resolve_hf_path(name_or_path, what="tokenizer", files=("vocab.txt", "tokenizer.json"))
    tok = AutoTokenizer.from_pretrained(path)
    for attr in ("cls_token_id", "sep_token_id", "pad_token_id", "mask_token_id"):
        if getattr(tok, attr) is None:
            raise ValueError(f"tokenizer {name_or_path!r} has no {attr[:-3]} ([CLS]/[SEP]/[PAD]/[MASK] are needed)")
    vocab_file = os.path.join(path, "vocab.txt") if os.path.isdir(path) else None
    if vocab_file and os.path.exists(vocab_file):  # transformers can silently build a tiny vocabulary
        with open(vocab_file, encoding="utf-8") as f:
            n = sum(1 for line in f if line.strip("\n"))
        if len(tok) < n:
            raise ValueError(f"tokenizer loaded from {path} has {len(tok)} entries but vocab.txt has {n}")
    return tok


def tokenize(tokenizer, texts: Sequence[str], max_length: int, padding: str = "longest") -> dict:
    """Encode single sentences as ``[CLS] tokens`` (at most ``max_length`` ids, no [SEP]).

    Args:
        padding: ``'longest'`` (pad to the longest sentence) or ``'max_length'`` (pad to ``max_length``).
    Returns:
        ``{'input_ids': LongTensor [B, L], 'attention_mask': LongTensor [B, L]}``.
    """
    if padding not in ("longest", "max_length"):
        raise ValueError(f"padding must be 'longest' or 'max_length', got {padding!r}")
    enc = tokenizer(list(texts), padding=padding, truncation=True, max_length=max_length + 1,
                    return_tensors="pt", return_token_type_ids=False)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    last = mask.sum(dim=1) - 1  # position of the trailing [SEP] in each row
    rows = torch.arange(ids.shape[0])
    if not bool((ids[rows, last] == tokenizer.sep_token_id).all()):
        raise ValueError("tokenizer did not end single sentences with [SEP]; cannot apply ALBEF's template")
    ids[rows, last] = tokenizer.pad_token_id
    mask[rows, last] = 0
    keep = max_length if padding == "max_length" else int(mask.sum(dim=1).max())
    return {"input_ids": ids[:, :keep].contiguous(), "attention_mask": mask[:, :keep].contiguous()}
