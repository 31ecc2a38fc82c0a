"""Time `analyze` of timm:vit_base_patch32_224 at batch 8 (the command's defaults) and break it down.

One real run of ``load_model`` + ``analyze``, exactly what ``wasi-compress analyze timm:vit_base_patch32_224``
does, with its stages timed in place (the functions analyze calls are wrapped with timers, so nothing runs
twice): model creation, capture (fx trace + shape propagation), spectra (singular values and ranks of the
49 linears), FLOPs (fvcore), and the memory step (one forward and backward pass under
saved_tensors_hooks). Importing torch, timm and wasi_compress is timed too: the command pays it.
Target: load + analyze under 60 s; exits 1 if it is missed.

    .venv/bin/python benchmarks/bench_analyze.py
"""

from __future__ import annotations

import time

T0 = time.perf_counter()
import wasi_compress  # noqa: E402  (first: the torchvision shim, before timm)
import timm  # noqa: E402,F401
import torch  # noqa: E402

IMPORT_S = time.perf_counter() - T0

import os  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
from collections import defaultdict  # noqa: E402

from wasi_compress import analysis, flops  # noqa: E402
from wasi_compress.loading import load_model  # noqa: E402
from wasi_compress.passes import capture as capture_module  # noqa: E402

MODEL = "timm:vit_base_patch32_224"
BATCH = 8
TARGET_S = 60.0

STAGES = ["model creation", "capture", "spectra", "FLOPs", "memory step"]
spent: dict[str, float] = defaultdict(float)


def timed(stage: str, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            spent[stage] += time.perf_counter() - start

    return wrapper


def main() -> int:
    # analyze imports capture and count_flops inside its body, and calls the spectrum and memory helpers
    # through its module globals: wrap them where they are looked up
    capture_module.capture = timed("capture", capture_module.capture)
    flops.count_flops = timed("FLOPs", flops.count_flops)
    analysis.site_singular_values = timed("spectra", analysis.site_singular_values)
    analysis.ranks_for_thresholds = timed("spectra", analysis.ranks_for_thresholds)
    analysis.measure_saved_activations = timed("memory step", analysis.measure_saved_activations)

    start = time.perf_counter()
    loaded = timed("model creation", load_model)(MODEL)
    doc = analysis.analyze(loaded, batch_size=BATCH)
    total = time.perf_counter() - start

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"python {platform.python_version()}, torch {torch.__version__}, timm {timm.__version__}, {platform.machine()}, "
          f"{torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs, load average {load:.1f}")
    print(f"{MODEL} at batch {BATCH}: {len(doc['layers'])} linear layers, capture {doc['capture']}, "
          f"{doc['totals']['params']:,} params, {doc['totals']['flops']:,} FLOPs (fvcore)")
    print(f"  {'import torch/timm/wasi_compress':<32} {IMPORT_S:7.2f} s  (paid by the command, not in the total)")
    for stage in STAGES:
        print(f"  {stage:<32} {spent[stage]:7.2f} s  {100 * spent[stage] / total:5.1f}%")
    other = total - sum(spent[s] for s in STAGES)
    print(f"  {'other (rows of the document)':<32} {other:7.2f} s  {100 * other / total:5.1f}%")
    print(f"  {'total: load_model + analyze':<32} {total:7.2f} s")
    ok = total < TARGET_S
    print(f"target: under {TARGET_S:.0f} s: {'yes' if ok else 'NO'}"
          f" (with imports: {total + IMPORT_S:.2f} s, {'under' if total + IMPORT_S < TARGET_S else 'over'} {TARGET_S:.0f} s)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
