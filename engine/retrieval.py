"""Image-text retrieval evaluation: feature extraction, ITC similarity, and the original recall metrics."""
from __future__ import annotations

import math
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
def itc_retrieval(model, image_loader, dataset, tokenizer, device: torch.device, max_length: int = 30,
                  text_batch: int = 256, return_sim: bool = False):
    """Zero-shot retrieval ranked by ITC cosine similarity alone (no ITM re-rank), sharded across ranks.

    ``image_loader`` gives this rank's share of ``dataset``'s images (every batch carries the images' global
    ``index``; pass a loader over the whole set in a single process); the texts are split the same way. The features
    are merged exactly (disjoint rows summed over ranks) and every rank returns the metrics, so no rank waits in a
    collective while another evaluates. ``return_sim``: also return the similarity matrix ``[images, texts]``
    (numpy), as ``(metrics, sim)``.
    """
    from utils import distributed as du

    model.eval()
    world, rank = du.get_world_size(), du.get_rank()
    texts = dataset.text
    mine = list(range(rank, len(texts), world))
    text_feats = None
    for i in range(0, len(mine), text_batch):
        rows = mine[i:i + text_batch]
        enc = tokenize(tokenizer, [texts[t] for t in rows], max_length, padding="max_length")
        feat = model.encode_text(enc["input_ids"].to(device), enc["attention_mask"].to(device)).feat.float()
        if text_feats is None:
            text_feats = torch.zeros(len(texts), feat.shape[1], device=device)
        text_feats[torch.tensor(rows, device=device)] = feat
    image_feats = None
    for batch in image_loader:
        feat = model.encode_image(batch["image"].to(device)).feat.float()
        if image_feats is None:
            image_feats = torch.zeros(len(dataset), feat.shape[1], device=device)
        image_feats[batch["index"].to(device)] = feat
    dim = model.cfg.embed_dim
    text_feats = du.all_reduce_sum(text_feats if text_feats is not None else torch.zeros(len(texts), dim, device=device))
    image_feats = du.all_reduce_sum(image_feats if image_feats is not None
                                    else torch.zeros(len(dataset), dim, device=device))
    sim = (image_feats @ text_feats.T).float().cpu().numpy()
    metrics = recall_metrics(sim, sim.T, dataset.txt2img, dataset.img2txt)
    return (metrics, sim) if return_sim else metrics


@torch.no_grad()
def extract_all(model, image_loader, texts: Sequence[str], tokenizer, device: torch.device, max_length: int = 30,
                text_batch: int = 256):
    """Everything the re-rank needs: text states/masks/features and image tokens/features (token states kept on
    the CPU, so no device ever holds every image's tokens), in dataset order."""
    model.eval()
    t_embeds, t_masks, t_feats = [], [], []
    for i in range(0, len(texts), text_batch):
        enc = tokenize(tokenizer, texts[i:i + text_batch], max_length, padding="max_length")
        ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
        out = model.encode_text(ids, mask)
        t_embeds.append(out.embeds.cpu())
        t_masks.append(mask.cpu())
        t_feats.append(out.feat)
    n = len(image_loader.dataset)
    i_embeds, i_feats = None, None
    for batch in image_loader:
        out = model.encode_image(batch["image"].to(device))
        if i_embeds is None:
            i_embeds = torch.empty((n, *out.embeds.shape[1:]), dtype=out.embeds.dtype)
            i_feats = torch.empty((n, out.feat.shape[1]), dtype=out.feat.dtype, device=device)
        i_embeds[batch["index"]] = out.embeds.cpu()
        i_feats[batch["index"].to(device)] = out.feat
    return torch.cat(t_embeds), torch.cat(t_masks), torch.cat(t_feats), i_embeds, i_feats


def check_rerank(score: str, itc_weight: float) -> None:
    """Config validation of ``rerank_score`` and ``rerank_itc_weight`` (Pretrain.py and Retrieval.py)."""
    if score not in ("itm", "itm+itc"):
        raise ValueError(f"rerank_score must be 'itm' or 'itm+itc', got {score!r}")
    if not (isinstance(itc_weight, (int, float)) and math.isfinite(itc_weight) and itc_weight >= 0):
        raise ValueError(f"rerank_itc_weight must be a finite number >= 0, got {itc_weight!r}")
    if score == "itm" and itc_weight != 1:
        raise ValueError(f"rerank_itc_weight ({itc_weight}) weighs the ITC term of rerank_score: itm+itc; "
                         "with rerank_score: itm there is none")


def _rerank(model, queries: torch.Tensor, sim: torch.Tensor, k: int, pair_fn, rows_per_call: int,
            score: str, itc_weight: float = 1.0) -> torch.Tensor:
    """For each query row, ITM-score its top-k candidates by ITC (many rows per fusion call); -100 elsewhere.
    ``pair_fn`` gives the pairs' text states and masks, the distinct images of the call and each pair's image index
    into them: the fusion layers project each distinct image's keys/values once per call."""
    out = torch.full_like(sim, -100.0)
    k = min(k, sim.shape[1])
    for start in range(0, len(queries), rows_per_call):
        rows = queries[start:start + rows_per_call]
        top_sim, top_idx = sim[rows].topk(k, dim=1)
        text_embeds, text_mask, image_embeds, image_index = pair_fn(rows, top_idx)
        fused = model.fuse(text_embeds, text_mask, image_embeds, image_index=image_index)
        itm = model.itm_logits(fused)[:, 1].float().view(len(rows), k)
        if score == "itm+itc":
            itm = itm + itc_weight * top_sim  # x * 1.0 is x: the default is BLIP's sum exactly
        out[rows.unsqueeze(1), top_idx] = itm
    return out


@torch.no_grad()
def itm_rerank_scores(model, image_loader, texts: Sequence[str], tokenizer, device: torch.device, k_test: int,
                      max_length: int = 30, score: str = "itm", pairs_per_call: int = 256,
                      return_sim: bool = False, itc_weight: float = 1.0) -> Dict[str, torch.Tensor]:
    """The original ALBEF retrieval protocol: ITC similarity of all images x all texts; per image the top
    ``k_test`` texts and per text the top ``k_test`` images are re-scored by the ITM positive logit (``score='itm'``,
    the original) or ITM + ``itc_weight`` x ITC similarity (``'itm+itc'``; weight 1 is BLIP's sum); every other
    entry is -100. Rows are sharded across
    ranks and merged exactly (a sum over ranks of disjoint rows). Returns ``{'i2t': [Ni, Nt], 't2i': [Nt, Ni]}``,
    with ``return_sim`` also ``'itc'``: the ITC similarity ``[Ni, Nt]`` the candidates were taken from.
    """
    from utils import distributed as du

    if score not in ("itm", "itm+itc"):
        raise ValueError(f"rerank_score must be 'itm' or 'itm+itc', got {score!r}")
    t_embeds, t_masks, t_feats, i_embeds, i_feats = extract_all(model, image_loader, texts, tokenizer, device,
                                                               max_length)
    sim = (i_feats @ t_feats.T).float()
    world, rank = du.get_world_size(), du.get_rank()
    rows_per_call = max(1, pairs_per_call // max(1, min(k_test, sim.shape[1])))

    def shard(n: int) -> torch.Tensor:
        step = -(-n // world)
        return torch.arange(rank * step, min(n, (rank + 1) * step), device=device)

    def i2t_pairs(rows, top_idx):  # image rows (each image once), candidate texts
        k = top_idx.shape[1]
        img = i_embeds[rows.cpu()].to(device)
        index = torch.arange(len(rows), device=device).repeat_interleave(k)
        flat = top_idx.reshape(-1).cpu()
        return t_embeds[flat].to(device), t_masks[flat].to(device), img, index

    def t2i_pairs(rows, top_idx):  # text rows, candidate images (each distinct image of the call once)
        k = top_idx.shape[1]
        distinct, index = torch.unique(top_idx.reshape(-1).cpu(), return_inverse=True)
        r = rows.cpu().repeat_interleave(k)
        return t_embeds[r].to(device), t_masks[r].to(device), i_embeds[distinct].to(device), index.to(device)

    i2t = _rerank(model, shard(sim.shape[0]), sim, k_test, i2t_pairs, rows_per_call, score, itc_weight)
    t2i = _rerank(model, shard(sim.shape[1]), sim.T.contiguous(), k_test, t2i_pairs, rows_per_call, score,
                  itc_weight)
    if world > 1:  # each rank filled only its rows: zero the others, then sum
        for mat, n in ((i2t, sim.shape[0]), (t2i, sim.shape[1])):
            mine = torch.zeros(n, dtype=torch.bool, device=device)
            mine[shard(n)] = True
            mat[~mine] = 0
            du.all_reduce_sum(mat)
    out = {"i2t": i2t.cpu(), "t2i": t2i.cpu()}
    if return_sim:
        out["itc"] = sim.cpu()
    return out


def save_examples(sim, dataset, out: str, n: int = 6, k: int = 5, consistent=None) -> None:
    """``n`` test captions (the first caption of evenly spaced images), each with its top-``k`` images by ``sim``
    (``[images, texts]``), as one PNG; a retrieved image is marked correct when it is the caption's own, or, with
    ``consistent`` (``[texts, images]`` bool: the caption is true of the image), when the caption is true of it."""
    from utils.pictures import save_ranking_grid

    n_img = len(dataset.images)
    picks = [dataset.img2txt[i][0] for i in sorted({round(j * n_img / n) for j in range(n)}) if dataset.img2txt[i]]
    rows = []
    for t in picks:
        top = sim[:, t].argsort()[::-1][:k]
        rows.append((dataset.text[t], [
            (dataset.images[i], f"#{r}" + (" (its image)" if i == dataset.txt2img[t] else ""),
             bool(consistent[t, i]) if consistent is not None else i == dataset.txt2img[t])
            for r, i in enumerate(top.tolist(), 1)]))
    save_ranking_grid(rows, out, thumb=96)
