"""The `convert` job: load-side bookkeeping, the `lowrank_` transform on a copy, evaluation, FLOPs, the
convert/1 document, and the outputs (checkpoint, ONNX, JSON, report) committed all or none."""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from wasi_compress import fileio
from wasi_compress.convert.config import ConvertConfig
from wasi_compress.convert.document import checkpoint_extra, document
from wasi_compress.convert.images import calibration_batches, evaluation_set
from wasi_compress.convert.sources import as_loaded, merge_structure, source_of
from wasi_compress.errors import InfeasibleBudgetError, UserError
from wasi_compress.evaluation import batched, top1_accuracy
from wasi_compress.loading import LoadedModel, resolve_device
from wasi_compress.outputs import Outputs, check_paths, lock_outputs, report_html
from wasi_compress.planner import Plan
from wasi_compress.transforms.lowrank import lowrank_, param_bytes
from wasi_compress.units import format_bytes

Progress = Callable[[int, int, str], None]  # (done, total, what)


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
        from wasi_compress.checkpoint import save_checkpoint

        if self.source is None:
            raise UserError("the model's architecture has no name, so a checkpoint could not be rebuilt; pass "
                            "source={'arch': 'timm:<name>' | 'package.module:factory'} to convert()")
        return save_checkpoint(path, self.model, source=self.source, structure=self.structure,
                               extra=self.checkpoint_extra, dtype=self.dtype, explicit_attention=self.explicit_attention)


def convert(model: LoadedModel | nn.Module, config: ConvertConfig, on_progress: Progress | None = None, *,
            source: dict[str, Any] | None = None, spec: str | None = None) -> ConvertResult:
    """Convert a model under ``config.budget``; writes ``config.output``, ``onnx``, ``json`` and
    ``report`` when set, all or none. The input is not modified: conversion works on a copy.

    ``model``: a LoadedModel (`wasi_compress.loading.load_model`) or an nn.Module (its input comes from
    its timm config or patch embedding). ``source``: the architecture a checkpoint records
    (``{"arch", "num_classes", "img_size"}``), required to write a checkpoint of a bare module."""
    if not isinstance(config, ConvertConfig):
        raise TypeError(f"config must be a ConvertConfig, got {type(config).__name__}")
    progress = on_progress or (lambda *_: None)
    loaded = as_loaded(model, spec)
    from wasi_compress.hf import model_folder

    check_paths({"MODEL": loaded.spec if Path(loaded.spec).is_file() else None}, output_paths(config),
                {**data_folders(config), "MODEL": model_folder(loaded.spec)})
    device = resolve_device(config.device)
    source, prior_structure = source_of(loaded, source)
    if config.output and source is None:
        raise UserError(f"{loaded.spec}: a model loaded from a pickled module has no architecture name, so its "
                        "checkpoint could not be rebuilt; load it with --arch and --weights instead")
    with lock_outputs(output_paths(config).values()):  # two runs cannot write the same output
        return _convert(loaded, config, progress, source, prior_structure, device)


def _convert(loaded: LoadedModel, config: ConvertConfig, progress: Progress, source, prior_structure, device) -> ConvertResult:
    notes: list[str] = []
    if config.calib and config.objective == "weight":
        notes.append(f"--calib {config.calib} is unused: the weight objective needs no data (use --objective data)")
    work = copy.deepcopy(loaded.model).eval().to(device)
    x = _example(loaded, config, device)
    eval_set = evaluation_set(config.eval, loaded, notes) if config.eval else None
    original = _figures(work, x, config, eval_set, notes, "original", progress)
    explicit_before = bool((loaded.metadata or {}).get("explicit_attention"))
    calib = calibration_batches(config, loaded, notes) if config.objective == "data" else None
    planned = _plan(work, config, x, calib, loaded.spec, progress)
    if config.budget_bytes >= original["bytes"]:
        notes.append(f"the budget ({format_bytes(config.budget_bytes)}) is at least the model's own "
                     f"{format_bytes(original['bytes'])} in {config.dtype}: no layer had to shrink, so the model is "
                     "kept as it is (every linear dense unless factoring cost nothing)")
    converted = planned.model
    structure = merge_structure(converted, planned.layers, prior_structure)
    figures = _figures(converted, x, config, eval_set, notes, "converted", progress)
    doc = document(loaded.spec, config, planned, original, figures, notes)
    from wasi_compress.passes.attention import ExplicitMultiheadAttention

    explicit = explicit_before or any(isinstance(m, ExplicitMultiheadAttention) for m in work.modules())  # capture rewrote work
    result = ConvertResult(converted, planned.plan, doc, source, structure, checkpoint_extra(config, planned),
                           config.dtype, explicit)
    result.files = [str(p) for p in _write(result, config, x, notes, progress)]
    return result


def output_paths(config: ConvertConfig) -> dict[str, str | Path | None]:
    """Every file the job may write, by the flag that names it."""
    return {"-o": config.output, "--onnx": config.onnx, "--onnx weights": f"{config.onnx}.data" if config.onnx else None,
            "--json": config.json, "--report": report_html(config.report)}


def data_folders(config: ConvertConfig) -> dict[str, str | None]:
    """The image folders the job may read (no output may be written into one), by their flag."""
    return {"--calib": config.calib, "--eval": config.eval}


def _example(loaded: LoadedModel, config: ConvertConfig, device) -> torch.Tensor:
    from wasi_compress.inputs import model_example

    return model_example(loaded.model, 2, seed=config.seed, device=device, input_size=loaded.input_size)


def _plan(work: nn.Module, config: ConvertConfig, x, calib, spec: str, progress):
    try:
        return lowrank_(work, config.lowrank_config(), example=x, calib=calib, on_progress=progress)
    except InfeasibleBudgetError as exc:
        floor = exc.smallest_feasible_bytes
        raise InfeasibleBudgetError(
            f"budget {config.budget_bytes} bytes ({format_bytes(config.budget_bytes)}) is infeasible for {spec} "
            f"in {config.dtype}: the smallest feasible budget is {floor} bytes ({format_bytes(floor)}): "
            f"{getattr(exc, 'what', 'every linear')} at its smallest rank plus {getattr(exc, 'fixed_bytes', 0)} bytes of "
            "other parameters", floor) from None
    except UserError as exc:
        if str(exc).startswith("no linear layer"):
            raise UserError(f"{spec}: {exc}") from None
        raise


def _figures(model: nn.Module, x, config, eval_set, notes, which: str, progress) -> dict[str, Any]:
    """Bytes, parameters, FLOPs and accuracy (when evaluating) of the original or converted model."""
    figures = {"bytes": param_bytes(model, config.torch_dtype), "params": sum(p.numel() for p in model.parameters()),
               "flops": _flops(model, x[:1], notes, which), "accuracy": None}
    if eval_set is not None:
        progress(0, 1, f"evaluating the {which} model on {config.eval}")
        prepare = lambda b: b.to(x.device)  # noqa: E731
        figures["accuracy"] = round(top1_accuracy(model, batched(*eval_set, config.eval_batch_size, prepare)), 6)
    return figures


def _flops(model, x, notes, which) -> int | None:
    from wasi_compress.flops import count_flops

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # fvcore's torch.jit tracing warns about deprecations
            return int(count_flops(model, x)["total"])
    except Exception as exc:  # fvcore's jit tracing fails on some models
        notes.append(f"fvcore could not count the FLOPs of the {which} model ({type(exc).__name__}); flops.{which} is null")
        return None


def _write(result: ConvertResult, config: ConvertConfig, x, notes, progress) -> list[Path]:
    """Checkpoint, ONNX, JSON and report, all or none (wasi_compress.outputs)."""
    from wasi_compress.onnx_export import export_onnx

    doc = result.report
    with Outputs() as outputs:
        if config.onnx:
            progress(0, 1, "ONNX export and parity check")
            parity = export_onnx(result.model, x, config.onnx, outputs, tolerance=config.onnx_tolerance,
                                 opset=config.opset, notes=notes)
            doc["onnx"] = {"path": str(config.onnx), **parity.to_dict()}
        if config.output:
            doc["file_bytes"] = outputs.stage(config.output, result.save).stat().st_size
        if config.json and config.json != "-":
            outputs.then(lambda: (fileio.write_json(config.json, doc), Path(config.json))[1])
        if config.report:
            from wasi_compress.report_html import write_report

            outputs.then(lambda: write_report(config.report, convert=doc))
        if config.json == "-":
            outputs.then(lambda: fileio.write_json("-", doc))
        return outputs.commit()

