"""Import shim for torchvision on a CPU-only torch build.

The pinned torchvision 0.28.0 wheel ships compiled ops (``_C.so``) that do not load on the CPU build of
torch 2.13.0. torchvision tolerates that for most ops, but at import time it registers fake kernels for
``torchvision::nms`` and ``torchvision::qnms`` unconditionally, which fails when their schemas (normally
defined by ``_C.so``) are missing, and so ``import timm`` fails. Before torchvision is imported we try
its compiled ops ourselves; only if they do not load do we define those two schemas. Nothing in
wasi-compress calls nms. Where torchvision imports normally this does nothing.
"""

from __future__ import annotations

import sys

_LIB = None  # the torch.library.Library must outlive the call that creates it


def ensure_torchvision_importable() -> None:
    global _LIB
    if _LIB is not None or "torchvision" in sys.modules:
        return
    import glob
    import importlib.util
    import os

    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return
    for lib in glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so")):
        try:
            torch.ops.load_library(lib)
            return  # the compiled ops load: torchvision imports normally
        except (OSError, RuntimeError):
            pass
    _LIB = torch.library.Library("torchvision", "DEF")
    _LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")


ensure_torchvision_importable()
