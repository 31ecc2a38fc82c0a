"""`lowrank_`: the most faithful low-rank model that fits a byte budget (METHOD.md sections 1, 3 and 4).

Budget semantics: ``config.budget`` is the total bytes of ALL parameters of the result stored in
``config.dtype`` plus its persistent buffers. Convolutions (plain ``nn.Conv2d``, groups 1) join the
planner as low-rank convolutions (modules/lowrank_conv.py: a rank-r k x k conv then a 1 x 1, the SVD of
the unfolded weight, with the same error measures) with ``config.convs="always"``, or, by default
(``"auto"``), only when the linears alone cannot reach the budget (hybrid ViTs, whose convolutions hold
most parameters); ``"never"`` keeps them dense. Parameters the transform does not change (embeddings,
norms, convolutions, linears that are skipped or filtered out) are paid for first; the rest goes to the
planner, which picks one candidate per linear: a rank k (``k (in + out)`` elements plus the bias) or the
dense layer; token embeddings are candidates too (``config.embeddings``: E ~ A B, see
_lowrank_embeddings.py). Every candidate's error is relative to its own layer, so errors add up on one scale:
``objective="weight"``: ||W - W_k||_F / ||W||_F; ``objective="data"``: ||X W^T - X W_k^T||_F / ||X W^T||_F
on calibration inputs, from the whitened weight's singular values (SVD-LLM), factors whitened too; a
text model's padding positions are not calibration inputs (_lowrank_candidates.real_tokens)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import nn

from wasi_compress.errors import InfeasibleBudgetError, UserError
from wasi_compress.modules.subspace import SubspaceLinear, whitened_singular_values
from wasi_compress.planner import LayerCandidates, Plan, plan as make_plan, smallest_feasible_budget
from wasi_compress.spectrum import singular_values
from wasi_compress.modules.lowrank_conv import LowRankConv2d
from wasi_compress.transforms._lowrank_candidates import (
    Progress, SiteWeights, conv_sites, rank_candidates, site_weights, unsupported, whitenings_from,
)
from wasi_compress.transforms._lowrank_embeddings import (
    counting_tokens, embedding_layers, embedding_spectrum, factor_embeddings, kept_candidates, row_weights,
)
from wasi_compress.transforms._sensitivity import PLAIN, held_out_scales, model_error_scales, rescale, rescaled
from wasi_compress.transforms.config import LowRankConfig
from wasi_compress.marks import mark_module

FilterFn = Callable[[nn.Module, str], bool]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LowRankPlan:
    """What `lowrank_` decided: the plan, its layers and candidates, and the budget's accounting.
    ``model`` is the model to use from now on (the one passed in, or its traced GraphModule when a
    functional linear was factored)."""

    model: nn.Module
    plan: Plan
    layers: list[SiteWeights]
    chosen: list[tuple[str, Any]]          # (site name, Candidate)
    fixed_param_bytes: int
    buffer_bytes: int
    smallest_feasible_bytes: int
    planner_budget_bytes: int
    total_bytes: int
    skipped: list[dict[str, str]] = field(default_factory=list)
    capture: Any = None

    @property
    def fixed_bytes(self) -> int:
        return self.fixed_param_bytes + self.buffer_bytes

    @property
    def ranks(self) -> dict[str, int | None]:
        return {name: c.rank for name, c in self.chosen}

    def layer_candidates(self) -> list[LayerCandidates]:
        return [LayerCandidates(layer.site.name, tuple(layer.candidates)) for layer in self.layers]


def element_bytes(t: torch.Tensor, dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8 if t.is_floating_point() else t.element_size()


def param_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes of the parameters in `dtype` (parameters() yields a shared tensor once)."""
    return sum(p.numel() * element_bytes(p, dtype) for p in model.parameters())


def lowrank_(model: nn.Module, config: LowRankConfig, *, example: torch.Tensor,
             calib: Iterable[torch.Tensor] | None = None, filter_fn: FilterFn | None = None,
             on_progress: Progress | None = None) -> LowRankPlan:
    """Factor the linears of `model` IN PLACE under ``config.budget`` and return the plan.

    ``example``: an input batch (shapes only). ``calib``: input batches for ``objective="data"``.
    ``filter_fn(module, fqn) -> bool`` decides which linears may change (default: ``config.roles``).
    Module linears are swapped in `model` itself; a functional linear (F.linear on a parameter) can
    only be rewritten in the traced graph, and then ``plan.model`` is that GraphModule."""
    from wasi_compress.checkpoint import copy_model_attributes, stored_bytes
    from wasi_compress.passes.capture import capture
    from wasi_compress.passes.replace import ReplaceLinearsPass

    if not isinstance(config, LowRankConfig):
        raise TypeError(f"config must be a LowRankConfig, got {type(config).__name__}")
    progress = on_progress or (lambda *_: None)
    dtype, device = DTYPES[config.dtype], example.device
    elem = torch.finfo(dtype).bits // 8
    cap = capture(model, example)
    skipped = list(cap.skipped)
    layers = _selected(model, cap, config, filter_fn, elem, skipped)
    embeddings = embedding_layers(model, skipped) if config.embeddings and filter_fn is None else []
    buffer_bytes = stored_bytes(model, dtype) - param_bytes(model, dtype)
    calib = None if calib is None else list(calib)  # read more than once (spectra, probes, convolutions)

    whitenings, token_weights = _candidates(model, layers, embeddings, config, calib, device, elem, progress)
    candidates, fixed, floor = _costs(model, layers + embeddings, dtype, buffer_bytes)
    if config.convs == "always" or (config.convs == "auto" and config.budget_bytes < floor):
        convs = [site_weights(model, site, elem) for site in conv_sites(model, {layer.site.name for layer in layers})
                 if filter_fn is None or filter_fn(model.get_submodule(site.name), site.name)]
        whitenings.update(_spectra(model, convs, config, calib, device, elem, progress))
        layers = layers + convs
        candidates, fixed, floor = _costs(model, layers + embeddings, dtype, buffer_bytes)
    if not candidates:
        raise UserError("no linear layer to convert" + (f" ({skipped[0]['name']}: {skipped[0]['reason']})" if skipped else ""))
    fixed_param = fixed - buffer_bytes
    progress(len(layers), len(layers), "planning")
    if config.budget_bytes < floor:
        what = "every linear and convolution" if any(layer.site.kind == "conv" for layer in layers) else "every linear"
        error = InfeasibleBudgetError(
            f"budget {config.budget_bytes} bytes is infeasible in {config.dtype}: the smallest feasible budget is "
            f"{floor} bytes: {what} at its smallest rank plus {fixed} bytes of other parameters", floor)
        error.fixed_bytes = fixed
        error.what = what
        raise error
    the_plan = make_plan(candidates, config.budget_bytes - fixed, config.allocator)
    chosen = the_plan.chosen(candidates)
    ranks = {name: c.rank for name, c in chosen}
    to_replace = [layer for layer in layers if ranks[layer.site.name] not in (None, layer.current_rank)]
    target = _factor(model, cap, to_replace, ranks, whitenings, progress, ReplaceLinearsPass, copy_model_attributes)
    factor_embeddings(target, embeddings, dict(chosen), token_weights)
    if dtype != torch.float32:
        _round_trip_dtype(target, dtype)  # compute with exactly the weights a checkpoint stores
    total = param_bytes(target, dtype)
    if total > fixed_param + the_plan.total_cost_bytes:  # the accounting and the model must agree
        raise AssertionError(f"planned {fixed_param + the_plan.total_cost_bytes} bytes, the model has {total}")
    return LowRankPlan(target, the_plan, layers + embeddings, chosen, fixed_param, buffer_bytes, floor,
                       config.budget_bytes - fixed, total, skipped, cap)


def _costs(model, planned, dtype, buffer_bytes) -> tuple[list[LayerCandidates], int, int]:
    """The planner's candidates of the planned layers, the bytes it cannot change (other parameters and
    the buffers), and the smallest feasible budget."""
    candidates = [LayerCandidates(layer.site.name, tuple(layer.candidates)) for layer in planned]
    fixed = _fixed_param_bytes(model, planned, dtype) + buffer_bytes
    return candidates, fixed, (smallest_feasible_budget(candidates) + fixed if candidates else fixed)


def _candidates(model, layers, embeddings, config, calib, device, elem, progress):
    """Each layer's rank candidates from its spectrum: of the weight, or with the data objective of the
    whitened weight (linears) or the token-weighted table (embeddings), from one calibration pass; with
    the data objective, embeddings also get candidates keeping their frequent rows exactly."""
    whitenings, token_weights, counts = {}, {}, {}
    if config.objective == "data":
        if calib is None:
            raise UserError("objective 'data' needs calibration batches: pass calib=[input batches]")
        calib = list(calib)  # read twice: the calibration pass, then the model-scale probe
        with counting_tokens(model, embeddings) as counts:
            whitenings = whitenings_from(model, layers, calib, device, progress)
        token_weights = {layer.site.name: row_weights(counts[layer.site.name], _padding(model, layer))
                         for layer in embeddings}
    for layer in embeddings:
        progress(0, len(embeddings), f"spectrum of {layer.site.name}")
        s = embedding_spectrum(layer, token_weights.get(layer.site.name))
        layer.candidates = rank_candidates(layer, s, config, elem)
    for i, layer in enumerate(layers):
        progress(i, len(layers), f"spectrum of {layer.site.name}")
        wh = whitenings.get(layer.site.name)
        s = singular_values(layer.weight) if wh is None else whitened_singular_values(layer.weight, wh)
        layer.candidates = rank_candidates(layer, s, config, elem)
    scales, held = None, {}
    if model_scale(config, embeddings):
        for layer in embeddings if counts else ():
            progress(0, 1, f"held-out error of {layer.site.name}")
            held[layer.site.name] = held_out_scales(model, layer, calib, counts[layer.site.name],
                                                    _padding(model, layer), config, elem)
        # the plain probes on counted rows only for what the held-out rows could not measure
        unmeasured = [layer for layer in embeddings if PLAIN not in held.get(layer.site.name, {})]
        batch = next(iter(calib)).to(device)
        scales = model_error_scales(model, layers + unmeasured, batch, whitenings, token_weights, progress)
        scales.update({name: h[PLAIN] for name, h in held.items() if PLAIN in h})
        rescale(layers + embeddings, scales)
    for layer in embeddings if counts else ():  # after the probes, which measure the factors alone
        name = layer.site.name
        families = kept_candidates(layer, counts[name], token_weights[name], _padding(model, layer), config, elem)
        for share, family in families.items():
            layer.candidates += family if scales is None else rescaled(family, held.get(name, {}).get(share, scales[name]))
    return whitenings, token_weights


def _padding(model, layer) -> int | None:
    return model.get_submodule(layer.site.name).padding_idx


def model_scale(config: LowRankConfig, embeddings: list) -> bool:
    """Whether errors are on the model's scale (config.error_scale, "auto" resolved)."""
    if config.error_scale == "auto":
        return config.objective == "data" and bool(embeddings)
    return config.error_scale == "model"


def _selected(model, cap, config, filter_fn, elem, skipped) -> list[SiteWeights]:
    from wasi_compress.passes.replace import site_module

    layers = []
    for site in cap.sites:
        reason = unsupported(model, site)
        if reason is None and filter_fn is None and site.role not in config.roles:
            reason = f"role {site.role} is not in roles"
        if reason is None and filter_fn is not None and not filter_fn(site_module(model, site), site.name):
            reason = "excluded by filter_fn"
        if reason:
            skipped.append({"name": site.name, "reason": reason})
            continue
        layers.append(site_weights(model, site, elem))
    return layers


def _fixed_param_bytes(model: nn.Module, layers: list[SiteWeights], dtype: torch.dtype) -> int:
    """Bytes of the parameters no planned layer holds (paid before the planner spends the rest)."""
    from wasi_compress.analysis import site_parameters

    site_params = {id(p) for layer in layers for p in site_parameters(model, layer.site)}
    return sum(p.numel() * element_bytes(p, dtype) for p in model.parameters() if id(p) not in site_params)


def _spectra(model, layers, config, calib, device, elem, progress) -> dict:
    """Each layer's rank candidates from its spectrum (whitened with the data objective); returns the
    whitenings (the data objective's factors need them)."""
    whitenings = {}
    if config.objective == "data" and layers:
        if calib is None:
            raise UserError("objective 'data' needs calibration batches: pass calib=[input batches]")
        whitenings = whitenings_from(model, layers, calib, device, progress)
    for i, layer in enumerate(layers):
        progress(i, len(layers), f"spectrum of {layer.site.name}")
        wh = whitenings.get(layer.site.name)
        s = singular_values(layer.weight) if wh is None else whitened_singular_values(layer.weight, wh)
        layer.candidates = rank_candidates(layer, s, config, elem)
    return whitenings


def _factor(model, cap, to_replace, ranks, whitenings, progress, replace_pass, copy_attrs) -> nn.Module:
    """One SVD per chosen layer, all in one reversible pass; each new module is marked with its site."""
    done = [0]

    def build(site, dense: nn.Linear) -> nn.Module:
        progress(done[0], len(to_replace), f"factoring {site.name} at rank {ranks[site.name]}")
        done[0] += 1
        new = SubspaceLinear.from_linear(dense, rank=ranks[site.name], whitening=whitenings.get(site.name))
        return mark_module(new, "lowrank", site=site.name, kind=site.kind, origin="linear")

    functional = any(layer.site.kind == "functional" for layer in to_replace)
    target: nn.Module = cap.graph_module if functional else model
    if functional:
        copy_attrs(model, cap.graph_module)
    replace_pass([layer.site for layer in to_replace if layer.site.kind != "conv"], build)(target)
    for layer in to_replace:  # convolutions are modules of the model (and of its graph): swapped in place
        if layer.site.kind == "conv":
            name = layer.site.name
            new = LowRankConv2d.from_conv(target.get_submodule(name), ranks[name], whitenings.get(name))
            target.set_submodule(name, mark_module(new, "lowrank", site=name, kind="conv", origin="conv"))
    progress(len(to_replace), len(to_replace), "factored")
    whitenings.clear()
    return target.eval()


@torch.no_grad()
def _round_trip_dtype(model: nn.Module, dtype: torch.dtype) -> None:
    for t in list(model.parameters()) + list(model.buffers()):
        if t.is_floating_point():
            t.copy_(t.to(dtype))
