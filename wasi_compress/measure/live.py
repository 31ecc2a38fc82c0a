"""Peak live tensor bytes over a training step (a ``TorchDispatchMode``).

Every aten op that runs while ``LiveTensorBytes`` is active (forward, backward, which the autograd engine
runs under the same mode on CPU, and the optimizer step) reports its outputs, and the mode keeps one weak
reference per output storage (``StorageWeakRef``, which does not keep the data alive). After each op it
adds up the bytes of the storages still alive, plus a baseline of tensors that existed before the step
(parameters, buffers, optimizer state, the batch, any extra state such as compressor factors), and keeps
the maximum (only after an op that allocated: frees alone never raise it). So ``peak_bytes`` is the largest total of live tensor storage seen at op granularity over the
whole step. Not counted: scratch memory a kernel allocates and frees inside one op (BLAS workspaces),
allocator caching and fragmentation, and Python objects; tensors are counted by storage, so views and
shared storages count once."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["LiveTensorBytes"]


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

    def _add(self, t: Tensor) -> bool:
        """Track the storage of `t`; True when it is new (a view of a tracked storage is not)."""
        if t.device.type == "meta":
            return False
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # tensors without storage (sparse, nested, functional)
            return False
        ref = StorageWeakRef(storage)
        if ref.cdata in self._live and not self._live[ref.cdata][0].expired():
            return False
        self._live[ref.cdata] = (ref, storage.nbytes())
        return True

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
        added = False
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                added |= self._add(t)
        if added:  # the total rises only when a storage is allocated, so only then can the peak move
            self._refresh()
        return out
