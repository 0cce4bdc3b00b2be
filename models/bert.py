"""BERT text encoder whose upper layers cross-attend to image tokens (ALBEF's text + fusion encoder).

One stack of ``num_hidden_layers`` BERT layers. Layers ``[0, fusion_layer)`` are plain text layers (the
unimodal text encoder); layers ``[fusion_layer, num_hidden_layers)`` add a cross-attention block between
self-attention and the feed-forward block (the multimodal fusion encoder). ``mode`` picks which part runs:

* ``'text'``: layers below ``fusion_layer`` on token ids,
* ``'fusion'``: layers from ``fusion_layer`` on, fed with the text encoder's hidden states,
* ``'multi_modal'``: all layers.

Parameter names follow Hugging Face ``BertModel`` / ``BertForMaskedLM`` and the original ALBEF ``xbert.py``
(``embeddings.word_embeddings``, ``encoder.layer.{i}.attention.self.query``,
``encoder.layer.{i}.crossattention.self.key``, ``cls.predictions.transform.dense``, ...), so Hugging Face BERT
weights and the released ALBEF checkpoints load without renaming. Numerics follow the original: post-LN
residual blocks, exact GELU, absolute position embeddings, MLM decoder tied to the word embeddings.

Attention runs through ``F.scaled_dot_product_attention``. A cross-attention module can be switched to an
explicit-softmax path (``save_attention = True``) that keeps the attention map and its gradient for
Grad-CAM.

Cross-attention keys/values can be computed once and reused: :meth:`BertModel.cross_attention_kv` projects a set of
distinct images to every fusion layer's keys and values (``{layer: (key, value)}``, each ``[n_images, N, D]``,
with autograd), and ``BertModel.forward(..., encoder_kv=kv, image_index=idx)`` runs rows whose image is
``idx`` ``[n_rows]`` by gathering those rows instead of projecting ``n_rows`` image-token sets again. Passing
``image_index`` with plain ``encoder_hidden_states`` (the distinct images) does both in one call. The result is
the plain path's (``encoder_hidden_states=images[idx]``) to float32 rounding, gradients included.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

# Keys of Hugging Face config.json files that carry no meaning for this model; accepted and ignored.
_IGNORED_HF_KEYS = {
    "architectures", "model_type", "transformers_version", "position_embedding_type", "use_cache",
    "classifier_dropout", "torch_dtype", "dtype", "add_cross_attention", "is_decoder", "chunk_size_feed_forward",
    "output_attentions", "output_hidden_states", "return_dict", "gradient_checkpointing", "_name_or_path",
    "bos_token_id", "eos_token_id", "tie_word_embeddings",
}


@dataclass
class BertConfig:
    """Size and behaviour of the BERT text/fusion encoder (keys of the original ``config_bert.json``)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    fusion_layer: int = 6  # layers >= fusion_layer cross-attend to the image (the fusion encoder)
    encoder_width: int = 768  # width of the image tokens that cross-attention reads (the ViT width)
    grad_checkpointing: bool = False  # recompute each layer in the backward pass to save memory

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        if not 0 <= self.fusion_layer <= self.num_hidden_layers:
            raise ValueError(f"fusion_layer {self.fusion_layer} must lie in [0, {self.num_hidden_layers}]")
        if self.hidden_act != "gelu":
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported (only 'gelu', as BERT)")

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> "BertConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known - _IGNORED_HF_KEYS)
        if unknown:
            raise ValueError(f"{source}: unknown BERT config key(s) {unknown}; known keys: {sorted(known)}")
        values = {k: v for k, v in data.items() if k in known}
        if "gradient_checkpointing" in data and "grad_checkpointing" not in data:
            values["grad_checkpointing"] = bool(data["gradient_checkpointing"])
        return cls(**values)

    @classmethod
    def from_json_file(cls, path: Union[str, Path]) -> "BertConfig":
        with open(path) as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(data, source=str(path))

    def to_dict(self) -> dict:
        return asdict(self)


# Precomputed cross-attention keys and values per fusion layer: {layer index: (key, value)}, each [n_images, N, D].
EncoderKV = Dict[int, Tuple[torch.Tensor, torch.Tensor]]


def _key_padding_mask(mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """[B, L] 1/0 mask -> boolean [B, 1, 1, L] (True = attend), the form SDPA broadcasts over heads/queries."""
    if mask is None:
        return None
    return mask[:, None, None, :].bool()


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        # Persistent, as in the original checkpoints (they carry `...embeddings.position_ids`).
        self.register_buffer("position_ids", torch.arange(config.max_position_embeddings)[None], persistent=True)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        x = self.word_embeddings(input_ids)
        x = x + self.token_type_embeddings.weight[0]  # token_type_ids are always 0 in ALBEF
        x = x + self.position_embeddings(self.position_ids[:, :seq_len])
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    """Multi-head attention; keys/values come from the text itself or, for cross-attention, from the image."""

    def __init__(self, config: BertConfig, is_cross_attention: bool = False):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        kv_width = config.encoder_width if is_cross_attention else config.hidden_size
        self.query = nn.Linear(config.hidden_size, config.hidden_size)
        self.key = nn.Linear(kv_width, config.hidden_size)
        self.value = nn.Linear(kv_width, config.hidden_size)
        self.dropout_p = config.attention_probs_dropout_prob
        self.is_cross_attention = is_cross_attention
        # Grad-CAM support: when True, attention is computed with an explicit softmax and the map and its
        # gradient are kept in `attention_map` / `attention_gradients`.
        self.save_attention = False
        self.attention_map: Optional[torch.Tensor] = None
        self.attention_gradients: Optional[torch.Tensor] = None

    def _split_heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)  # (B, nh, N, hd)

    def project_kv(self, kv_states: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [n, N, D] of ``kv_states`` [n, N, width] (before the head split)."""
        return self.key(kv_states), self.value(kv_states)

    def forward(self, hidden_states: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                kv_states: Optional[torch.Tensor] = None,
                kv: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                kv_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Attention of ``hidden_states`` [n, L, D] to itself, to ``kv_states`` [n, N, width], or to precomputed
        ``kv`` = (key, value) [m, N, D] (from :meth:`project_kv`); ``kv_index`` [n] picks row ``i``'s key/value set
        (rows of ``kv``, or of ``kv_states``), None = row ``i`` reads set ``i``."""
        if kv is None:
            src = hidden_states if kv_states is None else kv_states
            if kv_index is not None:
                src = src.index_select(0, kv_index)
            kv = self.project_kv(src)
        elif kv_index is not None:
            kv = (kv[0].index_select(0, kv_index), kv[1].index_select(0, kv_index))
        q = self._split_heads(self.query(hidden_states))
        k = self._split_heads(kv[0])
        v = self._split_heads(kv[1])
        dropout_p = self.dropout_p if self.training else 0.0
        if self.save_attention:
            scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim)
            if attn_mask is not None:
                scores = scores.masked_fill(~attn_mask, torch.finfo(scores.dtype).min)
            probs = scores.softmax(dim=-1)
            self.attention_map = probs
            if probs.requires_grad:
                probs.register_hook(self._save_gradients)
            out = F.dropout(probs, dropout_p, self.training) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
        b, _, n, _ = out.shape
        return out.transpose(1, 2).reshape(b, n, -1)

    def _save_gradients(self, grad: torch.Tensor) -> None:
        self.attention_gradients = grad


class BertSelfOutput(nn.Module):
    """Projection + dropout + post-LN residual after an attention block."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig, is_cross_attention: bool = False):
        super().__init__()
        self.self = BertSelfAttention(config, is_cross_attention)
        self.output = BertSelfOutput(config)

    def forward(self, hidden_states, attn_mask=None, kv_states=None, kv=None, kv_index=None):
        if kv is None and kv_index is None:  # the plain call (as before the K/V reuse)
            return self.output(self.self(hidden_states, attn_mask, kv_states), hidden_states)
        return self.output(self.self(hidden_states, attn_mask, kv_states, kv=kv, kv_index=kv_index), hidden_states)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)

    def forward(self, x):
        return F.gelu(self.dense(x))


class BertOutput(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, x, residual):
        return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertLayer(nn.Module):
    """Self-attention -> (cross-attention, fusion layers only) -> feed-forward; each block post-LN."""

    def __init__(self, config: BertConfig, layer_num: int):
        super().__init__()
        self.attention = BertAttention(config)
        self.has_cross_attention = layer_num >= config.fusion_layer
        if self.has_cross_attention:
            self.crossattention = BertAttention(config, is_cross_attention=True)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config)

    def forward(self, hidden_states, attn_mask=None, encoder_hidden_states=None, encoder_mask=None,
                encoder_kv=None, image_index=None):
        """``encoder_kv``: this layer's precomputed cross-attention (key, value) [m, N, D], used instead of
        ``encoder_hidden_states``; ``image_index`` [n]: the image (row of ``encoder_kv`` / ``encoder_hidden_states``)
        of each row of ``hidden_states``, None = the i-th. ``encoder_mask`` is per row (already indexed)."""
        x = self.attention(hidden_states, attn_mask)
        if self.has_cross_attention:
            if encoder_hidden_states is None and encoder_kv is None:
                raise ValueError("a fusion layer needs encoder_hidden_states (the image tokens)")
            x = self.crossattention(x, encoder_mask, encoder_hidden_states, encoder_kv, image_index)
        return self.output(self.intermediate(x), x)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.layer = nn.ModuleList([BertLayer(config, i) for i in range(config.num_hidden_layers)])

    def layer_range(self, mode: str) -> range:
        fusion, total = self.config.fusion_layer, self.config.num_hidden_layers
        if mode == "text":
            return range(0, fusion)
        if mode == "fusion":
            return range(fusion, total)
        if mode == "multi_modal":
            return range(0, total)
        raise ValueError(f"mode must be 'text', 'fusion' or 'multi_modal', got {mode!r}")

    def image_slot(self, i: int, n_images: int) -> int:
        """Which of ``n_images`` image inputs fusion layer ``i`` reads (NLVR2: layer l reads image (l-f) mod n)."""
        return (i - self.config.fusion_layer) % n_images

    def cross_attention_kv(self, encoder_hidden_states: Union[torch.Tensor, Sequence[torch.Tensor]],
                           mode: str = "multi_modal") -> EncoderKV:
        """Cross-attention (key, value) [n, N, D] of every fusion layer that ``mode`` runs, for image tokens
        [n, N, width] (or a list, one per image input). Computed with autograd as the caller's grad mode says.
        Layers sharing their key/value parameters and reading the same tensor share one projection. Under
        autocast the image tokens are cast once (the casts the projections would do, so the result is equal)."""
        multi = isinstance(encoder_hidden_states, (list, tuple))
        images = list(encoder_hidden_states) if multi else [encoder_hidden_states]
        if torch.is_autocast_enabled(images[0].device.type):
            dtype = torch.get_autocast_dtype(images[0].device.type)
            cast = {}
            for j, x in enumerate(images):
                if x.is_floating_point() and x.dtype != dtype and x.dtype != torch.float64:
                    images[j] = cast.setdefault(id(x), x.to(dtype))
        out: EncoderKV = {}
        memo = {}
        for i in self.layer_range(mode):
            layer = self.layer[i]
            if not layer.has_cross_attention:
                continue
            attn = layer.crossattention.self
            x = images[self.image_slot(i, len(images))]
            key = (id(x), id(attn.key.weight), id(attn.key.bias), id(attn.value.weight), id(attn.value.bias))
            if key not in memo:
                memo[key] = attn.project_kv(x)
            out[i] = memo[key]
        return out

    def forward(self, hidden_states, attn_mask=None, encoder_hidden_states=None, encoder_mask=None,
                mode: str = "multi_modal", encoder_kv: Optional[EncoderKV] = None,
                image_index: Union[torch.Tensor, Sequence[torch.Tensor], None] = None):
        ckpt = self.config.grad_checkpointing and self.training and torch.is_grad_enabled()
        for i in self.layer_range(mode):
            enc, enc_mask, index = encoder_hidden_states, encoder_mask, image_index
            n_images = (len(enc) if isinstance(enc, (list, tuple)) else
                        len(index) if isinstance(index, (list, tuple)) else
                        len(enc_mask) if isinstance(enc_mask, (list, tuple)) else 1)
            j = self.image_slot(i, n_images)
            if isinstance(enc, (list, tuple)):  # several images (NLVR2)
                enc = enc[j]
            if isinstance(enc_mask, (list, tuple)):
                enc_mask = enc_mask[j]
            if isinstance(index, (list, tuple)):
                index = index[j]
            kv = encoder_kv.get(i) if encoder_kv is not None else None
            if kv is not None:
                enc = None
            layer = self.layer[i]
            if ckpt:
                hidden_states = checkpoint(layer, hidden_states, attn_mask, enc, enc_mask, kv, index,
                                           use_reentrant=False)
            else:
                hidden_states = layer(hidden_states, attn_mask, enc, enc_mask, kv, index)
        return hidden_states


class BertModel(nn.Module):
    """Embeddings + encoder, no pooler (ALBEF never uses one). Returns the last hidden states [B, L, D]."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    def forward(
        self,
        input_ids: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        encoder_embeds: Optional[torch.Tensor] = None,
        encoder_hidden_states: Union[torch.Tensor, Sequence[torch.Tensor], None] = None,
        encoder_attention_mask: Union[torch.Tensor, Sequence[torch.Tensor], None] = None,
        mode: str = "multi_modal",
        is_decoder: bool = False,
        encoder_kv: Optional[EncoderKV] = None,
        image_index: Union[torch.Tensor, Sequence[torch.Tensor], None] = None,
    ) -> torch.Tensor:
        """Run the layers that ``mode`` selects.

        Args:
            input_ids: [B, L] token ids (``'text'`` / ``'multi_modal'``).
            attention_mask: [B, L] 1 for real tokens, 0 for padding.
            encoder_embeds: [B, L, D] hidden states to start from instead of embedding ``input_ids``
                (``'fusion'`` mode: the text encoder's output).
            encoder_hidden_states: [B, N, encoder_width] image tokens for cross-attention (or a list, one per
                image, for multi-image inputs).
            encoder_attention_mask: [B, N] mask of the image tokens; None means all visible.
            mode: ``'text'``, ``'fusion'`` or ``'multi_modal'``.
            is_decoder: causal self-attention (answer decoders).
            encoder_kv: precomputed cross-attention keys/values (:meth:`cross_attention_kv` of the distinct
                images), used instead of projecting ``encoder_hidden_states``.
            image_index: [B] int64, row ``b`` reads image ``image_index[b]`` of ``encoder_kv`` /
                ``encoder_hidden_states`` / ``encoder_attention_mask`` (which then hold the distinct images); a list
                for multi-image inputs. None: row ``b`` reads image ``b``. With ``encoder_hidden_states`` and no
                ``encoder_kv``, each fusion layer projects the distinct images once and gathers.
        """
        x = self.embeddings(input_ids) if encoder_embeds is None else encoder_embeds
        attn_mask = _key_padding_mask(attention_mask)
        if is_decoder:
            n = x.shape[1]
            causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()[None, None]
            attn_mask = causal if attn_mask is None else attn_mask & causal
        if image_index is not None and encoder_kv is None and encoder_hidden_states is not None:
            encoder_kv = self.cross_attention_kv(encoder_hidden_states, mode)
        if isinstance(encoder_attention_mask, (list, tuple)):
            enc_mask = [_key_padding_mask(m) for m in encoder_attention_mask]
            if image_index is not None:
                idx = image_index if isinstance(image_index, (list, tuple)) else [image_index] * len(enc_mask)
                enc_mask = [m if m is None else m.index_select(0, t) for m, t in zip(enc_mask, idx)]
        else:
            enc_mask = _key_padding_mask(encoder_attention_mask)
            if enc_mask is not None and image_index is not None:
                if isinstance(image_index, (list, tuple)):
                    enc_mask = [enc_mask.index_select(0, t) for t in image_index]
                else:
                    enc_mask = enc_mask.index_select(0, image_index)
        return self.encoder(x, attn_mask, encoder_hidden_states, enc_mask, mode, encoder_kv, image_index)

    def cross_attention_kv(self, encoder_hidden_states: Union[torch.Tensor, Sequence[torch.Tensor]],
                           mode: str = "multi_modal") -> EncoderKV:
        """Per-layer cross-attention (key, value) of the distinct images, for ``encoder_kv`` (see
        :meth:`BertEncoder.cross_attention_kv`)."""
        return self.encoder.cross_attention_kv(encoder_hidden_states, mode)


class BertPredictionHeadTransform(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x):
        return self.LayerNorm(F.gelu(self.dense(x)))


class BertLMPredictionHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.transform = BertPredictionHeadTransform(config)
        self.decoder = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.decoder.bias = self.bias  # one tensor under both names, as in HF / the original checkpoints

    def forward(self, x):
        return self.decoder(self.transform(x))


class BertOnlyMLMHead(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.predictions = BertLMPredictionHead(config)

    def forward(self, x):
        return self.predictions(x)


class BertForMaskedLM(nn.Module):
    """``bert`` + MLM head ``cls`` whose decoder weight is the word-embedding matrix."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.cls = BertOnlyMLMHead(config)
        self.tie_weights()

    def tie_weights(self) -> None:
        self.cls.predictions.decoder.weight = self.bert.embeddings.word_embeddings.weight

    def forward(self, input_ids, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                mode: str = "multi_modal", encoder_kv: Optional[EncoderKV] = None,
                image_index: Optional[torch.Tensor] = None,
                positions: Optional[Tuple[torch.Tensor, ...]] = None) -> torch.Tensor:
        """MLM logits [B, L, vocab] of the full text + fusion stack on (possibly masked) ``input_ids``.

        ``positions`` (index tensors into [B, L], e.g. ``labels.ne(-100).nonzero(as_tuple=True)``): the head runs
        only there and the logits are [M, vocab], those rows of the full logits. ``encoder_kv`` / ``image_index``:
        see :meth:`BertModel.forward`."""
        hidden = self.bert(input_ids, attention_mask, encoder_hidden_states=encoder_hidden_states,
                           encoder_attention_mask=encoder_attention_mask, mode=mode, encoder_kv=encoder_kv,
                           image_index=image_index)
        if positions is not None:
            hidden = hidden[positions]
        return self.cls(hidden)


class BertLMHeadModel(BertForMaskedLM):
    """The same weights as :class:`BertForMaskedLM` (``bert`` + ``cls``), run as a left-to-right decoder: causal
    self-attention, cross-attention in every layer from ``fusion_layer`` on (0 for ALBEF's VQA answer decoder).
    Position ``t``'s logits predict token ``t + 1``."""

    def forward(self, input_ids, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                mode: str = "multi_modal", encoder_kv: Optional[EncoderKV] = None,
                image_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        hidden = self.bert(input_ids, attention_mask, encoder_hidden_states=encoder_hidden_states,
                           encoder_attention_mask=encoder_attention_mask, mode=mode, is_decoder=True,
                           encoder_kv=encoder_kv, image_index=image_index)
        return self.cls(hidden)


def tie_cross_attention_kv(bert: BertModel) -> None:
    """NLVR2's two-image fusion: fusion layers come in pairs ``(f + 2i, f + 2i + 1)`` that read image 0 and image 1;
    the pair shares its cross-attention key and value projections (one ``nn.Parameter`` under both layers' names,
    as the original ``share_cross_attention``). Query, output dense and LayerNorm stay separate."""
    layers, f = bert.encoder.layer, bert.config.fusion_layer
    if (len(layers) - f) % 2:
        raise ValueError(f"tying cross-attention in pairs needs an even number of fusion layers, got {len(layers) - f}")
    for i in range(f, len(layers), 2):
        first, second = layers[i].crossattention.self, layers[i + 1].crossattention.self
        for name in ("key", "value"):
            getattr(first, name).weight = getattr(second, name).weight
            getattr(first, name).bias = getattr(second, name).bias


@torch.no_grad()
def init_bert_weights(module: nn.Module, initializer_range: float = 0.02) -> None:
    """BERT's initialisation: N(0, initializer_range) for Linear/Embedding, zero bias and padding row, LN 1/0."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            m.weight.normal_(0.0, initializer_range)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.Embedding):
            m.weight.normal_(0.0, initializer_range)
            if m.padding_idx is not None:
                m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            m.weight.fill_(1.0)
            m.bias.zero_()
    for m in module.modules():
        if isinstance(m, BertLMPredictionHead):  # the MLM bias is a bare Parameter
            m.bias.zero_()
        elif isinstance(m, nn.Embedding) and m.padding_idx is not None:
            m.weight[m.padding_idx].zero_()  # again: the tied MLM decoder (a Linear) re-drew this row
