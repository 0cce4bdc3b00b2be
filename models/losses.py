"""ALBEF's objectives as plain functions: ITC with momentum distillation, ITM hard negatives, MLM masking and loss.

Everything here is vectorised (no per-sample Python loops, no host syncs), so it is safe inside the
training step and under ``torch.compile``. Probabilities and logits are computed in float32 (the ITC
similarities with autocast switched off, so a bf16/fp16 autocast region does not quantise them).
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
import torch.nn.functional as F


def fp32_math(device: torch.device):
    """A context in which autocast is off on ``device`` (so float32 operands give float32 matmuls)."""
    kind = torch.device(device).type
    if torch.amp.is_autocast_available(kind):
        return torch.autocast(kind, enabled=False)
    return contextlib.nullcontext()


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``mean_i( -sum_j targets_ij * log_softmax(logits)_ij )`` (rows of ``targets`` sum to 1)."""
    return -(F.log_softmax(logits.float(), dim=1) * targets).sum(dim=1).mean()


def distill_targets(teacher_logits: torch.Tensor, hard_targets: torch.Tensor, alpha: float) -> torch.Tensor:
    """Momentum-distillation targets ``alpha * softmax(teacher) + (1 - alpha) * hard_targets`` (float32)."""
    with fp32_math(teacher_logits.device):
        return alpha * F.softmax(teacher_logits.float(), dim=1) + (1 - alpha) * hard_targets


def itc_loss(image_feat: torch.Tensor, text_feat: torch.Tensor, image_feat_all: torch.Tensor,
             text_feat_all: torch.Tensor, temp: torch.Tensor, targets_i2t: torch.Tensor,
             targets_t2i: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Image-text contrastive loss of student queries against momentum keys (current batch + queue).

    Args:
        image_feat, text_feat: [B, E] normalised student features.
        image_feat_all, text_feat_all: [E, B + Q] normalised momentum features of the batch, then the queue.
        temp: scalar temperature.
        targets_i2t, targets_t2i: [B, B + Q] target distributions.

    Returns:
        (loss_ita, sim_i2t, sim_t2i): the loss ``(L_i2t + L_t2i) / 2`` and the student similarities / temp, all
        float32 (computed with autocast off).
    """
    with fp32_math(image_feat.device):
        sim_i2t = image_feat.float() @ text_feat_all.float() / temp
        sim_t2i = text_feat.float() @ image_feat_all.float() / temp
        loss = (soft_cross_entropy(sim_i2t, targets_i2t) + soft_cross_entropy(sim_t2i, targets_t2i)) / 2
    return loss, sim_i2t, sim_t2i


def sample_hard_negatives(sim: torch.Tensor, same: torch.Tensor, generator: Optional[torch.Generator] = None,
                          offset: int = 0) -> torch.Tensor:
    """For each row, draw one in-batch negative column with probability ``softmax(sim)`` (ITM hard negatives).

    Columns where ``same`` is True (the positive itself, and any other sample of the same image) are never
    drawn: they are masked before the softmax, which gives the original's distribution (softmax over the
    row, masked columns zeroed, renormalised) without its float32 underflow when the positive dominates.
    A row with no allowed column at all (every sample in the batch is the same image) draws uniformly among
    the other columns (its own column only when the batch has one sample), so sampling never fails.
    A row whose softmax is not a usable distribution (a nan or +inf similarity in an allowed column, or every
    allowed similarity -inf, as after a diverged step) draws uniformly among its allowed columns instead of
    raising; rows of finite similarities are drawn exactly as before. No host synchronisation.

    Args:
        sim: [B, N] similarities (student query vs momentum keys, divided by temp): N = B for the in-batch draw,
            or all ranks' batches (``itm_negatives: global``), row i's own column being ``offset + i``.
        same: [B, N] bool, True where column j must not be a negative for row i.
        offset: the column of row 0's own sample (this rank's first row among all ranks' rows).
    Returns:
        [B] int64 indices (columns) of the sampled negatives.
    """
    b, n = sim.shape
    logits = sim.float().masked_fill(same, float("-inf"))
    nothing_allowed = same.all(dim=1, keepdim=True)
    fallback = torch.zeros_like(logits)
    if n > 1:
        rows = torch.arange(b, device=sim.device)
        own = torch.zeros(b, n, dtype=torch.bool, device=sim.device)
        own[rows, rows + offset] = True
        fallback = fallback.masked_fill(own, float("-inf"))
    weights = F.softmax(torch.where(nothing_allowed, fallback, logits), dim=1)
    # torch.multinomial raises (CPU) or misbehaves (CUDA) on nan/inf/negative weights or a zero row: such rows
    # are replaced, without a host sync, by the uniform distribution over the row's allowed columns.
    allowed = torch.zeros_like(logits).masked_fill(same, float("-inf"))
    uniform = F.softmax(torch.where(nothing_allowed, fallback, allowed), dim=1)
    usable = torch.isfinite(weights).all(dim=1, keepdim=True) & (weights.sum(dim=1, keepdim=True) > 0)
    weights = torch.where(usable, weights, uniform)
    return torch.multinomial(weights, 1, generator=generator).squeeze(1)


def mask_tokens(input_ids: torch.Tensor, vocab_size: int, mask_token_id: int, pad_token_id: int,
                cls_token_id: int, mlm_probability: float = 0.15, generator: Optional[torch.Generator] = None
                ) -> Tuple[torch.Tensor, torch.Tensor]:
    """BERT masking as the original ALBEF: returns ``(masked_ids, labels)``.

    Each token is selected with ``mlm_probability`` ([PAD] and [CLS] never); of the selected, 80 % become
    [MASK], 10 % a random id in ``[0, vocab_size)`` and 10 % stay unchanged. ``labels`` holds the original
    id at selected positions and -100 elsewhere.
    """
    device = input_ids.device

    def bernoulli(p: float) -> torch.Tensor:
        return torch.rand(input_ids.shape, device=device, generator=generator) < p

    selected = bernoulli(mlm_probability) & (input_ids != pad_token_id) & (input_ids != cls_token_id)
    labels = torch.where(selected, input_ids, torch.full_like(input_ids, -100))
    replaced = bernoulli(0.8) & selected
    randomised = bernoulli(0.5) & selected & ~replaced
    random_ids = torch.randint(vocab_size, input_ids.shape, device=device, generator=generator)
    masked = torch.where(replaced, torch.full_like(input_ids, mask_token_id), input_ids)
    masked = torch.where(randomised, random_ids, masked)
    return masked, labels


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor, soft_labels: Optional[torch.Tensor] = None,
             alpha: float = 0.0) -> torch.Tensor:
    """Masked-LM loss ``(1 - alpha) * CE(logits, labels) + alpha * mean_masked( -sum_v q_v log p_v )``.

    Averages over positions with ``labels != -100``; ``soft_labels`` [B, L, V] are the momentum model's
    probabilities. A batch with no masked token gives 0 (not NaN), without a host sync.
    """
    log_probs = F.log_softmax(logits.float(), dim=-1)
    selected = labels != -100
    count = selected.sum().clamp(min=1)
    ce = -log_probs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    loss = (ce * selected).sum() / count
    if soft_labels is not None:
        distill = -(log_probs * soft_labels).sum(dim=-1)
        loss = (1 - alpha) * loss + alpha * (distill * selected).sum() / count
    return loss


def answer_nll(logits: torch.Tensor, input_ids: torch.Tensor, pad_token_id: int,
               soft_labels: Optional[torch.Tensor] = None, alpha: float = 0.0) -> torch.Tensor:
    """Per-sequence negative log-likelihood of a causal decoder, summed over tokens: [N].

    ``logits`` [N, L, V] at positions ``0..L-1`` predict tokens ``1..L`` of ``input_ids`` [N, L] (token 0, [CLS], is
    the start token and never a target; padding is ignored). With ``soft_labels`` [N, L-1, V] (the teacher's
    distributions for the same targets) the loss is ``(1 - alpha) * nll + alpha * sum_t H(soft_t, p_t)`` over the
    same non-padding positions, as the original VQA decoder.
    """
    logits = logits[:, :-1].float()
    targets = input_ids[:, 1:]
    valid = targets != pad_token_id
    nll = F.cross_entropy(logits.transpose(1, 2), targets.masked_fill(~valid, -100), reduction="none").sum(1)
    if soft_labels is None:
        return nll
    distill = -(F.log_softmax(logits, dim=-1) * soft_labels).sum(-1)
    return (1.0 - alpha) * nll + alpha * (distill * valid).sum(1)
