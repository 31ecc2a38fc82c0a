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


def data_config(model: nn.Module, img_size: int | None = None) -> tuple[tuple[int, int, int], tuple, tuple]:
    """(C, H, W), mean, std: timm's data config where the model has one, else from its patch embedding."""
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


def _pair(v) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))
