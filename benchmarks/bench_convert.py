"""Inference latency of converted versus original models, in torch and in onnxruntime, side by side.

Cases:
- ``builtin:mnist-vit`` converted at the demo budget: half its parameter bytes, data objective,
  calibrated on mnist (what ``wasi-compress convert builtin:mnist-vit --budget <half> --objective data
  --calib mnist`` does);
- ``timm:vit_base_patch32_224`` (random init: latency does not depend on the values) with every linear
  at 25% of its full rank (rank = min(in, out) // 4), the operating point of the WASI paper's claims.

Each model runs on the same fixed input in torch (eval, no_grad) and in onnxruntime (CPU provider, the
file ``convert --onnx`` would write); the figure is the median of ``--runs`` timed runs after warm-up,
with ``--threads`` intra-op threads for both runtimes. Ratios are original / converted (above 1: the
converted model is faster). FLOPs are fvcore's (one multiply-add = 1).

    .venv/bin/python benchmarks/bench_convert.py [--threads 1] [--runs 15]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import wasi_compress  # noqa: F401  (before timm)
import numpy as np
import torch
from torch import nn


def median_seconds(fn, runs: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def onnx_session(model: nn.Module, x: torch.Tensor, folder: Path, name: str, threads: int):
    import onnxruntime as ort

    path = folder / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                          output_names=["output"], dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}})
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def latency_rows(label: str, original: nn.Module, converted: nn.Module, input_size, batches, runs, threads, folder):
    from wasi_compress.inputs import example_input

    rows = []
    sessions = {which: onnx_session(model, example_input(input_size, 2), folder, f"{label}-{which}", threads)
                for which, model in (("original", original), ("converted", converted))}
    for batch in batches:
        x = example_input(input_size, batch, seed=0)
        figures = {}
        for which, model in (("original", original), ("converted", converted)):
            with torch.no_grad():
                figures[("torch", which)] = median_seconds(lambda: model(x), runs)
            feed = {"input": x.numpy()}
            session = sessions[which]
            figures[("onnxruntime", which)] = median_seconds(lambda: session.run(None, feed), runs)
        with torch.no_grad():
            diff = float(np.abs(sessions["converted"].run(None, {"input": x.numpy()})[0] - converted(x).numpy()).max())
        rows.append((batch, figures, diff))
    return rows


def print_rows(label: str, rows) -> None:
    print(f"  {'batch':>5}  {'runtime':<11} {'original ms':>12} {'converted ms':>13} {'speed-up':>9}")
    for batch, figures, diff in rows:
        for runtime in ("torch", "onnxruntime"):
            o, c = figures[(runtime, "original")], figures[(runtime, "converted")]
            print(f"  {batch:>5}  {runtime:<11} {o * 1e3:>12.2f} {c * 1e3:>13.2f} {o / c:>8.2f}x")
        print(f"  {batch:>5}  onnxruntime vs torch (converted): max abs diff {diff:.2e}")


def describe(label: str, original: nn.Module, converted: nn.Module, input_size) -> None:
    from wasi_compress.inputs import example_input
    from wasi_compress.flops import count_flops

    x = example_input(input_size, 1)
    po, pc = (sum(p.numel() for p in m.parameters()) for m in (original, converted))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fo, fc = (count_flops(m, x)["total"] for m in (original, converted))
    print(f"{label}: params {po / 1e6:.2f}M -> {pc / 1e6:.2f}M ({po / pc:.2f}x fewer), "
          f"FLOPs/image {fo / 1e6:.1f}M -> {fc / 1e6:.1f}M ({fo / fc:.2f}x fewer)")


def mnist_case():
    from wasi_compress.checkpoint import stored_bytes
    from wasi_compress.convert import ConvertConfig, convert
    from wasi_compress.loading import load_model

    loaded = load_model("builtin:mnist-vit")
    budget = stored_bytes(loaded.model, torch.float32) // 2
    t = time.perf_counter()
    result = convert(loaded, ConvertConfig(budget=budget, objective="data", calib="mnist"))
    took = time.perf_counter() - t
    doc = result.report
    factored = sum(layer["rank"] is not None for layer in doc["layers"])
    label = (f"builtin:mnist-vit at {budget} bytes (half of {doc['original_bytes']}), data objective, calib mnist: "
             f"{factored}/{len(doc['layers'])} linears factored, convert took {took:.1f} s")
    return label, loaded, result.model


def vit_base_case():
    import copy

    from wasi_compress.inputs import example_input
    from wasi_compress.loading import load_model
    from wasi_compress.modules.subspace import SubspaceLinear
    from wasi_compress.passes.capture import capture
    from wasi_compress.passes.replace import ReplaceLinearsPass

    loaded = load_model("timm:vit_base_patch32_224")
    converted = copy.deepcopy(loaded.model)
    cap = capture(converted, example_input(loaded.input_size, 1))
    sites = [s for s in cap.sites if s.kind == "module"]
    ReplaceLinearsPass(sites, lambda site, dense: SubspaceLinear.from_linear(
        dense, rank=max(1, min(site.in_features, site.out_features) // 4))).call(converted)
    label = f"timm:vit_base_patch32_224, all {len(sites)} linears at 25% of full rank"
    return label, loaded, converted.eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cmd = " ".join([".venv/bin/python", "benchmarks/bench_convert.py", *sys.argv[1:]])
    print(f"$ {cmd}")
    print(f"python {platform.python_version()}, torch {torch.__version__}, "
          f"onnxruntime {__import__('onnxruntime').__version__}, {platform.machine()}, "
          f"{args.threads} thread(s), median of {args.runs} runs (shared CPU: expect a few % of noise)")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for case, batches in ((mnist_case, (1, 64)), (vit_base_case, (1, 8))):
            label, loaded, converted = case()
            print()
            describe(label, loaded.model, converted, loaded.input_size)
            rows = latency_rows(case.__name__, loaded.model.eval(), converted, loaded.input_size, batches,
                                args.runs, args.threads, folder)
            print_rows(label, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
