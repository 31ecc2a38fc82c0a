"""`convert`: the most faithful low-rank model that fits a byte budget (METHOD.md sections 1, 3 and 4).

Budget semantics: ``budget`` is the total bytes of ALL parameters of the converted model stored in
``dtype`` (float32 = 4 bytes, float16/bfloat16 = 2), plus the model's persistent buffers as stored
(none in a ViT). Parameters that conversion cannot change (embeddings, norms, convolutions, linears that
are skipped) are paid for first; the rest of the budget goes to the planner, which picks one candidate
per linear layer:

- a rank k: ``k * (in + out) * elem`` bytes plus the bias, at the ranks the explained-variance
  thresholds give, a grid of ``rank_grid`` evenly spaced ranks from 1 to the break-even rank, all
  rounded up to ``rank_multiple`` (capped at full rank);
- the dense layer, ``in * out * elem`` plus the bias, always: a layer whose useful rank is above the
  break-even stays dense.

Errors are put on one scale before the planner adds them: every candidate's error is RELATIVE to its
own layer, read off one spectrum per layer.

- ``objective="weight"``: ``||W - W_k||_F / ||W||_F`` from the singular values of W (no data).
- ``objective="data"``: ``||X W^T - X W_k^T||_F / ||X W^T||_F`` on calibration inputs X (the layer's
  own inputs, collected during forward passes of calibration images), from the singular values of the
  whitened weight W S with C = X^T X = S S^T (SVD-LLM); factors are then whitened too.

The plan minimises the sum of these relative errors (DP on a byte grid, or the greedy baseline). Each
chosen rank is then factored once (SVD). The function does all the work first and writes files last:
a failure or an interrupt leaves no output behind, and the ONNX export is checked against torch
before anything is written.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys
import tempfile
import types
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from wasi_compress import _compat  # noqa: F401  (before timm)
from wasi_compress.analysis import site_parameters
from wasi_compress.checkpoint import (
    DTYPES, copy_model_attributes, module_location, save_checkpoint, stored_bytes, structure_entry,
)
from wasi_compress.errors import InfeasibleBudgetError, UserError
from wasi_compress.loading import LoadedModel, resolve_device
from wasi_compress.modules.subspace import SubspaceLinear, Whitening, whitened_singular_values
from wasi_compress.planner import (
    Candidate, LayerCandidates, Plan, pareto_front, plan as make_plan, smallest_feasible_budget,
)
from wasi_compress.spectrum import break_even_rank, errors_for_ranks, ranks_for_thresholds, singular_values
from wasi_compress.units import format_bytes, parse_bytes

SCHEMA = "wasi-compress/convert/1"
OBJECTIVES = ("weight", "data")
ALLOCATORS = ("dp", "greedy")
DEFAULT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)
PARETO_POINTS = 12
# An ONNX file above this many bytes of weights keeps them in <name>.data beside it (protobuf caps a
# single file at 2 GB; well below that, one file is simpler to ship).
ONNX_EXTERNAL_DATA_BYTES = 100 * 1000**2
Progress = Callable[[int, int, str], None]  # (done, total, what)
_LINEAR_FUNCS = (F.linear, torch._C._nn.linear)


# ---------------------------------------------------------------------------------------------------
# configuration


@dataclass
class ConvertConfig:
    """Everything `convert` needs besides the model; the CLI options of ``wasi-compress convert``.

    Validates itself on creation (UserError with one line) and round-trips through JSON
    (`to_dict`/`from_dict`, `to_json`/`from_json`). Paths (``output``, ``onnx``, ``json``, ``report``)
    are optional: without them `convert` writes nothing and the result can be saved later."""

    budget: str | int
    dtype: str = "float32"
    allocator: str = "dp"
    objective: str = "weight"
    calib: str | None = None          # mnist, digits, an image folder, or random; needed by objective=data
    calib_batches: int = 8
    calib_batch_size: int = 32
    rank_multiple: int = 1
    rank_grid: int = 32
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    seed: int = 0
    eval: str | None = None           # mnist, digits or an image folder: top-1 before and after
    eval_batch_size: int = 64
    output: str | None = None         # the converted checkpoint (.safetensors)
    onnx: str | None = None
    json: str | None = None           # the convert/1 document ('-' for stdout)
    report: str | None = None         # folder for report.html
    device: str = "cpu"
    onnx_tolerance: float = 1e-4
    opset: int = 17
    budget_bytes: int = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        self.budget_bytes = parse_bytes(self.budget, "--budget")
        _choice(self.dtype, tuple(DTYPES), "--dtype")
        _choice(self.allocator, ALLOCATORS, "--allocator")
        _choice(self.objective, OBJECTIVES, "--objective")
        for name in ("calib_batches", "calib_batch_size", "rank_multiple", "eval_batch_size"):
            _positive_int(getattr(self, name), "--" + name.replace("_", "-"))
        _positive_int(self.rank_grid, "--rank-grid", allow_zero=True)
        _positive_int(self.seed, "--seed", allow_zero=True)
        _positive_int(self.opset, "--opset")
        if self.opset < 17:
            raise UserError(f"--opset: needs 17 or later, got {self.opset}")
        if isinstance(self.thresholds, str):
            self.thresholds = tuple(_floats(self.thresholds, "--thresholds"))
        try:
            ths = tuple(sorted({float(t) for t in self.thresholds}))
        except (TypeError, ValueError):
            raise UserError(f"--thresholds: expected numbers in (0, 1], got {self.thresholds!r}") from None
        if any(not 0.0 < t <= 1.0 for t in ths):  # also refuses nan
            raise UserError(f"--thresholds: every threshold must be in (0, 1], got {', '.join(map(str, ths))}")
        self.thresholds = ths
        if self.objective == "data" and not self.calib:
            raise UserError("--objective data needs calibration images: add --calib mnist|digits|DIR|random")
        for name in ("calib", "eval", "output", "onnx", "json", "report", "device"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise UserError(f"--{name}: expected a non-empty string, got {value!r}")
        if self.eval == "random":
            raise UserError("--eval random: accuracy needs labelled images; use mnist, digits or a folder")
        if self.output is not None and Path(self.output).suffix.lower() != ".safetensors":
            raise UserError(f"-o/--output {self.output!r}: the converted model is a safetensors file; name it *.safetensors")
        if self.onnx is not None and self.onnx == "-":
            raise UserError("--onnx: give a file name, not '-'")
        paths = [(n, getattr(self, n)) for n in ("output", "onnx", "json") if getattr(self, n) not in (None, "-")]
        resolved = {}
        for name, value in paths:
            key = str(Path(value).resolve())
            if key in resolved:
                raise UserError(f"--{name} and --{resolved[key]} name the same file {value!r}")
            resolved[key] = name
            if Path(value).is_dir():
                raise UserError(f"--{name} {value!r} is a folder; give a file name")
        if self.onnx is not None and Path(self.onnx).suffix.lower() == ".safetensors":
            raise UserError(f"--onnx {self.onnx!r}: name the ONNX file *.onnx")
        try:
            tol = float(self.onnx_tolerance)
        except (TypeError, ValueError):
            tol = float("nan")
        if not math.isfinite(tol) or tol <= 0:
            raise UserError(f"onnx_tolerance must be a positive number, got {self.onnx_tolerance!r}")
        self.onnx_tolerance = tol

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        d["thresholds"] = list(self.thresholds)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConvertConfig:
        if not isinstance(data, dict):
            raise UserError(f"a convert configuration must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown convert setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if "budget" not in data:
            raise UserError("a convert configuration needs a budget")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ConvertConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"convert configuration: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        return cls.from_dict(data)


def _choice(value, options: Sequence[str], what: str) -> None:
    if value not in options:
        raise UserError(f"{what}: expected one of {', '.join(options)}, got {value!r}")


def _positive_int(value, what: str, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < (0 if allow_zero else 1):
        raise UserError(f"{what}: expected an integer {'>= 0' if allow_zero else '>= 1'}, got {value!r}")


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UserError(f"{what}: expected comma-separated numbers such as 0.5,0.8,0.9, got {text!r}") from None


# ---------------------------------------------------------------------------------------------------
# result


@dataclass
class ConvertResult:
    """The converted model (float32 compute, weights exactly as stored), the plan, and the convert/1
    document. ``files`` lists what was written (empty when the config named no output)."""

    model: nn.Module
    plan: Plan
    report: dict[str, Any]
    source: dict[str, Any] | None = None
    structure: list[dict[str, Any]] = field(default_factory=list)
    checkpoint_extra: dict[str, Any] = field(default_factory=dict)
    dtype: str = "float32"
    explicit_attention: bool = False
    files: list[str] = field(default_factory=list)

    @property
    def report_dict(self) -> dict[str, Any]:
        return self.report

    def save(self, path: str) -> Path:
        """Write the converted model as a checkpoint (what ``-o`` writes)."""
        if self.source is None:
            raise UserError("the model's architecture has no name, so a checkpoint could not be rebuilt; pass "
                            "source={'arch': 'timm:<name>' | 'package.module:factory'} to convert()")
        return save_checkpoint(path, self.model, source=self.source, structure=self.structure,
                               extra=self.checkpoint_extra, dtype=self.dtype,
                               explicit_attention=self.explicit_attention)


# ---------------------------------------------------------------------------------------------------
# the conversion


@dataclass
class _Layer:
    site: Any                    # LinearSite
    weight: torch.Tensor         # the dense weight (L R for factored layers), detached
    bias_bytes: int
    current_rank: int | None     # rank of an already factored layer
    candidates: list[Candidate] = field(default_factory=list)


def convert(model: LoadedModel | nn.Module, config: ConvertConfig, on_progress: Progress | None = None, *,
            source: dict[str, Any] | None = None, spec: str | None = None) -> ConvertResult:
    """Convert a model under ``config.budget`` and return a ConvertResult; writes ``config.output``,
    ``config.onnx``, ``config.json`` and ``config.report`` when they are set, all or none.

    ``model``: a LoadedModel (from `wasi_compress.loading.load_model`) or an nn.Module (then its input
    comes from its timm config or patch embedding). It is not modified: conversion works on a copy.
    ``source``: the architecture to record in the checkpoint (``{"arch", "num_classes", "img_size"}``);
    taken from the LoadedModel when it names one, required for writing a checkpoint of a bare module."""
    from wasi_compress.analysis import example_input
    from wasi_compress.flops import count_flops
    from wasi_compress.passes.attention import ExplicitMultiheadAttention
    from wasi_compress.passes.capture import capture
    from wasi_compress.passes.replace import ReplaceLinearsPass

    if not isinstance(config, ConvertConfig):
        raise TypeError(f"config must be a ConvertConfig, got {type(config).__name__}")
    progress = on_progress or (lambda *_: None)
    loaded = _as_loaded(model, spec)
    device = resolve_device(config.device)
    source, prior_structure = _source_of(loaded, source)
    if config.output and source is None:
        raise UserError(f"{loaded.spec}: a model loaded from a pickled module has no architecture name, so its "
                        "checkpoint could not be rebuilt; load it with --arch and --weights instead")
    dtype = config.torch_dtype
    elem = torch.finfo(dtype).bits // 8
    notes: list[str] = []
    if config.calib and config.objective == "weight":
        notes.append(f"--calib {config.calib} is unused: the weight objective needs no data (use --objective data)")

    work = copy.deepcopy(loaded.model).eval().to(device)
    x = example_input(loaded.input_size, 2, seed=config.seed, device=device)
    x1 = x[:1]

    # The original, before anything changes.
    original_params = _count_params(work)
    original_bytes = _param_bytes(work, dtype)
    flops_original = _flops(count_flops, work, x1, notes, "original")
    accuracy_original = None
    eval_set = None
    if config.eval:
        progress(0, 1, f"evaluating the original on {config.eval}")
        eval_set = _eval_images(config.eval, loaded, notes)
        accuracy_original = _accuracy(work, eval_set, config.eval_batch_size, device)

    cap = capture(work, x)
    explicit_attention = (any(isinstance(m, ExplicitMultiheadAttention) for m in work.modules())
                          or bool((loaded.metadata or {}).get("explicit_attention")))
    skipped = list(cap.skipped)
    layers_info: list[_Layer] = []
    for site in cap.sites:
        reason = _unsupported(work, site)
        if reason:
            skipped.append({"name": site.name, "reason": reason})
            continue
        layers_info.append(_layer_of(work, site, elem))
    if not layers_info:
        raise UserError(f"{loaded.spec}: no linear layer to convert" + (f" ({skipped[0]['reason']})" if skipped else ""))

    site_params = {id(p) for layer in layers_info for p in site_parameters(work, layer.site)}
    fixed_param_bytes = sum(p.numel() * _elem(p, dtype) for p in _unique_params(work) if id(p) not in site_params)
    buffer_bytes = stored_bytes(work, dtype) - sum(p.numel() * _elem(p, dtype) for p in _unique_params(work))
    fixed_bytes = fixed_param_bytes + buffer_bytes

    # One spectrum per layer; with the data objective, of the whitened weight.
    whitenings: dict[str, Whitening] = {}
    if config.objective == "data":
        whitenings = _calibrate(work, layers_info, loaded, config, device, progress, notes)
    n = len(layers_info)
    for i, layer in enumerate(layers_info):
        progress(i, n, f"spectrum of {layer.site.name}")
        wh = whitenings.get(layer.site.name)
        s = singular_values(layer.weight) if wh is None else whitened_singular_values(layer.weight, wh)
        layer.candidates = _candidates(layer, s, config, elem)
    progress(n, n, "planning")

    layers = [LayerCandidates(layer.site.name, tuple(layer.candidates)) for layer in layers_info]
    floor = smallest_feasible_budget(layers) + fixed_bytes
    planner_budget = config.budget_bytes - fixed_bytes
    if planner_budget < smallest_feasible_budget(layers):
        raise InfeasibleBudgetError(
            f"budget {config.budget_bytes} bytes ({format_bytes(config.budget_bytes)}) is infeasible for {loaded.spec} "
            f"in {config.dtype}: the smallest feasible budget is {floor} bytes ({format_bytes(floor)}): every linear "
            f"at its smallest rank plus {fixed_bytes} bytes of other parameters", floor)
    the_plan = make_plan(layers, planner_budget, config.allocator)
    chosen = the_plan.chosen(layers)

    # Factor the chosen layers (one SVD each), all in one reversible pass.
    ranks = {name: c.rank for name, c in chosen}
    to_replace = [layer for layer in layers_info
                  if ranks[layer.site.name] is not None and ranks[layer.site.name] != layer.current_rank]
    done = [0]

    def build(site, dense: nn.Linear) -> nn.Module:
        progress(done[0], len(to_replace), f"factoring {site.name} at rank {ranks[site.name]}")
        done[0] += 1
        return SubspaceLinear.from_linear(dense, rank=ranks[site.name], whitening=whitenings.get(site.name))

    functional = any(layer.site.kind == "functional" for layer in to_replace)
    target: nn.Module = cap.graph_module if functional else work
    if functional:
        copy_model_attributes(work, cap.graph_module)
    ReplaceLinearsPass([layer.site for layer in to_replace], build).call(target)
    progress(len(to_replace), len(to_replace), "factored")
    converted = target.eval()
    whitenings.clear()
    if dtype != torch.float32:
        _round_trip_dtype(converted, dtype)  # compute with exactly the weights the checkpoint stores

    structure = _merge_structure(converted, layers_info, prior_structure)
    # The accounting and the model must agree. (A traced GraphModule may hold fewer parameters than
    # planned for: it drops modules that forward never calls.)
    total_bytes = _param_bytes(converted, dtype)
    if total_bytes > fixed_param_bytes + the_plan.total_cost_bytes:
        raise AssertionError(f"planned {fixed_param_bytes + the_plan.total_cost_bytes} bytes of parameters, "
                             f"the converted model has {total_bytes}")

    flops_converted = _flops(count_flops, converted, x1, notes, "converted")
    accuracy_converted = None
    if eval_set is not None:
        progress(0, 1, f"evaluating the converted model on {config.eval}")
        accuracy_converted = _accuracy(converted, eval_set, config.eval_batch_size, device)

    dense_total = fixed_bytes + sum(max(c.cost_bytes for c in layer.candidates) for layer in layers)
    sweep = sorted({int(round(floor + (dense_total - floor) * i / (PARETO_POINTS - 1))) for i in range(PARETO_POINTS)})
    progress(0, 1, "budget sweep (Pareto front)")
    pareto = [{"budget_bytes": b + fixed_bytes, "error": round(e, 6)}
              for b, e in pareto_front(layers, [b - fixed_bytes for b in sweep], config.allocator)]

    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "model": loaded.spec,
        "budget_bytes": config.budget_bytes,
        "total_bytes": total_bytes,
        "original_bytes": original_bytes,
        "dtype": config.dtype,
        "allocator": config.allocator,
        "objective": config.objective,
        "error_scale": _error_scale(config.objective),
        "seed": config.seed,
        "resolution_bytes": the_plan.resolution_bytes,
        "max_slack_bytes": the_plan.max_slack_bytes,
        "smallest_feasible_bytes": floor,
        "fixed_bytes": fixed_bytes,
        "buffer_bytes": buffer_bytes,
        "total_error": round(the_plan.total_error, 6),
        "layers": [{"name": name, "rank": _reported_rank(c), "bytes": c.cost_bytes, "error": round(c.error, 6)}
                   for name, c in chosen],
        "params": {"original": original_params, "converted": _count_params(converted)},
        "flops": {"original": flops_original, "converted": flops_converted},
        "flops_convention": "fvcore: one multiply-add = 1 FLOP (METHOD.md counts 2), batch of 1",
        "pareto": pareto,
        "calibration": ({"data": config.calib, "batches": config.calib_batches, "batch_size": config.calib_batch_size}
                        if config.objective == "data" else None),
        "skipped": skipped,
        "notes": notes,
        "sources": {
            "total_bytes": f"derived: parameter elements x {elem} bytes ({config.dtype}), shared tensors once",
            "original_bytes": f"derived: parameters of the original model x {elem} bytes ({config.dtype})",
            "layers.bytes": "derived: rank x (in + out) x element size + bias, or in x out x element size + bias when dense",
            "layers.error": _error_scale(config.objective),
            "params": "counted: parameter elements, shared tensors once",
            "flops": "measured by fvcore on one example input",
            "pareto": "derived: the planner's best total error at each budget (whole-model bytes)",
            "onnx.max_abs_diff": "measured: onnxruntime versus torch on the example input",
            "accuracy": "measured: top-1 on the dataset's fixed test split",
            "file_bytes": "measured: size of the written checkpoint",
        },
    }
    if accuracy_original is not None:
        doc["accuracy"] = {"original": accuracy_original, "converted": accuracy_converted, "dataset": config.eval}

    checkpoint_extra = {
        "plan": {
            "budget_bytes": config.budget_bytes, "planner_budget_bytes": planner_budget,
            "allocator": config.allocator, "objective": config.objective,
            "resolution_bytes": the_plan.resolution_bytes, "max_slack_bytes": the_plan.max_slack_bytes,
            "total_bytes": total_bytes, "total_error": round(the_plan.total_error, 9),
            "ranks": {name: _reported_rank(c) for name, c in chosen},
        },
        "seed": config.seed,
        "convert": {k: v for k, v in config.to_dict().items()
                    if k in ("calib", "calib_batches", "calib_batch_size", "rank_multiple", "rank_grid", "thresholds")},
    }
    result = ConvertResult(converted, the_plan, doc, source, structure, checkpoint_extra, config.dtype,
                           explicit_attention)

    staged = _Staged()
    try:
        if config.onnx:
            progress(0, 1, "ONNX export and parity check")
            diff = _export_onnx(converted, x, Path(config.onnx), config, staged, notes)
            doc["onnx"] = {"path": str(config.onnx), "max_abs_diff": diff}
        _commit(result, config, staged)
    finally:
        staged.cleanup()
    return result


# ---------------------------------------------------------------------------------------------------
# pieces


def source_from_options(model: str, arch: str | None = None, num_classes: int | None = None,
                        img_size: int | None = None) -> dict[str, Any] | None:
    """The architecture a checkpoint records for a MODEL argument and its loading options (None when
    MODEL is a file that is not an architecture: a wasi checkpoint carries its own, a pickled module
    has none)."""
    if arch:
        return {"arch": arch, "num_classes": num_classes, "img_size": img_size}
    spec = model.strip()
    if spec.startswith(("timm:", "builtin:")) or (":" in spec and not Path(spec).exists()):
        return {"arch": spec, "num_classes": num_classes, "img_size": img_size}
    return None


def _as_loaded(model, spec: str | None) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, nn.Module):
        from wasi_compress.loading import _data_config, _num_classes

        size, mean, std = _data_config(model, None)
        return LoadedModel(model, spec or type(model).__name__, size, mean, std, _num_classes(model))
    raise TypeError(f"convert() takes a LoadedModel or an nn.Module, got {type(model).__name__}")


def _source_of(loaded: LoadedModel, source: dict | None) -> tuple[dict | None, list[dict]]:
    """The architecture to record, and the structure of an already converted model (a checkpoint)."""
    meta = loaded.metadata or {}
    prior = list(meta.get("structure") or [])
    if source is not None:
        if not isinstance(source, dict) or not isinstance(source.get("arch"), str):
            raise UserError("source must be a dict with an 'arch' string such as 'timm:vit_base_patch32_224'")
        return {"arch": source["arch"], "num_classes": source.get("num_classes"), "img_size": source.get("img_size")}, prior
    if meta.get("source"):
        return dict(meta["source"]), prior
    spec = loaded.spec
    if spec.startswith(("timm:", "builtin:")) or (":" in spec and not Path(spec).exists()):
        out = {"arch": spec, "num_classes": None, "img_size": None}
        if spec.startswith(("timm:", "builtin:")) and loaded.num_classes is not None:
            out["num_classes"] = loaded.num_classes  # both accept num_classes; record it in case it was changed
        cfg_size = (getattr(loaded.model, "pretrained_cfg", None) or {}).get("input_size")
        if spec.startswith("timm:") and cfg_size and tuple(cfg_size)[1:] != tuple(loaded.input_size)[1:]:
            out["img_size"] = int(loaded.input_size[1])
        return out, prior
    return None, prior


def _unsupported(model: nn.Module, site) -> str | None:
    if site.kind == "functional":
        if site.calls > 1:
            return f"F.linear on this weight runs {site.calls} times; replacing one call would break the others"
        if site.node is None:
            return "functional linear without an fx node"
        return None
    m = model.get_submodule(site.name)
    if type(m) is nn.Linear or isinstance(m, SubspaceLinear):
        return None
    return f"{type(m).__name__} is neither nn.Linear nor SubspaceLinear"


def _layer_of(model: nn.Module, site, elem: int) -> _Layer:
    bias_bytes = site.out_features * elem if site.bias_name else 0
    if site.kind == "module":
        m = model.get_submodule(site.name)
        if isinstance(m, SubspaceLinear):
            with torch.no_grad():
                weight = (m.L.float() @ m.R.float()).detach()
            return _Layer(site, weight, bias_bytes, int(m.rank))
        return _Layer(site, m.weight.detach(), bias_bytes, None)
    return _Layer(site, model.get_parameter(site.weight_name).detach(), bias_bytes, None)


def _candidates(layer: _Layer, spectrum: torch.Tensor, config: ConvertConfig, elem: int) -> list[Candidate]:
    """Rank candidates (thresholds + grid, rounded up to the multiple) and the dense layer (or, for an
    already factored layer, its current rank as the zero-error candidate)."""
    site = layer.site
    i, o = site.in_features, site.out_features
    full = min(i, o)
    top = layer.current_rank if layer.current_rank is not None else full
    be = break_even_rank(o, i)
    wanted = set(ranks_for_thresholds(spectrum, config.thresholds).values())
    if be >= 1 and config.rank_grid:
        g = config.rank_grid
        wanted |= {max(1, int(round(1 + (be - 1) * j / max(g - 1, 1)))) for j in range(g)}
    wanted.add(1)
    m = config.rank_multiple
    ranks = sorted({min(-(-k // m) * m, full) for k in wanted})
    if layer.current_rank is None:
        ranks = [k for k in ranks if k <= be]  # at or above break-even the dense layer costs no more
    else:
        ranks = [k for k in ranks if k < top] + [top]
    errors = errors_for_ranks(spectrum, ranks)
    out = [Candidate(k * (i + o) * elem + layer.bias_bytes, e, k, f"rank {k}") for k, e in zip(ranks, errors)]
    if layer.current_rank is None:
        out.append(Candidate(i * o * elem + layer.bias_bytes, 0.0, None, "dense"))
    else:
        out[-1] = Candidate(out[-1].cost_bytes, 0.0, top, f"keep rank {top}")
    return out


def _reported_rank(c: Candidate) -> int | None:
    return c.rank


def _error_scale(objective: str) -> str:
    if objective == "weight":
        return "relative weight error ||W - W_k||_F / ||W||_F per layer (plain singular values), summed over layers"
    return ("relative output error ||X W^T - X W_k^T||_F / ||X W^T||_F per layer on the calibration inputs "
            "(whitened singular values), summed over layers")


class _GramCollector(TorchFunctionMode):
    """Adds the input of every F.linear whose weight is a watched tensor to that layer's Whitening (this
    sees nn.Linear modules, functional linears and the R factor of subspace layers alike)."""

    def __init__(self, watched: dict[int, Whitening]):
        super().__init__()
        self.watched = watched

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LINEAR_FUNCS:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            wh = self.watched.get(id(weight))
            if wh is not None:
                wh.update(args[0] if args else kwargs["input"])
        return func(*args, **kwargs)


def _calibrate(model: nn.Module, layers: list[_Layer], loaded: LoadedModel, config: ConvertConfig,
               device: torch.device, progress: Progress, notes: list[str]) -> dict[str, Whitening]:
    images = _calibration_images(config, loaded, notes)
    whitenings = {layer.site.name: Whitening(layer.site.in_features) for layer in layers}
    watched = {}
    for layer in layers:
        if layer.site.kind == "module":
            m = model.get_submodule(layer.site.name)
            tensor = m.R if isinstance(m, SubspaceLinear) else m.weight
        else:
            tensor = model.get_parameter(layer.site.weight_name)
        watched[id(tensor)] = whitenings[layer.site.name]
    bs = config.calib_batch_size
    batches = [images[i:i + bs] for i in range(0, len(images), bs)]
    with torch.no_grad(), _GramCollector(watched):
        for b, batch in enumerate(batches):
            progress(b, len(batches), f"calibrating on {config.calib} ({len(images)} images)")
            model(batch.to(device))
    progress(len(batches), len(batches), "calibrated")
    for layer in layers:
        if whitenings[layer.site.name].rows == 0:
            raise UserError(f"{layer.site.name}: saw no calibration input (is it called by forward?)")
    return whitenings


def _calibration_images(config: ConvertConfig, loaded: LoadedModel, notes: list[str]) -> torch.Tensor:
    from wasi_compress.data import adapt_images, load_images, normalize, random_images

    c, h, w = loaded.input_size
    n = config.calib_batches * config.calib_batch_size
    if config.calib == "random":
        images = random_images(n, c, (h, w), seed=config.seed)
        notes.append(f"calibrated on {n} uniform-noise images (no data given)")
    else:
        ds = load_images(config.calib, "train")
        g = torch.Generator().manual_seed(config.seed)
        idx = torch.randperm(len(ds), generator=g)[:n]
        if len(idx) < n:
            notes.append(f"calibration set {config.calib} has {len(idx)} training images, fewer than {n} asked for")
        images, adapt_notes = adapt_images(ds.images[idx], c, (h, w))
        notes.extend(f"calibration: {t}" for t in adapt_notes)
    return normalize(images, loaded.mean, loaded.std)


def _eval_images(name: str, loaded: LoadedModel, notes: list[str]):
    from wasi_compress.data import adapt_images, load_images, normalize

    ds = load_images(name, "test")
    c, h, w = loaded.input_size
    images, adapt_notes = adapt_images(ds.images, c, (h, w))
    notes.extend(f"evaluation: {t}" for t in adapt_notes)
    if loaded.num_classes is not None and loaded.num_classes < ds.num_classes:
        notes.append(f"evaluation: the model has {loaded.num_classes} classes, {name} has {ds.num_classes}")
    return normalize(images, loaded.mean, loaded.std), ds.labels


@torch.no_grad()
def _accuracy(model: nn.Module, eval_set, batch_size: int, device: torch.device) -> float:
    images, labels = eval_set
    correct = 0
    for i in range(0, len(labels), batch_size):
        out = model(images[i:i + batch_size].to(device))
        out = out[0] if isinstance(out, (tuple, list)) else out
        correct += int((out.argmax(-1).cpu() == labels[i:i + batch_size]).sum())
    return round(correct / max(len(labels), 1), 6)


def _flops(count_flops, model, x, notes, which) -> int | None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fvcore's torch.jit tracing warns about deprecations
            return int(count_flops(model, x)["total"])
    except Exception as exc:  # fvcore's jit tracing fails on some models
        notes.append(f"fvcore could not count the FLOPs of the {which} model ({type(exc).__name__}); flops.{which} is null")
        return None


def _unique_params(model: nn.Module) -> list[torch.Tensor]:
    return list(model.parameters())  # parameters() yields a shared parameter once


def _elem(t: torch.Tensor, dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8 if t.is_floating_point() else t.element_size()


def _param_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    return sum(p.numel() * _elem(p, dtype) for p in _unique_params(model))


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in _unique_params(model))


@torch.no_grad()
def _round_trip_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            t.copy_(t.to(dtype))


def _merge_structure(converted: nn.Module, layers: list[_Layer], prior: list[dict]) -> list[dict]:
    """Structure entries of every subspace layer of the converted model, named as in the SOURCE
    architecture: layers converted before (a checkpoint given as MODEL) keep their entries, with their
    new rank; layers converted now get new entries."""
    by_location = {}
    for entry in prior:
        by_location[module_location(converted, entry)] = entry
    structure = []
    for layer in layers:
        site = layer.site
        location = site.name if site.kind == "module" else None
        if location is None:
            entry = {"kind": site.kind, "name": site.name}
            location = module_location(converted, entry)
        try:
            module = converted.get_submodule(location)
        except AttributeError:
            continue
        if not isinstance(module, SubspaceLinear):
            continue
        fresh = structure_entry(site, module)
        old = by_location.pop(location, None)
        if old is not None:
            fresh["name"], fresh["kind"] = old["name"], old["kind"]
        structure.append(fresh)
    structure.extend(by_location.values())  # earlier conversions of layers not planned now (skipped ones)
    return sorted(structure, key=lambda e: (e["kind"], e["name"]))


# ---------------------------------------------------------------------------------------------------
# outputs: staged, then committed all at once


class _Staged:
    """Temporary files beside their targets, renamed into place by `_commit`; removed on failure."""

    def __init__(self):
        self.moves: list[tuple[Path, Path]] = []  # (temporary, final), in commit order
        self.dirs: list[Path] = []

    def tempdir(self, target: Path) -> Path:
        target.parent.mkdir(parents=True, exist_ok=True)
        d = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
        self.dirs.append(d)
        return d

    def cleanup(self) -> None:
        for d in self.dirs:
            shutil.rmtree(d, ignore_errors=True)
        self.dirs.clear()


def _export_onnx(model: nn.Module, x: torch.Tensor, target: Path, config: ConvertConfig, staged: _Staged,
                 notes: list[str]) -> float:
    """Export to ONNX (two MatMuls per factored layer), check the file, run it in onnxruntime on the
    example input and compare with torch. Returns the max abs difference; above the tolerance it is an
    error and nothing is written. Weights above ONNX_EXTERNAL_DATA_BYTES go to <name>.data beside it."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    tmp = staged.tempdir(target)
    exported = tmp / "export"
    exported.mkdir()
    first = exported / target.name
    model = model.eval()
    cpu_model, cpu_x = model, x
    if x.device.type != "cpu":
        cpu_model, cpu_x = copy.deepcopy(model).cpu(), x.cpu()
    with torch.no_grad():
        expected = cpu_model(cpu_x)
    if not isinstance(expected, torch.Tensor):
        raise UserError(f"ONNX export: the model returns {type(expected).__name__}, not one tensor")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(cpu_model, (cpu_x,), str(first), dynamo=False, opset_version=config.opset,
                              input_names=["input"], output_names=["output"],
                              dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    except Exception as exc:
        raise UserError(f"ONNX export failed: {type(exc).__name__}: {_first_line(exc)}") from exc
    weight_bytes = sum(p.numel() * p.element_size() for p in cpu_model.parameters())
    external = weight_bytes > ONNX_EXTERNAL_DATA_BYTES
    final = tmp / target.name
    data_name = f"{target.name}.data"
    proto = onnx.load(str(first), load_external_data=True)
    if external:
        onnx.save_model(proto, str(final), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        notes.append(f"ONNX weights are in {data_name} beside {target.name} (more than "
                     f"{format_bytes(ONNX_EXTERNAL_DATA_BYTES)}); keep the two files together")
    else:
        onnx.save_model(proto, str(final))
    del proto
    shutil.rmtree(exported)
    try:
        onnx.checker.check_model(str(final), full_check=True)
    except Exception as exc:
        raise UserError(f"ONNX check failed: {_first_line(exc)}") from exc
    session = ort.InferenceSession(str(final), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: cpu_x.numpy()})[0]
    diff = float(np.max(np.abs(got.astype(np.float64) - expected.numpy().astype(np.float64))))
    if not diff <= config.onnx_tolerance:
        raise UserError(f"ONNX parity check failed: onnxruntime differs from torch by {diff:.3g} (max abs), above "
                        f"{config.onnx_tolerance:g}; nothing was written")
    if external:
        staged.moves.append((tmp / data_name, target.with_name(data_name)))
    staged.moves.append((final, target))
    return diff


def _commit(result: ConvertResult, config: ConvertConfig, staged: _Staged) -> None:
    """Write the checkpoint, move the ONNX files into place, write the JSON and the report. If any step
    fails, what this call already wrote is removed."""
    import os

    from wasi_compress.fileio import write_json

    written: list[Path] = []
    try:
        if config.output:
            path = result.save(config.output)
            written.append(path)
            result.report["file_bytes"] = path.stat().st_size
        for tmp, final in staged.moves:
            os.replace(tmp, final)
            written.append(final)
        if config.json and config.json != "-":
            write_json(config.json, result.report)
            written.append(Path(config.json))
        if config.report:
            from wasi_compress.report_html import write_report

            written.append(write_report(config.report, convert=result.report))
        if config.json == "-":
            write_json("-", result.report)
    except BaseException:
        for path in written:
            Path(path).unlink(missing_ok=True)
        raise
    result.files = [str(p) for p in written]


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:300]


# `wasi_compress.convert` is both this module and the function: `from wasi_compress import convert;
# convert(model, config)` works, and so does `from wasi_compress.convert import ConvertConfig`.
class _CallableModule(types.ModuleType):
    def __call__(self, *args, **kwargs):
        return convert(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
