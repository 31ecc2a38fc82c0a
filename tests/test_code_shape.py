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


@pytest.mark.parametrize("job,transform", [("convert/job.py", "lowrank_"), ("finetune/job.py", "prepare_with_levers_"),
                                           ("finetune/memory_budget.py", "prepare_training_")])
def test_jobs_compose_the_transforms(job, transform):
    source = (ROOT / "wasi_compress" / job).read_text()
    assert f"{transform}(" in source


def test_every_package_folder_is_installed():
    """pyproject lists packages explicitly (passes/ and cli/ are mapped inside wasi_compress): a folder
    left out would be missing from a wheel although an editable install hides it."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"wasi_compress." + ".".join(p.parent.relative_to(ROOT / "wasi_compress").parts) if p.parent != ROOT / "wasi_compress"
             else "wasi_compress" for p in (ROOT / "wasi_compress").rglob("__init__.py")}
    found |= {"wasi_compress.passes", "wasi_compress.cli"}
    assert found == listed
