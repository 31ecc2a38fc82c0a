"""Test-only launcher for the kill -9 tests (tests/test_kill.py): runs `wasi-compress ARGS...` in this
process after wrapping one function of the library so that, when the run reaches PHASE, it creates the
file READY and then waits to be killed. The test polls for READY and sends SIGKILL, so every kill lands
in the same place of the run, on any machine speed. Nothing here is imported by the library.

    python kill_launcher.py PHASE READY -- ARGS...

Phases:
- ``convert-plan``: convert is planning ranks (its output locks are held, nothing is written yet);
- ``convert-staged``: every output of convert is written under its temporary name, none renamed yet;
- ``convert-renamed``: the checkpoint (-o) was renamed into place, the other outputs not yet;
- ``finetune-mid-epoch``: finetune is at the second step of epoch 2 (epoch 1 is committed);
- ``finetune-checkpoint``: epoch 2's resume state and checkpoint are written under temporary names;
- ``finetune-renamed``: epoch 2's resume state was renamed into place, its checkpoint not yet.
"""

from __future__ import annotations

import os
import sys
import time
import types
from pathlib import Path


def _stop_here(ready: Path) -> None:
    ready.write_text(str(os.getpid()))
    time.sleep(600)  # the test kills this process well before
    raise SystemExit("kill_launcher: was not killed")


def _after_rename(ready: Path, suffix: str, count: int) -> None:
    """Stop right after the `count`-th rename onto a path ending in `suffix`."""
    import wasi_compress.outputs as outputs

    replace, seen = os.replace, []

    def replace_then_stop(src, dst, *args, **kwargs):
        replace(src, dst, *args, **kwargs)
        if str(dst).endswith(suffix):
            seen.append(dst)
            if len(seen) == count:
                _stop_here(ready)

    outputs.os = types.ModuleType("os")  # a copy of os in which only the outputs module sees the wrapped rename
    outputs.os.__dict__.update(os.__dict__)
    outputs.os.replace = replace_then_stop


def _in_epoch_2(ready: Path, name: str, stop_after_call: bool) -> None:
    """Stop in the second call of `wasi_compress.finetune.job.<name>` made after epoch 1 ended."""
    from wasi_compress.finetune import job

    end_epoch, original, calls = job.FinetuneRun._end_epoch, getattr(job, name), []
    epochs_ended = []

    def end_epoch_and_count(self, epoch, totals):
        record = end_epoch(self, epoch, totals)
        epochs_ended.append(epoch)
        return record

    def wrapped(*args, **kwargs):
        if epochs_ended and not stop_after_call:
            calls.append(1)
            if len(calls) == 2:
                _stop_here(ready)
        result = original(*args, **kwargs)
        if epochs_ended and stop_after_call:
            _stop_here(ready)
        return result

    job.FinetuneRun._end_epoch = end_epoch_and_count
    setattr(job, name, wrapped)


def _install(phase: str, ready: Path) -> None:
    if phase == "convert-plan":
        from wasi_compress.convert import job

        plan = job._plan
        job._plan = lambda *args, **kwargs: (_stop_here(ready), plan(*args, **kwargs))[1]
    elif phase == "convert-staged":
        from wasi_compress.outputs import Outputs

        Outputs.commit = lambda self: _stop_here(ready)
    elif phase == "convert-renamed":
        _after_rename(ready, ".safetensors", 1)
    elif phase == "finetune-mid-epoch":
        _in_epoch_2(ready, "train_step", stop_after_call=False)
    elif phase == "finetune-checkpoint":
        _in_epoch_2(ready, "write_checkpoint", stop_after_call=True)
    elif phase == "finetune-renamed":
        _after_rename(ready, ".resume.pt", 2)
    else:
        raise SystemExit(f"kill_launcher: unknown phase {phase!r}")


def main(argv: list[str]) -> None:
    phase, ready, dashes, *args = argv
    assert dashes == "--", argv
    import wasi_compress  # noqa: F401  (first: before timm)

    _install(phase, Path(ready))
    from wasi_compress.cli.main import main as cli

    cli(args=args, prog_name="wasi-compress")


if __name__ == "__main__":
    main(sys.argv[1:])
