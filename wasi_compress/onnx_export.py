"""ONNX export with a parity check: export (two MatMuls per factored linear), onnx.checker, a run in
onnxruntime on the example input, and the difference from torch relative to the output's scale
(max |ort - torch| / max |torch|): an absolute threshold passes trivially on outputs near zero and fails
on large ones (visformer's logits reach 400). Above the tolerance it is an error and nothing is written.

An output that cannot show a difference (all zeros, or the same for every input: torchvision's ViT
starts with a zero head) is no check at all; then the check runs on a copy whose all-zero parameters are
re-initialised (seeded), exported the same way, and the document says so. The file is staged in an
`Outputs` set and appears only on its commit."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from wasi_compress.errors import UserError
from wasi_compress.outputs import Outputs
from wasi_compress.units import format_bytes

# An ONNX file above this many bytes of weights keeps them in <name>.data beside it (protobuf caps a
# single file at 2 GB; well below that, one file is simpler to ship).
ONNX_EXTERNAL_DATA_BYTES = 100 * 1000**2


@dataclass
class Parity:
    """What the parity check measured: the max abs difference, the output's scale (max abs of torch's
    output), their ratio, and whether the check ran on a copy with its zero parameters re-initialised."""

    max_abs_diff: float
    output_scale: float
    rel_diff: float
    reinitialised: list[str]

    def to_dict(self) -> dict:
        return {"max_abs_diff": self.max_abs_diff, "output_scale": self.output_scale, "rel_diff": self.rel_diff,
                "checked_on": "a copy with its all-zero parameters re-initialised: " + ", ".join(self.reinitialised)
                if self.reinitialised else "the exported model"}


def export_onnx(model: nn.Module, x: torch.Tensor, target: str | Path, outputs: Outputs, *, tolerance: float,
                opset: int, notes: list[str]) -> Parity:
    """Stage `target` (and its .data file for large models); return the parity measured (relative to
    the output's scale; above ``tolerance`` a UserError and nothing written)."""
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
    parity = _parity_of(final, cpu_model, cpu_x, expected, tmp, opset, notes)
    if not parity.rel_diff <= tolerance:
        raise UserError(f"ONNX parity check failed: onnxruntime differs from torch by {parity.rel_diff:.3g} of the "
                        f"output's scale ({parity.max_abs_diff:.3g} max abs, outputs up to {parity.output_scale:.3g}), "
                        f"above {tolerance:g}; nothing was written")
    if external:
        outputs.move(tmp / data_name, target.with_name(data_name))
    outputs.move(final, target)
    return parity


def _parity_of(path: Path, model: nn.Module, x: torch.Tensor, expected: torch.Tensor, tmp: Path, opset: int,
               notes: list[str]) -> Parity:
    """Parity of the exported file; on a degenerate output, of a re-initialised copy exported the same way."""
    if not _degenerate(expected):
        return _measure(_run_onnx(path, x), expected, [])
    check_model = copy.deepcopy(model).eval()
    names = _reinitialise_zero_parameters(check_model)
    with torch.no_grad():
        check_expected = check_model(x)
    if not names or _degenerate(check_expected):
        notes.append("ONNX parity: the model's output does not vary (all zeros or the same for every input), so the "
                     "check compared constant outputs")
        return _measure(_run_onnx(path, x), expected, [])
    check_path = tmp / "parity" / path.name
    check_path.parent.mkdir()
    _export(check_model, x, check_path, opset)
    parity = _measure(_run_onnx(check_path, x), check_expected, names)
    shutil.rmtree(check_path.parent)
    notes.append(f"ONNX parity: the model's output is degenerate ({'all zeros' if not expected.any() else 'the same for every input'}), "
                 f"so the check ran on a copy with {', '.join(names)} re-initialised (seed 0), exported the same way")
    return parity


def _degenerate(out: torch.Tensor) -> bool:
    """All zeros, or the same for every sample of the batch: a difference could not show."""
    if not out.any():
        return True
    return out.dim() > 0 and out.shape[0] > 1 and bool((out == out[:1]).all())


@torch.no_grad()
def _reinitialise_zero_parameters(model: nn.Module) -> list[str]:
    """Give every all-zero weight matrix (a zero-initialised head) seeded values at 1/sqrt(fan-in)."""
    g = torch.Generator().manual_seed(0)
    names = []
    for name, p in model.named_parameters():
        if p.dim() >= 2 and not p.any():
            p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
            names.append(name)
    return names


def _measure(got, expected: torch.Tensor, reinitialised: list[str]) -> Parity:
    import numpy as np

    want = expected.numpy().astype(np.float64)
    diff = float(np.max(np.abs(got.astype(np.float64) - want)))
    scale = float(np.max(np.abs(want)))
    return Parity(diff, scale, diff / scale if scale > 0 else diff, reinitialised)


@contextlib.contextmanager
def _quiet_stdout():
    """The TorchScript exporter logs from C++ to file descriptor 1 (on a failure, the whole IR graph: its
    switch is read wrongly, so it is always on); stdout carries results only, so fd 1 goes to /dev/null."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
        yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _col2im(g, x, output_size, kernel_size, dilation, padding, stride):
    """aten::col2im (F.fold, as in VOLO) as ONNX Col2Im. torch's own opset-18 symbolic reads the number of
    spatial axes off output_size's tensor type, which the TorchScript exporter leaves unknown when the size
    is a list (TypeError: 'NoneType' object is not subscriptable); this one takes it from the kernel."""
    from torch.onnx import symbolic_helper as sh

    kernel = sh._parse_arg(kernel_size, "is")
    dilation, padding, stride = (sh._parse_arg(v, "is") for v in (dilation, padding, stride))
    axes = len(kernel)
    return g.op("Col2Im", x, output_size, g.op("Constant", value_t=torch.tensor(kernel, dtype=torch.int64)),
                dilations_i=list(dilation) or [1] * axes, pads_i=[p for p in padding for _ in range(2)] or [0, 0] * axes,
                strides_i=list(stride) or [1] * axes)


def _export(model: nn.Module, x: torch.Tensor, path: Path, opset: int) -> None:
    if opset >= 18:  # Col2Im exists from opset 18 on
        torch.onnx.register_custom_op_symbolic("aten::col2im", _col2im, 18)
    try:
        with warnings.catch_warnings(), _quiet_stdout():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset, input_names=["input"],
                              output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    except Exception as exc:
        raise UserError(f"ONNX export failed: {type(exc).__name__}: {first_line(exc)}") from exc


def _run_onnx(path: Path, x: torch.Tensor):
    import onnx
    import onnxruntime as ort

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise UserError(f"ONNX check failed: {first_line(exc)}") from exc
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:300]
