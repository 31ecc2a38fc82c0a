"""Measure what one training step costs: whole-step peak, saved activations, gradients, optimizer
state, and per linear layer its weights + gradients + optimizer state + saved input."""

from __future__ import annotations

import contextlib
import copy
import gc
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wasi_compress.finetune.steps import after_step_fn, make_run_optimizer, train_step
from wasi_compress.modules.asi import TuckerCompressor
from wasi_compress.measure import LiveTensorBytes, SavedActivationMeter, storage_bytes
from wasi_compress.reports import Source

SOURCES = {
    "linear_layers_bytes": Source("measured", "per linear layer, its weights (L, R for WASI) + gradients + optimizer "
                                  "state + the input it saved for backward (Tucker core and factors when compressed)"),
    "saved_activation_bytes": Source("measured", "saved_tensors_hooks over the forward pass, each storage once, "
                                     "parameters and buffers excluded (the peak of saved activations, reached at the "
                                     "end of forward)"),
    "params_bytes": Source("measured", "bytes of the model's parameter and buffer tensors"),
    "grads_bytes": Source("measured", "bytes of the .grad tensors left after backward (none where each "
                          "optimizer step ran inside backward and dropped its gradient: --step-in-backward)"),
    "optimizer_bytes": Source("measured", "bytes of the optimizer's state tensors after the step"),
    "peak_bytes": Source("measured", "peak of live tensor storage bytes over forward, backward and the optimizer step "
                         "(TorchDispatchMode over every aten op, storages tracked by weak reference; parameters, "
                         "optimizer state and the batch included; kernel-internal scratch not counted)"),
    "paper_scope_bytes": Source("measured", "the paper's scope, MLP linears (fc1, fc2) only: their weights + saved inputs"),
}


def optimizer_tensors(optimizer, params=None) -> list[Tensor]:
    wanted = None if params is None else {id(p) for p in params}
    return [v for p, state in optimizer.state.items() if wanted is None or id(p) in wanted
            for v in state.values() if isinstance(v, Tensor)]


def _compressor_tensors(model: nn.Module) -> list[Tensor]:
    return [f for m in model.modules() if isinstance(getattr(m, "compressor", None), TuckerCompressor)
            for f in (m.compressor.factors or [])]


def measure_step(model: nn.Module, optimizer, x: Tensor, y: Tensor, *, linears: dict[str, str],
                 warmup: bool = True, micro_batches: int = 1, collect: bool = True) -> dict[str, Any]:
    """Measure one training step of `model` (modified: run it on a copy).

    ``linears`` maps each linear layer's module name to its role. A warm-up step first creates the
    optimizer state and fixes the compressors' ranks; then, on the measured step: peak_bytes
    (LiveTensorBytes over forward + backward + optimizer step, parameters, buffers, optimizer state and
    the batch included), saved_activation_bytes, grads_bytes, optimizer_bytes, params_bytes,
    linear_layers_bytes and paper_scope_bytes (see SOURCES). With ``micro_batches`` m > 1 the step runs
    as `train_step` does (m chunks, gradients accumulated); saved bytes are those of the first chunk."""
    model.train()
    after_step = after_step_fn(model)
    if warmup:
        train_step(model, optimizer, x, y, after_step, micro_batches)
    optimizer.zero_grad(set_to_none=True)
    if collect:  # a full collection costs about 0.3 s in a process that imported timm
        gc.collect()
    modules = {name: model.get_submodule(name) for name in linears}
    params = list(model.parameters())
    baseline = params + list(model.buffers()) + optimizer_tensors(optimizer) + _compressor_tensors(model) + [x, y]
    chunks = [(cx, cy) for cx, cy in zip(x.tensor_split(micro_batches), y.tensor_split(micro_batches)) if len(cx)]
    saved = SavedActivationMeter(model, modules)
    with LiveTensorBytes(baseline) as live:
        for i, (cx, cy) in enumerate(chunks):
            with saved if i == 0 else contextlib.nullcontext():
                out = model(cx)
            loss = F.cross_entropy(out, cy) * (len(cx) / len(x))
            loss.backward()
            del out, loss
        grads_bytes = storage_bytes(p.grad for p in params if p.grad is not None)
        layer_grads = {name: storage_bytes(p.grad for p in m.parameters() if p.grad is not None) for name, m in modules.items()}
        optimizer.step()
        after_step()
    per_layer, linear_bytes, paper_bytes = _per_layer(modules, linears, optimizer, layer_grads, saved.per_module)
    optimizer.zero_grad(set_to_none=True)
    return {
        "linear_layers_bytes": int(linear_bytes), "saved_activation_bytes": int(saved.total_bytes),
        "params_bytes": int(storage_bytes(params + list(model.buffers()))), "grads_bytes": int(grads_bytes),
        "optimizer_bytes": int(storage_bytes(optimizer_tensors(optimizer))), "peak_bytes": int(live.peak_bytes),
        "paper_scope_bytes": int(paper_bytes), "per_layer": per_layer,
        "sources": {k: s.text for k, s in SOURCES.items()}, "source_kinds": {k: s.kind for k, s in SOURCES.items()},
    }


def _per_layer(modules, linears, optimizer, layer_grads, per_saved):
    per_layer, linear_bytes, paper_bytes = {}, 0, 0
    for name, m in modules.items():
        weights = storage_bytes(list(m.parameters()) + list(m.buffers()))
        state = storage_bytes(optimizer_tensors(optimizer, list(m.parameters())))
        saved = per_saved.get(name, 0)
        per_layer[name] = {"weights": weights, "grads": layer_grads[name], "optimizer": state, "saved_input": saved}
        linear_bytes += weights + layer_grads[name] + state + saved
        if linears[name] in ("fc1", "fc2"):
            paper_bytes += weights + saved
    return per_layer, linear_bytes, paper_bytes


def measure_on_copy(model: nn.Module, config, x: Tensor, y: Tensor, linears: dict[str, str], *,
                    ordinary: bool = False, micro_batches: int = 1) -> dict[str, Any]:
    """measure_step on a copy of `model`, leaving `model` and the global RNG untouched. ``ordinary``: the
    vanilla baseline's step (one batch, a plain optimizer step after backward)."""
    with torch.random.fork_rng(devices=[]):
        twin = copy.deepcopy(model)
        optimizer = make_run_optimizer([p for p in twin.parameters() if p.requires_grad], config, ordinary=ordinary)
        result = measure_step(twin, optimizer, x, y, linears=linears,
                              micro_batches=1 if ordinary else micro_batches)
        del twin, optimizer
        gc.collect()
    return result
