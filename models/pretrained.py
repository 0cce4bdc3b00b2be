"""Initialising ALBEF from public weights: Hugging Face BERT for the text side, DeiT/timm ViT for the image side.

Names are resolved offline-first: a local folder or file is used as is; a hub name is looked up in the local
Hugging Face cache; only when it is not cached and the hub is reachable is it downloaded. When it cannot be
had, one clear error names the missing weights at once (no minute of hub retries).
"""
from __future__ import annotations

import argparse
import os
import re
import socket
from typing import Dict, Iterable
from urllib.parse import urlparse

import torch

from models.layouts import CheckpointError
from models.vit import interpolate_pos_embed


class MissingWeightsError(FileNotFoundError):
    pass


def _hub_offline() -> bool:
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _hub_reachable(timeout: float = 3.0) -> bool:
    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    try:
        with socket.create_connection((url.hostname, url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def looks_like_a_path(name: str) -> bool:
    """A local path, not a hub name (``org/name`` or ``name``): absolute, relative with ``.``/``~``, more than one
    ``/``, or a weights file's extension."""
    return (name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
            or name.endswith((".pth", ".pt", ".bin", ".safetensors", ".json", ".txt")))


def missing_path_message(what: str, name: str) -> str:
    """``what`` at local path ``name`` does not exist; a hint for the synthetic world's files."""
    msg = f"{what} {name!r} does not exist (no such file or folder: {os.path.abspath(os.path.expanduser(name))})"
    if "synthetic" in name:
        msg += ("; the synthetic world's files are generated: `python -m dataset.synthetic --out data/synthetic` "
                "(`make demo` does it; `make tasks-demo` and `make grounding-demo` add the task files)")
    return msg


def resolve_hf_path(name: str, what: str, files: Iterable[str] = ("config.json",)) -> str:
    """Return a local folder for ``name`` (a folder, or a hub repo id that is cached or downloadable).

    Raises:
        MissingWeightsError: naming ``name`` and what to do, when it is neither local, cached nor reachable.
    """
    if os.path.isdir(name):
        return name
    if os.path.exists(name):
        raise MissingWeightsError(f"{what} {name!r} must be a folder (save_pretrained layout) or a hub name")
    if looks_like_a_path(name):
        raise MissingWeightsError(missing_path_message(what, name))
    from huggingface_hub import snapshot_download

    try:  # the local cache, no network
        return snapshot_download(name, local_files_only=True)
    except Exception:
        pass
    hint = (f"put a local copy in a folder and set it in the config, or on a connected machine run "
            f"`huggingface-cli download {name}` to fill the cache")
    if _hub_offline():
        raise MissingWeightsError(f"{what} {name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is "
                                  f"set: {hint}")
    if not _hub_reachable():
        raise MissingWeightsError(f"{what} {name!r} is not in the local Hugging Face cache and the hub cannot be "
                                  f"reached: {hint}")
    return snapshot_download(name)


def _benign_globals() -> list:
    """Classes that checkpoints of ALBEF forks carry beside the weights and that unpickle without running code:
    ``argparse.Namespace`` (a saved ``args``) and numpy scalars / dtypes (a saved ``best`` metric)."""
    import numpy as np

    out = [argparse.Namespace, np.dtype]
    core = getattr(np, "_core", None) or getattr(np, "core", None)
    scalar = getattr(getattr(core, "multiarray", None), "scalar", None)
    if scalar is not None:
        out.append(scalar)
    out += [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]
    return out


_BENIGN_GLOBALS = _benign_globals()


def load_state_dict_file(path: str) -> Dict[str, torch.Tensor]:
    """Load a ``.safetensors`` or ``.pth/.bin`` state dict safely (``weights_only``), unwrapping ``'model'``/``'state_dict'``."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    if not os.path.isfile(path):
        raise MissingWeightsError(f"checkpoint file {path} does not exist")
    try:
        with torch.serialization.safe_globals(_BENIGN_GLOBALS):
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if "Weights only load failed" in str(e) and "GLOBAL" in str(e):  # a pickle with objects, not a torn file
            found = re.search(r"GLOBAL (\S+)", str(e))
            what = f" (a {found.group(1)})" if found else ""
            raise CheckpointError(f"{path}: the checkpoint holds Python objects besides tensors{what}; only "
                                  "tensors, plain Python values, argparse.Namespace and numpy scalars are loaded "
                                  "(weights_only) for safety: save its state dict alone") from e
        detail = (str(e).splitlines() or [""])[0][:200]
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated, corrupt or another format): "
                              f"{type(e).__name__}: {detail}") from e
    for key in ("model", "state_dict", "module"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd


def _check_shapes(sd: Dict[str, torch.Tensor], module: torch.nn.Module, what: str, config_key: str) -> None:
    expected = module.state_dict()
    for k, v in sd.items():
        if k in expected and expected[k].shape != v.shape:
            raise ValueError(f"{what}: {k} has shape {tuple(v.shape)}, the model expects "
                             f"{tuple(expected[k].shape)} (check the {config_key} config against the checkpoint)")


def load_bert_weights(text_encoder: torch.nn.Module, name_or_path: str, first_layers_only: bool = False) -> None:
    """Load Hugging Face BERT weights (``BertModel``/``BertForMaskedLM``/``BertForPreTraining`` layouts) into a
    :class:`models.bert.BertForMaskedLM` (or :class:`~models.bert.BertLMHeadModel`), or into a plain
    :class:`models.bert.BertModel` (then the MLM head is ignored).

    Only the new cross-attention blocks may stay uninitialised; any other missing key is an error. The pooler
    and next-sentence head are ignored. ``first_layers_only`` lets a shallower model take BERT's first layers
    (the VQA answer decoder: 6 of 12, as the original's ``from_pretrained`` with a 6-layer config).
    """
    folder = resolve_hf_path(name_or_path, what="BERT weights")
    sd = None
    for fname in ("model.safetensors", "pytorch_model.bin"):
        if os.path.exists(os.path.join(folder, fname)):
            sd = load_state_dict_file(os.path.join(folder, fname))
            break
    if sd is None:
        raise MissingWeightsError(f"no model.safetensors or pytorch_model.bin in {folder} (BERT weights {name_or_path!r})")
    with_head = hasattr(text_encoder, "bert")
    n_layers = (text_encoder.bert if with_head else text_encoder).config.num_hidden_layers
    mapped = {}
    for k, v in sd.items():
        k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        if k.startswith(("bert.pooler.", "pooler.", "cls.seq_relationship.")):
            continue
        if not k.startswith(("bert.", "cls.")):
            k = "bert." + k  # a plain BertModel checkpoint
        parts = k.split(".")
        if first_layers_only and parts[1:3] == ["encoder", "layer"] and int(parts[3]) >= n_layers:
            continue
        mapped[k] = v
    if "cls.predictions.decoder.weight" not in mapped and "bert.embeddings.word_embeddings.weight" in mapped:
        mapped["cls.predictions.decoder.weight"] = mapped["bert.embeddings.word_embeddings.weight"]
    if "cls.predictions.bias" in mapped:
        mapped.setdefault("cls.predictions.decoder.bias", mapped["cls.predictions.bias"])
    if not with_head:  # a BertModel: the body's keys without "bert.", no MLM head
        mapped = {k[len("bert."):]: v for k, v in mapped.items() if k.startswith("bert.")}
    _check_shapes(mapped, text_encoder, f"BERT weights {name_or_path!r}", "bert_config")
    missing, unexpected = text_encoder.load_state_dict(mapped, strict=False)
    missing = [k for k in missing if ".crossattention." not in k and not k.endswith("position_ids")
               and not k.startswith("cls.")]
    if missing or unexpected:
        raise ValueError(f"BERT weights {name_or_path!r} do not fit the text encoder: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    if with_head:
        text_encoder.tie_weights()


def load_vit_weights(vit: torch.nn.Module, name_or_path: str) -> None:
    """Initialise the ViT from a DeiT/timm checkpoint: a ``.pth``/``.safetensors`` file (the official DeiT file
    ``deit_base_patch16_224-b5f2ef4d.pth`` has its weights under ``'model'``) or a timm model name such as
    ``deit_base_patch16_224.fb_in1k`` (fetched through timm's hub cache). The position embedding is resized to
    the model's grid; the classifier head is dropped; any other mismatch is an error.
    """
    if os.path.isfile(name_or_path):
        sd = load_state_dict_file(name_or_path)
    else:
        import timm

        if looks_like_a_path(name_or_path):
            raise MissingWeightsError(missing_path_message("ViT weights", name_or_path))
        repo = f"timm/{name_or_path}" if "/" not in name_or_path else name_or_path
        folder = resolve_hf_path(repo, what="ViT weights", files=("model.safetensors",))
        files = [f for f in ("model.safetensors", "pytorch_model.bin") if os.path.exists(os.path.join(folder, f))]
        if not files:
            raise MissingWeightsError(f"no model.safetensors or pytorch_model.bin in {folder} (ViT weights "
                                      f"{name_or_path!r}); timm {timm.__version__}")
        sd = load_state_dict_file(os.path.join(folder, files[0]))
    sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "head_dist.", "fc_norm.", "dist_token"))}
    if "pos_embed" in sd:
        sd["pos_embed"] = interpolate_pos_embed(sd["pos_embed"], vit.patch_embed.num_patches)
    _check_shapes(sd, vit, f"ViT weights {name_or_path!r}", "vit:")
    missing, unexpected = vit.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"ViT weights {name_or_path!r} do not fit the image encoder: missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
