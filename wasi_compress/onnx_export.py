"""ONNX export with a parity check: export (two MatMuls per factored linear), onnx.checker, a run in
onnxruntime on the example input, and the max abs difference from torch. Above the tolerance it is an
error and nothing is written. The file is staged in an `Outputs` set and appears only on its commit."""

from __future__ import annotations

import copy
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from wasi_compress.errors import UserError
from wasi_compress.outputs import Outputs
from wasi_compress.units import format_bytes

# An ONNX file above this many bytes of weights keeps them in <name>.data beside it (protobuf caps a
# single file at 2 GB; well below that, one file is simpler to ship).
ONNX_EXTERNAL_DATA_BYTES = 100 * 1000**2


def export_onnx(model: nn.Module, x: torch.Tensor, target: str | Path, outputs: Outputs, *, tolerance: float,
                opset: int, notes: list[str]) -> float:
    """Stage `target` (and its .data file for large models); return the measured max abs difference."""
    import onnx

    target = Path(target)
    tmp = outputs.tempdir(target)
    cpu_model, cpu_x = (model, x) if x.device.type == "cpu" else (copy.deepcopy(model).cpu(), x.cpu())
    cpu_model.eval()
    with torch.no_grad():
        expected = cpu_model(cpu_x)
    if not isinstance(expected, torch.Tensor):
        raise UserError(f"ONNX export: the model returns {type(expected).__name__}, not one tensor")
    first = tmp / "export" / target.name
    first.parent.mkdir()
    _export(cpu_model, cpu_x, first, opset)
    external = sum(p.numel() * p.element_size() for p in cpu_model.parameters()) > ONNX_EXTERNAL_DATA_BYTES
    final, data_name = tmp / target.name, f"{target.name}.data"
    proto = onnx.load(str(first), load_external_data=True)
    if external:
        onnx.save_model(proto, str(final), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
        notes.append(f"ONNX weights are in {data_name} beside {target.name} (more than "
                     f"{format_bytes(ONNX_EXTERNAL_DATA_BYTES)}); keep the two files together")
    else:
        onnx.save_model(proto, str(final))
    del proto
    shutil.rmtree(first.parent)
    diff = _parity(final, cpu_x, expected)
    if not diff <= tolerance:
        raise UserError(f"ONNX parity check failed: onnxruntime differs from torch by {diff:.3g} (max abs), above "
                        f"{tolerance:g}; nothing was written")
    if external:
        outputs.move(tmp / data_name, target.with_name(data_name))
    outputs.move(final, target)
    return diff


def _export(model: nn.Module, x: torch.Tensor, path: Path, opset: int) -> None:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset, input_names=["input"],
                              output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    except Exception as exc:
        raise UserError(f"ONNX export failed: {type(exc).__name__}: {first_line(exc)}") from exc


def _parity(path: Path, x: torch.Tensor, expected: torch.Tensor) -> float:
    import numpy as np
    import onnx
    import onnxruntime as ort

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise UserError(f"ONNX check failed: {first_line(exc)}") from exc
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    return float(np.max(np.abs(got.astype(np.float64) - expected.numpy().astype(np.float64))))


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:300]
