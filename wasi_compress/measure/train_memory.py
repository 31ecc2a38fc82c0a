"""The training-memory breakdown: parameters, gradients and optimizer state derived from tensor sizes,
saved activations as measured (one gradient per trainable parameter, one state for SGD momentum or two
for AdamW per trainable parameter)."""

from __future__ import annotations

from typing import Any

import torch

from wasi_compress.measure.storage import storage_bytes
from wasi_compress.reports import Source

__all__ = ["TRAIN_MEMORY_SOURCES", "train_memory"]

TRAIN_MEMORY_SOURCES: dict[str, Source] = {
    "params_bytes": Source("derived", "bytes of the parameter tensors"),
    "grads_bytes": Source("derived", "one gradient per trainable parameter"),
    "optimizer_bytes": Source("derived", "1 state (SGD momentum) or 2 states (AdamW) per trainable parameter"),
    "saved_activation_bytes": Source("measured", "saved_tensors_hooks over one forward and backward step, each storage once"),
    "total_bytes": Source("derived", "params + grads + AdamW state + saved activations"),
}


def train_memory(params: list[torch.nn.Parameter], saved_activation_bytes: int) -> dict[str, Any]:
    """The training-memory breakdown for a set of parameters and a measured saved-activation figure.
    Its ``sources`` are prose (as in analyze/1); the kinds are ``TRAIN_MEMORY_SOURCES``."""
    params_bytes = storage_bytes(params)
    trainable = storage_bytes([p for p in params if p.requires_grad])
    grads = trainable
    optimizer = {"sgd_momentum": trainable, "adamw": 2 * trainable}
    return {
        "params_bytes": params_bytes,
        "grads_bytes": grads,
        "optimizer_bytes": optimizer,
        "saved_activation_bytes": int(saved_activation_bytes),
        "total_bytes": params_bytes + grads + optimizer["adamw"] + int(saved_activation_bytes),
        "sources": {k: s.text for k, s in TRAIN_MEMORY_SOURCES.items()},
    }
