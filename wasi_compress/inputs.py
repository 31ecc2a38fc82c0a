"""What a model takes as input: its (C, H, W) size, normalisation and number of classes.

A leaf module (torch only): loading, checkpoints, analysis and the jobs all read a model's input
description from here, so none of them has to import another to find it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class InputSpec:
    input_size: tuple[int, int, int]  # (C, H, W)
    mean: tuple[float, ...]
    std: tuple[float, ...]


def input_spec(model: nn.Module, img_size: int | None = None) -> InputSpec:
    """The input description of `model` (see data_config) as one value."""
    return InputSpec(*data_config(model, img_size))


def data_config(model: nn.Module, img_size: int | None = None) -> tuple[tuple[int, ...], tuple, tuple]:
    """(C, H, W), mean, std: timm's data config where the model has one, else from its patch embedding.
    A text model (one with a ``token_input``, see hf.py) takes (seq_len,) token ids, no normalisation."""
    tokens = getattr(model, "token_input", None)
    if tokens is not None:
        return (int(tokens.seq_len),), (), ()
    cfg = getattr(model, "pretrained_cfg", None) or {}
    input_size = cfg.get("input_size")
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and getattr(patch_embed, "img_size", None) is not None:
        chans = getattr(getattr(patch_embed, "proj", None), "in_channels", None) or (input_size or (3,))[0]
        h, w = _pair(patch_embed.img_size)
        input_size = (chans, h, w)
    if input_size is None:
        input_size = getattr(model, "default_input_size", None) or (3, 224, 224)
    if img_size is not None:
        input_size = (input_size[0], img_size, img_size)
    c = int(input_size[0])
    mean = tuple(cfg.get("mean", (0.485, 0.456, 0.406) if c == 3 else (0.5,) * c))
    std = tuple(cfg.get("std", (0.229, 0.224, 0.225) if c == 3 else (0.5,) * c))
    return (c, int(input_size[1]), int(input_size[2])), mean, std


def num_classes_of(model: nn.Module) -> int | None:
    """The classifier size a model declares (timm's ``num_classes``), or None."""
    n = getattr(model, "num_classes", None)
    return int(n) if isinstance(n, int) else None


def example_input(input_size: Sequence[int], batch_size: int, *, seed: int = 0, device: str = "cpu") -> torch.Tensor:
    """A fixed random batch: shapes and memory depend only on its size, and a seed keeps runs identical."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, *input_size, generator=g).to(device)


def is_text_model(model: nn.Module) -> bool:
    return getattr(model, "token_input", None) is not None


def token_ids(tokens, batch_size: int, *, seed: int = 0, device: str = "cpu", seq_len: int | None = None) -> torch.Tensor:
    """A fixed random batch of token ids; with a pad token, the rows after the first end in padding of
    growing length (a quarter of the sequence at most), so the attention mask matters."""
    length = int(seq_len or tokens.seq_len)
    g = torch.Generator().manual_seed(seed)
    low = 1 if tokens.pad_token_id == 0 else 0
    ids = torch.randint(low, tokens.vocab_size, (batch_size, length), generator=g)
    if tokens.pad_token_id is not None:
        for row in range(1, batch_size):
            pad = min(row, max(length // 4, 1) if length > 1 else 0)
            if pad:
                ids[row, length - pad:] = tokens.pad_token_id
    return ids.to(device)


def model_example(model: nn.Module, batch_size: int, *, seed: int = 0, device: str = "cpu",
                  input_size: Sequence[int] | None = None) -> torch.Tensor:
    """The example batch `model` takes: token ids for a text model, else images of `input_size` (default:
    the model's own)."""
    tokens = getattr(model, "token_input", None)
    if tokens is not None:
        return token_ids(tokens, batch_size, seed=seed, device=device,
                         seq_len=input_size[0] if input_size else None)
    size = tuple(input_size) if input_size else data_config(model, None)[0]
    return example_input(size, batch_size, seed=seed, device=device)


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))
