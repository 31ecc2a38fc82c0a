"""Configs of the transforms: dataclasses that validate themselves and round-trip through JSON.

They carry no file paths and no CLI wording. A bad value raises `ConfigError`, which names the field;
a job config that extends one (ConvertConfig, FinetuneConfig) maps the field to its command-line flag
through `label` so the CLI prints ``--budget: ...`` where the Python API prints ``budget: ...``."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

from wasi_compress.errors import UserError
from wasi_compress.modules.training import UPDATE_ALIASES, UPDATE_RULES, canonical_update

__all__ = ["ALL_ROLES", "BLOCK_ROLES", "ConfigError", "LowRankConfig", "TransformConfig", "UPDATE_ALIASES",
           "UPDATE_RULES", "WasiConfig", "canonical_update"]

ALL_ROLES = ("qkv", "q", "k", "v", "proj", "fc1", "fc2", "head", "other")
BLOCK_ROLES = ("qkv", "q", "k", "v", "proj", "fc1", "fc2")
METHODS = ("wasi", "asi", "vanilla")
OBJECTIVES = ("weight", "data")
CONV_CHOICES = ("auto", "always", "never")
ERROR_SCALES = ("auto", "layer", "model")
ALLOCATORS = ("dp", "greedy")
DTYPE_NAMES = ("float32", "float16", "bfloat16")
DEFAULT_THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99)


class ConfigError(UserError):
    """A config field holds a bad value; ``field`` names it."""

    def __init__(self, message: str, field_name: str):
        super().__init__(message)
        self.field = field_name


@dataclass
class TransformConfig:
    """Validation and JSON round trip shared by every config."""

    def label(self, name: str) -> str:
        """How an error names a field (job configs override this with the CLI flag)."""
        return name

    def fail(self, name: str, message: str) -> None:
        raise ConfigError(f"{self.label(name)}: {message}", name)

    def check_choice(self, name: str, options: Sequence[str]) -> None:
        if getattr(self, name) not in options:
            self.fail(name, f"expected one of {', '.join(options)}, got {getattr(self, name)!r}")

    def check_int(self, name: str, low: int) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            self.fail(name, f"expected an integer >= {low}, got {value!r}")

    def check_fraction(self, name: str, optional: bool = False) -> None:
        value = getattr(self, name)
        if optional and value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
            self.fail(name, f"must be in (0, 1], got {value!r}")
        setattr(self, name, float(value))

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            if f.init:
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        if not isinstance(data, dict):
            raise UserError(f"a {cls.__name__} must be a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"unknown {cls.__name__} setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**{k: tuple(v) if isinstance(v, list) and k in cls.tuple_fields else v for k, v in data.items()})

    @classmethod
    def from_json(cls, text: str):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UserError(f"{cls.__name__}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        return cls.from_dict(data)

    tuple_fields: ClassVar[tuple[str, ...]] = ()


@dataclass
class LowRankConfig(TransformConfig):
    """How `lowrank_` factors a model under a byte budget (see wasi_compress/transforms/lowrank.py).

    ``budget``: total bytes of all parameters of the result in ``dtype`` (a number, or text such as
    "50MB", "12MiB"). ``objective``: "weight" (relative Frobenius error, no data) or "data" (relative
    output error on calibration inputs, which `lowrank_` then needs). ``thresholds``: explained-variance
    thresholds whose ranks are candidates, beside ``rank_grid`` ranks up to break-even, rounded up to
    ``rank_multiple``. ``roles``: the linear roles that may change (the default filter). ``convs``: whether
    plain convolutions join the planner as low-rank convolutions ("auto": only when the linears alone
    cannot reach the budget; "always"; "never"). ``embeddings``:
    nn.Embedding tables are planner candidates too (low-rank E ~ A B). ``error_scale``: "layer" (each
    layer's relative error), "model" (rescaled to estimate the model output's relative error, measured
    on one calibration batch; needs objective "data"), or "auto" (model when an embedding is a
    candidate under the data objective, else layer); see transforms/_sensitivity.py."""

    budget: str | int
    dtype: str = "float32"
    allocator: str = "dp"
    objective: str = "weight"
    rank_multiple: int = 1
    rank_grid: int = 32
    thresholds: tuple[float, ...] = DEFAULT_THRESHOLDS
    roles: tuple[str, ...] = ALL_ROLES
    seed: int = 0
    convs: str = "auto"  # low-rank convolutions: "auto" (when linears alone cannot fit), "always", "never"
    embeddings: bool = True
    error_scale: str = "auto"
    budget_bytes: int = field(init=False, repr=False, compare=False)
    tuple_fields: ClassVar[tuple[str, ...]] = ("thresholds", "roles")

    def __post_init__(self):
        from wasi_compress.units import parse_bytes

        self.budget_bytes = parse_bytes(self.budget, self.label("budget"))
        self.check_choice("dtype", DTYPE_NAMES)
        self.check_choice("allocator", ALLOCATORS)
        self.check_choice("objective", OBJECTIVES)
        self.check_choice("convs", CONV_CHOICES)
        self.check_choice("error_scale", ERROR_SCALES)
        if self.error_scale == "model" and self.objective != "data":
            self.fail("error_scale", "model-scale errors are measured on calibration data: use objective 'data'")
        self.check_int("rank_multiple", 1)
        self.check_int("rank_grid", 0)
        self.check_int("seed", 0)
        if isinstance(self.thresholds, str):
            self.thresholds = tuple(t for t in self.thresholds.split(",") if t.strip())
        try:
            ths = tuple(sorted({float(t) for t in self.thresholds}))
        except (TypeError, ValueError):
            self.fail("thresholds", f"expected numbers in (0, 1], got {self.thresholds!r}")
        if any(not 0.0 < t <= 1.0 for t in ths):  # also refuses nan
            self.fail("thresholds", f"every threshold must be in (0, 1], got {', '.join(map(str, ths))}")
        self.thresholds = ths
        self.roles = _roles(self, self.roles)


@dataclass
class WasiConfig(TransformConfig):
    """How `prepare_training_` makes a model trainable in low memory.

    ``method``: "wasi" (weights trained in their subspace, L and R only, at the rank explaining
    ``threshold`` of each weight's energy; saved inputs Tucker-compressed at ``activation_threshold``),
    "asi" (dense weights, compressed saved inputs) or "vanilla" (nothing changes). ``update``:
    "optimizer-step" (your optimizer steps L and R; the handle re-orthonormalises after each step) or
    "subspace-iteration" (the paper's rule inside backward: plain SGD at the optimizer's learning rate
    once the handle is attached). ``activation_threshold=None`` keeps saved inputs exact.
    ``activation_budget`` (bytes, or text such as "20MB"): plan each layer's Tucker ranks under it
    instead (exact DP over ``calibration_thresholds`` candidates on a labelled calibration batch).
    ``finetune_last``: train only the last N blocks, freeze what runs before them. ``roles``: the roles
    that get training modules (the default filter). A model with no linear in a block whose 1x1
    convolutions are its MLPs gets them computed as linears (modules/pointwise.py). ``allow_unchanged``:
    a wasi or asi run that would replace no layer is refused (it would train as vanilla) unless set."""

    method: str = "wasi"
    update: str = "optimizer-step"
    threshold: float = 0.6   # the command's defaults (wasi_compress/finetune/config.py says why)
    activation_threshold: float | None = 0.98
    activation_budget: str | int | None = None
    calibration_thresholds: tuple[float, ...] = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
    finetune_last: int | None = None
    roles: tuple[str, ...] = BLOCK_ROLES
    # the subspace-iteration rule's SGD settings until an optimizer is attached (it then follows that one's)
    lr: float = 0.05
    weight_decay: float = 0.0
    allow_unchanged: bool = False  # wasi/asi that would replace no layer: an error unless this is set
    tuple_fields: ClassVar[tuple[str, ...]] = ("roles", "calibration_thresholds")

    @property
    def activation_budget_bytes(self) -> int | None:
        from wasi_compress.units import parse_bytes

        return None if self.activation_budget is None else parse_bytes(self.activation_budget, self.label("activation_budget"))

    def __post_init__(self):
        self.check_choice("method", METHODS)
        if isinstance(self.update, str):
            self.update = canonical_update(self.update)
        self.check_choice("update", UPDATE_RULES)
        self.check_fraction("threshold")
        self.check_fraction("activation_threshold", optional=True)
        if self.finetune_last is not None:
            self.check_int("finetune_last", 1)
        for name in ("lr", "weight_decay"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 \
                    or (name == "lr" and value == 0):
                self.fail(name, f"must be a {'positive' if name == 'lr' else 'non-negative'} number, got {value!r}")
        self.roles = _roles(self, self.roles)
        if self.activation_budget is not None:
            self.activation_budget_bytes  # noqa: B018  (validates: raises UserError on bad input)
            if self.method == "vanilla":
                self.fail("activation_budget", "needs method wasi or asi: vanilla keeps exact activations")
        ths = tuple(self.calibration_thresholds)
        if not ths or any(isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < t <= 1.0 for t in ths):
            self.fail("calibration_thresholds", f"must be numbers in (0, 1], got {list(ths)}")
        self.calibration_thresholds = tuple(float(t) for t in ths)


def _roles(config: TransformConfig, roles) -> tuple[str, ...]:
    roles = (roles,) if isinstance(roles, str) else tuple(roles)
    bad = [r for r in roles if r not in ALL_ROLES]
    if bad or not roles:
        config.fail("roles", f"expected roles among {', '.join(ALL_ROLES)}, got {list(roles)!r}")
    return roles
