"""Crash safety and concurrency of the jobs' outputs (issue 11, section 5): temporaries left by a killed
writer are removed by the next run (never a live writer's), a lock on each output refuses a second
writer with one line (a stale lock is taken over), and a resume state missing a key is one line."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

from wasi_compress.errors import UserError
from wasi_compress.outputs import lock_outputs, lock_path, remove_stale_temporaries


def _reaped_pid() -> int:
    """The PID of a process that has exited (and been reaped): os.kill(pid, 0) finds no such process."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


@pytest.fixture
def live_pid():
    child = subprocess.Popen(["sleep", "60"])
    yield child.pid
    child.kill()
    child.wait()


def _one_line(exc: pytest.ExceptionInfo) -> str:
    text = str(exc.value)
    assert "\n" not in text.strip(), text
    return text


def test_the_next_convert_removes_a_dead_writers_temporaries_and_keeps_a_live_ones(tmp_path, live_pid):
    from wasi_compress.convert import ConvertConfig, convert
    from wasi_compress.loading import load_model

    dead = _reaped_pid()
    out = tmp_path / "m.safetensors"
    stale_file = tmp_path / f".m.safetensors.{dead}.abc123.tmp"
    stale_dir = tmp_path / f".m.safetensors.{dead}.def456.tmp"
    live_file = tmp_path / f".m.safetensors.{live_pid}.ghi789.tmp"
    other = tmp_path / f".n.safetensors.{dead}.jkl012.tmp"  # another target's: not this run's to clean
    stale_file.write_bytes(b"half")
    stale_dir.mkdir()
    (stale_dir / "m.safetensors").write_bytes(b"half")
    live_file.write_bytes(b"in progress")
    other.write_bytes(b"x")
    convert(load_model("builtin:mnist-vit"), ConvertConfig(budget=10**9, output=str(out)))
    assert out.is_file()
    assert not stale_file.exists() and not stale_dir.exists()
    assert live_file.exists() and other.exists()
    assert not lock_path(out).exists()  # the lock went with the run
    leftovers = {p.name for p in tmp_path.iterdir()} - {out.name, live_file.name, other.name}
    assert not leftovers, leftovers


def test_temporaries_carry_the_writers_pid(tmp_path):
    from wasi_compress.fileio import atomic_path
    from wasi_compress.outputs import Outputs

    target = tmp_path / "a.json"
    with atomic_path(target) as tmp:
        assert tmp.name.startswith(f".a.json.{os.getpid()}.") and tmp.name.endswith(".tmp")
        tmp.write_text("{}")
        assert remove_stale_temporaries(target) == []  # this live process's own
    with Outputs() as outputs:
        d = outputs.tempdir(target)
        assert d.name.startswith(f".a.json.{os.getpid()}.")


def test_a_held_lock_refuses_a_second_writer_with_one_line(tmp_path, live_pid):
    from wasi_compress.convert import ConvertConfig, convert
    from wasi_compress.loading import load_model

    out = tmp_path / "m.safetensors"
    lock_path(out).write_text(f"{live_pid}\n")
    with pytest.raises(UserError, match=f"is being written by process {live_pid}") as exc:
        convert(load_model("builtin:mnist-vit"), ConvertConfig(budget=10**9, output=str(out)))
    assert "wait for it or choose another output" in _one_line(exc)
    assert not out.exists() and lock_path(out).read_text().strip() == str(live_pid)  # not ours to remove
    lock_path(out).unlink()
    with lock_outputs([out, None, "-"]):  # and within one process, a second lock on the same output
        with pytest.raises(UserError, match=f"process {os.getpid()}"):
            with lock_outputs([out]):
                pass
        assert lock_path(out).read_text().strip() == str(os.getpid())
    assert not lock_path(out).exists()


def test_a_held_lock_refuses_a_finetune_on_the_same_output(tmp_path, vit_models, live_pid):
    from wasi_compress.finetune import FinetuneConfig, finetune

    out = tmp_path / "f.safetensors"
    resume = Path(f"{out}.resume.pt")
    lock_path(resume).write_text(f"{live_pid}\n")
    with pytest.raises(UserError, match=f"being written by process {live_pid}") as exc:
        finetune(FinetuneConfig(model="vit_models:tiny_timm_vit", data="digits", output=str(out), measure_memory=False))
    _one_line(exc)
    assert not out.exists() and not lock_path(out).exists()


def test_a_stale_lock_is_taken_over(tmp_path):
    out = tmp_path / "sub" / "m.safetensors"
    out.parent.mkdir()
    lock_path(out).write_text(f"{_reaped_pid()}\n")
    with lock_outputs([out]) as held:
        assert held == [lock_path(out)]
        assert lock_path(out).read_text().strip() == str(os.getpid())
    assert not lock_path(out).exists()


def test_a_lock_in_a_new_folder_leaves_no_folder_behind(tmp_path):
    out = tmp_path / "new" / "deeper" / "m.safetensors"
    with lock_outputs([out]):
        assert lock_path(out).exists()
    assert not (tmp_path / "new").exists()


def _state(config) -> dict:
    return {"version": 1, "config": config.to_json(), "epoch": 1, "model": {}, "optimizer": {}, "history": [],
            "step_times": [], "weight_ranks": {}, "activation_ranks": None, "planning": "null", "per_rank": [{}]}


@pytest.mark.parametrize("key", ["config", "per_rank", "epoch", "model", "optimizer", "planning", "history"])
def test_a_resume_state_missing_a_key_is_one_line(tmp_path, vit_models, key):
    from wasi_compress.finetune import FinetuneConfig, finetune, resume_path

    out = str(tmp_path / "f.safetensors")
    config = FinetuneConfig(model="vit_models:tiny_timm_vit", data="digits", output=out, resume=True,
                            measure_memory=False)
    state = _state(config)
    del state[key]
    torch.save(state, resume_path(out))
    with pytest.raises(UserError, match=f"'{key}' is missing") as exc:
        finetune(config)
    _one_line(exc)


@pytest.mark.parametrize("key,value", [("config", 3), ("per_rank", {}), ("epoch", "1"), ("config", "[1]"),
                                       ("planning", "{not json")])
def test_a_resume_state_key_of_the_wrong_type_is_one_line(tmp_path, vit_models, key, value):
    from wasi_compress.finetune import FinetuneConfig, finetune, resume_path

    out = str(tmp_path / "f.safetensors")
    config = FinetuneConfig(model="vit_models:tiny_timm_vit", data="digits", output=out, resume=True,
                            measure_memory=False)
    state = {**_state(config), key: value}
    torch.save(state, resume_path(out))
    with pytest.raises(UserError, match=f"'{key}'") as exc:
        finetune(config)
    _one_line(exc)


@pytest.mark.parametrize("args,output", [
    (["analyze", "vit_models:tiny_timm_vit", "--json", "a.json"], "a.json"),
    (["analyze", "vit_models:tiny_timm_vit", "--report", "rep"], "rep/report.html"),
    (["check", "{convert}", "--max-size", "1MB", "--junit", "g.xml"], "g.xml"),
    (["check", "{convert}", "--max-size", "1MB", "--json", "g.json"], "g.json"),
    (["report", "{convert}", "-o", "rep"], "rep/report.html"),
], ids=["analyze --json", "analyze --report", "check --junit", "check --json", "report -o"])
def test_every_command_refuses_an_output_another_run_is_writing(tmp_path, monkeypatch, cli, assert_one_line_error,
                                                                live_pid, args, output):
    fixture = Path(__file__).resolve().parent / "fixtures" / "convert.json"
    monkeypatch.chdir(tmp_path)
    (tmp_path / output).parent.mkdir(exist_ok=True)
    lock_path(tmp_path / output).write_text(f"{live_pid}\n")
    result = cli(*[a.format(convert=fixture) for a in args])
    assert_one_line_error(result, f"being written by process {live_pid}")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == sorted(
        {str(lock_path(Path(output))), *([str(Path(output).parent)] if "/" in output else [])})
