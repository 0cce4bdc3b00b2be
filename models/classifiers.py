"""ALBEF with a classification head on the fused [CLS]: SNLI-VE, NLVR2, and NLVR2's text-assignment pre-training
(reference ``original-albef.md`` §3.8, §3.9).

* :class:`ALBEFVE`: image + hypothesis -> contradiction / neutral / entailment.
* :class:`ALBEFNLVR`: two images + a sentence -> false / true. The fusion encoder has twice as many layers as
  ALBEF's; they alternate between the two images and each pair shares its cross-attention key/value.
* :class:`ALBEFTextAssignment`: the NLVR2 model's pre-training step: for a caption and two images, is the caption
  about the first, the second, or neither?

VE and NLVR2 train with an EMA teacher when ``distill``: ``(1 - alpha) * CE + alpha * H(softmax(teacher), student)``.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from models.albef import ALBEFConfig
from models.bert import BertConfig, BertModel, init_bert_weights, tie_cross_attention_kv
from models.losses import fp32_math
from models.momentum import MomentumMixin
from models.vit import create_vit


def classifier_head(width: int, num_classes: int) -> nn.Sequential:
    """``cls_head``: Linear -> ReLU -> Linear (keys ``cls_head.0.*``, ``cls_head.2.*``)."""
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, num_classes))


def distilled_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, teacher_logits: Optional[torch.Tensor],
                            alpha: float) -> torch.Tensor:
    """``(1 - alpha) * CE(logits, targets) - alpha * mean_b sum_c softmax(teacher)_c log_softmax(logits)_c``."""
    logits = logits.float()
    loss = F.cross_entropy(logits, targets)
    if teacher_logits is None:
        return loss
    soft = F.softmax(teacher_logits.float(), dim=-1)
    return (1.0 - alpha) * loss - alpha * (F.log_softmax(logits, dim=-1) * soft).sum(-1).mean()


def two_image_bert_config(bert: BertConfig) -> BertConfig:
    """NLVR2's text encoder: the text layers, then every fusion layer twice (one per image): 18 layers for ALBEF."""
    fusion = bert.num_hidden_layers - bert.fusion_layer
    return dataclasses.replace(bert, num_hidden_layers=bert.fusion_layer + 2 * fusion)


class _FusedClassifier(MomentumMixin, nn.Module):
    """ViT + BERT (text and fusion layers) + ``cls_head`` on the fused [CLS], with optional EMA teacher."""

    num_classes = 2
    two_images = False

    def __init__(self, cfg: ALBEFConfig, distill: bool = True):
        super().__init__()
        self.cfg = cfg
        self.distill = distill
        self.visual_encoder = create_vit(cfg.vit, cfg.image_res)
        bert_cfg = two_image_bert_config(cfg.bert) if self.two_images else cfg.bert
        self.text_encoder = BertModel(bert_cfg)
        init_bert_weights(self.text_encoder, cfg.bert.initializer_range)
        if self.two_images:
            tie_cross_attention_kv(self.text_encoder)
        self.cls_head = classifier_head(cfg.bert.hidden_size, self.num_classes)
        if distill:
            self.add_momentum_copies(["visual_encoder", "text_encoder", "cls_head"])

    def no_weight_decay(self) -> set:
        return set()

    def _image_states(self, vit: nn.Module, image: torch.Tensor, batch: int):
        embeds = vit(image)
        return list(embeds.split(batch)) if self.two_images else embeds

    def classify(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 momentum: bool = False) -> torch.Tensor:
        """Class logits [B, num_classes]. For two-image models ``image`` is ``[images 0; images 1]`` ([2B, ...])."""
        vit, enc, head = ((self.visual_encoder_m, self.text_encoder_m, self.cls_head_m) if momentum else
                          (self.visual_encoder, self.text_encoder, self.cls_head))
        states = self._image_states(vit, image, input_ids.shape[0])
        hidden = enc(input_ids, attention_mask, encoder_hidden_states=states)
        return head(hidden[:, 0, :])

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                targets: torch.Tensor, alpha: float = 0.0) -> Dict[str, torch.Tensor]:
        """``{"loss_cls": ...}``: cross-entropy against ``targets`` [B], distilled from the teacher if ``distill``."""
        logits = self.classify(image, input_ids, attention_mask)
        teacher = None
        if self.distill:
            with torch.no_grad():
                self.momentum_update()
                with self.momentum_weights():
                    teacher = self.classify(image, input_ids, attention_mask, momentum=True)
        return {"loss_cls": distilled_cross_entropy(logits, targets, teacher, alpha)}


class ALBEFVE(_FusedClassifier):
    """SNLI-VE: labels contradiction 0, neutral 1, entailment 2. Layout of the original VE checkpoints."""

    layout = "ve"
    num_classes = 3


class ALBEFNLVR(_FusedClassifier):
    """NLVR2: ``image`` is ``[left images; right images]`` ([2B, 3, H, W]); labels false 0 / true 1. Fusion layer
    ``f + 2i`` reads the left image, ``f + 2i + 1`` the right one; each pair shares its cross-attention key/value."""

    layout = "nlvr"
    num_classes = 2
    two_images = True


class ALBEFTextAssignment(MomentumMixin, nn.Module):
    """NLVR2 text-assignment pre-training (the original ``Pretrain_nlvr.py``): keys ``visual_encoder.*``, the
    two-image ``text_encoder.*``, ``vision_proj``, ``text_proj``, ``temp`` (kept for the checkpoint layout and frozen; only
    ``vision_proj`` is used, without gradient, to find similar images) and ``ta_head`` (3 classes). No momentum model."""

    layout = "nlvr_ta"

    def __init__(self, cfg: ALBEFConfig):
        super().__init__()
        self.cfg = cfg
        self.visual_encoder = create_vit(cfg.vit, cfg.image_res)
        self.text_encoder = BertModel(two_image_bert_config(cfg.bert))
        init_bert_weights(self.text_encoder, cfg.bert.initializer_range)
        tie_cross_attention_kv(self.text_encoder)
        width = cfg.bert.hidden_size
        self.vision_proj = nn.Linear(cfg.vision_width, cfg.embed_dim)
        self.text_proj = nn.Linear(width, cfg.embed_dim)
        self.temp = nn.Parameter(torch.tensor(cfg.temp))
        # Kept for the checkpoint layout only: text_proj and temp take no part in the loss and vision_proj runs under
        # no_grad (it only ranks similar images), so none of them is trainable; DDP never waits for their gradients.
        for p in (*self.vision_proj.parameters(), *self.text_proj.parameters(), self.temp):
            p.requires_grad_(False)
        self.ta_head = nn.Linear(width, 3)

    def no_weight_decay(self) -> set:
        return set()

    def assign_logits(self, image_embeds, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      image_index: Optional[Sequence[torch.Tensor]] = None) -> torch.Tensor:
        """[B, 3] logits: the caption matches image 0 / image 1 / neither, for image token states (img0, img1), or
        for the batch's distinct images [n, N, width] with ``image_index`` = (img0, img1) index tensors [B]: then each
        pair of fusion layers (one shared key/value projection) projects every distinct image once and gathers."""
        if image_index is not None:
            hidden = self.text_encoder(input_ids, attention_mask, encoder_hidden_states=image_embeds,
                                       image_index=list(image_index))
        else:
            hidden = self.text_encoder(input_ids, attention_mask, encoder_hidden_states=list(image_embeds))
        return self.ta_head(hidden[:, 0, :])

    @torch.no_grad()
    def pair_weights(self, image_embeds: torch.Tensor) -> torch.Tensor:
        """Sampling weights over the other images of the batch: ``softmax(v v^T / 0.07)`` with a zero diagonal,
        ``v`` the normalised ``vision_proj`` of each image's [CLS] (as the original: fixed 0.07, not ``temp``)."""
        feat = F.normalize(self.vision_proj(image_embeds[:, 0, :]).float(), dim=-1)
        with fp32_math(feat.device):  # similarities in float32, also under autocast
            weights = F.softmax(feat @ feat.T / 0.07, dim=1).fill_diagonal_(0)
        # Non-finite features (a diverged step) give nan rows, which torch.multinomial rejects: such rows become
        # uniform over the other images, without a host sync. Finite rows are left exactly as they are.
        others = torch.ones_like(weights).fill_diagonal_(0)
        usable = torch.isfinite(weights).all(dim=1, keepdim=True) & (weights.sum(dim=1, keepdim=True) > 0)
        return torch.where(usable, weights, others)

    @torch.no_grad()
    def sample_assignments(self, weights: torch.Tensor, generator: Optional[torch.Generator] = None) -> List[torch.Tensor]:
        """Draw (image-0 index, image-1 index, label) per caption, vectorised. With probability 2/3 a similar image
        ``j ~ weights[b]`` is paired with the caption's own image ``b``, first (label 0) or second (label 1) with
        equal odds; otherwise two distinct similar images, neither the caption's (label 2; needs a batch of 3+)."""
        bsz = weights.shape[0]
        if bsz < 2:
            raise ValueError("text assignment needs at least 2 images per batch (pairs are drawn from the batch)")
        own = torch.arange(bsz, device=weights.device)
        # Rows torch.multinomial would reject (nan/inf/negative entries, nothing positive; for the draw of two,
        # fewer than two positive entries) are drawn uniformly over the other images instead; no host sync.
        others = torch.ones_like(weights).fill_diagonal_(0)
        usable = (torch.isfinite(weights) & (weights >= 0)).all(dim=1, keepdim=True) & \
            (weights.sum(dim=1, keepdim=True) > 0)
        weights = torch.where(usable, weights, others)
        u = torch.rand(2, bsz, generator=generator, device=weights.device)
        j = torch.multinomial(weights, 1, generator=generator).squeeze(1)
        if bsz >= 3:
            two_usable = (weights > 0).sum(dim=1, keepdim=True) >= 2
            two = torch.multinomial(torch.where(two_usable, weights, others), 2, generator=generator)
        else:  # no second other image: never label 2
            two = torch.stack([j, j], dim=1)
            u[0] = 1.0
        label = torch.where(u[0] > 1 / 3, torch.where(u[1] > 0.5, 0, 1), 2)
        img0 = torch.where(label == 0, own, torch.where(label == 1, j, two[:, 0]))
        img1 = torch.where(label == 0, j, torch.where(label == 1, own, two[:, 1]))
        return [img0, img1, label]

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """``{"loss_ta": CE}`` of the 3-way assignment for pairs drawn from the batch (see :meth:`sample_assignments`)."""
        embeds = self.visual_encoder(image)
        img0, img1, label = self.sample_assignments(self.pair_weights(embeds), generator)
        logits = self.assign_logits(embeds, input_ids, attention_mask, image_index=(img0, img1))
        return {"loss_ta": F.cross_entropy(logits.float(), label)}
