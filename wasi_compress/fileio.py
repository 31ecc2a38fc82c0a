"""Atomic output files: write to a temporary file beside the target, then rename over it, so an
interrupted or failed command never leaves a half-written output behind."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path in the target's folder; on success rename it to `path`, on error delete it."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    from wasi_compress.outputs import keep_default_permissions, remove_stale_temporaries, temp_prefix

    remove_stale_temporaries(target)  # left by a writer that was killed
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(target), suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        keep_default_permissions(tmp_path)
        os.replace(tmp_path, target)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def strict_json(document: Any) -> Any:
    """The document with every float that is not a finite number (NaN, inf) replaced by None, so that it
    serialises as strict JSON (null); json.dumps would otherwise write NaN, which JSON parsers refuse."""
    if isinstance(document, float):
        return document if math.isfinite(document) else None
    if isinstance(document, dict):
        return {key: strict_json(value) for key, value in document.items()}
    if isinstance(document, (list, tuple)):
        return [strict_json(value) for value in document]
    return document


def write_json(path: str | os.PathLike, document: Any) -> None:
    """Write a JSON document atomically; '-' writes to stdout. Only strict JSON: a value that is not a
    finite number is written as null."""
    text = json.dumps(strict_json(document), indent=2, sort_keys=False, allow_nan=False) + "\n"
    if str(path) == "-":
        import sys

        sys.stdout.write(text)
        sys.stdout.flush()
        return
    write_text_atomic(path, text)
