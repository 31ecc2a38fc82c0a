"""Measure a training step's memory: live tensor bytes (whole-step peak) and saved activations by layer.

``LiveTensorBytes`` is a ``TorchDispatchMode``: every aten op that runs while it is active (forward,
backward, which the autograd engine runs under the same mode on CPU, and the optimizer step) reports
its outputs, and the mode keeps one weak reference per output storage (``StorageWeakRef``, which does not
keep the data alive). After each op it adds up the bytes of the storages still alive, plus a baseline
of tensors that existed before the step (parameters, buffers, optimizer state, the batch, any extra
state such as compressor factors), and keeps the maximum. So ``peak_bytes`` is the largest total of
live tensor storage seen at op granularity over the whole step. Not counted: scratch memory a kernel
allocates and frees inside one op (BLAS workspaces), allocator caching and fragmentation, and Python
objects; tensors are counted by storage, so views and shared storages count once.

``SavedActivations`` records what autograd saves for backward (``saved_tensors_hooks``), each storage
once, parameters and buffers excluded, and attributes each saved storage to the innermost watched
module (e.g. a linear layer) whose forward was running when it was saved: that is the layer's saved
input, exact or compressed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["LiveTensorBytes", "SavedActivations", "storage_bytes"]


def _key(t: Tensor) -> tuple[int, int]:
    s = t.untyped_storage()
    return (s.data_ptr(), s.nbytes())


def storage_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages among ``tensors``."""
    seen: dict[tuple[int, int], int] = {}
    for t in tensors:
        if isinstance(t, Tensor) and t.device.type != "meta":
            k = _key(t)
            seen[k] = k[1]
    return sum(seen.values())


class LiveTensorBytes(TorchDispatchMode):
    """Peak of live tensor storage bytes while active (see the module docstring)."""

    def __init__(self, baseline: Iterable[Tensor] = ()):
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak_bytes = 0
        self.current_bytes = 0
        for t in baseline:
            self._add(t)
        self._refresh()

    def _add(self, t: Tensor) -> None:
        if t.device.type == "meta":
            return
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, nested, functional)
            return
        ref = StorageWeakRef(storage)
        self._live[ref.cdata] = (ref, storage.nbytes())

    def _refresh(self) -> None:
        total, dead = 0, []
        for key, (ref, nbytes) in self._live.items():
            if ref.expired():
                dead.append(key)
            else:
                total += nbytes
        for key in dead:
            del self._live[key]
        self.current_bytes = total
        self.peak_bytes = max(self.peak_bytes, total)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                self._add(t)
        self._refresh()
        return out


class SavedActivations:
    """Context manager: bytes autograd saves for backward, each storage once, by watched module.

    ``watch`` maps a name to a module; a storage saved while that module's forward runs (innermost
    watched module wins) is counted under its name in ``per_module``."""

    def __init__(self, model: nn.Module, watch: dict[str, nn.Module] | None = None):
        self.model = model
        self.watch = watch or {}
        self.saved: dict[tuple[int, int], str | None] = {}
        self._stack: list[str] = []
        self._exclude = {_key(p) for p in model.parameters()} | {_key(b) for b in model.buffers()}
        self._stack_ctx: contextlib.ExitStack | None = None

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

    def _pop(self) -> None:  # a forward hook must return None, or it replaces the module's output
        if self._stack:
            self._stack.pop()

    def _pack(self, t: Tensor) -> Tensor:
        if t.device.type != "meta":
            key = _key(t)
            if key[1] > 0 and key not in self._exclude:
                owner = self._stack[-1] if self._stack else None
                if self.saved.get(key) is None:
                    self.saved[key] = owner
        return t

    def __enter__(self) -> SavedActivations:
        stack = contextlib.ExitStack()
        for name, module in self.watch.items():
            pre = module.register_forward_pre_hook(lambda _m, _a, name=name: self._stack.append(name))
            post = module.register_forward_hook(lambda _m, _a, _o: self._pop())
            stack.callback(pre.remove)
            stack.callback(post.remove)
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t))
        self._stack_ctx = stack
        return self

    def __exit__(self, *exc: Any) -> None:
        assert self._stack_ctx is not None
        self._stack_ctx.close()
        self._stack.clear()

