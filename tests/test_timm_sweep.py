"""Issue 10, section 3: every timm ViT family (and torchvision's vit_b_16 and swin_t) end to end, one
slow test per model (tests/timm_sweep.py lists them and runs the steps): analyze at batch 1, convert at
half the model's bytes with ONNX parity, reload the checkpoint (bit for bit), and one WASI training
step that must replace layers. A model that cannot be handled is an xfail with its reason (strict: a
fix shows up as a failure to update the list); the committed table is benchmarks/sweep_timm.txt."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import wasi_compress  # noqa: F401  (before timm)

TESTS_DIR = Path(__file__).resolve().parent


def _sweep():
    sys.path.insert(0, str(TESTS_DIR))  # MODEL strings timm_sweep:shallow_<name> and tv_models:<name> resolve
    import timm_sweep

    return timm_sweep


def _params():
    import os

    sweep = _sweep()
    out = []
    for entry in sweep.SWEEP + sweep.EXTRA:
        marks = [pytest.mark.slow]
        if entry.xfail:
            marks.append(pytest.mark.xfail(reason=entry.xfail, strict=True))
        if entry in sweep.EXTRA and not os.environ.get("WASI_SWEEP_ALL"):
            marks.append(pytest.mark.skip(reason="extended sweep (benchmarks/sweep_timm.txt): set WASI_SWEEP_ALL=1"))
        out.append(pytest.param(entry, id=entry.name, marks=marks))
    return out


@pytest.mark.parametrize("entry", _params())
def test_family_end_to_end(entry, tmp_path):
    result = _sweep().run(entry, tmp_path)
    assert result["converted_bytes"] <= result["bytes"] // 2
    assert result["onnx_rel_diff"] <= 1e-4
    assert result["wasi_layers"] > 0
