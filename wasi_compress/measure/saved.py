"""The saved-activations meter: what autograd saves for backward, measured with ``saved_tensors_hooks``.

Every tensor autograd saves passes through the pack hook; each underlying storage counts once (views and
tensors sharing storage count once), parameters and buffers excluded. A saved storage is attributed to
the innermost watched module whose forward was running when it was saved (``per_module``), and, when
``linear_weights`` is given, to the linear layer whose ``F.linear`` call took it as input, matched by
the weight tensor (``per_linear``; a TorchFunctionMode intercepts the calls).

With ``by_family``, every saved storage is also attributed to the op family that saved it
(``per_family``, keys ``FAMILIES``; the values sum exactly to ``total_bytes``):

- ``linear_inputs``: the storage is the input of an F.linear call of a layer in ``linear_weights``
  (so this figure equals ``linear_input_bytes``), whichever op saved it first;
- otherwise the family current when autograd first packed the storage (first owner wins): the
  functional op running at that moment, if it is one of ``FUNCTION_FAMILY`` (F.layer_norm, F.group_norm,
  F.rms_norm -> ``layernorm``; F.gelu, F.silu, F.relu and other activations -> ``activation``;
  F.scaled_dot_product_attention -> ``attention``; F.linear -> ``other``), else the family of the
  innermost module of a family type whose forward is running (nn.LayerNorm/GroupNorm/RMSNorm ->
  ``layernorm``; nn.GELU/SiLU/ReLU/... -> ``activation``; a module whose class name contains
  "Attention", such as timm's Attention or nn.MultiheadAttention -> ``attention``: its softmax, q k^T
  and attn v matmuls, dropout masks), else ``other`` (patch embedding, residual adds, pooling, loss)."""

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

__all__ = ["FAMILIES", "FUNCTION_FAMILY", "SavedActivationMeter", "SavedBytes", "family_of_module",
           "measure_saved_activations"]

FAMILIES = ("linear_inputs", "layernorm", "activation", "attention", "other")


def _present(*objects: Any) -> list[Any]:
    return [o for o in objects if o is not None]


_NORM_FUNCTIONS = _present(F.layer_norm, F.group_norm, getattr(F, "rms_norm", None))
_ACTIVATION_FUNCTIONS = _present(F.gelu, F.silu, F.relu, F.relu_, F.relu6, F.leaky_relu, F.elu, F.hardswish, F.mish,
                                 F.softplus, F.glu, F.sigmoid, F.tanh, torch.relu, torch.relu_, torch.sigmoid,
                                 torch.tanh, Tensor.relu, Tensor.relu_, Tensor.sigmoid, Tensor.tanh)
# the functional op running when a tensor is saved decides its family; F.linear's own saved tensors that
# are not watched linear inputs are "other", not the family of the module around the call
FUNCTION_FAMILY: dict[Any, str] = {
    **{f: "layernorm" for f in _NORM_FUNCTIONS},
    **{f: "activation" for f in _ACTIVATION_FUNCTIONS},
    F.scaled_dot_product_attention: "attention",
    F.linear: "other",
}
_NORM_MODULES = tuple(_present(nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", None)))
_ACTIVATION_MODULES = (nn.GELU, nn.SiLU, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.Hardswish, nn.Mish, nn.Softplus,
                       nn.GLU, nn.Sigmoid, nn.Tanh)


def family_of_module(module: nn.Module) -> str | None:
    """The op family of a module type (``layernorm``, ``activation``, ``attention``), or None."""
    if isinstance(module, _NORM_MODULES):
        return "layernorm"
    if isinstance(module, _ACTIVATION_MODULES):
        return "activation"
    if isinstance(module, nn.MultiheadAttention) or "Attention" in type(module).__name__:
        return "attention"
    return None


class _LinearInputRecorder(TorchFunctionMode):
    """Remembers the storage of every input to F.linear whose weight belongs to a known owner, and (with
    ``by_family``) the family of the functional op running (``family``, None between such ops)."""

    def __init__(self, owner_of_weight: dict[int, str], by_family: bool = False):
        super().__init__()
        self.owner_of_weight = owner_of_weight
        self.by_family = by_family
        self.inputs: dict[tuple[int, int], str] = {}
        self.family: str | None = None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear and args:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            owner = self.owner_of_weight.get(id(weight)) if weight is not None else None
            if owner is not None and isinstance(args[0], Tensor):
                self.inputs.setdefault(storage_key(args[0]), owner)
        family = FUNCTION_FAMILY.get(func) if self.by_family else None
        if family is None:
            return func(*args, **kwargs)
        outer, self.family = self.family, family
        try:
            return func(*args, **kwargs)
        finally:
            self.family = outer


class SavedActivationMeter:
    """Context manager: bytes autograd saves for backward while active, each storage once.

    ``watch`` maps a name to a module; a storage saved while that module's forward runs (innermost watched
    module wins) counts under its name in ``per_module``. ``linear_weights`` maps a linear layer's name to
    the tensors through which it calls F.linear (its weight, or its factors); the saved inputs of those
    calls count under its name in ``per_linear``. With ``by_family``, ``per_family`` attributes every
    saved storage to an op family (module docstring)."""

    def __init__(self, model: nn.Module, watch: dict[str, nn.Module] | None = None, *,
                 linear_weights: dict[str, Iterable[Tensor]] | None = None, by_family: bool = False):
        self.model = model
        self.watch = watch or {}
        self.by_family = by_family
        self.saved: dict[tuple[int, int], str | None] = {}
        self.family_of: dict[tuple[int, int], str] = {}
        self._stack: list[str] = []
        self._families: list[str] = []
        self._exclude = {storage_key(p) for p in model.parameters()} | {storage_key(b) for b in model.buffers()}
        owner_of_weight = {id(t): name for name, ts in (linear_weights or {}).items() for t in ts}
        wants_mode = linear_weights is not None or by_family
        self._recorder = _LinearInputRecorder(owner_of_weight, by_family) if wants_mode else None
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

    @property
    def per_family(self) -> dict[str, int]:
        """Saved bytes by op family (``FAMILIES``), summing to ``total_bytes``; all "other" without
        ``by_family`` except the linear inputs."""
        inputs = self._recorder.inputs if self._recorder is not None else {}
        out = dict.fromkeys(FAMILIES, 0)
        for key in self.saved:
            family = "linear_inputs" if key in inputs else self.family_of.get(key, "other")
            out[family] += key[1]
        return out

    def _pop(self) -> None:  # a forward hook must return None, or it replaces the module's output
        if self._stack:
            self._stack.pop()

    def _pop_family(self) -> None:
        if self._families:
            self._families.pop()

    def _current_family(self) -> str:
        running = self._recorder.family if self._recorder is not None else None
        return running or (self._families[-1] if self._families else "other")

    def _pack(self, t: Tensor) -> Tensor:
        if t.device.type != "meta":
            key = storage_key(t)
            if key[1] > 0 and key not in self._exclude:
                if self.saved.get(key) is None:
                    self.saved[key] = self._stack[-1] if self._stack else None
                if self.by_family and key not in self.family_of:
                    self.family_of[key] = self._current_family()
        return t

    def _family_hooks(self, stack: contextlib.ExitStack) -> None:
        """Forward hooks keeping the stack of running modules of a family type."""
        for module in self.model.modules():
            family = family_of_module(module)
            if family is not None:
                pre = module.register_forward_pre_hook(lambda _m, _a, f=family: self._families.append(f))
                post = module.register_forward_hook(lambda _m, _a, _o: self._pop_family())
                stack.callback(pre.remove)
                stack.callback(post.remove)

    def __enter__(self) -> SavedActivationMeter:
        stack = contextlib.ExitStack()
        for name, module in self.watch.items():
            pre = module.register_forward_pre_hook(lambda _m, _a, name=name: self._stack.append(name))
            post = module.register_forward_hook(lambda _m, _a, _o: self._pop())
            stack.callback(pre.remove)
            stack.callback(post.remove)
        if self.by_family:
            self._family_hooks(stack)
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t))
        if self._recorder is not None:
            stack.enter_context(self._recorder)
        self._exit = stack
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._exit is not None
        self._exit.close()
        self._stack.clear()
        self._families.clear()


@dataclass
class SavedBytes:
    """What one measured step saved: every saved storage once (parameters excluded), the part saved as
    inputs of linear layers, that part by layer, and the whole by op family (``FAMILIES``, summing to
    ``total_bytes``)."""

    total_bytes: int
    linear_input_bytes: int
    per_linear: dict[str, int] = field(default_factory=dict)
    per_family: dict[str, int] = field(default_factory=dict)


def measure_saved_activations(
    model: nn.Module,
    example: Any,
    *,
    linear_weights: dict[str, Iterable[Tensor]] | None = None,
    loss_fn: Callable[[Any], Tensor] | None = None,
    backward: bool = True,
) -> SavedBytes:
    """Run one forward (and backward) pass in training mode and measure what autograd saved; the model's
    mode and gradients are left as they were. ``linear_weights`` as in ``SavedActivationMeter``; the
    saved bytes are attributed by op family too (``per_family``)."""
    meter = SavedActivationMeter(model, linear_weights=linear_weights or {}, by_family=True)
    was_training = model.training
    example = example if isinstance(example, tuple) else (example,)
    modes = {m: m.training for m in model.modules()}
    model.train()
    batch_norm_in_eval_mode(model, example)
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
        for m, mode in modes.items():
            m.training = mode
        for p in model.parameters():  # leave the model as it was: no gradients left behind
            p.grad = grads_before[id(p)]
    per_linear = meter.per_linear
    return SavedBytes(meter.total_bytes, sum(per_linear.values()), per_linear, meter.per_family)


def default_loss(out: Any) -> Tensor:
    """A scalar to backpropagate from any model output: the mean square of every tensor in it."""
    if isinstance(out, Tensor):
        return out.float().square().mean()
    if isinstance(out, (tuple, list)):
        return sum(default_loss(o) for o in out if isinstance(o, Tensor))
    if isinstance(out, dict):
        return sum(default_loss(o) for o in out.values() if isinstance(o, Tensor))
    raise TypeError(f"cannot make a loss from a model output of type {type(out).__name__}")


def batch_norm_in_eval_mode(model: nn.Module, example: tuple) -> bool:
    """At batch 1, train-mode BatchNorm has one value per channel (LeViT's BatchNorm1d after a linear)
    and refuses it: run BatchNorm on its running statistics then (it saves the same tensors for
    backward). Returns whether any BatchNorm was switched."""
    first = next((t for t in example if isinstance(t, Tensor)), None)
    if first is None or first.dim() == 0 or first.shape[0] != 1:
        return False
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.eval()
    return bool(norms)
