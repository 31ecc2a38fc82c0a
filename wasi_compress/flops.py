"""FLOPs of one forward pass, counted by fvcore.

Convention (fvcore's): one multiply-add = 1 FLOP. METHOD.md counts one multiply-add as 2 FLOPs; double
these figures to compare. fvcore does not count fused attention; we register a handle for
``aten::scaled_dot_product_attention`` (QK^T and AV matmuls). Elementwise ops (add, gelu, softmax) are
not counted, as in fvcore's defaults."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

CONVENTION = "fvcore: one multiply-add = 1 FLOP; matmuls, linears, convolutions and attention counted, elementwise ops not"


def _sdpa_flop(inputs: list[Any], outputs: list[Any]) -> int:
    from fvcore.nn.jit_handles import get_shape

    q, k, v = (get_shape(x) for x in inputs[:3])
    batch = math.prod(q[:-2])
    nq, d = q[-2], q[-1]
    nk, dv = k[-2], v[-1]
    return batch * nq * nk * (d + dv)


def count_flops(model: nn.Module, example: torch.Tensor) -> dict[str, Any]:
    """{"total": int, "by_module": {qualname: int}, "convention": str}; raises RuntimeError if fvcore
    cannot trace the model with torch.jit."""
    from fvcore.nn import FlopCountAnalysis

    was_training = model.training
    model.eval()
    try:
        analysis = FlopCountAnalysis(model, example)
        analysis.set_op_handle("aten::scaled_dot_product_attention", _sdpa_flop)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        total = int(analysis.total())
        by_module = {k: int(v) for k, v in analysis.by_module().items()}
    finally:
        model.train(was_training)
    return {"total": total, "by_module": by_module, "convention": CONVENTION}
