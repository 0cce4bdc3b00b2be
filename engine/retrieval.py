"""Image-text retrieval evaluation: feature extraction, ITC similarity, and the original recall metrics."""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from models.tokenizer import tokenize


@torch.no_grad()
def extract_features(model, image_loader, texts: Sequence[str], tokenizer, device: torch.device,
                     max_length: int = 30, text_batch: int = 256) -> Tuple[torch.Tensor, torch.Tensor]:
    """Normalised ITC features of every image of ``image_loader`` (in dataset order) and every text.

    Texts are padded to ``max_length`` without a trailing [SEP], as the original evaluation.
    """
    model.eval()
    text_feats = []
    for i in range(0, len(texts), text_batch):
        enc = tokenize(tokenizer, texts[i:i + text_batch], max_length, padding="max_length")
        out = model.encode_text(enc["input_ids"].to(device), enc["attention_mask"].to(device))
        text_feats.append(out.feat)
    image_feats = torch.empty(len(image_loader.dataset), text_feats[0].shape[1], device=device)
    for batch in image_loader:
        out = model.encode_image(batch["image"].to(device))
        image_feats[batch["index"].to(device)] = out.feat
    return image_feats, torch.cat(text_feats)


def recall_metrics(scores_i2t: np.ndarray, scores_t2i: np.ndarray, txt2img: Dict[int, int],
                   img2txt: Dict[int, List[int]]) -> Dict[str, float]:
    """The original ``itm_eval``: R@1/5/10 in percent for text retrieval (per image, rank of its best-ranked
    caption) and image retrieval (per text, rank of its image), their means and ``r_mean``."""
    ranks = np.zeros(scores_i2t.shape[0])
    for i, row in enumerate(scores_i2t):
        order = np.argsort(row)[::-1]
        ranks[i] = min(np.where(order == t)[0][0] for t in img2txt[i])
    tr = [100.0 * np.mean(ranks < k) for k in (1, 5, 10)]
    ranks = np.zeros(scores_t2i.shape[0])
    for t, row in enumerate(scores_t2i):
        order = np.argsort(row)[::-1]
        ranks[t] = np.where(order == txt2img[t])[0][0]
    ir = [100.0 * np.mean(ranks < k) for k in (1, 5, 10)]
    out = {"txt_r1": tr[0], "txt_r5": tr[1], "txt_r10": tr[2], "txt_r_mean": float(np.mean(tr)),
           "img_r1": ir[0], "img_r5": ir[1], "img_r10": ir[2], "img_r_mean": float(np.mean(ir))}
    out["r_mean"] = (out["txt_r_mean"] + out["img_r_mean"]) / 2
    return {k: float(v) for k, v in out.items()}


@torch.no_grad()
def itc_retrieval(model, image_loader, dataset, tokenizer, device: torch.device, max_length: int = 30
                  ) -> Dict[str, float]:
    """Zero-shot retrieval ranked by ITC cosine similarity alone (no ITM re-rank)."""
    image_feats, text_feats = extract_features(model, image_loader, dataset.text, tokenizer, device, max_length)
    sim = (image_feats @ text_feats.T).float().cpu().numpy()
    return recall_metrics(sim, sim.T, dataset.txt2img, dataset.img2txt)
