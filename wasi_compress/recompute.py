"""Per-block recomputation (activation checkpointing) that survives deepcopy and keeps parameter names.

`recompute_blocks_(model, names)` makes each named block run its forward under
``torch.utils.checkpoint`` (non-reentrant) in training: autograd keeps the block's inputs only, and the
block's forward runs again in backward to rebuild what its own backward needs. The gradient is the same
(dropout RNG is replayed by checkpoint). The block's class is swapped for a subclass whose ``forward``
checkpoints the original one, instead of patching an instance attribute: a patched bound method would
still point at the original block after ``copy.deepcopy``, and a wrapper module would rename every
parameter (``blocks.0.inner.attn...``) and break checkpoints. `restore_blocks_` swaps the classes back.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from wasi_compress.errors import UserError

__all__ = ["is_recomputed", "recompute_blocks_", "restore_blocks_"]

_SUBCLASSES: dict[type, type] = {}


def _recomputed_class(cls: type) -> type:
    if cls not in _SUBCLASSES:
        def forward(self, *args, **kwargs):
            run = super(sub, self).forward
            if self.training and torch.is_grad_enabled():
                return checkpoint(run, *args, use_reentrant=False, **kwargs)
            return run(*args, **kwargs)

        sub = type(f"Recomputed{cls.__name__}", (cls,), {"forward": forward, "_wasi_recompute_base": cls,
                                                         "__module__": cls.__module__})
        _SUBCLASSES[cls] = sub
    return _SUBCLASSES[cls]


def is_recomputed(module: nn.Module) -> bool:
    return "_wasi_recompute_base" in type(module).__dict__


def recompute_blocks_(model: nn.Module, names: Iterable[str]) -> list[str]:
    """Recompute each named block in backward (see the module docstring); returns the names changed."""
    changed = []
    for name in names:
        try:
            block = model.get_submodule(name)
        except AttributeError:
            raise UserError(f"per-block recomputation needs {name} to be a module of the model, and it is not "
                            "(a traced model inlines its blocks)") from None
        if not is_recomputed(block):
            block.__class__ = _recomputed_class(type(block))
            changed.append(name)
    return changed


def restore_blocks_(model: nn.Module) -> list[str]:
    """Undo `recompute_blocks_` on every block of `model`; returns the names restored."""
    restored = []
    for name, module in model.named_modules():
        if is_recomputed(module):
            module.__class__ = type(module)._wasi_recompute_base
            restored.append(name)
    return restored
