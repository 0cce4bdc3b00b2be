"""ALBEF for VQA: the answer is generated, not classified (reference ``original-albef.md`` §3.7, §5.2).

``visual_encoder`` (ViT) -> ``text_encoder`` (the full BERT: text layers, then fusion layers cross-attending to the
image) gives question states; ``text_decoder`` (a causal BERT whose every layer cross-attends to the question
states, initialised from the pre-trained fusion layers and MLM head) scores answers token by token. With
``distill`` an EMA teacher (``*_m``) provides soft targets for the answer tokens.

At test time each question ranks a fixed answer list (:meth:`ALBEFVQA.rank_answer`): the decoder's first-token
distribution picks the top ``k`` candidates, which are then re-scored by their full sequence likelihood.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from models.albef import ALBEFConfig
from models.bert import BertLMHeadModel, BertModel, init_bert_weights
from models.losses import answer_nll
from models.momentum import MomentumMixin
from models.vit import create_vit


def decoder_config(cfg: ALBEFConfig):
    """The answer decoder: as deep as the fusion encoder, cross-attention in every layer, reading question states
    (``hidden_size`` wide). 6 layers for ALBEF, as the original's hard-coded value."""
    bert = cfg.bert
    return dataclasses.replace(bert, num_hidden_layers=bert.num_hidden_layers - bert.fusion_layer, fusion_layer=0,
                               encoder_width=bert.hidden_size)


class ALBEFVQA(MomentumMixin, nn.Module):
    """Keys: ``visual_encoder.*``, ``text_encoder.*`` (no ``bert.``), ``text_decoder.bert.*``, ``text_decoder.cls.*``
    and, with ``distill``, the three ``_m`` copies: the layout of the original ``vqa.pth``."""

    layout = "vqa"

    def __init__(self, cfg: ALBEFConfig, distill: bool = True):
        super().__init__()
        if cfg.bert.fusion_layer >= cfg.bert.num_hidden_layers:
            raise ValueError("VQA needs fusion layers (fusion_layer < num_hidden_layers): the decoder is built "
                             "from them")
        self.cfg = cfg
        self.distill = distill
        self.visual_encoder = create_vit(cfg.vit, cfg.image_res)
        self.text_encoder = BertModel(cfg.bert)
        self.text_decoder = BertLMHeadModel(decoder_config(cfg))
        init_bert_weights(self.text_encoder, cfg.bert.initializer_range)
        init_bert_weights(self.text_decoder, cfg.bert.initializer_range)
        if distill:
            self.add_momentum_copies(["visual_encoder", "text_encoder", "text_decoder"])

    def no_weight_decay(self) -> set:
        return set()

    def encode_question(self, image: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        momentum: bool = False) -> torch.Tensor:
        """Question states [B, Lq, D]: all BERT layers over the question, fusion layers reading the image."""
        vit, enc = (self.visual_encoder_m, self.text_encoder_m) if momentum else (self.visual_encoder,
                                                                                  self.text_encoder)
        return enc(input_ids, attention_mask, encoder_hidden_states=vit(image))

    def answer_logits(self, answer_ids: torch.Tensor, answer_mask: Optional[torch.Tensor],
                      question_states: torch.Tensor, question_mask: torch.Tensor, momentum: bool = False,
                      question_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Decoder logits [N, La, vocab] of answers given (already repeated) question states [N, Lq, D], or the
        distinct questions' states [B, Lq, D] / mask [B, Lq] with ``question_index`` [N] (answer n's question): the
        decoder then projects each question's cross-attention keys/values once per layer and gathers them."""
        dec = self.text_decoder_m if momentum else self.text_decoder
        return dec(answer_ids, answer_mask, encoder_hidden_states=question_states,
                   encoder_attention_mask=question_mask, image_index=question_index)

    def forward(self, image: torch.Tensor, question_ids: torch.Tensor, question_mask: torch.Tensor,
                answer_ids: torch.Tensor, answer_mask: torch.Tensor, k: torch.Tensor, weights: torch.Tensor,
                alpha: float = 0.0) -> Dict[str, torch.Tensor]:
        """Weighted answer NLL (distilled from the teacher's token distributions when ``distill``).

        Args:
            image: [B, 3, H, W]; question_ids, question_mask: [B, Lq].
            answer_ids, answer_mask: [A, La], every question's candidate answers one after another
                (``[CLS] answer [SEP]``); ``k`` [B] how many answers each question has (sum = A).
            weights: [A] each answer's weight (its share of the annotators' votes).
        Returns ``{"loss_vqa": sum_a w_a * nll_a / B}``.
        """
        n_answers = answer_ids.shape[0]
        states = self.encode_question(image, question_ids, question_mask)
        # answer a's question (the original repeats the states; the decoder gathers each question's keys/values)
        q_index = torch.repeat_interleave(torch.arange(image.shape[0], device=k.device), k,
                                          output_size=n_answers)
        soft_labels = None
        if self.distill:
            with torch.no_grad():
                self.momentum_update()
                with self.momentum_weights():
                    states_m = self.encode_question(image, question_ids, question_mask, momentum=True)
                    logits_m = self.answer_logits(answer_ids, answer_mask, states_m, question_mask, momentum=True,
                                                  question_index=q_index)
                soft_labels = F.softmax(logits_m[:, :-1].float(), dim=-1)
        logits = self.answer_logits(answer_ids, answer_mask, states, question_mask, question_index=q_index)
        nll = answer_nll(logits, answer_ids, self.cfg.pad_token_id, soft_labels, alpha)
        return {"loss_vqa": (weights * nll).sum() / image.shape[0]}

    @torch.no_grad()
    def rank_answer(self, question_states: torch.Tensor, question_mask: torch.Tensor, answer_ids: torch.Tensor,
                    answer_mask: torch.Tensor, k: int, first_token_twice: bool = True
                    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Rank a fixed answer list [A, La] for each question: (answer indices [B, k], probabilities [B, k]).

        Stage 1: the decoder on ``[CLS]`` alone gives each answer's first-token probability ``p1``; the top ``k``
        answers go on. Stage 2: their full NLL under teacher forcing. Score ``log p1 - nll``, softmax over the
        ``k``, sorted. ``nll`` already contains ``-log p1``, so the original counts the first token twice;
        ``first_token_twice=False`` scores by the sequence likelihood alone (BLIP's choice).
        """
        n_q = question_states.shape[0]
        k = min(k, answer_ids.shape[0])
        start = answer_ids[:1, :1].expand(n_q, 1)  # [CLS] as the start token
        first_logits = self.answer_logits(start, None, question_states, question_mask)[:, 0]
        p_first = F.softmax(first_logits.float(), dim=-1).index_select(1, answer_ids[:, 1])
        topk_probs, topk_ids = p_first.topk(k, dim=1)  # [B, k]

        flat = topk_ids.reshape(-1)
        q_index = torch.arange(n_q, device=flat.device).repeat_interleave(k)  # each question's K/V once
        cand_ids, cand_mask = answer_ids[flat], answer_mask[flat]
        nll = answer_nll(self.answer_logits(cand_ids, cand_mask, question_states, question_mask,
                                            question_index=q_index), cand_ids, self.cfg.pad_token_id)
        scores = -nll.view(n_q, k)
        if first_token_twice:
            scores = scores + topk_probs.log()
        probs, order = F.softmax(scores, dim=-1).topk(k, dim=1)
        return torch.gather(topk_ids, 1, order), probs

    @torch.no_grad()
    def answer(self, image: torch.Tensor, question_ids: torch.Tensor, question_mask: torch.Tensor,
               answer_ids: torch.Tensor, answer_mask: torch.Tensor, k: int = 128, first_token_twice: bool = True
               ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Rank the answer list for each (image, question): (answer indices [B, k], probabilities [B, k])."""
        states = self.encode_question(image, question_ids, question_mask)
        return self.rank_answer(states, question_mask, answer_ids, answer_mask, k, first_token_twice)
