"""The whole-step memory planner (issue 13): which memory levers a training step uses, and the weight
ranks, so that its peak fits a byte budget at the least error. A pure function of measured inputs.

The levers (`StepLevers`) and what each costs in error:

- ``micro_batches`` m: the batch runs as m chunks whose gradients accumulate before one optimizer step
  (exact: the same gradient); saved tensors are one chunk's.
- ``recompute``: every block keeps only its inputs and re-runs its forward in backward (exact).
- ``activation``: GELU/SiLU keep a code of their input for backward (``code8``, ``code2``) instead of the
  input (``exact``); error: the code's relative gradient error, once per block.
- ``linear_inputs``: the block linears keep their inputs exact or as Tucker forms (``tucker``, the
  method's activation threshold); error: the relative weight-gradient error of each layer, summed.
- ``frozen_dtype``: frozen parameters that no gradient passes through (before the first trained block,
  ``finetune_last``) kept in bfloat16 (`wasi_compress.frozen_storage`); error: their relative rounding
  error. It changes a derived term only (half their bytes), so it needs no measurement of its own.
- always on under a budget, since they are exact and never cost memory: LayerNorm computes its backward
  from its output (memory-sharing LayerNorm) and attention runs the fused kernel (no probabilities kept).

The memory model, term by term (every term in bytes, at the run's batch B and micro-batch b = ceil(B/m);
`StepModel.peak`):

    m > 1:  peak = fixed + weights + batch + activations(b)
    m = 1:  peak = fixed + weights + batch + max(end, activations(b) - gradients[, activations(b) - released])

``fixed``: parameters, buffers, gradients and optimizer state of everything the planner does not size
(derived from tensor sizes); ``weights``: each planned layer's parameters (L and R, or the dense weight)
times (1 + gradient + optimizer-state copies) (derived); ``batch``: the input batch (derived);
``activations(b)``: what a step holds beyond those while chunks accumulate (every gradient alive under
the next chunk's saved tensors), measured on the real model with these forms at three small micro-batch
sizes (the live-tensor tracker's peak of a two-chunk step minus the derived terms), interpolated between
them and extrapolated linearly beyond (`ActivationFit`). A one-chunk step peaks either early in backward
(saved tensors, few gradients: activations minus the gradients, which are counted in fixed and weights)
or at its end (every gradient, transients only: ``end``, measured on a one-chunk step of one sample); with
per-block recomputation also when backward reaches the first block (nearly every gradient alive, one
block's activations, the inputs of every later block freed: ``released``, derived from the block input
shapes).

The choice is exact over the candidate set: for every lever combination the planned layers' ranks are
chosen by the exact DP planner (`wasi_compress.planner.plan_dp`, relative weight error per layer) within
what the rest of the step leaves of the budget; the combination with the least total error wins (ties:
fewer micro-batches, then no recomputation, which are faster). Micro-batches below ``MIN_MICRO_BATCH``
samples are considered only when no plan with larger ones fits, since they slow the step down.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from wasi_compress.errors import InfeasibleBudgetError, UserError
from wasi_compress.planner import LayerCandidates, Plan, plan_dp
from wasi_compress.units import format_bytes

__all__ = ["ACTIVATION_FORMS", "LINEAR_INPUT_FORMS", "ActivationFit", "StepLevers", "StepModel", "StepPlan", "plan_step"]

ACTIVATION_FORMS = ("exact", "code8", "code2")
# Micro-batches smaller than this are chosen only when nothing else fits: on a CPU a step of many tiny
# chunks runs several times slower (on builtin:mnist-vit, 64 chunks of 1 sample with recomputation took
# 4.6x the time of one batch of 64), a cost the error proxy does not see.
MIN_MICRO_BATCH = 8
LINEAR_INPUT_FORMS = ("exact", "tucker")
FROZEN_DTYPES = ("float32", "bfloat16")


@dataclass(frozen=True)
class StepLevers:
    """One combination of levers (see the module docstring)."""

    micro_batches: int = 1
    recompute: bool = False
    activation: str = "exact"
    linear_inputs: str = "exact"
    layernorm: str = "shared"
    attention: str = "fused"
    frozen_dtype: str = "float32"

    def __post_init__(self):
        if isinstance(self.micro_batches, bool) or not isinstance(self.micro_batches, int) or self.micro_batches < 1:
            raise UserError(f"micro_batches must be a positive integer, got {self.micro_batches!r}")
        if not isinstance(self.recompute, bool):
            raise UserError(f"recompute must be true or false, got {self.recompute!r}")
        for name, options in (("activation", ACTIVATION_FORMS), ("linear_inputs", LINEAR_INPUT_FORMS),
                              ("layernorm", ("shared", "exact")), ("attention", ("fused", "as-is")),
                              ("frozen_dtype", FROZEN_DTYPES)):
            if getattr(self, name) not in options:
                raise UserError(f"{name} must be one of {', '.join(options)}, got {getattr(self, name)!r}")

    @property
    def fit_key(self) -> tuple:
        """What the activation term depends on: the forms (not the number of micro-batches, nor the frozen
        parameters' dtype, a derived term)."""
        return (self.recompute, self.activation, self.linear_inputs, self.layernorm, self.attention)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> StepLevers:
        if not isinstance(data, dict) or set(data) - set(cls.__dataclass_fields__):
            raise UserError(f"step levers must be an object with keys among {', '.join(cls.__dataclass_fields__)}")
        return cls(**data)


@dataclass(frozen=True)
class ActivationFit:
    """activations(b), piecewise linear through measured micro-batch sizes (``sizes`` increasing, with
    ``bytes_at`` the activation term measured at each): interpolated between them, extrapolated beyond
    the largest along the last segment's slope."""

    sizes: tuple[int, ...]
    bytes_at: tuple[int, ...]

    def __post_init__(self):
        if len(self.sizes) < 2 or len(self.sizes) != len(self.bytes_at) or list(self.sizes) != sorted(set(self.sizes)):
            raise ValueError(f"need two or more increasing sizes with one figure each, got {self.sizes}, {self.bytes_at}")

    def at(self, b: int) -> int:
        pairs = list(zip(self.sizes, self.bytes_at))
        segment = next(((p, q) for p, q in zip(pairs, pairs[1:]) if b <= q[0]), (pairs[-2], pairs[-1]))
        (b1, y1), (b2, y2) = segment
        return max(0, int(math.ceil(y1 + (y2 - y1) / (b2 - b1) * (b - b1))))


@dataclass
class StepPlan:
    """The chosen levers and ranks, with the predicted peak term by term."""

    levers: StepLevers
    weight_ranks: dict[str, int | None]
    predicted: dict[str, int]
    error: dict[str, float]
    budget_bytes: int
    weight_plan: Plan | None = None
    considered: int = 0
    notes: list[str] = field(default_factory=list)
    user_budget_bytes: int | None = None  # the budget asked for; ``budget_bytes`` is what it was planned under

    @property
    def predicted_peak_bytes(self) -> int:
        return self.predicted["peak"]

    def to_dict(self) -> dict[str, Any]:
        return {"levers": self.levers.to_dict(), "weight_ranks": self.weight_ranks, "predicted": self.predicted,
                "error": self.error, "budget_bytes": self.user_budget_bytes or self.budget_bytes,
                "planned_under_bytes": self.budget_bytes, "considered": self.considered,
                "memory_model": "peak = fixed + planned weights + batch + activations(micro-batch) with micro-batches, "
                                "else + max(end of step, activations - gradients, and with recomputation activations - released "
                                "block inputs); fixed, weights and batch derived "
                                "from tensor sizes, activations measured at three small micro-batch sizes with these "
                                "forms (interpolated, extrapolated linearly), end of step measured",
                "error_proxy": "sum of relative errors: weight truncation ||W - W_k||_F / ||W||_F per planned layer, "
                               "activation-code gradient error per block, Tucker weight-gradient error per layer, "
                               "relative rounding error of frozen parameters kept in bfloat16",
                "notes": self.notes}


def _micro_batch(batch_size: int, m: int) -> int:
    return -(-batch_size // m)


@dataclass(frozen=True)
class StepModel:
    """The memory model's inputs (module docstring): derived terms, the planned layers' candidates, and
    per form key (`StepLevers.fit_key`) the measured activation fit and end-of-step term."""

    batch_size: int
    fixed_bytes: int                       # everything not planned: parameters, buffers, gradients, state
    fixed_grad_bytes: int                  # the gradients among fixed_bytes
    batch_bytes: int                       # the input batch and labels
    weight_layers: tuple[LayerCandidates, ...]
    grad_share: float                      # the share of a planned candidate's cost that is its gradient
    fits: Mapping[tuple, ActivationFit]    # activations(b) with every gradient alive (chunks accumulating)
    end_terms: Mapping[tuple, int]         # a one-chunk step's end (gradients complete) beyond the derived terms
    released_inputs_per_sample: int = 0    # block inputs recomputation has freed when backward reaches the first block
    frozen_saving_bytes: int = 0           # what frozen parameters in bfloat16 take off fixed_bytes

    def activations(self, levers: StepLevers) -> int | None:
        fit = self.fits.get(levers.fit_key)
        return None if fit is None else fit.at(_micro_batch(self.batch_size, levers.micro_batches))

    def frozen_saving(self, levers: StepLevers) -> int:
        return self.frozen_saving_bytes if levers.frozen_dtype == "bfloat16" else 0

    def peak(self, levers: StepLevers, weight_bytes: int) -> int | None:
        """Predicted peak with the planned layers costing `weight_bytes`: chunks that accumulate keep every
        gradient alive under the next chunk's activations (additive); a one-chunk step peaks either early in
        backward (activations, few gradients), or, with recomputation, when backward reaches the first block
        (nearly every gradient, one block's activations, every later block's input freed), or at its end
        (every gradient, no activations)."""
        acts = self.activations(levers)
        if acts is None:
            return None
        base = self.fixed_bytes + weight_bytes + self.batch_bytes - self.frozen_saving(levers)
        if levers.micro_batches > 1:
            return base + acts
        grads = self.fixed_grad_bytes + int(self.grad_share * weight_bytes)
        late = acts - self.released_inputs_per_sample * _micro_batch(self.batch_size, 1) if levers.recompute else 0
        return base + max(self.end_terms.get(levers.fit_key, 0), acts - grads, late)


def plan_step(model: StepModel, budget_bytes: int, *, lever_errors: Mapping[tuple[str, str], float],
              options: Sequence[StepLevers], min_micro_batch: int = MIN_MICRO_BATCH) -> StepPlan:
    """The least-error plan whose predicted peak fits ``budget_bytes`` (see the module docstring).

    ``model.weight_layers``: per planned layer its candidates (cost = parameter bytes x (1 + gradient +
    state copies), error = relative weight error). ``lever_errors[("activation", form)]`` and
    ``[("linear_inputs", form)]``: the error of each form. Options whose micro-batch is below
    ``min_micro_batch`` samples are tried only when no other fits. Raises InfeasibleBudgetError naming
    the smallest predicted peak of any option."""
    roomy = [o for o in options if _micro_batch(model.batch_size, o.micro_batches) >= min(min_micro_batch, model.batch_size)]
    if roomy and len(roomy) < len(options):
        try:
            return _plan_among(model, roomy, budget_bytes, lever_errors)
        except InfeasibleBudgetError:
            pass
    return _plan_among(model, options, budget_bytes, lever_errors)


def _plan_among(model: StepModel, options, budget_bytes: int, lever_errors) -> StepPlan:
    best: tuple | None = None
    smallest = None
    least_weights = sum(min(c.cost_bytes for c in layer.candidates) for layer in model.weight_layers)
    for levers in options:
        floor = model.peak(levers, least_weights)
        if floor is None:
            continue
        smallest = floor if smallest is None else min(smallest, floor)
        if floor > budget_bytes:
            continue
        # what the rest of the step takes at the smallest ranks; more rank only lowers a one-chunk step's
        # early-backward term (its gradients grow), so the weights may take the remainder
        weights = plan_dp(model.weight_layers, budget_bytes - (floor - least_weights)) if model.weight_layers else None
        lever_error = sum(lever_errors.get((name, getattr(levers, name)), 0.0)
                          for name in ("activation", "linear_inputs", "frozen_dtype"))
        total = (weights.total_error if weights else 0.0) + lever_error
        key = (round(total, 12), levers.micro_batches, levers.recompute)
        if best is None or key < best[0]:
            best = (key, levers, weights, lever_error)
    if best is None:
        if smallest is None:
            raise UserError("no lever combination could be measured for this model")
        raise InfeasibleBudgetError(f"memory budget {format_bytes(budget_bytes)} is infeasible: the smallest whole-step "
                                    f"peak the levers reach is predicted at {format_bytes(smallest)} ({smallest} bytes)",
                                    smallest)
    _key, levers, weights, lever_error = best
    chosen = dict(weights.chosen(model.weight_layers)) if weights else {}
    weight_bytes = weights.total_cost_bytes if weights else 0
    predicted = {"fixed": model.fixed_bytes - model.frozen_saving(levers), "weights": weight_bytes, "batch": model.batch_bytes,
                 "activations": model.activations(levers), "end_of_step": model.end_terms.get(levers.fit_key),
                 "peak": model.peak(levers, weight_bytes),
                 "micro_batch": _micro_batch(model.batch_size, levers.micro_batches)}
    if levers.recompute and levers.micro_batches == 1:
        predicted["released_inputs"] = model.released_inputs_per_sample * model.batch_size
    error = {"weights": weights.total_error if weights else 0.0, "levers": lever_error,
             "total": (weights.total_error if weights else 0.0) + lever_error}
    ranks = {name: cand.rank for name, cand in chosen.items()}
    return StepPlan(levers, ranks, predicted, error, budget_bytes, weights, len(options))
