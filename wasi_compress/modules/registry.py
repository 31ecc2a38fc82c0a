"""The registry of module types that act as a linear layer.

It lives beside the layers, not in passes/, so a layer registers itself from its own package
(modules/ imports nothing from passes/); passes/capture.py reads it to keep such modules as fx leaves
and to find them as linear sites, so models that are already converted are understood too."""

from __future__ import annotations

from torch import nn

# type -> name of its weight-like attribute (the tensor whose shape gives out x in features)
_LINEAR_TYPES: dict[type, str] = {nn.Linear: "weight"}


def register_linear_type(cls: type, weight_attr: str) -> type:
    """Declare a module type as a linear layer (a leaf for tracing, a site for analysis)."""
    _LINEAR_TYPES[cls] = weight_attr
    return cls


def is_linear_module(m: nn.Module) -> bool:
    return isinstance(m, tuple(_LINEAR_TYPES))
