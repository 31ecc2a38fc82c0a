"""`analyze`: per linear layer, how compressible the model is and where its training memory goes.

Returns a plain dict (schema ``wasi-compress/analyze/1``, documented in docs/schemas.md); rendering is
the CLI's job. Ranks come from singular values only (``svdvals``), never full SVDs."""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch import nn

from wasi_compress.errors import UserError
from wasi_compress.inputs import data_config, model_example
from wasi_compress.loading import LoadedModel, load_model
from wasi_compress.measure import FAMILIES, measure_saved_activations, train_memory
from wasi_compress.measure.train_memory import TRAIN_MEMORY_SOURCES
from wasi_compress.reports import ANALYZE_SCHEMA, AnalyzeReport, Source
from wasi_compress.spectrum import break_even_rank, ranks_for_thresholds, singular_values

SCHEMA = ANALYZE_SCHEMA  # kept for importers of analysis.SCHEMA
DEFAULT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
Progress = Callable[[int, int, str], None]  # (done, total, what)


def check_thresholds(thresholds: Sequence[float]) -> tuple[float, ...]:
    out = tuple(sorted(set(float(t) for t in thresholds)))
    if not out or any(not (0.0 < t <= 1.0) or math.isnan(t) for t in out):
        raise UserError(f"thresholds must be numbers in (0, 1], got {','.join(map(str, thresholds)) or 'none'}")
    return out


def site_modules(model: nn.Module, site) -> list[torch.Tensor]:
    """The tensors through which a linear site calls F.linear (weight, or L and R)."""
    if site.kind == "module":
        return list(model.get_submodule(site.name).parameters())
    return [model.get_parameter(site.weight_name)]


def site_singular_values(model: nn.Module, site) -> torch.Tensor:
    """Singular values of the site's effective weight; factored modules are handled without forming L R."""
    if site.kind == "module":
        m = model.get_submodule(site.name)
        if hasattr(m, "L") and hasattr(m, "R"):
            # svdvals(L R) = svdvals(T R) where L = Q T: only (k x in) work, no dense weight.
            _, t = torch.linalg.qr(m.L.detach().float())
            return singular_values(t @ m.R.detach().float())
        return singular_values(m.weight)
    return singular_values(model.get_parameter(site.weight_name))


def site_parameters(model: nn.Module, site) -> list[nn.Parameter]:
    if site.kind == "module":
        return list(model.get_submodule(site.name).parameters())
    params = [model.get_parameter(site.weight_name)]
    if site.bias_name:
        params.append(model.get_parameter(site.bias_name))
    return params


def analyze(
    loaded: LoadedModel | nn.Module,
    *,
    batch_size: int = 8,
    input_size: Sequence[int] | None = None,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    device: str = "cpu",
    spec: str | None = None,
    on_progress: Progress | None = None,
) -> dict[str, Any]:
    """Analyze a model; returns an analyze/1 document. Like every job it leaves its input unchanged:
    capture rewrites attention and moves tensors to ``device``, so it works on a copy."""
    import copy

    from wasi_compress.passes.capture import capture

    if isinstance(loaded, nn.Module):
        size, mean, std = data_config(loaded, None)
        loaded = LoadedModel(loaded, spec or type(loaded).__name__, size, mean, std, None)
    if batch_size < 1:
        raise UserError(f"--batch-size must be at least 1, got {batch_size}")
    thresholds = check_thresholds(thresholds)
    model = copy.deepcopy(loaded.model).to(device)
    size = tuple(input_size) if input_size else loaded.input_size
    x = model_example(model, batch_size, device=device, input_size=size)
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    x = x.to(dtype) if x.is_floating_point() else x  # token ids stay integers

    cap = capture(model, x)
    total_steps = len(cap.sites) + 2
    report = on_progress or (lambda *_: None)

    layers = []
    for i, site in enumerate(cap.sites):
        report(i, total_steps, f"singular values of {site.name}")
        layers.append(_layer_entry(model, site, thresholds, dtype))

    report(len(cap.sites), total_steps, "FLOPs (fvcore)")
    total_flops, notes = _count_flops(model, x)

    report(len(cap.sites) + 1, total_steps, "one training step (saved activations)")
    weights_of = {site.name: site_modules(model, site) for site in cap.sites}
    saved = measure_saved_activations(model, x, linear_weights=weights_of)
    report(total_steps, total_steps, "done")

    body = {
        "model": loaded.spec,
        "capture": cap.method,
        "capture_note": cap.note,
        "batch_size": batch_size,
        "input_shape": [batch_size, *size],
        "dtype": str(dtype).replace("torch.", ""),
        "thresholds": list(thresholds),
        "layers": layers,
        "totals": _totals(model, cap.sites, layers, total_flops, saved),
        "skipped": cap.skipped,
        "notes": notes + _batch_norm_notes(model, batch_size) + _file_notes(loaded.metadata),
    }
    return AnalyzeReport(body, ANALYZE_SOURCES, _TRAIN_MEMORY_KINDS).to_dict()


def _count_flops(model: nn.Module, x: torch.Tensor) -> tuple[int | None, list[str]]:
    """fvcore's FLOPs of one forward pass, or None and a note saying why not."""
    from wasi_compress.flops import count_flops  # looked up at call time (the benchmark wraps it)

    try:
        return count_flops(model, x)["total"], []
    except Exception as exc:  # torch.jit tracing inside fvcore fails on some models
        return None, [f"fvcore could not count FLOPs ({type(exc).__name__}); totals.flops is null"]


def _layer_entry(model: nn.Module, site, thresholds: tuple[float, ...], dtype: torch.dtype) -> dict[str, Any]:
    """One layer of the analyze/1 document."""
    s = site_singular_values(model, site)
    ranks = ranks_for_thresholds(s, thresholds)
    params = site_parameters(model, site)
    dense = site.in_features * site.out_features
    act_shape = list(site.input_shape) if site.input_shape else None
    elem = torch.finfo(dtype).bits // 8
    rows = math.prod(act_shape[:-1]) if act_shape else 0
    return {
        "name": site.name, "role": site.role, "kind": site.kind,
        "in_features": site.in_features, "out_features": site.out_features,
        "params": sum(p.numel() for p in params), "weight_bytes": sum(p.numel() * p.element_size() for p in params),
        "activation_shape": act_shape,
        "activation_bytes": math.prod(act_shape) * elem if act_shape else None,
        "ranks": {_key(t): k for t, k in ranks.items()},
        "break_even_rank": break_even_rank(site.out_features, site.in_features),
        "param_fraction": {_key(t): round(k * (site.in_features + site.out_features) / dense, 6) for t, k in ranks.items()},
        "flops": rows * _effective_macs(model, site),
        "singular_values": [round(float(v), 7) for v in s],
    }


def _totals(model: nn.Module, sites, layers: list[dict], total_flops: int | None, saved) -> dict[str, Any]:
    """The analyze/1 document's `totals`: whole model, and its linear layers alone."""
    from wasi_compress.flops import CONVENTION

    all_params = list(model.parameters())
    linear_params = _unique([p for site in sites for p in site_parameters(model, site)])
    return {
        "params": sum(p.numel() for p in all_params),
        "weight_bytes": sum(p.numel() * p.element_size() for p in all_params),
        "flops": total_flops,
        "flops_convention": CONVENTION,
        "train_memory": train_memory(all_params, saved.total_bytes),
        "saved_by_family": {family: saved.per_family.get(family, 0) for family in FAMILIES},
        "linear": {
            "params": sum(p.numel() for p in linear_params),
            "weight_bytes": sum(p.numel() * p.element_size() for p in linear_params),
            "flops": sum(layer["flops"] for layer in layers),
            "train_memory": train_memory(linear_params, saved.linear_input_bytes),
        },
    }


ANALYZE_SOURCES: dict[str, Source | str] = {
    "layers.ranks": Source("derived", "explained variance of the weight's singular values (torch.linalg.svdvals)"),
    "layers.activation_bytes": Source("derived", "product of the input shape recorded on the example batch x dtype size"),
    "layers.flops": Source("derived", "rows x in x out multiply-adds (x rank (in + out) for factored layers), fvcore convention"),
    "totals.flops": Source.worded("measured", "measured by fvcore on the example batch"),
    "totals.train_memory": "see train_memory.sources",  # a pointer, not a figure: no kind
    "totals.saved_by_family": Source("measured", "the saved activations of one training step "
                                     "(saved_tensors_hooks, each storage once) by the op family that saved "
                                     "them: inputs of linear layers first, then the functional op or the "
                                     "innermost norm, activation or attention module running; the rest is other"),
}
# the train_memory figures keep their prose beside them (train_memory.sources); their kinds go in the
# document's source_kinds under the figures' dotted paths
_TRAIN_MEMORY_KINDS = {f"{path}.{key}": source for path in ("totals.train_memory", "totals.linear.train_memory")
                       for key, source in TRAIN_MEMORY_SOURCES.items()}


def analyze_model(spec: str, batch_size: int = 8, **load_kwargs) -> dict[str, Any]:
    """Load a MODEL argument and analyze it (used by `check` when given a model)."""
    return analyze(load_model(spec, **load_kwargs), batch_size=batch_size)


def _effective_macs(model: nn.Module, site) -> int:
    if site.kind == "module":
        m = model.get_submodule(site.name)
        if hasattr(m, "L") and hasattr(m, "R"):
            return int(m.R.shape[0]) * (site.in_features + site.out_features)
    return site.in_features * site.out_features


def _unique(params: list[nn.Parameter]) -> list[nn.Parameter]:
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _key(threshold: float) -> str:
    return repr(float(threshold)) if threshold != int(threshold) else str(threshold)


def _batch_norm_notes(model: nn.Module, batch_size: int) -> list[str]:
    if batch_size != 1 or not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return []
    return ["batch 1: the training step ran BatchNorm on its running statistics (in train mode it needs more "
            "than one value per channel); it saves the same tensors either way"]


def _file_notes(metadata: dict[str, Any]) -> list[str]:
    """A checkpoint's own notes: data from a file, kept only as a list of strings."""
    notes = metadata.get("notes")
    return [n for n in notes if isinstance(n, str)] if isinstance(notes, list) else []
