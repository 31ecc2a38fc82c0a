"""Frozen parameters stored in a smaller dtype (a memory lever of issue 13).

`store_frozen_in_(model, names, torch.bfloat16)` keeps the named frozen parameters in bfloat16 (half the
bytes) and computes in float32 as before: each owning module gets a forward pre-hook that swaps float32
copies in for the length of its own forward, and a forward hook that swaps the stored tensors back. The
copies are transients of one module at a time, freed when its forward returns, which holds only where
nothing keeps them for backward: a frozen module whose inputs need no gradient (everything before the
first trained block under ``finetune_last``), so only such parameters are accepted.

Not exact: the frozen weights are rounded to bfloat16 once (relative error about 2^-9 per entry;
`rounding_error` gives the figure for a model). The hooks live in the modules' hook dicts and call
module-level functions, so they survive ``copy.deepcopy``; `restore_frozen_dtype_` casts back and removes
them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from wasi_compress.errors import UserError

__all__ = ["FROZEN_DTYPES", "frozen_bytes", "restore_frozen_dtype_", "rounding_error", "store_frozen_in_"]

FROZEN_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _swap_in(module: nn.Module, _args) -> None:
    module._wasi_stored = {}
    for name, p in module._parameters.items():
        if p is not None and name in module._wasi_frozen:
            module._wasi_stored[name] = p
            module._parameters[name] = nn.Parameter(p.detach().float(), requires_grad=False)


def _swap_back(module: nn.Module, _args, _out) -> None:
    module._parameters.update(getattr(module, "_wasi_stored", {}))
    module._wasi_stored = {}


def _eligible(model: nn.Module, names: Iterable[str]) -> dict[str, list[str]]:
    """The named parameters by owning module, leaving out those whose module's forward spans trained
    parts (the model itself, a module with trained parameters inside): float32 copies would live through
    them. Raises UserError for a name that is not a frozen parameter."""
    owners: dict[str, list[str]] = {}
    for name in names:
        module_name, _, leaf = name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            module = None
        p = None if module is None else module._parameters.get(leaf)
        if p is None or p.requires_grad:
            raise UserError(f"{name} is not a frozen parameter of the model: only frozen ones can be stored in a "
                            "smaller dtype")
        if module is model or any(q.requires_grad for q in module.parameters()) or not p.is_floating_point():
            continue
        owners.setdefault(module_name, []).append(leaf)
    return owners


def store_frozen_in_(model: nn.Module, names: Iterable[str], dtype: torch.dtype = torch.bfloat16) -> list[str]:
    """Keep the named frozen parameters in `dtype` (module docstring). Parameters held by a module whose
    own forward does not run them (a model's ``pos_embed``, used in the model's forward around its trained
    blocks) stay as they are. Returns the names stored in `dtype`."""
    stored = []
    for module_name, leaves in _eligible(model, names).items():
        module = model.get_submodule(module_name)
        for leaf in leaves:
            p = module._parameters[leaf]
            module._parameters[leaf] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
            stored.append(f"{module_name}.{leaf}")
        if "_wasi_frozen" not in module.__dict__:
            # no handles kept: a deep copy would share their weak references with the original
            module._wasi_frozen = set()
            module.register_forward_pre_hook(_swap_in)
            module.register_forward_hook(_swap_back)
        module._wasi_frozen |= set(leaves)
    return stored


def restore_frozen_dtype_(model: nn.Module) -> list[str]:
    """Undo `store_frozen_in_`: the stored parameters back in float32 (their rounded values), hooks removed."""
    restored = []
    for module_name, module in model.named_modules():  # noqa: B007
        if "_wasi_frozen" not in module.__dict__:
            continue
        for hooks, fn in ((module._forward_pre_hooks, _swap_in), (module._forward_hooks, _swap_back)):
            for key in [k for k, v in hooks.items() if v is fn]:
                del hooks[key]
        for leaf in sorted(module.__dict__.pop("_wasi_frozen")):
            p = module._parameters[leaf]
            module._parameters[leaf] = nn.Parameter(p.detach().float(), requires_grad=False)
            restored.append(f"{module_name}.{leaf}" if module_name else leaf)
        module.__dict__.pop("_wasi_stored", None)
    return restored


def frozen_bytes(model: nn.Module, names: Iterable[str]) -> int:
    """What `store_frozen_in_` (bfloat16) would save on `model`: half the float32 bytes it would store."""
    total = 0
    for module_name, leaves in _eligible(model, names).items():
        module = model.get_submodule(module_name)
        total += sum(module._parameters[leaf].numel() * 2 for leaf in leaves
                     if module._parameters[leaf].dtype == torch.float32)
    return total


def rounding_error(model: nn.Module, names: Iterable[str], dtype: torch.dtype = torch.bfloat16) -> float:
    """Relative Frobenius error of the parameters `store_frozen_in_` would store, together, after rounding
    to `dtype`."""
    err = norm = 0.0
    for module_name, leaves in _eligible(model, names).items():
        for leaf in leaves:
            p = model.get_submodule(module_name)._parameters[leaf].detach().float()
            err += float((p - p.to(dtype).float()).pow(2).sum())
            norm += float(p.pow(2).sum())
    return (err / norm) ** 0.5 if norm else 0.0
