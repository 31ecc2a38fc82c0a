"""CI compression gates: read a report, compare its figures with limits, and say which gates pass.

Everything here works on plain dicts (the JSON reports of docs/schemas.md) and returns plain data, so
the command line, tests and other tools share one definition of what a gate means; rendering (tables,
JUnit, Markdown) lives in the `check` command.

A gate never passes by default: a gate whose figure the report does not record is an error, because a
CI job that silently skips a check it was asked for would let a regression through."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from wasi_compress.errors import UserError
from wasi_compress.reports import ANALYZE_SCHEMA as ANALYZE  # the schema strings are defined in reports
from wasi_compress.reports import CHECK_SCHEMA as CHECK
from wasi_compress.reports import CONVERT_SCHEMA as CONVERT
from wasi_compress.reports import FINETUNE_SCHEMA as FINETUNE
from wasi_compress.reports import REPORT_SCHEMAS
from wasi_compress.units import parse_bytes

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, published as tomli
    import tomli as tomllib


@dataclass(frozen=True)
class Figure:
    """One quantity a gate can look at, and where each report kind keeps it (a dotted key path)."""

    name: str
    unit: str  # "bytes", "count", "fraction" or "number": how the value is read and shown
    keys: Mapping[str, str]


FIGURES = {
    "size": Figure("size", "bytes", {
        CONVERT: "total_bytes", ANALYZE: "totals.weight_bytes", FINETUNE: "memory.params_bytes"}),
    "params": Figure("params", "count", {ANALYZE: "totals.params", CONVERT: "params.converted"}),
    "flops": Figure("flops", "count", {ANALYZE: "totals.flops", CONVERT: "flops.converted"}),
    "train-memory": Figure("train-memory", "bytes", {
        ANALYZE: "totals.train_memory.total_bytes", FINETUNE: "memory.peak_bytes"}),
    "accuracy": Figure("accuracy", "fraction", {CONVERT: "accuracy.converted", FINETUNE: "final.accuracy"}),
    "onnx-diff": Figure("onnx-diff", "number", {CONVERT: "onnx.max_abs_diff"}),
}

# Absolute gates: option/config key -> (figure, direction). "max" passes when actual <= limit.
ABSOLUTE_GATES = {
    "max-size": ("size", "max"),
    "max-params": ("params", "max"),
    "max-flops": ("flops", "max"),
    "max-train-memory": ("train-memory", "max"),
    "min-accuracy": ("accuracy", "min"),
    "max-onnx-diff": ("onnx-diff", "max"),
}
# Figures compared with --baseline, and the direction in which they get worse.
REGRESSION_FIGURES = {"size": "max", "train-memory": "max", "accuracy": "min"}


# ---------------------------------------------------------------------------------------------------
# Reading limits (shared by the command line and the configuration files)

_COUNT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kKmMgGtT]?)\s*$")
_COUNT_SCALE = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UserError(f"{what}: expected a number, got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise UserError(f"{what}: cannot read {value!r} as a number") from None
    if not math.isfinite(number) or number < 0:
        raise UserError(f"{what}: {value!r} is not a finite number >= 0")
    return number


def parse_count(value: Any, what: str) -> int | float:
    """A parameter or FLOP count: a plain number (86e6) or one with K, M, G or T (powers of 1000), because
    FLOP counts are usually quoted as '17.6G'."""
    if isinstance(value, str):
        m = _COUNT.match(value)
        if not m:
            raise UserError(f"{what}: cannot read {value!r}; use a number such as 86e6 or 17.6G (K, M, G, T)")
        count = _number(m.group(1), what) * _COUNT_SCALE[m.group(2).lower()]
    else:
        count = _number(value, what)
    return int(count) if count.is_integer() else count  # JSON output shows 5000, not 5000.0


def parse_fraction(value: Any, what: str) -> float:
    """An accuracy. Reports store accuracy as a fraction in [0, 1]; '75%' is accepted too, and 75 is refused
    rather than read as a gate nothing can pass."""
    if isinstance(value, str) and value.strip().endswith("%"):
        fraction = _number(value.strip()[:-1], what) / 100
    else:
        fraction = _number(value, what)
    if fraction > 1:
        raise UserError(f"{what}: {value!r} is above 1; accuracy is a fraction in [0, 1] (write 0.75 or 75%)")
    return fraction


def _path(value: Any, what: str) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise UserError(f"{what}: expected a path to a report, got {value!r}")
    return Path(value)


_PARSERS: dict[str, Callable[[Any, str], Any]] = {
    "max-size": parse_bytes,
    "max-params": parse_count,
    "max-flops": parse_count,
    "max-train-memory": parse_bytes,
    "min-accuracy": parse_fraction,
    "max-onnx-diff": _number,
    "baseline": _path,
    "max-regression": _number,
}
SETTING_KEYS = tuple(_PARSERS)


@dataclass(frozen=True)
class Limits:
    """The gates asked for. None means 'not asked for'; the field names are the setting keys with '_'."""

    max_size: int | None = None
    max_params: float | None = None
    max_flops: float | None = None
    max_train_memory: int | None = None
    min_accuracy: float | None = None
    max_onnx_diff: float | None = None
    baseline: Path | None = None
    max_regression: float | None = None

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> "Limits":
        return cls(**{key.replace("-", "_"): value for key, value in settings.items()})

    def get(self, key: str) -> Any:
        return getattr(self, key.replace("-", "_"))

    def is_empty(self) -> bool:
        return all(getattr(self, f.name) is None for f in fields(self))


def parse_settings(raw: Mapping[str, Any], where: str | None = None) -> dict[str, Any]:
    """Typed settings from raw key -> value pairs: TOML values from the file `where`, or command-line
    strings when `where` is None (errors then name the option, --max-size). Unknown keys are an error, so a
    typo such as `max_size` cannot silently drop a gate."""
    unknown = sorted(set(raw) - set(_PARSERS))
    if unknown:
        raise UserError(f"{where}: unknown gate key(s) {', '.join(unknown)}; known keys: {', '.join(SETTING_KEYS)}")
    return {key: _PARSERS[key](value, f"{where}: {key}" if where else f"--{key}")
            for key, value in raw.items() if value is not None}


# ---------------------------------------------------------------------------------------------------
# Configuration files

CONFIG_NAME = "wasi-compress.toml"


def _gates_table(path: Path) -> dict[str, Any] | None:
    """The gates table of a TOML file: `[gates]` in wasi-compress-style files, `[tool.wasi-compress.gates]`
    in pyproject.toml. None when the file has no such table."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"cannot read gate configuration {path}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid TOML ({exc})") from None
    if path.name == "pyproject.toml":
        table = document.get("tool", {}).get("wasi-compress", {}).get("gates")
        name = "[tool.wasi-compress.gates]"
    else:
        table, name = document.get("gates"), "[gates]"
    if table is not None and not isinstance(table, dict):
        raise UserError(f"{path}: {name} must be a table")
    return table


def find_config(start: Path) -> Path | None:
    """The nearest configuration with a gates table: wasi-compress.toml (a `[gates]` table), then
    pyproject.toml (`[tool.wasi-compress.gates]`), in `start` and its parents up to the enclosing git root.
    Files without the table are passed over, so an unrelated pyproject.toml does not hide one further up."""
    for directory in (start.resolve(), *start.resolve().parents):
        for name in (CONFIG_NAME, "pyproject.toml"):
            candidate = directory / name
            if candidate.is_file() and _gates_table(candidate) is not None:
                return candidate
        if (directory / ".git").exists():
            return None
    return None


def load_config(path: Path) -> dict[str, Any]:
    """Typed settings from a configuration file. A relative `baseline` is relative to the file's folder,
    because the file may be found in a parent of the current directory."""
    table = _gates_table(path)
    if table is None:
        expected = "[tool.wasi-compress.gates]" if path.name == "pyproject.toml" else "[gates]"
        raise UserError(f"{path}: no {expected} table")
    settings = parse_settings(table, str(path))
    if "baseline" in settings and not settings["baseline"].is_absolute():
        settings["baseline"] = path.parent / settings["baseline"]
    return settings


# ---------------------------------------------------------------------------------------------------
# Reports

def validate_report(document: Any, where: str) -> str:
    """The report's schema; anything that is not a report this version knows is an error (a reader must
    refuse a schema it does not know)."""
    if not isinstance(document, dict):
        raise UserError(f"{where}: not a wasi-compress report (expected a JSON object)")
    schema = document.get("schema")
    if schema is None:
        raise UserError(f"{where}: no \"schema\" key; expected a report of analyze, convert or finetune")
    if schema not in REPORT_SCHEMAS:
        raise UserError(f"{where}: unknown schema {schema!r}; expected one of {', '.join(REPORT_SCHEMAS)}")
    return schema


def load_report(path: Path) -> dict:
    """Read and validate a JSON report."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"report not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read report {path}: {exc}") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    except (ValueError, RecursionError) as exc:  # an integer of thousands of digits, arrays nested too deep
        reason = (str(exc).split(";")[0].splitlines() or ["nested too deeply"])[0][:120]
        raise UserError(f"{path}: not a report this tool can read ({type(exc).__name__}: {reason})") from None
    validate_report(document, str(path))
    return document


class _Missing(Exception):
    """A figure the report does not record; turned into one UserError naming every gate affected."""


def figure_value(document: dict, figure: str, where: str = "the report") -> tuple[float, str]:
    """(value, dotted key) of a figure in a report. Raises _Missing when the report kind has no such figure
    or the key is absent, null or not a number, and UserError (naming `where`) when the value is one no
    measurement gives: infinite, too large for a float, or an accuracy outside [0, 1]. NaN is read (a
    gate on it fails: it is a measurement that went wrong) except for accuracy."""
    schema = document["schema"]
    spec = FIGURES[figure]
    key = spec.keys.get(schema)
    if key is None:
        where = ", ".join(f"{s.split('/')[1]} {k}" for s, k in spec.keys.items())
        raise _Missing(f"a {schema} report has no {figure} figure (it is in: {where})")
    value: Any = document
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        raise _Missing(f"missing key {key}" + ("" if _absent(document, key) else " (it is null: not a number)"))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Missing(f"key {key} is {repr(value)[:60]}, not a number")
    _check_figure(value, key, spec.unit, where)
    return value, key


def _absent(document: dict, key: str) -> bool:
    *parents, last = key.split(".")
    for part in parents:
        document = document.get(part) if isinstance(document, dict) else None
    return not isinstance(document, dict) or last not in document


def _check_figure(value: int | float, key: str, unit: str, where: str) -> None:
    try:
        number = float(value)
    except OverflowError:
        raise UserError(f"{where}: key {key} is an integer of about {int(value.bit_length() * 0.30103) + 1} digits, "
                        "too large to be a measurement") from None
    if math.isinf(number):
        raise UserError(f"{where}: key {key} is {number}, not a finite number")
    if unit == "fraction" and not 0 <= number <= 1:
        raise UserError(f"{where}: key {key} is {value!r}, not an accuracy (a fraction in [0, 1])")


@dataclass(frozen=True)
class GateResult:
    name: str  # the setting key, or "<figure>-regression"
    figure: str
    key: str  # where the actual value was read in the report
    unit: str
    direction: str  # "max": passes when actual <= limit; "min": passes when actual >= limit
    actual: float
    limit: float
    baseline: float | None = None  # the baseline's value, for regression gates

    @property
    def passed(self) -> bool:
        # Written so that NaN fails: every comparison with NaN is False.
        return self.actual <= self.limit if self.direction == "max" else self.actual >= self.limit

    def to_json(self) -> dict:
        out = {"name": self.name, "figure": self.figure, "key": self.key, "unit": self.unit,
               "comparison": "<=" if self.direction == "max" else ">=",
               "actual": self.actual, "limit": self.limit, "passed": self.passed}
        if self.baseline is not None:
            out["baseline"] = self.baseline
        return out


@dataclass(frozen=True)
class CheckResult:
    target: str
    schema: str
    gates: list[GateResult]
    baseline: str | None = None
    notes: list[str] = field(default_factory=list)  # regression figures not compared, and why

    @property
    def passed(self) -> bool:
        return all(g.passed for g in self.gates)

    def to_json(self) -> dict:
        """The `wasi-compress/check/1` document."""
        return {"schema": CHECK, "target": self.target, "report_schema": self.schema, "baseline": self.baseline,
                "passed": self.passed, "gates": [g.to_json() for g in self.gates], "notes": self.notes}


def regression_limit(baseline: float, pct: float, direction: str) -> float:
    """Sizes and memory may grow by pct percent of the baseline; accuracy may drop by pct percent of the
    baseline (relative: 0.90 with 2% allows down to 0.882, not 0.88)."""
    return baseline * (1 + pct / 100) if direction == "max" else baseline * (1 - pct / 100)


def evaluate(report: dict, limits: Limits, *, target: str, baseline: dict | None = None,
             baseline_name: str | None = None) -> CheckResult:
    """Every gate asked for in `limits`, applied to `report` (and `baseline` for regression gates).

    Regression gates compare each of size, train memory and accuracy that the baseline records and the
    report's kind can record (an analyze baseline has train memory, a convert report never does: that
    pair is noted, not failed); a report whose kind records the figure but lacks it is an error.

    Raises UserError when no gate is asked for, when --baseline and --max-regression do not come
    together, or when a figure is missing (all missing figures in one line)."""
    if limits.is_empty():
        raise UserError("no gates given: pass --max-size, --max-params, --max-flops, --max-train-memory, "
                        "--min-accuracy, --max-onnx-diff or --baseline with --max-regression, or put them in a "
                        f"[gates] table of {CONFIG_NAME} (or [tool.wasi-compress.gates] in pyproject.toml)")
    if (limits.max_regression is None) != (baseline is None):
        raise UserError("--baseline and --max-regression (baseline and max-regression in a configuration file) "
                        "go together: give both or neither")
    results: list[GateResult] = []
    problems: list[str] = []
    for name, (figure, direction) in ABSOLUTE_GATES.items():
        limit = limits.get(name)
        if limit is None:
            continue
        try:
            actual, key = figure_value(report, figure, target)
        except _Missing as exc:
            problems.append(f"gate {name}: {exc}")
            continue
        results.append(GateResult(name, figure, key, FIGURES[figure].unit, direction, actual, limit))
    notes: list[str] = []
    if baseline is not None:
        for figure, direction in REGRESSION_FIGURES.items():
            name = f"{figure}-regression"
            try:
                reference, _ = figure_value(baseline, figure, f"baseline {baseline_name}")
            except _Missing:
                notes.append(f"{name} not checked: the baseline does not record {figure}")
                continue
            if report["schema"] not in FIGURES[figure].keys:
                notes.append(f"{name} not checked: a {report['schema']} report does not record {figure}")
                continue
            try:
                actual, key = figure_value(report, figure, target)
            except _Missing as exc:
                problems.append(f"gate {name}: {exc} (the baseline records it)")
                continue
            limit = regression_limit(reference, limits.max_regression, direction)
            results.append(GateResult(name, figure, key, FIGURES[figure].unit, direction, actual, limit, reference))
        if not any(r.baseline is not None for r in results) and not problems:
            problems.append(f"baseline {baseline_name}: shares none of size, train-memory, accuracy with the report")
    if problems:
        raise UserError(f"{target}: " + "; ".join(problems))
    return CheckResult(target, report["schema"], results, baseline_name, notes)
