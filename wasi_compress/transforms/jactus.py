"""`jactus_`: joint compression and adaptation (JACTUS, METHOD.md section 7) as a transform, in place.

    plan = jactus_(model, JactusConfig(retain=0.8), calib=[(x, y), ...])
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
    ...  your loop: only the cores C, the biases and the layers left dense train ...
    save(model, "m.safetensors")   # loads back with wasi_compress.load, no calibration, no planning

Steps: (1) C_x and C_g of every selected linear over the calibration batches (hooks, one backward a
batch; wasi_compress.jactus.stats), shrunk toward a scaled identity (Ledoit-Wolf); (2) per layer, one
candidate per energy level of ``levels`` (alpha = beta = gamma = the level: one knob per layer, so a
layer's candidates are nested unions), each with its parameter count and captured task energy
(wasi_compress.jactus.bases); candidates above the dense layer's parameter count are dropped (the
smallest is always kept); (3) ranks across layers by the budgeted maximum-coverage greedy, with the
exact DP on the same candidates as a cross-check (both reported; ``allocator`` says which is applied;
wasi_compress.jactus.allocate); (4) every selected nn.Linear becomes a JactusLinear with C = Q_L^T W Q_R.

The budget: ``retain`` (a fraction, or text such as "80%") of the model's stored parameter count (every
tensor of its state dict, as a checkpoint holds them), or ``budget`` (bytes of all of them in float32,
as convert's --budget). The layers that stay dense are paid for first; the rest is the JACTUS layers'
share. Without either, each layer takes the fixed thresholds ``alpha``, ``beta``, ``gamma``."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from wasi_compress.errors import UserError
from wasi_compress.transforms.config import BLOCK_ROLES, TransformConfig, _roles

__all__ = ["JactusConfig", "JactusPlan", "jactus_", "parse_retain"]

ALLOCATORS = ("greedy", "dp")
DEFAULT_LEVELS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9, 0.925, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999)
FLOAT_BYTES = 4  # budgets in bytes count float32 tensors, as checkpoints store them


def parse_retain(value: Any, what: str = "retain") -> float:
    """A retained fraction in (0, 1] from 0.8, "0.8" or "80%"; anything else raises one UserError line."""
    text = str(value).strip()
    try:
        fraction = float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        raise UserError(f"{what}: expected a fraction such as 0.8 or a percentage such as 80%, got {value!r}") from None
    if isinstance(value, bool) or not 0.0 < fraction <= 1.0:  # also refuses nan
        raise UserError(f"{what}: must be in (0, 100%], got {value!r}")
    return fraction


@dataclass
class JactusConfig(TransformConfig):
    """How `jactus_` compresses and prepares a model (see the module docstring)."""

    retain: float | str | None = 0.8
    budget: str | int | None = None
    alpha: float = 0.9
    beta: float = 0.9
    gamma: float = 0.9
    levels: tuple[float, ...] = DEFAULT_LEVELS
    allocator: str = "greedy"
    roles: tuple[str, ...] = BLOCK_ROLES
    tuple_fields: ClassVar[tuple[str, ...]] = ("levels", "roles")

    def __post_init__(self):
        if self.retain is not None and self.budget is not None:
            self.fail("retain", "give retain or budget, not both")
        if self.retain is not None:
            self.retain = parse_retain(self.retain, self.label("retain"))
        self.budget_bytes  # noqa: B018  (validates)
        for name in ("alpha", "beta", "gamma"):
            self.check_fraction(name)
        self.check_choice("allocator", ALLOCATORS)
        try:
            levels = tuple(sorted({float(t) for t in self.levels}))
        except (TypeError, ValueError):
            self.fail("levels", f"expected numbers in (0, 1], got {self.levels!r}")
        if not levels or any(not 0.0 < t <= 1.0 for t in levels):
            self.fail("levels", f"every level must be in (0, 1], got {list(levels)}")
        self.levels = levels
        self.roles = _roles(self, self.roles)

    @property
    def budget_bytes(self) -> int | None:
        from wasi_compress.units import parse_bytes

        return None if self.budget is None else parse_bytes(self.budget, self.label("budget"))


@dataclass
class JactusPlan:
    """What `jactus_` chose: per layer the candidates and the chosen one; the greedy and DP allocations."""

    layers: list[dict[str, Any]]
    original_params: int
    budget_params: int | None
    result_params: int
    greedy: dict[str, Any] | None = None
    dp: dict[str, Any] | None = None
    applied: str = "thresholds"
    calibration_rows: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def ranks(self) -> dict[str, tuple[int, int]]:
        return {layer["name"]: (layer["chosen"]["k_left"], layer["chosen"]["k_right"]) for layer in self.layers}

    def summary(self) -> dict[str, Any]:
        """The plan without its candidate lists (for checkpoint metadata)."""
        keep = ("name", "role", "out_features", "in_features", "chosen")
        return {**self.to_dict(), "layers": [{k: layer[k] for k in keep if k in layer} for layer in self.layers]}

    def to_dict(self) -> dict[str, Any]:
        return {"layers": self.layers, "original_params": self.original_params, "budget_params": self.budget_params,
                "result_params": self.result_params, "retained": self.result_params / self.original_params,
                "greedy": self.greedy, "dp": self.dp, "applied": self.applied,
                "calibration_rows": self.calibration_rows, "notes": self.notes}


def stored_params(model: nn.Module) -> int:
    """Elements of the tensors a checkpoint of `model` stores (shared tensors once)."""
    from wasi_compress.checkpoint import stored_bytes

    return stored_bytes(model, torch.float32) // FLOAT_BYTES


def jactus_(model: nn.Module, config: JactusConfig | None = None, *, calib: Iterable[tuple[Tensor, Tensor]],
            example: Tensor | None = None, loss_fn: Callable | None = None,
            filter_fn: Callable[[nn.Module, str], bool] | None = None) -> JactusPlan:
    """Replace, IN PLACE, the selected linears of `model` by JactusLinear layers and return the plan.

    ``calib``: (inputs, labels) batches of the target task (a list; it is read once). ``filter_fn(module,
    fqn)`` chooses the linears (default: nn.Linear modules whose role is in ``config.roles``)."""
    from wasi_compress.jactus.stats import collect_statistics
    from wasi_compress.passes.capture import capture

    config = config or JactusConfig()
    if not isinstance(config, JactusConfig):
        raise TypeError(f"config must be a JactusConfig, got {type(config).__name__}")
    batches = list(calib)
    if not batches:
        raise UserError("JACTUS needs calibration batches of the target task: pass calib=[(inputs, labels), ...]")
    cap = capture(model, example if example is not None else batches[0][0][:2])
    modules = {}
    for site in cap.sites:
        m = model.get_submodule(site.name) if site.kind == "module" else None
        chosen = filter_fn(m, site.name) if filter_fn is not None else site.role in config.roles
        if type(m) is nn.Linear and chosen:
            modules[site.name] = m
    if not modules:
        raise UserError(f"JACTUS found no nn.Linear module with a role among {', '.join(config.roles)} to compress")
    original = stored_params(model)
    stats = collect_statistics(model, modules, batches, loss_fn)
    _check_rows(stats)
    spectra, rhos = _spectra(modules, stats)
    layers = [_layer_record(name, cap, modules[name], spectra[name], rhos[name]) for name in modules]
    plan = _choose(config, modules, spectra, layers, original)
    plan.calibration_rows = min(s[0].rows for s in stats.values())
    for layer in plan.layers:
        _replace(model, layer["name"], modules[layer["name"]], spectra[layer["name"]], layer["chosen"])
    plan.result_params = stored_params(model)
    return plan


def _check_rows(stats) -> None:
    """Each covariance needs at least as many rows (tokens) as it has features: with fewer, C_x or C_g is
    rank deficient and its top eigenvectors fit the few samples, not the task."""
    for name, (cx, cg, _) in stats.items():
        for moment, what in ((cx, "input"), (cg, "output-gradient")):
            if moment.rows < moment.features:
                raise UserError(f"the calibration set is too small for JACTUS: {moment.rows} rows (samples x tokens) "
                                f"reach {name}, fewer than the {moment.features} features of its {what} covariance; "
                                "give more calibration batches (--calib-batches) or a larger --batch-size")


def _spectra(modules, stats):
    from wasi_compress.jactus.bases import LayerSpectra
    from wasi_compress.jactus.stats import shrunk

    spectra, rhos = {}, {}
    for name, m in modules.items():
        c_x, rho_x = shrunk(stats[name][0])
        c_g, rho_g = shrunk(stats[name][1])
        spectra[name] = LayerSpectra(m.weight, c_x, c_g, stats[name][2], m.bias is not None)
        rhos[name] = (rho_x, rho_g)
    return spectra, rhos


def _layer_record(name, cap, m, spectra, rhos) -> dict[str, Any]:
    role = next((s.role for s in cap.sites if s.name == name), "other")
    return {"name": name, "role": role, "out_features": m.out_features, "in_features": m.in_features,
            "dense_params": spectra.dense_params, "shrinkage_x": rhos[0], "shrinkage_g": rhos[1]}


def _candidates(config: JactusConfig, spectra) -> list:
    """One candidate per level, duplicates and those above the dense count dropped (the smallest kept)."""
    seen, out = set(), []
    for level in config.levels:
        choice = spectra.choice(level)
        key = (choice.k_w, choice.k_i, choice.k_o)
        if key in seen:
            continue
        seen.add(key)
        if choice.params <= spectra.dense_params or not out:
            out.append(choice)
    return out


def _choose(config: JactusConfig, modules, spectra, layers, original: int) -> JactusPlan:
    from wasi_compress.jactus.allocate import allocate_dp, allocate_greedy

    if config.retain is None and config.budget is None:
        for layer in layers:
            layer["chosen"] = spectra[layer["name"]].choice(config.alpha, config.beta, config.gamma).to_dict()
        return JactusPlan(layers, original, None, 0)
    total = int(config.retain * original) if config.retain is not None else config.budget_bytes // FLOAT_BYTES
    kept = original - sum(layer["dense_params"] for layer in layers)  # what stays dense is paid for first
    cands = {layer["name"]: _candidates(config, spectra[layer["name"]]) for layer in layers}
    costs = [[c.params for c in cands[layer["name"]]] for layer in layers]
    gains = [[c.task_energy for c in cands[layer["name"]]] for layer in layers]
    budget = total - kept
    floor = sum(min(c) for c in costs)
    if budget < floor:
        what = f"--retain {config.retain:.0%}" if config.retain is not None else f"--budget {config.budget}"
        raise UserError(f"{what} is below what JACTUS can reach: the layers it keeps dense need {kept:,} parameters and "
                        f"its smallest candidates {floor:,}, so the smallest feasible retained share is "
                        f"{(kept + floor) / original:.1%} ({(kept + floor) * FLOAT_BYTES:,} bytes)")
    greedy, dp = allocate_greedy(costs, gains, budget), allocate_dp(costs, gains, budget)
    applied = greedy if config.allocator == "greedy" else dp
    for layer, j, j_dp in zip(layers, applied.choices, dp.choices):
        options = cands[layer["name"]]
        layer["chosen"] = options[j].to_dict()
        layer["dp_choice"] = options[j_dp].to_dict()
        layer["candidates"] = [{"level": c.thresholds[0], "params": c.params, "task_energy": c.task_energy}
                               for c in options]
    return JactusPlan(layers, original, total, 0, greedy.to_dict(), dp.to_dict(), applied.allocator)


def _replace(model: nn.Module, name: str, linear: nn.Linear, spectra, chosen: dict[str, Any]) -> None:
    from wasi_compress.marks import copy_marks, mark_module
    from wasi_compress.modules.jactus import JactusLinear

    q_left, q_right = spectra.bases(chosen["k_w"], chosen["k_i"], chosen["k_o"])
    new = JactusLinear.from_linear(linear, q_left.to(torch.float32), q_right.to(torch.float32))
    copy_marks(linear, new)
    model.set_submodule(name, mark_module(new, "jactus", site=name, kind="module", origin="linear"))
