"""`--memory-budget`: measure what the planner needs on the real model, plan the step
(`wasi_compress.step_plan.plan_step`) and apply the chosen levers.

What is measured, on copies of the model (nothing here trains the run's model):
- per lever combination (`StepLevers.fit_key`), the activation term at three small micro-batch sizes: the
  live-tensor peak of a real step (`measure_step`) minus the derived terms (parameters, buffers, whole
  gradients, optimizer state, the batch);
- the Tucker form's relative weight-gradient error per layer on the calibration batch
  (`passes.training.layer_candidates`), and each activation code's relative gradient error.
Derived: each planned layer's weight candidates from its spectrum (ranks at explained-variance
thresholds and at fractions of min(out, in) below them, up to break-even, and the dense layer), costed as parameters x (1 + gradient + optimizer-state
copies) and errored as the relative truncation error.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wasi_compress.errors import InfeasibleBudgetError, UserError
from wasi_compress.modules.training import WASILinear
from wasi_compress.planner import Candidate, LayerCandidates
from wasi_compress.units import format_bytes
from wasi_compress.step_plan import ACTIVATION_FORMS, ActivationFit, StepLevers, StepModel, StepPlan, plan_step

__all__ = ["PlanInputs", "apply_levers_", "changes_model", "lever_floors", "measure_plan_inputs", "memory_levers", "predict_peak", "plan_and_check", "plan_inputs_for", "prepare_with_levers_",
           "state_copies"]

WEIGHT_THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
# ranks below the threshold grid, as fractions of min(out, in): a flat spectrum (a model trained little,
# or randomly initialised) puts even the 0.3 threshold at a large share of the dense bytes, and budgets
# at 1/10 of vanilla's peak need the weights smaller than that
RANK_FRACTIONS = (1 / 64, 1 / 32, 1 / 16, 1 / 8)


def apply_levers_(model: nn.Module, levers: StepLevers, blocks: Sequence[str], frozen: Sequence[str] = ()) -> list[str]:
    """Apply the forms of `levers` to the model's blocks in place (micro-batching is the loop's), and the
    frozen parameters' dtype to `frozen` (the names `prepare_training_` froze). Returns notes on what
    changed."""
    from wasi_compress.frozen_storage import store_frozen_in_
    from wasi_compress.passes.saved_forms import SavedFormsPass
    from wasi_compress.recompute import recompute_blocks_

    notes = []
    if levers.linear_inputs == "exact":
        for m in model.modules():
            if isinstance(m, WASILinear):
                m.compressor = None
    SavedFormsPass(layernorm=levers.layernorm, activation=levers.activation, attention=levers.attention,
                   blocks=tuple(blocks))(model)
    if levers.recompute:
        notes.append(f"{len(recompute_blocks_(model, blocks))} blocks recompute their forward in backward")
    if levers.frozen_dtype == "bfloat16":
        notes.append(f"{len(store_frozen_in_(model, frozen))} frozen parameters kept in bfloat16")
    return notes


def changes_model(levers: StepLevers) -> bool:
    """Whether `apply_levers_` would change a model (micro-batching alone is the loop's)."""
    return (levers.recompute or levers.activation != "exact" or levers.layernorm != "exact" or levers.attention != "as-is"
            or levers.frozen_dtype != "float32")


def prepare_with_levers_(model: nn.Module, config, levers: StepLevers, *, example: Tensor, calib=None,
                         weight_ranks=None, activation_ranks=None):
    """`prepare_training_` of `config` (with exact saved inputs where the levers say so), then the levers'
    forms. Returns (handle, notes)."""
    from wasi_compress.transforms.training import prepare_training_

    wasi = config.wasi_config()
    if levers.linear_inputs == "exact" and wasi.method == "wasi":
        wasi.activation_threshold = None
    handle = prepare_training_(model, wasi, example=example, calib=calib, weight_ranks=weight_ranks,
                               activation_ranks=activation_ranks)
    return handle, apply_levers_(handle.model, levers, handle.blocks, handle.frozen) if changes_model(levers) else []


def plan_inputs_for(dense: nn.Module, config, x: Tensor, y: Tensor, status=lambda _text: None) -> PlanInputs:
    """`measure_plan_inputs` for the dense model `dense` (prepared on a copy at the configured thresholds)."""
    from wasi_compress.transforms.training import prepare_training_

    handle = prepare_training_(copy.deepcopy(dense), config.wasi_config(), example=x[:2])
    return measure_plan_inputs(dense, handle.model, handle, config, x, y, status)


# the share of a memory budget kept back from the plan for the memory model's error (it predicts the
# measured peak within about 1% on the benchmark models; the measurement then confirms the plan)
PLAN_MARGIN = 0.02


def plan_and_check(inputs: PlanInputs, budget: int, measure_peak, label: str | None = None) -> tuple[StepPlan, Any]:
    """Plan under `budget` less PLAN_MARGIN, then measure the plan (``measure_peak(plan) -> (peak bytes,
    anything)``): over the budget, plan again under a target lowered by the overshoot (at most 4 plans).
    Returns (plan, what measure_peak returned with it). ``label`` names the budget in errors."""
    label = label or f"memory budget {format_bytes(budget)}"
    # rounded up: the smallest feasible budget named below, less the margin, must plan again
    target, replaced, under = math.ceil(budget * (1 - PLAN_MARGIN)), [], 1.0
    for _attempt in range(4):
        try:
            step = inputs.plan(target)
        except InfeasibleBudgetError as exc:
            # the budget named must hold the smallest plan as measured, not only as predicted: measure it
            # (unless a plan already measured over its prediction), and scale by how far it was over
            if under == 1.0:
                least = inputs.plan(exc.smallest_feasible_bytes)
                under = max(1.0, measure_peak(least)[0] / least.predicted_peak_bytes)
            smallest = math.ceil(exc.smallest_feasible_bytes * under / (1 - PLAN_MARGIN))
            basis = (f"the smallest plan's measured peak, x{under:.3f} its prediction" if under > 1 else
                     "the levers' smallest predicted peak, whose measured step fits")
            raise InfeasibleBudgetError(
                f"{label} is infeasible for this step: the smallest feasible budget is "
                f"{format_bytes(smallest)} ({smallest} bytes; {basis}, plus a {PLAN_MARGIN:.0%} margin)", smallest) from None
        peak, measured = measure_peak(step)
        if peak <= budget:
            step.notes += replaced
            step.user_budget_bytes = budget
            return step, measured
        replaced.append(f"a plan predicted at {step.predicted_peak_bytes} bytes measured {peak}, over the budget, "
                        "and was replaced")
        under = max(under, peak / step.predicted_peak_bytes)
        target = int(target * budget / peak * (1 - PLAN_MARGIN))
    raise UserError(f"{label}: the planned step measured {peak} bytes, over the budget, after "
                    "4 plans; give a larger budget")


def state_copies(config) -> int:
    """Optimizer-state tensors per trained parameter: SGD with momentum 1, AdamW 2, plain SGD 0."""
    if config.optimizer == "adamw":
        return 2
    return 1 if config.effective_momentum else 0


def _options(config, blocks_ok: bool, method: str, frozen_saving: int = 0) -> list[StepLevers]:
    in_backward = config.in_backward or (method == "wasi" and config.update == "subspace-iteration")
    counts = [1] if in_backward else sorted({min(2 ** i, config.batch_size) for i in range(12)})
    linear = ("exact", "tucker") if method == "wasi" else (("tucker",) if method == "asi" else ("exact",))
    dtypes = ("float32", "bfloat16") if frozen_saving else ("float32",)
    return [StepLevers(m, r, a, li, frozen_dtype=d) for m in counts for r in ((False, True) if blocks_ok else (False,))
            for a in ACTIVATION_FORMS for li in linear for d in dtypes]


def _fit_sizes(batch_size: int) -> tuple[int, ...]:
    """Micro-batch sizes to measure at (two chunks of each fit in a batch of at least 4): small, so cheap to
    run, yet spanning the sizes plans use most."""
    return tuple(b for b in (1, 2, 4) if 2 * b <= batch_size)


def _activation_term(prepared: nn.Module, levers: StepLevers, blocks, config, x: Tensor, y: Tensor, b: int,
                     chunks: int) -> int:
    """The live peak of one step with `levers`' forms in `chunks` chunks of `b` samples, minus the derived
    terms (parameters, buffers, every gradient, optimizer state, the batch). Chunks that accumulate take
    the optimizer step after backward; one chunk takes the run's own (inside backward, where it runs)."""
    from wasi_compress.finetune.step_memory import measure_step
    from wasi_compress.finetune.steps import make_run_optimizer

    with torch.random.fork_rng(devices=[]):
        twin = copy.deepcopy(prepared)
        apply_levers_(twin, levers, blocks)
        trained = [p for p in twin.parameters() if p.requires_grad]
        optimizer = make_run_optimizer(trained, config, ordinary=chunks > 1)
        # copies, not slices: the live-tensor tracker counts a slice's whole storage (the full batch)
        xs, ys = x[:chunks * b].clone(), y[:chunks * b].clone()
        result = measure_step(twin, optimizer, xs, ys, linears={}, micro_batches=chunks, collect=False)
        grads = sum(p.numel() * p.element_size() for p in trained)
        batch = xs.numel() * xs.element_size() + ys.numel() * ys.element_size()
        return result["peak_bytes"] - result["params_bytes"] - result["optimizer_bytes"] - grads - batch


def _warm_compressors(prepared: nn.Module, x: Tensor, y: Tensor) -> None:
    """One forward and backward (no step) on the whole calibration batch, so every Tucker compressor has
    its ranks chosen at the run's batch size, as the run's first step chooses them, and its factors: the
    measured copies then start warm, with one power-iteration step per mode, instead of each paying the
    first step's eigendecompositions (a 3072-wide mode takes seconds). Only the batch mode, whose size
    differs between the measured micro-batches, starts afresh."""
    from wasi_compress.modules.asi import TuckerCompressor

    if not any(isinstance(getattr(m, "compressor", None), TuckerCompressor) for m in prepared.modules()):
        return
    with torch.random.fork_rng(devices=[]):
        prepared.train()
        F.cross_entropy(prepared(x), y).backward()
    prepared.zero_grad(set_to_none=True)


def _measure_forms(prepared, options, blocks, config, x, y, status) -> tuple[dict, dict]:
    """Per form key: the activation fit (two accumulating chunks at each fit size) and the end term (one
    chunk of one sample, whose peak comes once every gradient exists)."""
    keys = {levers.fit_key: levers for levers in options}
    fits, ends = {}, {}
    for i, (key, levers) in enumerate(keys.items()):
        status(f"measuring lever combination {i + 1}/{len(keys)}")
        if config.batch_size >= 4:
            sizes = _fit_sizes(config.batch_size)
            fits[key] = ActivationFit(sizes, tuple(max(0, _activation_term(prepared, levers, blocks, config, x, y, b, 2))
                                                   for b in sizes))
        else:  # too small a batch for two chunks of two: one sample, proportional beyond it
            one = max(0, _activation_term(prepared, levers, blocks, config, x, y, 1, min(2, config.batch_size)))
            fits[key] = ActivationFit((1, 2), (one, 2 * one))
        ends[key] = _activation_term(prepared, levers, blocks, config, x, y, 1, 1)
    return fits, ends


def _weight_layers(dense: nn.Module, sites, method: str, copies: int) -> list[LayerCandidates]:
    """Rank candidates of each planned linear (wasi) or its dense cost alone (asi, vanilla)."""
    from wasi_compress.spectrum import break_even_rank, errors_for_ranks, ranks_for_thresholds, singular_values

    layers = []
    for site in sites:
        m = dense.get_submodule(site.name)
        o, i = site.out_features, site.in_features
        bias = o * m.weight.element_size() if getattr(m, "bias", None) is not None else 0
        elem = m.weight.element_size()
        cands = [Candidate((o * i * elem + bias) * copies, 0.0, None, "dense")]
        if method == "wasi":
            spectrum = singular_values(m.weight.detach())
            by_threshold = set(ranks_for_thresholds(spectrum, WEIGHT_THRESHOLDS).values())
            below = {max(1, round(f * min(o, i))) for f in RANK_FRACTIONS}
            ranks = sorted({k for k in by_threshold | {k for k in below if k < min(by_threshold)}
                            if k <= break_even_rank(o, i)})
            cands += [Candidate((k * (o + i) * elem + bias) * copies, e, k, f"rank {k}")
                      for k, e in zip(ranks, errors_for_ranks(spectrum, ranks))]
        layers.append(LayerCandidates(site.name, tuple(cands)))
    return layers


def _prepared_layers(prepared: nn.Module, sites, copies: int) -> list[LayerCandidates]:
    """Each planned layer as it was prepared (one candidate: its parameters' bytes times the copies)."""
    layers = []
    for site in sites:
        m = prepared.get_submodule(site.name)
        size = sum(p.numel() * p.element_size() * (copies if p.requires_grad else 1) for p in m.parameters())
        size += sum(b.numel() * b.element_size() for b in m.buffers())
        rank = getattr(m, "rank", None)
        layers.append(LayerCandidates(site.name, (Candidate(size, 0.0, rank, "as prepared"),)))
    return layers


def _lever_errors(dense, sites, blocks, config, x, y) -> dict[tuple[str, str], float]:
    from wasi_compress.modules.saved_forms import derivative_error
    from wasi_compress.passes.training import layer_candidates

    method = config.method
    activation_modules = sum(1 for name, m in dense.named_modules() if type(m) in (nn.GELU, nn.SiLU)
                             and block_in(name, blocks))
    errors = {("activation", "exact"): 0.0, ("linear_inputs", "exact"): 0.0}
    for form in ("code8", "code2"):
        errors[("activation", form)] = activation_modules * derivative_error("gelu", int(form[-1]))
    if method in ("wasi", "asi"):
        layers = layer_candidates(dense, [s for s in sites if s.kind == "module"], x, y,
                                  thresholds=(config.activation_threshold,))
        errors[("linear_inputs", "tucker")] = sum(max(c.error for c in layer.candidates) for layer in layers)
    return errors


@dataclass
class PlanInputs:
    """What `plan_step` needs, measured once per run (re-plans under another budget reuse it)."""

    model: StepModel
    options: list[StepLevers]
    lever_errors: dict[tuple[str, str], float]
    notes: list[str] = field(default_factory=list)

    def plan(self, budget_bytes: int) -> StepPlan:
        step = plan_step(self.model, budget_bytes, lever_errors=self.lever_errors, options=self.options)
        step.notes += self.notes
        return step


def lever_floors(inputs: PlanInputs) -> dict[str, int]:
    """The smallest predicted whole-step peak (bytes) with each lever alone at its strongest, and with all of
    them together (the smallest feasible budget). Memory-sharing LayerNorm and fused attention are on in
    every row, as under a budget; rows for levers the run cannot use (micro-batching with an in-backward
    step, Tucker inputs for vanilla) are left out."""
    model = inputs.model
    dense = sum(next((c.cost_bytes for c in layer.candidates if c.rank is None), max(c.cost_bytes for c in layer.candidates))
                for layer in model.weight_layers)
    smallest = sum(min(c.cost_bytes for c in layer.candidates) for layer in model.weight_layers)
    most = max(o.micro_batches for o in inputs.options)

    def peak(levers: StepLevers, weights: int) -> int | None:
        return model.peak(levers, weights) if levers in inputs.options else None

    rows = {"none (exact forms only)": peak(StepLevers(), dense),
            f"micro-batching ({most} micro-batches)": peak(StepLevers(micro_batches=most), dense),
            "per-block recomputation": peak(StepLevers(recompute=True), dense),
            "2-bit activation codes": peak(StepLevers(activation="code2"), dense),
            "Tucker saved linear inputs": peak(StepLevers(linear_inputs="tucker"), dense),
            "low-rank weights (smallest ranks)": peak(StepLevers(), smallest)}
    rows["all together"] = min(v for v in (peak(o, smallest) for o in inputs.options) if v is not None)
    return {k: v for k, v in rows.items() if v is not None}


def memory_levers(model: nn.Module, batch_size: int, input_size, device: str = "cpu") -> dict[str, Any]:
    """`lever_floors` of `model` at `batch_size` (random inputs and labels) for WASI trained by SGD with
    momentum 0.9 (optimizer-step rule): what `analyze --levers` adds to the analyze document."""
    from wasi_compress.finetune.config import FinetuneConfig
    from wasi_compress.inputs import model_example
    from wasi_compress.passes.attention import ExplicitAttentionPass

    dense = copy.deepcopy(model).to(device)
    ExplicitAttentionPass()(dense)
    x = model_example(model, batch_size, device=device, input_size=tuple(input_size))
    with torch.no_grad():
        classes = int(dense.eval()(x[:1]).shape[-1])
    y = torch.randint(0, classes, (batch_size,), generator=torch.Generator().manual_seed(0)).to(device)
    config = FinetuneConfig(model="analyze", data="random", method="wasi", update="optimizer-step", batch_size=batch_size,
                            step_in_backward=False)  # micro-batches need the whole gradient
    return {"smallest_peak_bytes": lever_floors(plan_inputs_for(dense, config, x, y)),
            "optimizer": "SGD, momentum 0.9 (WASI, optimizer-step rule)",
            "source": "derived: the step planner's memory model (wasi_compress.step_plan) over activation terms "
                      "measured at three small micro-batch sizes"}


def predict_peak(dense: nn.Module, config, levers: StepLevers, x: Tensor, y: Tensor) -> StepPlan:
    """The memory model's prediction for one fixed step: `config`'s method at its thresholds (no planned
    ranks) with `levers` (the forms need not be the planner's: exact LayerNorm, attention as it is).
    Returns the plan of that one option, whose ``predicted`` holds the terms."""
    from wasi_compress.transforms.training import prepare_training_

    handle = prepare_training_(copy.deepcopy(dense), config.wasi_config(), example=x[:2])
    inputs = measure_plan_inputs(dense, handle.model, handle, config, x, y, options=[levers], ranks="as prepared",
                                 errors=False)
    return inputs.plan(1 << 62)


def measure_plan_inputs(dense: nn.Module, prepared: nn.Module, handle, config, x: Tensor, y: Tensor,
                        status=lambda _text: None, options: list[StepLevers] | None = None,
                        ranks: str = "planned", errors: bool = True) -> PlanInputs:
    """Measure what planning the step of `config` needs, for a model whose dense form is `dense` and whose
    `prepare_training_` form (at the configured thresholds) is `prepared`, with `handle` its handle;
    (x, y): the calibration batch; ``status(text)`` hears progress. Neither model is changed."""
    from wasi_compress.passes.training import BLOCK_ROLES

    from wasi_compress.frozen_storage import frozen_bytes, rounding_error

    blocks_ok = all(_is_module(prepared, b) for b in handle.blocks) and bool(handle.blocks)
    frozen_saving = frozen_bytes(prepared, handle.frozen)
    options = options if options is not None else _options(config, blocks_ok, config.method, frozen_saving)
    changed = {layer.name for layer in handle.layers if layer.module != "dense"}
    selected = [s for s in handle.capture.sites if s.kind == "module" and s.role in BLOCK_ROLES
                and block_in(s.name, handle.blocks) and (s.name in changed or config.method == "vanilla")]
    trained_by_optimizer = not (config.method == "wasi" and config.update == "subspace-iteration")
    copies = 1 + int(trained_by_optimizer) + state_copies(config)
    notes = [] if blocks_ok else ["per-block recomputation was not considered: the blocks are not modules of the model"]
    planned = {s.name for s in selected}
    fixed, fixed_grads = _fixed_bytes(prepared, planned, state_copies(config))
    _warm_compressors(prepared, x, y)
    fits, ends = _measure_forms(prepared, options, handle.blocks, config, x, y, status)
    model = StepModel(
        batch_size=config.batch_size, fixed_bytes=fixed, fixed_grad_bytes=fixed_grads,
        batch_bytes=config.batch_size * (x[0].numel() * x.element_size() + y.element_size()),
        weight_layers=tuple(_weight_layers(dense, selected, config.method, copies) if ranks == "planned"
                            else _prepared_layers(prepared, selected, copies)),
        grad_share=int(trained_by_optimizer) / copies, fits=fits, end_terms=ends,
        released_inputs_per_sample=_released_block_inputs(prepared, handle.blocks, x) if blocks_ok else 0,
        frozen_saving_bytes=frozen_saving)
    lever_errors = _lever_errors(dense, selected, handle.blocks, config, x, y) if errors else {}
    if errors and frozen_saving:
        lever_errors[("frozen_dtype", "bfloat16")] = rounding_error(prepared, handle.frozen)
    return PlanInputs(model, options, lever_errors, notes)


def _released_block_inputs(model: nn.Module, blocks: Sequence[str], x: Tensor) -> int:
    """Bytes per sample of the inputs of every block but the first to run (shapes seen in one forward of
    one sample): what per-block recomputation has freed when backward reaches the first block."""
    sizes: list[int] = []
    hooks = [model.get_submodule(b).register_forward_pre_hook(
        lambda _m, args: sizes.append(sum(a.numel() * a.element_size() for a in args if isinstance(a, Tensor))))
        for b in blocks]
    was_training = model.training
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model.eval()(x[:1])
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    return sum(sizes[1:])


def _is_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def _fixed_bytes(prepared: nn.Module, planned: set[str], state: int) -> tuple[int, int]:
    """Parameters and buffers outside the planned layers, with gradients and optimizer state of the trained
    ones; and the gradients alone."""
    total = grads = 0
    for name, module in prepared.named_modules():
        if name in planned or any(name.startswith(p + ".") for p in planned):
            continue
        for p in module.parameters(recurse=False):
            size = p.numel() * p.element_size()
            total += size * ((2 + state) if p.requires_grad else 1)
            grads += size if p.requires_grad else 0
        for b in module.buffers(recurse=False):
            total += b.numel() * b.element_size()
    return total, grads


def block_in(name: str, blocks: Sequence[str]) -> bool:
    """Whether module `name` lies inside one of the blocks (module qualnames; "" is the whole model)."""
    return any(b == "" or name == b or name.startswith(b + ".") for b in blocks)
