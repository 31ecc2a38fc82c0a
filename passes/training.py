"""Insert the training modules of the method into a captured model (issue 4).

``TrainingPass`` swaps the linears of a model's transformer blocks (roles qkv, q, k, v, proj, fc1, fc2)
through ``ReplaceLinearsPass``:

- ``method="wasi"``: ``WASILinear`` (weight subspace at the rank explaining ``threshold`` of the weight's
  energy, trained by the ``update`` rule) with a ``TuckerCompressor`` on its saved input. A layer whose
  rank would not pay (k (O + I) >= O I, METHOD.md section 1) keeps its dense weight and gets an
  ``ASILinear`` instead; ``TrainingLayer.note`` says so.
- ``method="asi"``: ``ASILinear`` (dense weight, compressed saved input).
- ``method="vanilla"``: nothing is replaced.

Layers outside the blocks (the classifier head, patch embedding, any ``other`` linear) stay dense and
trainable; for wasi and asi a trained dense linear outside the blocks becomes ``CompactInputLinear``, which
saves a compact copy of an input that is a view (a head reading the class token would otherwise keep the
whole final-norm output alive for backward). With ``finetune_last=N`` only the last N blocks are replaced
and trained; everything that runs before the first of them is frozen (``requires_grad=False``), so
autograd records nothing there and no activation of the frozen part is saved (checked in tests with
``measure_saved_activations``).

The activation compressor of each layer is either a threshold (``activation_threshold``: ranks chosen at
the first training step) or fixed Tucker ranks per layer (``activation_ranks``), e.g. planned under a
byte budget by ``plan_activation_ranks``: on a calibration batch each layer's saved input X and output
gradient dY are captured, each candidate threshold gives a Tucker form whose bytes (core + factors) are
its cost and whose relative weight-gradient error ||G~ - G||_F / ||G||_F (G = dY^T X, G~ from the
compressed input) is its error, and ``wasi_compress.planner.plan`` picks one candidate per layer. Errors
are relative to each layer's own gradient norm, so they are on one scale and can be added.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from wasi_compress.errors import UserError
from wasi_compress.modules.asi import TuckerCompressor, compressed_bytes, mode_gram, mode_product, weight_grad_from_compressed
from wasi_compress.modules.subspace import SubspaceLinear
from wasi_compress.modules.training import ASILinear, CompactInputLinear, WASILinear, canonical_update
from wasi_compress.passes.base import PassResult, WasiPass
from wasi_compress.passes.capture import Capture, LinearSite, block_of
from wasi_compress.passes.replace import ReplaceLinearsPass, site_module
from wasi_compress.planner import Candidate, LayerCandidates, Plan, plan
from wasi_compress.spectrum import break_even_rank, rank_for_threshold
from wasi_compress.marks import copy_marks, mark_module

__all__ = [
    "BLOCK_ROLES",
    "CALIBRATION_THRESHOLDS",
    "METHODS",
    "TrainingLayer",
    "TrainingPass",
    "activation_candidates",
    "block_of",
    "freeze_before",
    "layer_candidates",
    "plan_activation_ranks",
    "to_inference",
]

METHODS = ("wasi", "asi", "vanilla")
BLOCK_ROLES = ("qkv", "q", "k", "v", "proj", "fc1", "fc2")
CALIBRATION_THRESHOLDS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)

@dataclass
class TrainingLayer:
    """What the pass did to one linear site."""

    name: str
    role: str
    block: str | None
    module: str                     # "wasi", "asi" or "dense"
    trained: bool
    weight_rank: int | None = None  # WASI rank (None: dense weight)
    activation: str = "none"        # "threshold=0.8", "ranks=[..]", or "none" (saved input kept exact)
    activation_ranks: list[int] | None = None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "role": self.role, "block": self.block, "module": self.module,
                "trained": self.trained, "weight_rank": self.weight_rank, "activation": self.activation,
                "activation_ranks": self.activation_ranks, "note": self.note}


def trained_blocks(sites: Sequence[LinearSite], finetune_last: int | None) -> list[str]:
    """The blocks to train, in execution order (sites come from `capture` in execution order)."""
    blocks: list[str] = []
    for site in sites:
        block = site.block
        if site.role in BLOCK_ROLES and block is not None and block not in blocks:
            blocks.append(block)
    if finetune_last is None:
        return blocks
    if not blocks:
        raise UserError("--finetune-last needs transformer blocks, but the graph shows no attention or MLP and no "
                        "linear sits in a block named like blocks.N / layers.N / encoder.layer.N")
    if not 1 <= finetune_last <= len(blocks):
        raise UserError(f"--finetune-last must be between 1 and {len(blocks)} (the model's blocks), got {finetune_last}")
    return blocks[-finetune_last:]


class TrainingPass(WasiPass):
    """Replace the block linears of a captured model by training modules (see the module docstring).

    ``weight_ranks`` / ``activation_ranks`` (site name -> rank / Tucker ranks or None for an exact saved
    input) override ``threshold`` / ``activation_threshold`` per layer; this is how a planned or saved
    choice is rebuilt exactly. ``lr`` and ``weight_decay`` are the subspace-iteration layers' own SGD
    settings (the rule updates L, R inside backward); the optimizer-step rule takes them from the optimizer."""

    name = "training_modules"
    reversible = True  # reverse = to_inference: the trained layers in their inference form

    def __init__(self, capture: Capture, *, method: str, update: str = "subspace-iteration", threshold: float = 0.8,
                 activation_threshold: float | None = 0.95, weight_ranks: dict[str, int | None] | None = None,
                 activation_ranks: dict[str, list[int] | None] | None = None, lr: float | None = None,
                 weight_decay: float = 0.0, finetune_last: int | None = None, roles: Sequence[str] = BLOCK_ROLES,
                 filter_fn: Callable[[nn.Module, str], bool] | None = None):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.capture = capture
        self.method = method
        self.update = canonical_update(update)
        self.roles = tuple(roles)
        self.filter_fn = filter_fn
        self.threshold = threshold
        self.activation_threshold = activation_threshold
        self.weight_ranks = weight_ranks
        self.activation_ranks = activation_ranks
        self.lr = lr
        self.weight_decay = weight_decay
        self.blocks = trained_blocks(capture.sites, finetune_last)
        self.finetune_last = finetune_last
        self.layers: list[TrainingLayer] = []
        self.preserves_computation = method == "vanilla"

    def selected_sites(self) -> list[LinearSite]:
        """The sites that get a training module: linears of the trained blocks whose role is in ``roles``,
        or, with ``filter_fn(module, fqn)``, those of the trained blocks it accepts."""
        out = []
        for s in self.capture.sites:
            if s.block is None or s.block not in self.blocks:
                continue
            if self.filter_fn is None:
                if s.role in self.roles:
                    out.append(s)
            elif self.filter_fn(site_module(self.capture.model, s), s.name):
                out.append(s)
        return out

    def call(self, module: nn.Module) -> PassResult:
        selected = {s.name for s in self.selected_sites()}
        self.layers = []
        for site in self.capture.sites:
            block = site.block
            trained = self.finetune_last is None or (block in self.blocks) or (block is None and site.role == "head")
            self.layers.append(TrainingLayer(site.name, site.role, block, "dense", trained,
                                             note="" if site.name in selected else "outside the trained blocks' qkv/proj/fc layers: kept dense"))
        if self.method == "vanilla" or not selected:
            return PassResult(module, False)
        sites = [s for s in self.capture.sites if s.name in selected]
        if any(s.kind == "functional" for s in sites) and not isinstance(module, fx.GraphModule):
            if self.capture.graph_module is None:
                raise UserError(f"{sites[0].name} is a functional linear and fx could not trace the model")
            module = self.capture.graph_module
        by_name = {layer.name: layer for layer in self.layers}

        def build(site: LinearSite, dense: nn.Linear) -> nn.Module:
            new = self._build(site, dense, module, by_name[site.name])
            origin = "subspace" if isinstance(_current(module, site), SubspaceLinear) else "linear"
            return new if new is dense else mark_module(new, self.name, site=site.name, kind=site.kind, origin=origin)

        inner = ReplaceLinearsPass(sites, build)
        result = inner(module)
        self._compact_inputs(result.graph_module, selected)
        return PassResult(result.graph_module, True)

    def reverse(self, module: nn.Module) -> PassResult:
        """The training modules' inference form (SubspaceLinear for WASI, nn.Linear for the others)."""
        return PassResult(to_inference(module), True)

    def _compact_inputs(self, module: nn.Module, selected: set[str]) -> None:
        """Trained dense linears outside the blocks (the head) become CompactInputLinear: a head reading
        one token would otherwise keep the final norm's whole (B, N, C) output alive for backward."""
        for site, layer in zip(self.capture.sites, self.layers):
            if site.name in selected or not layer.trained or site.kind != "module":
                continue
            current = module.get_submodule(site.name)
            if type(current) is nn.Linear:
                new = CompactInputLinear.from_linear(current)
                module.set_submodule(site.name, mark_module(new, self.name, site=site.name, kind="module", origin="linear"))
                layer.note += "; saves a compact copy of its input when that is a view of a larger tensor"

    # ---------------------------------------------------------------------------------------------
    def _compressor(self, site: LinearSite, layer: TrainingLayer) -> TuckerCompressor | None:
        if self.activation_ranks is not None and site.name in self.activation_ranks:
            ranks = self.activation_ranks[site.name]
            if ranks is None:
                layer.activation = "none"
                return None
            layer.activation, layer.activation_ranks = f"ranks={list(ranks)}", list(ranks)
            return TuckerCompressor(ranks=list(ranks))
        if self.activation_threshold is None:
            return None
        layer.activation = f"threshold={self.activation_threshold:g}"
        return TuckerCompressor(eps=self.activation_threshold)

    def _build(self, site: LinearSite, dense: nn.Linear, model: nn.Module, layer: TrainingLayer) -> nn.Module:
        current = model.get_submodule(site.name) if site.kind == "module" else None
        if site.through:  # its weight goes to a function that calls F.linear itself: no input to compress
            return self._build_through(site, dense, layer)
        compressor = self._compressor(site, layer)
        if self.method == "wasi":
            kwargs = dict(update=self.update, compressor=compressor)
            if self.update == "subspace-iteration":
                kwargs.update(lr=self.lr, weight_decay=self.weight_decay)
            if isinstance(current, SubspaceLinear):  # already factored: train it at its own rank
                new = WASILinear.from_subspace(current, **kwargs)
                layer.module, layer.weight_rank = "wasi", new.rank
                return new
            rank = self._weight_rank(site, dense)
            if rank is not None:
                new = WASILinear.from_linear(dense, rank=rank, **kwargs)
                layer.module, layer.weight_rank = "wasi", new.rank
                return new
            layer.note = (f"rank at threshold {self.threshold:g} is above break-even "
                          f"({break_even_rank(site.out_features, site.in_features)}): dense weight, compressed input")
        if isinstance(current, SubspaceLinear):
            layer.note = "already factored (SubspaceLinear): trained as it is, input not compressed"
            layer.activation, layer.activation_ranks = "none", None
            return current
        if compressor is None:
            layer.module = "dense"
            return dense
        layer.module = "asi"
        return ASILinear(dense.weight, dense.bias, compressor)

    def _build_through(self, site: LinearSite, dense: nn.Linear, layer: TrainingLayer) -> nn.Module:
        """A site used through its weight (LinearSite.through): WASI trains L and R through W = L R under the
        optimizer-step rule; its input is saved by the function's own F.linear, uncompressed."""
        rank = self._weight_rank(site, dense) if self.method == "wasi" and self.update == "optimizer-step" else None
        if rank is None:
            layer.module = "dense"
            layer.note = (f"its weight is passed to {site.through}, which calls F.linear itself: kept dense "
                          f"({'rank above break-even' if self.method == 'wasi' and self.update == 'optimizer-step' else 'only WASI with the optimizer-step rule trains such a layer in its subspace'})")
            return dense
        new = WASILinear.from_linear(dense, rank=rank, update="optimizer-step")
        layer.module, layer.weight_rank = "wasi", new.rank
        layer.note = f"its weight is passed to {site.through}, which calls F.linear itself: trained as W = L R, input not compressed"
        return new

    def _weight_rank(self, site: LinearSite, dense: nn.Linear) -> int | None:
        """The WASI rank of a dense layer, or None where the factorization would not pay."""
        if self.weight_ranks is not None and site.name in self.weight_ranks:
            return self.weight_ranks[site.name]
        from wasi_compress.spectrum import singular_values

        rank = rank_for_threshold(singular_values(dense.weight), self.threshold)
        return rank if rank <= break_even_rank(site.out_features, site.in_features) else None


def _current(model: nn.Module, site: LinearSite) -> nn.Module | None:
    return model.get_submodule(site.name) if site.kind == "module" else None


def freeze_before(model: nn.Module, first_trained: str, example: Any) -> list[str]:
    """Freeze every parameter whose owning module first runs before module ``first_trained``.

    The order comes from forward pre-hooks over one no-grad forward pass on ``example``. Parameters held
    directly by a module that starts before the first trained block (the model's own ``cls_token`` and
    ``pos_embed``, the patch embedding, earlier blocks) are frozen; the rest (later blocks, final norm,
    head) stay trainable. Returns the frozen parameter names."""
    order: dict[str, int] = {}
    handles = []

    def record(name: str) -> None:  # a pre-hook must return None, or it replaces the module's input
        order.setdefault(name, len(order))

    for name, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(lambda _m, _a, name=name: record(name)))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(*(example if isinstance(example, tuple) else (example,)))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    if first_trained not in order:
        raise ValueError(f"{first_trained} did not run in the forward pass")
    start = order[first_trained]
    frozen = []
    for name, p in model.named_parameters():
        owner = name.rpartition(".")[0]
        if order.get(owner, -1) < start:
            p.requires_grad_(False)
            frozen.append(name)
    return frozen


# -------------------------------------------------------------------------------------------------
# Activation ranks under a byte budget


def activation_candidates(x: Tensor, grad_out: Tensor, thresholds: Sequence[float] = CALIBRATION_THRESHOLDS,
                          label_prefix: str = "") -> list[Candidate]:
    """Candidates for one layer's saved input: one Tucker form per threshold plus the exact input.

    cost = bytes of core + factors (the exact input: its own bytes); error = ||G~ - G||_F / ||G||_F with
    G = dY^T X and G~ contracted from the Tucker form. Each mode's Gram eigendecomposition is computed
    once and shared by all thresholds (the factors are the leading eigenvectors, as a TuckerCompressor's
    first step would find them). ``rank`` of a candidate is unused (ranks per mode are in the label)."""
    x = x.detach().contiguous()
    grad_out = grad_out.detach().reshape(*x.shape[:-1], -1)
    g = grad_out.reshape(-1, grad_out.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
    g_norm = float(torch.linalg.vector_norm(g))
    eig = []
    for mode in range(x.dim()):
        gram = mode_gram(x, x, mode)
        values, vectors = torch.linalg.eigh(gram.float() if gram.dtype in (torch.float16, torch.bfloat16) else gram)
        eig.append((values.flip(0).clamp_min(0).sqrt(), vectors.flip(1).to(x.dtype)))
    out = [Candidate(x.numel() * x.element_size(), 0.0, None, f"{label_prefix}exact")]
    seen: set[tuple[int, ...]] = set()
    for eps in thresholds:
        ranks = tuple(rank_for_threshold(s, eps) for s, _ in eig)
        if ranks in seen:
            continue
        seen.add(ranks)
        factors = [v[:, :r].contiguous() for (_, v), r in zip(eig, ranks)]
        core = x
        for mode in sorted(range(x.dim()), key=lambda m: factors[m].shape[1] / x.shape[m]):
            core = mode_product(core, factors[mode], mode)
        g_tilde = weight_grad_from_compressed(core, factors, grad_out)
        error = float(torch.linalg.vector_norm(g_tilde - g)) / g_norm if g_norm > 0 else 0.0
        out.append(Candidate(compressed_bytes(core, factors), error, None,
                             f"{label_prefix}threshold={eps:g} ranks={list(ranks)}"))
    return out


def _ranks_of(candidate: Candidate) -> list[int] | None:
    if "ranks=" not in candidate.label:
        return None
    text = candidate.label.split("ranks=", 1)[1]
    return [int(v) for v in text.strip("[]").split(",")]


def layer_candidates(model: nn.Module, sites: Sequence[LinearSite], inputs: Tensor, labels: Tensor,
                     loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
                     thresholds: Sequence[float] = CALIBRATION_THRESHOLDS) -> list[LayerCandidates]:
    """Run one forward and backward pass of the (dense) model on a calibration batch, capture each site's
    input and output gradient, and list its candidates (`activation_candidates`). Module sites only.
    The model's parameters and gradients are left as they were; the pass runs in eval mode (no dropout)."""
    captured: dict[str, dict[str, Tensor]] = {}
    handles = []
    for site in sites:
        if site.kind != "module":
            continue
        module = model.get_submodule(site.name)

        def hook(_m, args, out, name=site.name):
            if name in captured or not isinstance(out, Tensor) or not out.requires_grad:
                return
            captured[name] = {"x": args[0].detach()}
            out.register_hook(lambda g, name=name: captured[name].__setitem__("dy", g.detach()))

        handles.append(module.register_forward_hook(hook))
    was_training = model.training
    requires = {id(p): p.requires_grad for p in model.parameters()}
    grads = {id(p): p.grad for p in model.parameters()}
    model.eval()
    try:
        for p in model.parameters():  # the output gradients need some graph, even in a frozen model
            p.requires_grad_(True)
        loss = loss_fn(model(inputs), labels)
        loss.backward()
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
        for p in model.parameters():
            p.requires_grad_(requires[id(p)])
            p.grad = grads[id(p)]
    layers = []
    for site in sites:
        data = captured.get(site.name)
        if data is None or "dy" not in data:
            continue
        layers.append(LayerCandidates(site.name, tuple(activation_candidates(data["x"], data["dy"], thresholds))))
    return layers


@dataclass
class ActivationPlan:
    """The planned Tucker ranks per layer (None: saved input kept exact) and the planner's figures."""

    ranks: dict[str, list[int] | None]
    plan: Plan
    layers: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {**self.plan.to_dict(), "error_scale": "relative weight-gradient error ||G~ - G||_F / ||G||_F per layer, summed",
                "cost": "bytes of the saved input of each planned layer (Tucker core + factors, or the exact input)",
                "layers": self.layers}


def plan_activation_ranks(layers: Sequence[LayerCandidates], budget_bytes: int, allocator: str = "dp") -> ActivationPlan:
    """Choose one candidate per layer under ``budget_bytes`` (raises InfeasibleBudgetError naming the
    smallest feasible budget)."""
    chosen_plan = plan(layers, budget_bytes, allocator)
    ranks: dict[str, list[int] | None] = {}
    details = []
    for layer, (name, cand) in zip(layers, chosen_plan.chosen(layers)):
        ranks[name] = _ranks_of(cand)
        details.append({"name": name, "ranks": ranks[name], "bytes": cand.cost_bytes, "error": cand.error,
                        "choice": cand.label,
                        "candidates": [{"label": c.label, "bytes": c.cost_bytes, "error": c.error} for c in layer.candidates]})
    return ActivationPlan(ranks, chosen_plan, details)


# -------------------------------------------------------------------------------------------------
# Back to inference modules


def to_inference(model: nn.Module, *, dense: bool = False) -> nn.Module:
    """Replace, in place, every WASILinear by its SubspaceLinear (``dense=True``: an nn.Linear holding
    W = L R) and every ASILinear and CompactInputLinear by an nn.Linear holding the same tensors. Each
    new module keeps the marks of the one it replaces. 1x1 convolutions computed as linears for training
    (modules/pointwise.py) become convolutions again (two 1x1 convs, a LowRankConv2d, when trained in a
    subspace and not ``dense``). Returns the model."""
    from wasi_compress.modules.pointwise import unwrap_pointwise_convs_

    for name, m in list(model.named_modules()):
        if isinstance(m, WASILinear):
            new = m.to_subspace()
            new = new.to_linear() if dense else new
        elif isinstance(m, (ASILinear, CompactInputLinear)):
            new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None, device="meta")
            new.weight = m.weight
            new.bias = m.bias
        else:
            continue
        model.set_submodule(name, copy_marks(m, new))
    unwrap_pointwise_convs_(model)
    return model
