"""Marks on the modules a transform or pass made (peft's ``base_layer`` / optimum's ``was_transformed``
idea): each new module records, per transform, which site it replaced and from what, so a reverse
(`to_inference_`, `ReplaceLinearsPass.reverse`, `save`) reads the model itself instead of a separate
record that could drift from it. Graph nodes carry theirs in ``node.meta['wasi_compress']``."""

from __future__ import annotations

from typing import Any, Iterator

from torch import nn

MARK_ATTR = "wasi_compress_marks"


def mark_module(module: nn.Module, transform: str, **info: Any) -> nn.Module:
    """Record on `module` that `transform` made it (info: site, kind, origin ...). Returns the module."""
    marks = dict(getattr(module, MARK_ATTR, None) or {})
    marks[transform] = dict(info)
    setattr(module, MARK_ATTR, marks)
    return module


def marks_of(module: nn.Module) -> dict[str, dict[str, Any]]:
    marks = getattr(module, MARK_ATTR, None)
    return dict(marks) if isinstance(marks, dict) else {}


def mark_of(module: nn.Module, transform: str) -> dict[str, Any] | None:
    return marks_of(module).get(transform)


def copy_marks(source: nn.Module, target: nn.Module) -> nn.Module:
    """Give `target` (the module that replaces `source`) the marks of `source`."""
    for transform, info in marks_of(source).items():
        mark_module(target, transform, **info)
    return target


def site_of(module: nn.Module) -> dict[str, Any] | None:
    """The linear site a marked module stands for ({"site", "kind"}), whichever transform made it."""
    for info in marks_of(module).values():
        if "site" in info:
            return {"site": info["site"], "kind": info.get("kind", "module")}
    return None


def marked_modules(model: nn.Module, transform: str) -> Iterator[tuple[str, nn.Module, dict[str, Any]]]:
    """(qualified name, module, info) of every module marked by `transform`."""
    for name, m in model.named_modules():
        info = mark_of(m, transform)
        if info is not None:
            yield name, m, info
