"""Shared fixtures. `import wasi_compress` comes first: it installs the torchvision import shim that timm
needs on the CPU build of torch, so it must run before anything imports timm.

Tests marked ``@pytest.mark.slow`` (more than about a second: a whole job, a subprocess, a base-width
model, an ONNX export) are left out of ``make test-fast`` (``pytest -m "not slow"``, under 30 s);
``make test`` runs them all."""

import wasi_compress  # noqa: F401  (first: before timm)

import sys
from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner, Result

TESTS_DIR = Path(__file__).resolve().parent
ROOT = TESTS_DIR.parent


@pytest.fixture
def vit_models(monkeypatch):
    """The test models of tests/vit_models.py (every one is listed, with what to expect of it, in
    tests/models.py), importable as ``vit_models`` so that MODEL arguments such as
    ``vit_models:functional_head_vit`` and ``convert_models:hand_vit`` resolve (pytest runs with
    --import-mode=importlib, which does not put the tests folder on sys.path)."""
    monkeypatch.syspath_prepend(str(TESTS_DIR))
    import vit_models

    return vit_models


@pytest.fixture
def cli(vit_models) -> Callable[..., Result]:
    """Run `wasi-compress ARGS...` in-process with click's CliRunner (stdout and stderr kept apart)."""
    from wasi_compress.cli.main import main

    def run(*args) -> Result:
        return CliRunner().invoke(main, [str(a) for a in args])

    return run


def _assert_one_line_error(result: Result, *fragments: str, status_on_stdout: bool = False) -> str:
    """The contract for bad input: exit code 2, exactly one line on stderr, no traceback, nothing on
    stdout (``status_on_stdout``: finetune prints its status lines, "loading the data", there); the line
    contains every fragment given (case-insensitive)."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.output
    assert status_on_stdout or result.stdout == ""
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), (fragment, lines[0])
    return lines[0]


@pytest.fixture
def assert_one_line_error() -> Callable[..., str]:
    return _assert_one_line_error


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """No network: HF_HUB_OFFLINE=1, an empty HF cache, and any socket connection fails the test
    (``pytestmark = pytest.mark.usefixtures("offline")`` in the modules that load HF models)."""
    import socket

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-home" / "hub"))

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def subprocess_env() -> dict:
    """Environment for running the real `wasi-compress` executable on hand-written factories."""
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


@pytest.fixture
def run_wasi_compress(subprocess_env) -> Callable:
    """Run the real command in a fresh interpreter (for what CliRunner cannot see: warnings that Python
    prints on stderr, side effects of a whole process). Returns the CompletedProcess."""
    import subprocess

    def run(*args, cwd=None):
        return subprocess.run([sys.executable, "-m", "wasi_compress.cli.main", *map(str, args)], capture_output=True,
                              text=True, env=subprocess_env, cwd=cwd, timeout=300)

    return run
