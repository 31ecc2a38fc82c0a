"""Byte quantities as users write them: '50MB', '1.5 GiB', '1024'."""

from __future__ import annotations

import math
import re

from wasi_compress.errors import UserError

_UNITS = {
    "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str | int | float, what: str = "budget") -> int:
    """Parse a byte size. Units B, KB, MB, GB are powers of 1000; KiB, MiB, GiB powers of 1024;
    case-insensitive; a bare number is bytes. Zero, negative, infinite, NaN or malformed -> UserError."""
    if isinstance(text, bool):
        raise UserError(f"{what}: expected a size such as 50MB, got {text!r}")
    if isinstance(text, (int, float)):
        value, unit = float(text), "b"
    else:
        s = str(text).strip()
        if s.lower() in {"nan", "inf", "+inf", "-inf", "infinity"} or s.startswith("-"):
            raise UserError(f"{what}: {text!r} is not a positive finite size; use e.g. 50MB or 12MiB")
        m = _PATTERN.match(s)
        if not m:
            raise UserError(f"{what}: cannot read {text!r}; use a number with B, KB, MB, GB, KiB, MiB or GiB (e.g. 50MB)")
        value, unit = float(m.group(1)), (m.group(2) or "b").lower()
        if unit not in _UNITS:
            raise UserError(f"{what}: unknown unit {m.group(2)!r} in {text!r}; use B, KB, MB, GB, KiB, MiB or GiB")
    if not math.isfinite(value) or value <= 0:
        raise UserError(f"{what}: {text!r} is not a positive finite size; use e.g. 50MB or 12MiB")
    n = int(math.floor(value * _UNITS[unit]))
    if n <= 0:
        raise UserError(f"{what}: {text!r} is less than one byte")
    return n


def format_bytes(n: int | float) -> str:
    """Human-readable bytes in powers of 1000 (matching how budgets are usually written)."""
    n = float(n)
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"
