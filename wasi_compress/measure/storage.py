"""Bytes of tensor storage: the one storage-bytes function of the package."""

from __future__ import annotations

from collections.abc import Iterable

from torch import Tensor

__all__ = ["storage_bytes", "storage_key"]


def storage_key(t: Tensor) -> tuple[int, int]:
    """(data pointer, bytes) of the tensor's storage: views and tensors sharing a storage share a key."""
    s = t.untyped_storage()
    return (s.data_ptr(), s.nbytes())


def storage_bytes(tensors: Iterable[Tensor]) -> int:
    """Bytes of the distinct storages among ``tensors``, each storage once; meta tensors and non-tensors skipped."""
    seen: dict[tuple[int, int], int] = {}
    for t in tensors:
        if isinstance(t, Tensor) and t.device.type != "meta":
            k = storage_key(t)
            seen[k] = k[1]
    return sum(seen.values())
