"""`save` and `load` for models changed by the transforms: a safetensors checkpoint whose metadata names
the architecture and lists every factored site, so `load` rebuilds it with no SVD and no re-planning."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from wasi_compress.errors import UserError
from wasi_compress.marks import site_of

SOURCE_ATTR = "wasi_compress_source"  # set by `load` on the models it builds: how to build them again


def save(model: nn.Module, path: str | os.PathLike, *, arch: str | None = None, dtype: str = "float32",
         extra: dict[str, Any] | None = None) -> Path:
    """Write `model` (after `lowrank_`, or `to_inference_`) as a checkpoint at `path`, atomically.

    ``arch``: the architecture to rebuild it from (``timm:<name>``, ``builtin:<name>``,
    ``package.module:factory``); not needed for a model from `load`, nor for a timm model created with
    only ``num_classes`` / ``img_size`` changed. Training modules must be turned back first."""
    from wasi_compress.checkpoint import save_checkpoint, structure_entry
    from wasi_compress.modules.jactus import JactusLinear
    from wasi_compress.modules.subspace import SubspaceLinear
    from wasi_compress.passes.capture import LinearSite
    from wasi_compress.modules.training import ASILinear, CompactInputLinear, WASILinear

    if any(isinstance(m, (WASILinear, ASILinear, CompactInputLinear)) for m in model.modules()):
        raise UserError("the model still holds training modules; call wasi_compress.to_inference_(model) before save")
    from wasi_compress.modules.lowrank_conv import LowRankConv2d

    structure = []
    for name, m in model.named_modules():
        if isinstance(m, LowRankConv2d):
            mark = site_of(m) or {"site": name}
            structure.append({"name": mark["site"], "kind": "module", "module": "lowrank_conv", "rank": int(m.rank),
                              "bias": m.second.bias is not None, "in_features": int(m.in_features),
                              "out_features": int(m.out_features)})
        elif isinstance(m, (SubspaceLinear, JactusLinear)):
            mark = site_of(m) or {"site": name, "kind": "module"}
            site = LinearSite(name=mark["site"], kind=mark["kind"], role="other", in_features=int(m.in_features),
                              out_features=int(m.out_features), bias=m.bias is not None, weight_name="", bias_name=None)
            structure.append(structure_entry(site, m))
    return save_checkpoint(path, model, source=source_of_model(model, arch), structure=structure, extra=extra,
                           dtype=dtype)


def load(path_or_model: str | os.PathLike, **kwargs) -> nn.Module:
    """A model from a checkpoint written by `save`, `convert` or `finetune`, or from any MODEL argument
    (``timm:<name>``, ``builtin:<name>``, a weights file with ``arch=``); eval mode. The model remembers
    its source, so `save` needs no ``arch``. A checkpoint whose metadata names a
    ``package.module:factory`` is refused unless ``trust_code=True`` (or that factory is given as ``arch``):
    loading a file never imports code the file chose."""
    from wasi_compress.loading import load_model

    loaded = load_model(str(path_or_model), **kwargs)
    source = (loaded.metadata or {}).get("source")
    if source is None:
        from wasi_compress.architectures import checkpoint_source

        source = checkpoint_source(str(path_or_model), arch=kwargs.get("arch"), num_classes=kwargs.get("num_classes"),
                                   img_size=kwargs.get("img_size"))
    if source is not None:
        setattr(loaded.model, SOURCE_ATTR, dict(source))
    return loaded.model


def source_of_model(model: nn.Module, arch: str | None) -> dict[str, Any]:
    """The ``source`` a checkpoint records: ``arch``, else what `load` remembered, else timm's own name."""
    from wasi_compress.inputs import data_config, num_classes_of

    num_classes = num_classes_of(model)
    if arch:
        return {"arch": arch, "num_classes": num_classes, "img_size": None}
    remembered = getattr(model, SOURCE_ATTR, None)
    if isinstance(remembered, dict):
        return {**remembered, "num_classes": num_classes if num_classes is not None else remembered.get("num_classes")}
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("architecture")
    if not name:
        raise UserError(f"cannot tell how to rebuild {type(model).__name__}; pass arch='timm:<name>' or "
                        "'package.module:factory' to save()")
    size = data_config(model, None)[0]
    default = tuple(cfg.get("input_size") or size)
    return {"arch": f"timm:{name}", "num_classes": num_classes,
            "img_size": int(size[1]) if tuple(size)[1:] != default[1:] else None}
