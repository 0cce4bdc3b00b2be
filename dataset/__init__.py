"""Data sets, transforms and loaders for ALBEF in the original JSON formats, plus the synthetic world.

The training loader (resumable order, per-sample random streams) is ``dataset.sampling.create_train_loader``; torch is
imported where it is used, so ``tools.check_data`` (``dataset.images``) starts without it."""
from __future__ import annotations

from typing import Any, Dict, List


class CaptionCollator:
    """Stacks images and tokenizes captions in the loader workers: ``{'image', 'input_ids', 'attention_mask',
    'bad_images'}``, plus ``idx`` / ``label`` when the samples carry them. Image pairs (``image0``, ``image1``:
    NLVR2) become one ``image`` batch ``[all left images; all right images]``. ``bad_images`` is always present:
    the samples' ``bad_images`` (paths skipped by ``on_bad_image: skip``) flattened into one list of str."""

    def __init__(self, tokenizer, max_length: int, padding: str = "longest"):
        self.tokenizer, self.max_length, self.padding = tokenizer, max_length, padding

    def __call__(self, samples: List[Dict[str, Any]]) -> Dict[str, Any]:
        import torch

        from models.tokenizer import tokenize

        if "image0" in samples[0]:
            batch = {"image": torch.stack([s["image0"] for s in samples] + [s["image1"] for s in samples])}
        else:
            batch = {"image": torch.stack([s["image"] for s in samples])}
        batch.update(tokenize(self.tokenizer, [s["caption"] for s in samples], self.max_length, self.padding))
        if "idx" in samples[0]:
            batch["idx"] = torch.tensor([s["idx"] for s in samples], dtype=torch.long)
        if "label" in samples[0]:
            batch["label"] = torch.tensor([s["label"] for s in samples], dtype=torch.long)
        batch["bad_images"] = [p for s in samples for p in s.get("bad_images", ())]
        return batch
