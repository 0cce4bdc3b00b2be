"""ALBEF pre-training model: "Align before Fuse" (Li et al., NeurIPS 2021, https://arxiv.org/abs/2107.07651).

Image encoder (ViT) + text encoder (BERT layers below ``fusion_layer``) + fusion encoder (BERT layers from
``fusion_layer`` on, cross-attending to the image), 256-d projections for image-text contrastive learning
(ITC), an image-text matching head (ITM), the MLM head, and an EMA ("momentum") copy of the unimodal
encoders and projections that provides ITC keys, feature queues and distillation targets.

Submodule and buffer names reproduce the original checkpoint layout (``visual_encoder.*``,
``text_encoder.bert.*``, ``text_encoder.cls.*``, ``vision_proj``, ``text_proj``, ``temp``, ``itm_head``, the
``*_m`` momentum copies, ``image_queue``, ``text_queue``, ``queue_ptr``), so the released ``ALBEF.pth`` /
``ALBEF_4M.pth`` load with ``strict=True``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, NamedTuple, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from models.bert import BertConfig, BertForMaskedLM, BertModel, EncoderKV, init_bert_weights
from models.momentum import MomentumMixin
from models.losses import distill_targets, fp32_math, itc_loss, mask_tokens, mlm_loss, sample_hard_negatives
from models.vit import VisionConfig, create_vit
from utils.distributed import all_gather_no_grad, all_gather_with_grad, get_rank, get_world_size


@dataclass
class ALBEFConfig:
    """Everything that fixes the pre-training model's shape and objectives (keys of ``Pretrain.yaml``)."""

    image_res: int = 256  # input resolution (16 x 16 patches at 256 px for ViT-B/16)
    vision_width: int = 768  # ViT width fed to vision_proj; must equal vit.embed_dim
    embed_dim: int = 256  # joint ITC space
    temp: float = 0.07  # initial learnable temperature, clamped to [0.001, 0.5]
    mlm_probability: float = 0.15
    queue_size: int = 65536  # momentum feature queue length
    momentum: float = 0.995  # EMA coefficient of the momentum encoders
    vit: VisionConfig = field(default_factory=VisionConfig)
    bert: BertConfig = field(default_factory=BertConfig)
    # token ids the masking needs (from the tokenizer)
    pad_token_id: int = 0
    cls_token_id: int = 101
    mask_token_id: int = 103
    # ITM hard negatives drawn from this rank's batch (the original) or from all ranks' batches (BLIP's choice)
    itm_negatives: str = "local"
    # ---- pre-training objectives (the paper's Table 1 ablation; the defaults are the full model, see
    # OBJECTIVE_ROWS). ALBEF reads all four; ALBEFRetrieval reads itm_hard_negatives and needs itc.
    itc: bool = True  # the ITC loss (false: loss_ita is a constant 0, queues untouched, ITC projections frozen)
    itm_hard_negatives: bool = True  # ITM negatives drawn ~ softmax(ITC similarity); false: uniformly in the batch
    itc_distill: bool = True  # ITC targets mixed with the momentum model's (alpha); false: one-hot targets
    mlm_distill: bool = True  # MLM targets mixed with the momentum model's (alpha); false: the masked ids only

    def __post_init__(self):
        if self.vision_width != self.vit.embed_dim:
            raise ValueError(f"vision_width ({self.vision_width}) must equal vit.embed_dim ({self.vit.embed_dim})")
        if self.bert.encoder_width != self.vit.embed_dim:
            raise ValueError(f"bert_config encoder_width ({self.bert.encoder_width}) must equal vit.embed_dim "
                             f"({self.vit.embed_dim})")
        if self.embed_dim < 1:
            raise ValueError(f"embed_dim must be >= 1, got {self.embed_dim}")
        if self.queue_size < 1:
            raise ValueError(f"queue_size must be >= 1, got {self.queue_size}")
        if not 0 <= self.momentum <= 1:  # also False for nan
            raise ValueError(f"momentum must be in [0, 1], got {self.momentum}")
        if not 0 < self.mlm_probability < 1:
            raise ValueError(f"mlm_probability must be in (0, 1), got {self.mlm_probability}")
        if not 0 < self.temp < float("inf"):  # also False for nan
            raise ValueError(f"temp must be a finite number > 0, got {self.temp}")
        if self.itm_negatives not in ("local", "global"):
            raise ValueError(f"itm_negatives must be 'local' or 'global', got {self.itm_negatives!r}")
        check_objectives(self.itc, self.itm_hard_negatives, self.itm_negatives)


# The paper's Table 1 rows (Li et al. 2021, "Evaluation of the proposed methods") as objective switches: ITM without
# "hard" draws its negatives uniformly from the batch; MoD = momentum distillation of that loss.
OBJECTIVE_ROWS: Dict[str, Dict[str, bool]] = {
    "MLM+ITM": dict(itc=False, itm_hard_negatives=False, itc_distill=False, mlm_distill=False),
    "ITC+MLM+ITM": dict(itc=True, itm_hard_negatives=False, itc_distill=False, mlm_distill=False),
    "ITC+MLM+ITM_hard": dict(itc=True, itm_hard_negatives=True, itc_distill=False, mlm_distill=False),
    "ITC_MoD+MLM+ITM_hard": dict(itc=True, itm_hard_negatives=True, itc_distill=True, mlm_distill=False),
    "full": dict(itc=True, itm_hard_negatives=True, itc_distill=True, mlm_distill=True),  # ITC_MoD+MLM_MoD+ITM_hard
}


def check_objectives(itc: bool, itm_hard_negatives: bool, itm_negatives: str = "local") -> None:
    """Reject objective switches that cannot be combined (ValueError naming the keys).

    Hard negatives are drawn from the ITC similarities, so ``itm_hard_negatives: true`` needs ``itc: true`` (the
    paper's MLM + ITM row sets both false); ``itm_negatives: global`` mines hard negatives across ranks, so it
    needs ``itm_hard_negatives: true``. ``itc_distill`` with ``itc: false`` is ignored (there is no ITC loss)."""
    if itm_hard_negatives and not itc:
        raise ValueError("itm_hard_negatives: true needs itc: true (hard negatives are drawn from the ITC "
                         "similarities); with itc: false set itm_hard_negatives: false (random in-batch negatives, "
                         "the paper's MLM + ITM row)")
    if not itm_hard_negatives and itm_negatives != "local":
        raise ValueError(f"itm_negatives: {itm_negatives} mines hard negatives across ranks; with "
                         "itm_hard_negatives: false use itm_negatives: local")


class Encoded(NamedTuple):
    embeds: torch.Tensor  # [B, L, D] token states (ViT tokens or text-layer outputs)
    feat: torch.Tensor  # [B, E] L2-normalised projection of token 0 ([CLS]), float32


@torch.no_grad()
def _trunc_normal_init(module: nn.Linear, std: float = 0.02) -> None:
    nn.init.trunc_normal_(module.weight, std=std)
    nn.init.zeros_(module.bias)


class ALBEFBase(MomentumMixin, nn.Module):
    """What every ALBEF variant with ITC + ITM shares: encoders, projections, ``temp``, ``itm_head``, the momentum
    copies and the feature queues. Subclasses choose the text encoder class and the objectives.

    ``reuse_image_kv`` (default True): the student's fusion layers project the batch's image tokens to
    cross-attention keys/values once per step and every fusion pass (ITM positives, ITM hard negatives, MLM)
    gathers its rows from them; False projects them in each pass (the original's computation; equal losses and
    gradients to float32 rounding)."""

    reuse_image_kv = True

    def __init__(self, cfg: ALBEFConfig, text_encoder: nn.Module):
        super().__init__()
        self.cfg = cfg
        self.visual_encoder = create_vit(cfg.vit, cfg.image_res)
        self.text_encoder = text_encoder
        init_bert_weights(self.text_encoder, cfg.bert.initializer_range)
        text_width = cfg.bert.hidden_size
        self.vision_proj = nn.Linear(cfg.vision_width, cfg.embed_dim)
        self.text_proj = nn.Linear(text_width, cfg.embed_dim)
        self.temp = nn.Parameter(torch.tensor(cfg.temp))
        self.itm_head = nn.Linear(text_width, 2)
        for m in (self.vision_proj, self.text_proj, self.itm_head):
            _trunc_normal_init(m)

        # Momentum (EMA) copies; never trained by the optimizer.
        self.add_momentum_copies(["visual_encoder", "vision_proj", "text_encoder", "text_proj"])

        self.register_buffer("image_queue", F.normalize(torch.randn(cfg.embed_dim, cfg.queue_size), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(cfg.embed_dim, cfg.queue_size), dim=0))
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @staticmethod
    def _bert(encoder: nn.Module) -> nn.Module:
        """The BERT body: ``text_encoder.bert`` in the pre-training layout, ``text_encoder`` itself otherwise."""
        return encoder.bert if hasattr(encoder, "bert") else encoder

    # ------------------------------------------------------------------------------------- encoders
    def encode_image(self, image: torch.Tensor, momentum: bool = False) -> Encoded:
        vit, proj = (self.visual_encoder_m, self.vision_proj_m) if momentum else (self.visual_encoder,
                                                                                   self.vision_proj)
        embeds = vit(image)
        return Encoded(embeds, F.normalize(proj(embeds[:, 0, :]).float(), dim=-1))

    def encode_text(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, momentum: bool = False
                    ) -> Encoded:
        enc, proj = (self.text_encoder_m, self.text_proj_m) if momentum else (self.text_encoder, self.text_proj)
        embeds = self._bert(enc)(input_ids, attention_mask, mode="text")
        return Encoded(embeds, F.normalize(proj(embeds[:, 0, :]).float(), dim=-1))

    def fuse(self, text_embeds: torch.Tensor, attention_mask: torch.Tensor, image_embeds: Optional[torch.Tensor] = None,
             image_index: Optional[torch.Tensor] = None, image_kv: Optional[EncoderKV] = None) -> torch.Tensor:
        """Fusion layers over text-encoder states, cross-attending to image tokens: [B, L, D].

        ``image_embeds`` [B, N, width] (one image per row), or the distinct images [n, N, width] with
        ``image_index`` [B] (row b reads image ``image_index[b]``; their keys/values are projected once per layer),
        or ``image_kv`` (:meth:`image_kv` of the distinct images) with ``image_index`` (None: row b reads image b)."""
        return self._bert(self.text_encoder)(encoder_embeds=text_embeds, attention_mask=attention_mask,
                                             encoder_hidden_states=image_embeds, mode="fusion", encoder_kv=image_kv,
                                             image_index=image_index)

    def image_kv(self, image_embeds: torch.Tensor) -> EncoderKV:
        """The student fusion layers' cross-attention keys/values of image tokens [n, N, width], computed once (with
        autograd when enabled) for :meth:`fuse` / the MLM pass to gather from."""
        return self._bert(self.text_encoder).cross_attention_kv(image_embeds, mode="fusion")

    def itm_logits(self, fused: torch.Tensor) -> torch.Tensor:
        return self.itm_head(fused[:, 0, :])

    # ------------------------------------------------------------------------------------------ queue
    @torch.no_grad()
    def _dequeue_and_enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor,
                             idx: Optional[torch.Tensor] = None) -> None:
        """Write all ranks' momentum features (and image ids) into the ring buffers at ``queue_ptr``, no host sync.
        Features that are not all finite (a diverging step, which the engine skips) leave the queues as they were."""
        image_feats = all_gather_no_grad(image_feat)
        text_feats = all_gather_no_grad(text_feat)
        n, size = image_feats.shape[0], self.image_queue.shape[1]
        ok = torch.isfinite(image_feats).all() & torch.isfinite(text_feats).all()
        pos = (self.queue_ptr + torch.arange(n, device=self.queue_ptr.device)) % size
        self.image_queue[:, pos] = torch.where(ok, image_feats.T.to(self.image_queue.dtype), self.image_queue[:, pos])
        self.text_queue[:, pos] = torch.where(ok, text_feats.T.to(self.text_queue.dtype), self.text_queue[:, pos])
        if idx is not None:
            new_idx = all_gather_no_grad(idx.reshape(-1)).view(1, -1)
            self.idx_queue[:, pos] = torch.where(ok, new_idx, self.idx_queue[:, pos])
        self.queue_ptr.copy_((self.queue_ptr + n * ok.long()) % size)

    def _itm_loss(self, txt: "Encoded", img: "Encoded", attention_mask: torch.Tensor, sim_i2t: torch.Tensor,
                  sim_t2i: torch.Tensor, same: torch.Tensor, generator: Optional[torch.Generator],
                  image_kv: Optional[EncoderKV] = None, feat_m: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                  idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """ITM on 1 positive + 2 hard negatives per pair (an image per text, a text per image); with
        ``itm_hard_negatives: false`` the negatives are uniform among the batch's other images (``sim_i2t`` and
        ``sim_t2i`` unused, may be None). ``image_kv``: the fusion layers' keys/values of ``img.embeds`` (computed here
        when ``reuse_image_kv`` and not given).
        With ``itm_negatives: global`` and several ranks, ``feat_m`` (momentum image and text features) and ``idx``
        (image ids, retrieval; None: each sample is its own image) select negatives among all ranks' samples."""
        bs = txt.embeds.shape[0]
        if image_kv is None and self.reuse_image_kv:
            image_kv = self.image_kv(img.embeds)
        if image_kv is not None:
            fused_pos = self.fuse(txt.embeds, attention_mask, image_kv=image_kv)
        else:
            fused_pos = self.fuse(txt.embeds, attention_mask, img.embeds)
        if self.cfg.itm_negatives == "global" and get_world_size() > 1:
            if feat_m is None:
                raise ValueError("itm_negatives: global needs the momentum features (feat_m)")
            fused_neg = self._fuse_global_negatives(txt, img, attention_mask, feat_m, idx, generator)
            itm_logits = self.itm_logits(torch.cat([fused_pos[:, :1], fused_neg[:, :1]], dim=0))
            itm_labels = torch.zeros(3 * bs, dtype=torch.long, device=itm_logits.device)
            itm_labels[:bs] = 1
            return F.cross_entropy(itm_logits.float(), itm_labels)
        with torch.no_grad():
            if self.cfg.itm_hard_negatives:
                neg_image_idx = sample_hard_negatives(sim_t2i[:, :bs], same, generator)
                neg_text_idx = sample_hard_negatives(sim_i2t[:, :bs], same, generator)
            else:  # uniform over the allowed columns; the same [B, B] draws, so the generator advances as above
                flat = torch.zeros(same.shape, device=same.device)
                neg_image_idx = sample_hard_negatives(flat, same, generator)
                neg_text_idx = sample_hard_negatives(flat, same, generator)
        text_embeds_all = torch.cat([txt.embeds, txt.embeds[neg_text_idx]], dim=0)
        text_atts_all = torch.cat([attention_mask, attention_mask[neg_text_idx]], dim=0)
        if image_kv is not None:  # rows: [negative image per text; own image per negative text]
            image_index = torch.cat([neg_image_idx, torch.arange(bs, device=neg_image_idx.device)])
            fused_neg = self.fuse(text_embeds_all, text_atts_all, image_index=image_index, image_kv=image_kv)
        else:
            image_embeds_all = torch.cat([img.embeds[neg_image_idx], img.embeds], dim=0)
            fused_neg = self.fuse(text_embeds_all, text_atts_all, image_embeds_all)
        itm_logits = self.itm_logits(torch.cat([fused_pos[:, :1], fused_neg[:, :1]], dim=0))
        itm_labels = torch.zeros(3 * bs, dtype=torch.long, device=itm_logits.device)
        itm_labels[:bs] = 1
        return F.cross_entropy(itm_logits.float(), itm_labels)

    def _fuse_global_negatives(self, txt: "Encoded", img: "Encoded", attention_mask: torch.Tensor,
                               feat_m: Tuple[torch.Tensor, torch.Tensor], idx: Optional[torch.Tensor],
                               generator: Optional[torch.Generator]) -> torch.Tensor:
        """The negative fusion pass with negatives drawn among all ranks' samples (``itm_negatives: global``).

        Weights as the local draw: softmax of this rank's student features against every rank's momentum features
        over temp, samples of the same image excluded. Image and text token states are gathered with gradient (a
        negative's gradient flows back to the rank that encoded it, summed over the ranks that drew it); texts are
        padded to the longest batch of any rank (one small all-reduce and host sync per step). Rows: a negative
        image per text, then this rank's own image per negative text (as the local pass)."""
        bs, rank = txt.embeds.shape[0], get_rank()
        with torch.no_grad(), fp32_math(img.feat.device):
            image_feat_m, text_feat_m = (all_gather_no_grad(f.float()) for f in feat_m)
            sim_t2i = txt.feat.float() @ image_feat_m.T / self.temp
            sim_i2t = img.feat.float() @ text_feat_m.T / self.temp
            if idx is None:
                rows = torch.arange(bs, device=sim_t2i.device)
                same = torch.zeros_like(sim_t2i, dtype=torch.bool)
                same[rows, rows + rank * bs] = True
            else:
                same = idx.view(-1, 1) == all_gather_no_grad(idx.reshape(-1)).view(1, -1)
            neg_image_idx = sample_hard_negatives(sim_t2i, same, generator, offset=rank * bs)
            neg_text_idx = sample_hard_negatives(sim_i2t, same, generator, offset=rank * bs)
        length = torch.tensor([attention_mask.shape[1]], device=attention_mask.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(length, op=dist.ReduceOp.MAX)
        pad = int(length.item()) - attention_mask.shape[1]
        text_embeds, text_atts = F.pad(txt.embeds, (0, 0, 0, pad)), F.pad(attention_mask, (0, pad))
        text_embeds_all = all_gather_with_grad(text_embeds)
        text_atts_all = all_gather_no_grad(text_atts)
        image_embeds_all = all_gather_with_grad(img.embeds)
        text_neg = torch.cat([text_embeds, text_embeds_all[neg_text_idx]], dim=0)
        atts_neg = torch.cat([text_atts, text_atts_all[neg_text_idx]], dim=0)
        image_neg = torch.cat([image_embeds_all[neg_image_idx], img.embeds], dim=0)
        return self.fuse(text_neg, atts_neg, image_neg)

    def _itc(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, img: Encoded,
             txt: Encoded, positives: Optional[torch.Tensor], alpha: float, distill: bool = True):
        """ITC of student features against momentum keys (batch + queue); returns (loss, sim_i2t, sim_t2i,
        momentum image, momentum text). ``positives`` [B, B + Q] are the hard targets (None: the diagonal)."""
        temp = self.temp
        with torch.no_grad():
            self.momentum_update()
            with self.momentum_weights():
                img_m = self.encode_image(image, momentum=True)
                txt_m = self.encode_text(input_ids, attention_mask, momentum=True)
            with fp32_math(image.device):  # similarities and targets in float32, also under autocast
                # (cat copies: the queues need no clone)
                image_feat_all = torch.cat([img_m.feat.T, self.image_queue.float()], dim=1)
                text_feat_all = torch.cat([txt_m.feat.T, self.text_queue.float()], dim=1)
                if positives is None:
                    positives = torch.zeros(img_m.feat.shape[0], image_feat_all.shape[1], device=image.device)
                    positives.fill_diagonal_(1)
                if distill:
                    targets_i2t = distill_targets(img_m.feat @ text_feat_all / temp, positives, alpha)
                    targets_t2i = distill_targets(txt_m.feat @ image_feat_all / temp, positives, alpha)
                else:
                    targets_i2t = targets_t2i = positives
        loss, sim_i2t, sim_t2i = itc_loss(img.feat, txt.feat, image_feat_all, text_feat_all, temp, targets_i2t,
                                          targets_t2i)
        return loss, sim_i2t, sim_t2i, img_m, txt_m


class ALBEF(ALBEFBase):
    """Pre-training model. ``forward(image, input_ids, attention_mask, alpha)`` returns a dict of losses.

    ``sparse_mlm`` (default True): the MLM head (student and teacher) runs only at the masked positions; False
    computes the full ``[B, L, vocab]`` logits as the original (equal loss and gradients to float32 rounding)."""

    layout = "pretrain"
    sparse_mlm = True

    def __init__(self, cfg: ALBEFConfig):
        super().__init__(cfg, BertForMaskedLM(cfg.bert))
        if not cfg.itc:  # no loss reaches the ITC projections and temp: frozen, so no trainable parameter is unused
            for p in (*self.vision_proj.parameters(), *self.text_proj.parameters(), self.temp):
                p.requires_grad_(False)

    def no_weight_decay(self) -> set:
        """Empty, as the original (its optimizer decays ``temp``, ``pos_embed`` and ``cls_token``)."""
        return set()

    def mlm_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, image_embeds: torch.Tensor
                   ) -> torch.Tensor:
        """MLM logits [B, L, vocab] of the full text + fusion stack conditioned on image tokens."""
        return self.text_encoder(input_ids, attention_mask, encoder_hidden_states=image_embeds)

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                alpha: float = 0.0, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """ITC + ITM + MLM losses of one batch (the original's order of operations).

        The objective switches of the config ``itm_hard_negatives``, ``itc_distill`` and ``mlm_distill`` each change
        only the loss they name: the random draws (``generator`` and the global RNG) stay in the same order, so the
        other losses are bitwise those of the full model. ``itc: false`` (which needs random ITM negatives) returns
        ``loss_ita`` = 0 (no gradient), leaves the queues as they are and runs the momentum model only for the MLM
        teacher (without dropout, loss_itm and loss_mlm equal those of the ITC model with random negatives).

        Args:
            image: [B, 3, H, W]; input_ids, attention_mask: [B, L] (single sentences, ``[CLS] tokens``).
            alpha: distillation weight for ITC and MLM targets (ignored by a loss whose ``*_distill`` is false).
            generator: optional RNG for the ITM negatives draw and the MLM masking.
        """
        cfg = self.cfg
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        img = self.encode_image(image)
        txt = self.encode_text(input_ids, attention_mask)
        if cfg.itc:
            loss_ita, sim_i2t, sim_t2i, img_m, txt_m = self._itc(image, input_ids, attention_mask, img, txt, None,
                                                                 alpha, cfg.itc_distill)
            self._dequeue_and_enqueue(img_m.feat, txt_m.feat)
            feat_m = (img_m.feat, txt_m.feat)
        else:  # no contrastive similarities (the ITM negatives are random), no momentum keys for the queues
            loss_ita = torch.zeros((), device=image.device)
            sim_i2t = sim_t2i = feat_m = img_m = None
            if cfg.mlm_distill:  # the MLM teacher reads the momentum image encoder
                with torch.no_grad():
                    self.momentum_update()
                    with self.momentum_weights(["visual_encoder", "vision_proj"]):
                        img_m = self.encode_image(image, momentum=True)

        same = torch.eye(image.shape[0], dtype=torch.bool, device=image.device)
        # The student's fusion-layer keys/values of the B images, shared by the ITM and MLM passes.
        image_kv = self.image_kv(img.embeds) if self.reuse_image_kv else None
        loss_itm = self._itm_loss(txt, img, attention_mask, sim_i2t, sim_t2i, same, generator, image_kv,
                                  feat_m=feat_m)

        # ---- MLM conditioned on the image, distilled from the momentum model
        masked_ids, labels = mask_tokens(input_ids, cfg.bert.vocab_size, cfg.mask_token_id, cfg.pad_token_id,
                                         cfg.cls_token_id, cfg.mlm_probability, generator)
        # Sparse head: only the masked positions (one host sync); their rows of the full logits.
        positions = labels.ne(-100).nonzero(as_tuple=True) if self.sparse_mlm else None
        soft_labels = None
        if cfg.mlm_distill:
            with torch.no_grad(), self.momentum_weights(["text_encoder"]):
                logits_m = self.text_encoder_m(masked_ids, attention_mask, encoder_hidden_states=img_m.embeds,
                                               positions=positions)
                soft_labels = F.softmax(logits_m.float(), dim=-1)
        if image_kv is not None:
            logits = self.text_encoder(masked_ids, attention_mask, encoder_kv=image_kv, positions=positions)
        else:
            logits = self.text_encoder(masked_ids, attention_mask, encoder_hidden_states=img.embeds,
                                       positions=positions)
        loss_mlm = mlm_loss(logits, labels if positions is None else labels[positions], soft_labels, alpha)
        return {"loss_mlm": loss_mlm, "loss_ita": loss_ita, "loss_itm": loss_itm}


class ALBEFRetrieval(ALBEFBase):
    """Retrieval (and weakly-supervised grounding) model: the text encoder is a plain ``BertModel`` (keys
    ``text_encoder.*``, no MLM head) and an ``idx_queue`` holds the image id of every queued feature, so that
    every caption of the same image, in the batch or the queue, is a positive.

    As the original, ``temp`` is not clamped here unless ``clamp_temp`` is set.
    """

    layout = "retrieval"

    def __init__(self, cfg: ALBEFConfig, distill: bool = True, clamp_temp: bool = False):
        if not cfg.itc:
            raise ValueError("ALBEFRetrieval needs itc: true (retrieval ranks by ITC similarity)")
        super().__init__(cfg, BertModel(cfg.bert))
        self.distill = distill
        self.clamp_temp = clamp_temp
        self.register_buffer("idx_queue", torch.full((1, cfg.queue_size), -100, dtype=torch.long))

    def no_weight_decay(self) -> set:
        return set()

    def forward(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, idx: torch.Tensor,
                alpha: float = 0.0, generator: Optional[torch.Generator] = None) -> Dict[str, torch.Tensor]:
        """ITC (positives by image id, momentum-distilled) + ITM losses; ``idx`` [B] are image ids."""
        if self.clamp_temp:
            with torch.no_grad():
                self.temp.clamp_(0.001, 0.5)
        img = self.encode_image(image)
        txt = self.encode_text(input_ids, attention_mask)
        idx = idx.view(-1, 1)
        idx_all = torch.cat([idx.T, self.idx_queue.clone()], dim=1)
        positives = (idx == idx_all).float()
        positives = positives / positives.sum(dim=1, keepdim=True)
        loss_ita, sim_i2t, sim_t2i, img_m, txt_m = self._itc(image, input_ids, attention_mask, img, txt, positives,
                                                             alpha, self.distill)
        self._dequeue_and_enqueue(img_m.feat, txt_m.feat, idx)
        same = idx == idx.T  # never a caption of the same image as a negative
        loss_itm = self._itm_loss(txt, img, attention_mask, sim_i2t, sim_t2i, same, generator,
                                  feat_m=(img_m.feat, txt_m.feat), idx=idx)
        return {"loss_ita": loss_ita, "loss_itm": loss_itm}
