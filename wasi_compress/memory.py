"""Training-memory accounting, measured where it can be and derived from tensor sizes where it must.

Saved activations are measured over a real forward pass with ``torch.autograd.graph.saved_tensors_hooks``:
every tensor autograd saves for backward passes through the pack hook, and we count each underlying
storage once (views and tensors sharing storage count once), excluding parameters. The inputs saved by
linear layers are identified by intercepting ``F.linear`` calls with a TorchFunctionMode and matching
storages. Parameters, gradients and optimizer state are derived from the sizes of the tensors that exist:
one gradient per trainable parameter, one state (SGD momentum) or two (AdamW) per trainable parameter."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode


def _storage_key(t: torch.Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return (s.data_ptr(), s.nbytes())


class _LinearInputRecorder(TorchFunctionMode):
    """Remembers the storage of every input to F.linear whose weight belongs to a known owner."""

    def __init__(self, owner_of_weight: dict[int, str]):
        super().__init__()
        self.owner_of_weight = owner_of_weight
        self.inputs: dict[tuple[int, int], str] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and args:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            owner = self.owner_of_weight.get(id(weight)) if weight is not None else None
            if owner is not None and isinstance(args[0], torch.Tensor):
                self.inputs.setdefault(_storage_key(args[0]), owner)
        return func(*args, **kwargs)


@dataclass
class SavedActivations:
    total_bytes: int                     # every saved storage once, parameters excluded
    linear_input_bytes: int              # the part saved as inputs of linear layers
    per_linear: dict[str, int] = field(default_factory=dict)


def measure_saved_activations(
    model: nn.Module,
    example: Any,
    *,
    linear_weights: dict[str, Iterable[torch.Tensor]] | None = None,
    loss_fn: Callable[[Any], torch.Tensor] | None = None,
    backward: bool = True,
) -> SavedActivations:
    """Run one forward (and backward) pass in training mode and measure what autograd saved.

    ``linear_weights`` maps a linear layer's name to the tensors through which it calls F.linear (its
    weight, or its factors); inputs of those calls count as that layer's saved input."""
    owner_of_weight = {id(t): name for name, ts in (linear_weights or {}).items() for t in ts}
    param_storages = {_storage_key(p) for p in model.parameters()} | {_storage_key(b) for b in model.buffers()}
    saved: dict[tuple[int, int], int] = {}

    def pack(t: torch.Tensor):
        key = _storage_key(t)
        if key not in param_storages and key[1] > 0:
            saved[key] = key[1]
        return t

    recorder = _LinearInputRecorder(owner_of_weight)
    was_training = model.training
    model.train()
    example = example if isinstance(example, tuple) else (example,)
    grads_before = {id(p): p.grad for p in model.parameters()}
    for p in model.parameters():  # backward accumulates into an existing .grad in place: set it aside
        p.grad = None
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), recorder:
            out = model(*example)
        if backward:
            loss = loss_fn(out) if loss_fn else _default_loss(out)
            if loss.requires_grad:
                loss.backward()
    finally:
        model.train(was_training)
        for p in model.parameters():  # leave the model as it was: no gradients left behind
            p.grad = grads_before[id(p)]
    per_linear: dict[str, int] = {}
    for key, nbytes in saved.items():
        owner = recorder.inputs.get(key)
        if owner is not None:
            per_linear[owner] = per_linear.get(owner, 0) + nbytes
    return SavedActivations(sum(saved.values()), sum(per_linear.values()), per_linear)


def _default_loss(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out.float().square().mean()
    if isinstance(out, (tuple, list)):
        return sum(_default_loss(o) for o in out if isinstance(o, torch.Tensor))
    if isinstance(out, dict):
        return sum(_default_loss(o) for o in out.values() if isinstance(o, torch.Tensor))
    raise TypeError(f"cannot make a loss from a model output of type {type(out).__name__}")


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of distinct storages among `tensors`."""
    seen: dict[tuple[int, int], int] = {}
    for t in tensors:
        key = _storage_key(t)
        seen[key] = key[1]
    return sum(seen.values())


def train_memory(params: list[torch.nn.Parameter], saved_activation_bytes: int) -> dict[str, Any]:
    """The training-memory breakdown for a set of parameters and a measured saved-activation figure."""
    params_bytes = tensor_bytes(params)
    trainable = tensor_bytes([p for p in params if p.requires_grad])
    grads = trainable
    optimizer = {"sgd_momentum": trainable, "adamw": 2 * trainable}
    return {
        "params_bytes": params_bytes,
        "grads_bytes": grads,
        "optimizer_bytes": optimizer,
        "saved_activation_bytes": int(saved_activation_bytes),
        "total_bytes": params_bytes + grads + optimizer["adamw"] + int(saved_activation_bytes),
        "sources": {
            "params_bytes": "derived: bytes of the parameter tensors",
            "grads_bytes": "derived: one gradient per trainable parameter",
            "optimizer_bytes": "derived: 1 state (SGD momentum) or 2 states (AdamW) per trainable parameter",
            "saved_activation_bytes": "measured: saved_tensors_hooks over one forward and backward step, each storage once",
            "total_bytes": "derived: params + grads + AdamW state + saved activations",
        },
    }
