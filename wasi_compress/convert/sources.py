"""What a converted checkpoint records about where the model came from: its architecture (``source``)
and the structure of subspace layers converted earlier (a checkpoint given as MODEL)."""

from __future__ import annotations

from torch import nn

from wasi_compress.architectures import is_architecture
from wasi_compress.errors import UserError
from wasi_compress.inputs import data_config, num_classes_of
from wasi_compress.loading import LoadedModel


def as_loaded(model, spec: str | None) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, nn.Module):
        size, mean, std = data_config(model, None)
        return LoadedModel(model, spec or type(model).__name__, size, mean, std, num_classes_of(model))
    raise TypeError(f"convert() takes a LoadedModel or an nn.Module, got {type(model).__name__}")


def source_of(loaded: LoadedModel, source: dict | None) -> tuple[dict | None, list[dict]]:
    """The architecture to record, and the structure of an already converted model (a checkpoint)."""
    meta = loaded.metadata or {}
    prior = list(meta.get("structure") or [])
    if source is not None:
        if not isinstance(source, dict) or not isinstance(source.get("arch"), str):
            raise UserError("source must be a dict with an 'arch' string such as 'timm:vit_base_patch32_224'")
        return {"arch": source["arch"], "num_classes": source.get("num_classes"), "img_size": source.get("img_size")}, prior
    if meta.get("source"):
        return dict(meta["source"]), prior
    hf_source = getattr(loaded.model, "hf_source", None)
    if isinstance(hf_source, dict):  # an hf: model records its class and config, not a path (hf.py)
        return {**hf_source, "num_classes": loaded.num_classes, "img_size": None}, prior
    spec = loaded.spec
    if not is_architecture(spec):
        return None, prior
    out = {"arch": spec, "num_classes": None, "img_size": None}
    if spec.startswith(("timm:", "builtin:")) and loaded.num_classes is not None:
        out["num_classes"] = loaded.num_classes  # both accept num_classes; record it in case it was changed
    cfg_size = (getattr(loaded.model, "pretrained_cfg", None) or {}).get("input_size")
    if spec.startswith("timm:") and cfg_size and tuple(cfg_size)[1:] != tuple(loaded.input_size)[1:]:
        out["img_size"] = int(loaded.input_size[1])
    return out, prior


def merge_structure(converted: nn.Module, layers, prior: list[dict]) -> list[dict]:
    """Structure entries of every subspace layer of the converted model, named as in the SOURCE
    architecture: layers converted before (a checkpoint given as MODEL) keep their entries, with their
    new rank; layers converted now get new entries."""
    from wasi_compress.checkpoint import module_location, structure_entry
    from wasi_compress.modules.lowrank_conv import LowRankConv2d
    from wasi_compress.modules.lowrank_embedding import LowRankEmbedding
    from wasi_compress.modules.subspace import SubspaceLinear

    by_location = {module_location(converted, entry): entry for entry in prior}
    structure = []
    for layer in layers:
        site = layer.site
        location = site.name if site.kind in ("module", "conv") else module_location(converted, {"kind": site.kind, "name": site.name})
        try:
            module = converted.get_submodule(location)
        except AttributeError:
            continue
        if not isinstance(module, (SubspaceLinear, LowRankConv2d, LowRankEmbedding)):
            continue
        fresh = structure_entry(site, module)
        old = by_location.pop(location, None)
        if old is not None:
            fresh["name"], fresh["kind"] = old["name"], old["kind"]
        structure.append(fresh)
    structure.extend(by_location.values())  # earlier conversions of layers not planned now (skipped ones)
    return sorted(structure, key=lambda e: (e["kind"], e["name"]))
