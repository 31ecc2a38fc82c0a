"""The convert/1 document (docs/schemas.md) and the plan metadata a converted checkpoint carries."""

from __future__ import annotations

from typing import Any

from wasi_compress.planner import pareto_front
from wasi_compress.transforms.lowrank import model_scale
from wasi_compress.reports import CONVERT_SCHEMA as SCHEMA, ConvertReport, Source
PARETO_POINTS = 12


def error_scale(objective: str, model_scale: bool = False) -> str:
    if model_scale:
        return ("estimated relative error of the model's output: each layer's relative output error (embeddings: "
                "token-weighted) times its measured model-output sensitivity on a calibration batch, summed over layers")
    if objective == "weight":
        return "relative weight error ||W - W_k||_F / ||W||_F per layer (plain singular values), summed over layers"
    return ("relative output error ||X W^T - X W_k^T||_F / ||X W^T||_F per layer on the calibration inputs "
            "(whitened singular values), summed over layers")


def pareto(planned, allocator: str) -> list[dict[str, Any]]:
    """The planner's best total error at PARETO_POINTS budgets from the smallest feasible one to dense."""
    layers = planned.layer_candidates()
    fixed, floor = planned.fixed_bytes, planned.smallest_feasible_bytes
    dense_total = fixed + sum(max(c.cost_bytes for c in layer.candidates) for layer in layers)
    sweep = sorted({int(round(floor + (dense_total - floor) * i / (PARETO_POINTS - 1))) for i in range(PARETO_POINTS)})
    return [{"budget_bytes": b + fixed, "error": round(e, 6)}
            for b, e in pareto_front(layers, [b - fixed for b in sweep], allocator)]


def sources(config, elem: int) -> dict[str, Source]:
    return {
        "total_bytes": Source("derived", f"parameter elements x {elem} bytes ({config.dtype}), shared tensors once"),
        "original_bytes": Source("derived", f"parameters of the original model x {elem} bytes ({config.dtype})"),
        "layers.bytes": Source("derived", "rank x (in + out) x element size + bias, or in x out x element size + bias "
                                          "when dense"),
        "layers.error": Source.worded("derived", error_scale(config.objective)),
        "params": Source("counted", "parameter elements, shared tensors once"),
        "flops": Source.worded("measured", "measured by fvcore on one example input"),
        "pareto": Source("derived", "the planner's best total error at each budget (whole-model bytes)"),
        "onnx.max_abs_diff": Source("measured", "onnxruntime versus torch on the example input"),
        "onnx.rel_diff": Source("measured", "max abs difference over the max abs of torch's output (the check's measure)"),
        "accuracy": Source("measured", "top-1 on the dataset's fixed test split"),
        "file_bytes": Source("measured", "size of the written checkpoint"),
    }


def document(spec: str, config, planned, original: dict[str, Any], converted: dict[str, Any],
             notes: list[str]) -> dict[str, Any]:
    """``original`` / ``converted``: {"bytes", "params", "flops", "accuracy"} of each model."""
    elem = config.torch_dtype.itemsize
    the_plan = planned.plan
    kept = {layer.site.name: layer.kept for layer in planned.layers}  # embeddings: label -> rows kept exactly
    body: dict[str, Any] = {
        "model": spec, "budget_bytes": config.budget_bytes, "total_bytes": planned.total_bytes,
        "original_bytes": original["bytes"], "dtype": config.dtype, "allocator": config.allocator,
        "objective": config.objective, "error_scale": error_scale(config.objective, model_scale(config, [l for l in planned.layers if l.site.role == "embedding"])), "seed": config.seed,
        "resolution_bytes": the_plan.resolution_bytes, "max_slack_bytes": the_plan.max_slack_bytes,
        "smallest_feasible_bytes": planned.smallest_feasible_bytes, "fixed_bytes": planned.fixed_bytes,
        "buffer_bytes": planned.buffer_bytes, "total_error": round(the_plan.total_error, 6),
        "layers": [_layer(name, c, kept) for name, c in planned.chosen],
        "params": {"original": original["params"], "converted": converted["params"]},
        "flops": {"original": original["flops"], "converted": converted["flops"]},
        "flops_convention": "fvcore: one multiply-add = 1 FLOP (METHOD.md counts 2), batch of 1",
        "pareto": pareto(planned, config.allocator),
        "calibration": ({"data": config.calib, "batches": config.calib_batches, "batch_size": config.calib_batch_size}
                        if config.objective == "data" else None),
        "skipped": planned.skipped, "notes": notes,
    }
    if original.get("accuracy") is not None:
        body["accuracy"] = {"original": original["accuracy"], "converted": converted["accuracy"], "dataset": config.eval}
    return ConvertReport(body, sources(config, elem)).to_dict()


def _layer(name: str, c, kept: dict[str, dict]) -> dict[str, Any]:
    """A layer's report entry; an embedding that keeps rows exactly says how many (``kept``)."""
    entry = {"name": name, "rank": c.rank, "bytes": c.cost_bytes, "error": round(c.error, 6)}
    rows = kept.get(name, {}).get(c.label)
    return entry if rows is None else entry | {"kept": int(rows.numel())}


def checkpoint_extra(config, planned) -> dict[str, Any]:
    """The plan as checkpoint metadata, so restoring needs no re-planning."""
    the_plan = planned.plan
    return {
        "plan": {
            "budget_bytes": config.budget_bytes, "planner_budget_bytes": planned.planner_budget_bytes,
            "allocator": config.allocator, "objective": config.objective,
            "resolution_bytes": the_plan.resolution_bytes, "max_slack_bytes": the_plan.max_slack_bytes,
            "total_bytes": planned.total_bytes, "total_error": round(the_plan.total_error, 9),
            "ranks": planned.ranks,
        },
        "seed": config.seed,
        "convert": {k: v for k, v in config.to_dict().items()
                    if k in ("calib", "calib_batches", "calib_batch_size", "rank_multiple", "rank_grid", "thresholds")},
    }
