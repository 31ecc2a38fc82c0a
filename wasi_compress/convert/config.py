"""`ConvertConfig`: the settings of ``wasi-compress convert``: a LowRankConfig (what the transform
needs) plus the job's data, evaluation and output files. Errors name the command-line flag."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from wasi_compress.errors import UserError
from wasi_compress.transforms.config import LowRankConfig

_FLAGS = {"output": "-o/--output"}
IMAGE_CALIB_BATCHES = 8  # calibration batches of images when --calib-batches is not given


@dataclass
class ConvertConfig(LowRankConfig):
    """Everything `convert` needs besides the model; the options of ``wasi-compress convert``.

    Validates itself on creation (UserError with one line) and round-trips through JSON. Paths
    (``output``, ``onnx``, ``json``, ``report``) are optional: without them `convert` writes nothing."""

    calib: str | None = None          # mnist, digits, an image folder, or random; needed by objective=data
    calib_batches: int | None = None  # None: IMAGE_CALIB_BATCHES of images; a text file's every line (tokens.py)
    calib_batch_size: int = 32
    eval: str | None = None           # mnist, digits or an image folder: top-1 before and after
    eval_batch_size: int = 64
    output: str | None = None         # the converted checkpoint (.safetensors)
    onnx: str | None = None
    json: str | None = None           # the convert/1 document ('-' for stdout)
    report: str | None = None         # folder for report.html
    device: str = "cpu"
    onnx_tolerance: float = 1e-4     # relative to the output's scale (onnx_export.py)
    opset: int = 17

    def label(self, name: str) -> str:
        return _FLAGS.get(name, "--" + name.replace("_", "-"))

    def __post_init__(self):
        if isinstance(self.thresholds, str):
            try:
                self.thresholds = tuple(float(t) for t in self.thresholds.split(",") if t.strip())
            except ValueError:
                raise UserError("--thresholds: expected comma-separated numbers such as 0.5,0.8,0.9, "
                                f"got {self.thresholds!r}") from None
        super().__post_init__()
        for name in ("calib_batches", "calib_batch_size", "eval_batch_size", "opset"):
            if name != "calib_batches" or self.calib_batches is not None:
                self.check_int(name, 1)
        if self.opset < 17:
            raise UserError(f"--opset: needs 17 or later, got {self.opset}")
        if self.objective == "data" and not self.calib:
            raise UserError("--objective data needs calibration images: add --calib mnist|digits|DIR|random")
        for name in ("calib", "eval", "output", "onnx", "json", "report", "device"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise UserError(f"--{name}: expected a non-empty string, got {value!r}")
        if self.eval == "random":
            raise UserError("--eval random: accuracy needs labelled images; use mnist, digits or a folder")
        self._check_paths()
        try:
            tol = float(self.onnx_tolerance)
        except (TypeError, ValueError):
            tol = float("nan")
        if not math.isfinite(tol) or tol <= 0:
            raise UserError(f"onnx_tolerance must be a positive number, got {self.onnx_tolerance!r}")
        self.onnx_tolerance = tol

    def _check_paths(self) -> None:
        if self.output is not None and Path(self.output).suffix.lower() != ".safetensors":
            raise UserError(f"-o/--output {self.output!r}: the converted model is a safetensors file; name it *.safetensors")
        if self.onnx is not None and self.onnx == "-":
            raise UserError("--onnx: give a file name, not '-'")
        resolved: dict[str, str] = {}
        for name in ("output", "onnx", "json"):
            value = getattr(self, name)
            if value in (None, "-"):
                continue
            key = str(Path(value).resolve())
            if key in resolved:
                raise UserError(f"--{name} and --{resolved[key]} name the same file {value!r}")
            resolved[key] = name
            if Path(value).is_dir():
                raise UserError(f"--{name} {value!r} is a folder; give a file name")
        if self.onnx is not None and Path(self.onnx).suffix.lower() == ".safetensors":
            raise UserError(f"--onnx {self.onnx!r}: name the ONNX file *.onnx")

    @property
    def torch_dtype(self) -> torch.dtype:
        from wasi_compress.transforms.lowrank import DTYPES

        return DTYPES[self.dtype]

    def lowrank_config(self) -> LowRankConfig:
        """The transform's part of these settings."""
        return LowRankConfig(**{k: v for k, v in self.to_dict().items() if k in LowRankConfig.__dataclass_fields__
                                and LowRankConfig.__dataclass_fields__[k].init})

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ConvertConfig:
        if not isinstance(data, dict):
            raise UserError(f"a convert configuration must be a JSON object, got {type(data).__name__}")
        known = {f for f, spec in cls.__dataclass_fields__.items() if spec.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown convert setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        if "budget" not in data:
            raise UserError("a convert configuration needs a budget")
        return super().from_dict(data)
