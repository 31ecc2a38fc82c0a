"""The timm ViT-family sweep (issue 10, section 3) as a table: for every model of tests/timm_sweep.py,
analyze at batch 1, convert at half its bytes with ONNX parity, reload, one WASI training step; what
each measured, or the step that failed and why. Output committed in benchmarks/sweep_timm.txt.

    PYTHONPATH=tests .venv/bin/python benchmarks/sweep_timm.py > benchmarks/sweep_timm.txt
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import wasi_compress  # noqa: E402,F401  (before timm)
import timm_sweep  # noqa: E402


def main(names: list[str]) -> None:
    torch.set_num_threads(1)
    entries = [timm_sweep.BY_NAME[n] for n in names] if names else timm_sweep.SWEEP + timm_sweep.EXTRA
    print(f"torch {torch.__version__}, timm {__import__('timm').__version__}, 1 thread; half = half the model's float32 bytes")
    print("| model | input | result | linears (skipped) | bytes | converted | factored | ONNX rel. diff | WASI layers | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for entry in entries:
        with tempfile.TemporaryDirectory() as d:
            try:
                r = timm_sweep.run(entry, Path(d))
            except Exception as exc:  # the table says which model failed and why
                line = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else ""
                print(f"| {entry.name} | {entry.img_size} | FAIL: {type(exc).__name__}: {line} | | | | | | | |", flush=True)
                continue
        depth = f", depth {entry.depth}" if entry.depth else ""
        print(f"| {entry.name}{depth} | {entry.img_size} | pass | {r['linears']} ({r['skipped']}) | {r['bytes']:,} | "
              f"{r['converted_bytes']:,} | {r['factored']} | {r['onnx_rel_diff']:.2g} | {r['wasi_layers']} | {r['seconds']} |",
              flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
