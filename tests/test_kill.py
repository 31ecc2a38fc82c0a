"""kill -9 (issue 11, section 7): a `wasi-compress convert` or `finetune` process killed with SIGKILL at
each phase of its work leaves every output either absent or complete and loadable; the next run removes
what the killed one left (its temporaries and its output locks); and `finetune --resume` after the kill
ends with weights exactly equal, tensor for tensor, to an uninterrupted run with the same seed.

Each kill lands at a fixed point of the run: tests/kill_launcher.py runs the real command after wrapping
one library function to create a marker file and wait there; the test polls for the marker, then sends
SIGKILL. The runs are tiny (an 8x8 ViT of two blocks, digits, six steps per epoch). Only the runs that are
killed (and the first of two concurrent runs) are separate processes; the runs after them, and the
uninterrupted references, run in this process. Every run uses one thread, as this suite does, so that
the same seed gives the same bits in and out of this process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow  # each case runs the real command in a fresh interpreter and kills it
torch.set_num_threads(1)

TESTS = Path(__file__).resolve().parent
TINY = "vit_models:tiny_timm_vit"
CONVERT = ["convert", TINY, "--budget", "60KB", "-o", "c.safetensors", "--onnx", "c.onnx", "--json", "c.json"]
FINETUNE = ["finetune", TINY, "--data", "digits", "--epochs", "2", "--batch-size", "256", "--seed", "5",
            "-o", "f.safetensors", "--json", "f.json"]


@pytest.fixture(scope="module")
def env() -> dict:
    """The tests folder on PYTHONPATH, for the tiny ViT factory (as conftest's env)."""
    paths = [str(TESTS), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p), "OMP_NUM_THREADS": "1"}


def _run(cli, args: list[str], cwd: Path):
    """Run the command in this process, in `cwd`; the click Result."""
    here = os.getcwd()
    os.chdir(cwd)
    try:
        return cli(*args)
    finally:
        os.chdir(here)


def _wasi(cli, args: list[str], cwd: Path) -> None:
    result = _run(cli, args, cwd)
    assert result.exit_code == 0, result.output


def _killed_at(phase: str, args: list[str], cwd: Path, env: dict) -> None:
    """Run the command in a fresh process and kill it with SIGKILL once it reaches `phase`."""
    _kill(_start(args, cwd, env, phase))


def _start(args: list[str], cwd: Path, env: dict, phase: str) -> subprocess.Popen:
    """Start the command through the launcher; return once it waits at `phase`."""
    ready = cwd.parent / f"{cwd.name}.ready"
    ready.unlink(missing_ok=True)
    process = subprocess.Popen([sys.executable, str(TESTS / "kill_launcher.py"), phase, str(ready), "--", *args],
                               cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not ready.exists():
        if process.poll() is not None:
            pytest.fail(f"the run ended before reaching {phase}: {process.stderr.read().decode()[-2000:]}")
        if time.monotonic() > deadline:
            _kill(process)
            pytest.fail(f"the run did not reach {phase}")
        time.sleep(0.05)
    return process


def _kill(process: subprocess.Popen) -> None:
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait(timeout=60) == -signal.SIGKILL
    process.stderr.close()


def _hidden(folder: Path) -> list[str]:
    """What a killed run may leave: temporaries (.NAME.PID.*.tmp) and output locks (.NAME.lock)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path))


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _loads(path: Path) -> None:
    """A complete checkpoint: it loads through MODEL and runs."""
    import wasi_compress

    model = wasi_compress.load(path, trust_code=True)  # its source is the tests' own factory
    with torch.no_grad():
        assert torch.isfinite(model(torch.zeros(1, 1, 8, 8))).all()


# --------------------------------------------------------------------------------------------------
# convert

@pytest.fixture
def convert_reference(tmp_path_factory, cli) -> Path:
    """An uninterrupted convert: what every complete output must equal, byte for byte."""
    folder = tmp_path_factory.getbasetemp() / "convert-reference"
    if not folder.exists():  # once per session (a function fixture, for the in-process `cli`)
        folder.mkdir()
        _wasi(cli, CONVERT, folder)
    return folder


@pytest.mark.parametrize("phase,complete", [("convert-plan", []), ("convert-staged", []),
                                            ("convert-renamed", ["c.onnx", "c.safetensors"])])
def test_convert_killed_leaves_no_output_or_a_complete_one(tmp_path, cli, env, convert_reference, phase, complete):
    _killed_at(phase, CONVERT, tmp_path, env)
    left = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("."))
    assert left == complete  # each output absent, or in place...
    for name in complete:    # ...and then complete: the same bytes as an uninterrupted run's
        assert (tmp_path / name).read_bytes() == (convert_reference / name).read_bytes(), name
    if "c.safetensors" in complete:
        _loads(tmp_path / "c.safetensors")
    assert _hidden(tmp_path), "the kill should have left a lock or temporaries for the next run to clean"

    _wasi(cli, CONVERT, tmp_path)  # the next run
    assert _hidden(tmp_path) == []  # the dead run's temporaries and locks are gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "c.onnx", "c.safetensors"]
    for name in ("c.onnx", "c.safetensors"):
        assert (tmp_path / name).read_bytes() == (convert_reference / name).read_bytes(), name


# --------------------------------------------------------------------------------------------------
# finetune

@pytest.fixture
def finetune_reference(tmp_path_factory, cli) -> dict[str, torch.Tensor]:
    """The weights of an uninterrupted two-epoch run with the same seed."""
    folder = tmp_path_factory.getbasetemp() / "finetune-reference"
    if not folder.exists():  # once per session
        folder.mkdir()
        _wasi(cli, FINETUNE, folder)
    return _tensors(folder / "f.safetensors")


# What each kill leaves committed: the epoch the checkpoint holds and the one the resume state holds.
FINETUNE_PHASES = {"finetune-mid-epoch": (1, 1), "finetune-checkpoint": (1, 1), "finetune-renamed": (1, 2)}


@pytest.mark.parametrize("phase", list(FINETUNE_PHASES))
def test_finetune_killed_then_resumed_equals_an_uninterrupted_run(tmp_path, cli, env, finetune_reference, phase):
    from wasi_compress.finetune.resume import load_resume

    _killed_at(phase, FINETUNE, tmp_path, env)
    checkpoint_epoch, state_epoch = FINETUNE_PHASES[phase]
    out, state = tmp_path / "f.safetensors", tmp_path / "f.safetensors.resume.pt"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [out.name, state.name]
    _loads(out)  # complete: the last committed epoch's checkpoint
    metadata = __import__("json").loads(__import__("safetensors").safe_open(str(out), "pt").metadata()["wasi_compress"])
    assert metadata["finetune"]["epochs_done"] == checkpoint_epoch
    assert load_resume(state)["epoch"] == state_epoch  # a complete, valid resume state
    assert _hidden(tmp_path)

    _wasi(cli, [*FINETUNE, "--resume"], tmp_path)
    assert _hidden(tmp_path) == []  # the next run cleaned the temporaries and locks of the killed one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json", out.name, state.name]
    assert _equal(_tensors(out), finetune_reference)  # tensor for tensor, as if never interrupted
    assert load_resume(state)["epoch"] == 2


# --------------------------------------------------------------------------------------------------
# two runs, one output

@pytest.mark.parametrize("second", [CONVERT, [*FINETUNE[:-4], "-o", "c.safetensors"]], ids=["convert", "finetune"])
def test_a_second_run_on_the_same_output_is_refused_while_the_first_runs(tmp_path, cli, env, second):
    first = _start(CONVERT, tmp_path, env, "convert-plan")  # holds the locks of its outputs, writes nothing yet
    try:
        result = _run(cli, second, tmp_path)
    finally:
        _kill(first)
    lines = result.stderr.strip().splitlines()  # (finetune shows its progress on stdout)
    assert result.exit_code == 2 and len(lines) == 1 and "Traceback" not in result.output, result.output
    assert f"c.safetensors is being written by process {first.pid}" in lines[0] and "choose another output" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == []  # neither wrote
