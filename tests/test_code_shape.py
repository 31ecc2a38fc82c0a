"""The shape the architecture promises: library functions small enough to read in one sitting, and the
finetune/convert jobs built on the public transforms."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LIBRARY = [p for folder in ("wasi_compress", "passes", "cli") for p in sorted((ROOT / folder).rglob("*.py"))]
MAX_FUNCTION_LINES = 60


@pytest.mark.parametrize("path", LIBRARY, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_library_function_is_over_60_lines(path):
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
            for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, long


@pytest.mark.parametrize("job,transform", [("convert/job.py", "lowrank_"), ("finetune/job.py", "prepare_training_")])
def test_jobs_compose_the_transforms(job, transform):
    source = (ROOT / "wasi_compress" / job).read_text()
    assert f"{transform}(" in source
