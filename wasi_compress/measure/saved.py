"""The saved-activations meter: what autograd saves for backward, measured with ``saved_tensors_hooks``.

Every tensor autograd saves passes through the pack hook; each underlying storage counts once (views and
tensors sharing storage count once), parameters and buffers excluded. A saved storage is attributed to
the innermost watched module whose forward was running when it was saved (``per_module``), and, when
``linear_weights`` is given, to the linear layer whose ``F.linear`` call took it as input, matched by
the weight tensor (``per_linear``; a TorchFunctionMode intercepts the calls)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from wasi_compress.measure.storage import storage_key

__all__ = ["SavedActivationMeter", "SavedBytes", "measure_saved_activations"]


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
            if owner is not None and isinstance(args[0], Tensor):
                self.inputs.setdefault(storage_key(args[0]), owner)
        return func(*args, **kwargs)


class SavedActivationMeter:
    """Context manager: bytes autograd saves for backward while active, each storage once.

    ``watch`` maps a name to a module; a storage saved while that module's forward runs (innermost watched
    module wins) counts under its name in ``per_module``. ``linear_weights`` maps a linear layer's name to
    the tensors through which it calls F.linear (its weight, or its factors); the saved inputs of those
    calls count under its name in ``per_linear``."""

    def __init__(self, model: nn.Module, watch: dict[str, nn.Module] | None = None, *,
                 linear_weights: dict[str, Iterable[Tensor]] | None = None):
        self.model = model
        self.watch = watch or {}
        self.saved: dict[tuple[int, int], str | None] = {}
        self._stack: list[str] = []
        self._exclude = {storage_key(p) for p in model.parameters()} | {storage_key(b) for b in model.buffers()}
        owner_of_weight = {id(t): name for name, ts in (linear_weights or {}).items() for t in ts}
        self._recorder = _LinearInputRecorder(owner_of_weight) if linear_weights is not None else None
        self._exit: contextlib.ExitStack | None = None

    @property
    def total_bytes(self) -> int:
        return sum(k[1] for k in self.saved)

    @property
    def per_module(self) -> dict[str, int]:
        out = {name: 0 for name in self.watch}
        for key, owner in self.saved.items():
            if owner is not None:
                out[owner] = out.get(owner, 0) + key[1]
        return out

    @property
    def per_linear(self) -> dict[str, int]:
        inputs = self._recorder.inputs if self._recorder is not None else {}
        out: dict[str, int] = {}
        for key in self.saved:
            owner = inputs.get(key)
            if owner is not None:
                out[owner] = out.get(owner, 0) + key[1]
        return out

    @property
    def linear_input_bytes(self) -> int:
        return sum(self.per_linear.values())

    def _pop(self) -> None:  # a forward hook must return None, or it replaces the module's output
        if self._stack:
            self._stack.pop()

    def _pack(self, t: Tensor) -> Tensor:
        if t.device.type != "meta":
            key = storage_key(t)
            if key[1] > 0 and key not in self._exclude and self.saved.get(key) is None:
                self.saved[key] = self._stack[-1] if self._stack else None
        return t

    def __enter__(self) -> SavedActivationMeter:
        stack = contextlib.ExitStack()
        for name, module in self.watch.items():
            pre = module.register_forward_pre_hook(lambda _m, _a, name=name: self._stack.append(name))
            post = module.register_forward_hook(lambda _m, _a, _o: self._pop())
            stack.callback(pre.remove)
            stack.callback(post.remove)
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t))
        if self._recorder is not None:
            stack.enter_context(self._recorder)
        self._exit = stack
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._exit is not None
        self._exit.close()
        self._stack.clear()


@dataclass
class SavedBytes:
    """What one measured step saved: every saved storage once (parameters excluded), the part saved as
    inputs of linear layers, and that part by layer."""

    total_bytes: int
    linear_input_bytes: int
    per_linear: dict[str, int] = field(default_factory=dict)


def measure_saved_activations(
    model: nn.Module,
    example: Any,
    *,
    linear_weights: dict[str, Iterable[Tensor]] | None = None,
    loss_fn: Callable[[Any], Tensor] | None = None,
    backward: bool = True,
) -> SavedBytes:
    """Run one forward (and backward) pass in training mode and measure what autograd saved; the model's
    mode and gradients are left as they were. ``linear_weights`` as in ``SavedActivationMeter``."""
    meter = SavedActivationMeter(model, linear_weights=linear_weights or {})
    was_training = model.training
    model.train()
    example = example if isinstance(example, tuple) else (example,)
    grads_before = {id(p): p.grad for p in model.parameters()}
    for p in model.parameters():  # backward accumulates into an existing .grad in place: set it aside
        p.grad = None
    try:
        with meter:
            out = model(*example)
        if backward:
            loss = loss_fn(out) if loss_fn else default_loss(out)
            if loss.requires_grad:
                loss.backward()
    finally:
        model.train(was_training)
        for p in model.parameters():  # leave the model as it was: no gradients left behind
            p.grad = grads_before[id(p)]
    per_linear = meter.per_linear
    return SavedBytes(meter.total_bytes, sum(per_linear.values()), per_linear)


def default_loss(out: Any) -> Tensor:
    """A scalar to backpropagate from any model output: the mean square of every tensor in it."""
    if isinstance(out, Tensor):
        return out.float().square().mean()
    if isinstance(out, (tuple, list)):
        return sum(default_loss(o) for o in out if isinstance(o, Tensor))
    if isinstance(out, dict):
        return sum(default_loss(o) for o in out.values() if isinstance(o, Tensor))
    raise TypeError(f"cannot make a loss from a model output of type {type(out).__name__}")
