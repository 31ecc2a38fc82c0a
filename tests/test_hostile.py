"""Hostile and broken input (issue 11, sections 4 and 6): every case is refused with exit code 2, exactly
one line on stderr starting with "error:", no traceback, and no output file left behind. Training that
diverges stops at the first non-finite loss and keeps the last good checkpoint; JSON outputs are strict
(null where a value is not a finite number)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from wasi_compress.fileio import strict_json, write_json

FIXTURES = Path(__file__).resolve().parent / "fixtures"
TINY = "vit_models:tiny_timm_vit"


def _strict_loads(text: str):
    """json.loads refusing NaN, Infinity and -Infinity, as strict JSON parsers do."""
    def refuse(constant):
        raise AssertionError(f"not strict JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def _fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def _leftovers(folder: Path, inputs: set[str]) -> list[str]:
    """Everything in `folder` that the test did not put there, hidden temporary files included."""
    return sorted(p.name for p in folder.iterdir() if p.name not in inputs)


def _one_error_line(result, *fragments: str) -> str:
    """The contract on stderr, for finetune, which prints its status lines ("loading the data") on stdout:
    exit code 2, exactly one line on stderr starting with "error: ", no traceback anywhere."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment.lower() in lines[0].lower(), (fragment, lines[0])
    return lines[0]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """An empty current directory (its .git stops the search for a gate configuration)."""
    (tmp_path / ".git").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


# --------------------------------------------------------------------------------------------------
# Strict JSON

def test_write_json_writes_null_for_values_that_are_not_finite(tmp_path):
    doc = {"loss": math.nan, "history": [{"loss": math.inf}, (-math.inf, 1.5)], "ok": 2, "name": "NaN",
           "nested": {"deep": [[math.nan]]}, "flag": True, "none": None}
    write_json(tmp_path / "d.json", doc)
    parsed = _strict_loads((tmp_path / "d.json").read_text())
    assert parsed == {"loss": None, "history": [{"loss": None}, [None, 1.5]], "ok": 2, "name": "NaN",
                      "nested": {"deep": [[None]]}, "flag": True, "none": None}
    assert doc["loss"] != doc["loss"]  # the caller's document is not changed


def test_write_json_to_stdout_is_strict(capsys):
    write_json("-", {"x": math.nan, "y": [math.inf]})
    assert _strict_loads(capsys.readouterr().out) == {"x": None, "y": [None]}


def test_strict_json_keeps_finite_numbers_and_other_values():
    assert strict_json([0.0, -1e308, 7, "inf", False]) == [0.0, -1e308, 7, "inf", False]


def test_check_json_is_strict_when_a_figure_is_nan(cli, workdir):
    report = _fixture("convert")
    report["onnx"]["max_abs_diff"] = float("nan")  # a broken export: the gate fails (exit 1), not an error
    (workdir / "c.json").write_text(json.dumps(report))
    result = cli("check", workdir / "c.json", "--max-onnx-diff", "1", "--json", workdir / "out.json")
    assert result.exit_code == 1, result.output
    gate = _strict_loads((workdir / "out.json").read_text())["gates"][0]
    assert gate["actual"] is None and gate["passed"] is False


# --------------------------------------------------------------------------------------------------
# check: thresholds and report values that are not what they claim to be

def _report(workdir: Path, name: str, text: str) -> Path:
    path = workdir / name
    path.write_text(text)
    return path


def _finetune_report(accuracy_json: str) -> str:
    doc = _fixture("finetune")
    doc["final"]["accuracy"] = "ACCURACY"
    return json.dumps(doc).replace('"ACCURACY"', accuracy_json)


CHECK_CASES = {
    # --min-accuracy thresholds that are not a fraction in [0, 1]
    "min-accuracy inf": (["convert.json", "--min-accuracy", "inf"], ["--min-accuracy"]),
    "min-accuracy 57.0": (["convert.json", "--min-accuracy", "57.0"], ["--min-accuracy", "fraction"]),
    "min-accuracy nan": (["convert.json", "--min-accuracy", "nan"], ["--min-accuracy"]),
    "min-accuracy negative": (["convert.json", "--min-accuracy", "-0.1"], ["--min-accuracy"]),
    "min-accuracy 5700%": (["convert.json", "--min-accuracy", "5700%"], ["--min-accuracy"]),
    "min-accuracy text": (["convert.json", "--min-accuracy", "high"], ["--min-accuracy"]),
    # accuracies read from a report
    "report accuracy 57.0": (["bad.json", "--min-accuracy", "0.5"], ["final.accuracy", "[0, 1]"]),
    "report accuracy Infinity": (["inf.json", "--min-accuracy", "0.5"], ["final.accuracy"]),
    "report accuracy NaN": (["nan.json", "--min-accuracy", "0.5"], ["final.accuracy"]),
    "report accuracy negative": (["neg.json", "--min-accuracy", "0.5"], ["final.accuracy"]),
    "baseline accuracy 57.0": (["good.json", "--baseline", "bad.json", "--max-regression", "1"],
                               ["baseline", "final.accuracy"]),
    # numbers no measurement gives
    "size of 400 digits": (["huge.json", "--max-size", "1MB"], ["total_bytes", "digits"]),
    "size of 5000 digits": (["huger.json", "--max-size", "1MB"], ["huger.json"]),
    "size Infinity": (["infsize.json", "--max-size", "1MB"], ["total_bytes"]),
    "nested too deep": (["deep.json", "--max-size", "1MB"], ["deep.json"]),
}


def _check_inputs(workdir: Path) -> None:
    convert = json.dumps(_fixture("convert"))
    _report(workdir, "convert.json", convert)
    _report(workdir, "good.json", _finetune_report("0.9"))
    _report(workdir, "bad.json", _finetune_report("57.0"))
    _report(workdir, "inf.json", _finetune_report("Infinity"))
    _report(workdir, "nan.json", _finetune_report("NaN"))
    _report(workdir, "neg.json", _finetune_report("-0.5"))
    _report(workdir, "huge.json", convert.replace('"total_bytes": 19752', '"total_bytes": 1' + "0" * 400))
    _report(workdir, "huger.json", convert.replace('"total_bytes": 19752', '"total_bytes": 1' + "0" * 5000))
    _report(workdir, "infsize.json", convert.replace('"total_bytes": 19752', '"total_bytes": Infinity'))
    _report(workdir, "deep.json", "[" * 200_000 + "]" * 200_000)


@pytest.mark.parametrize("args, fragments", list(CHECK_CASES.values()), ids=list(CHECK_CASES))
def test_check_refuses_bad_values(cli, assert_one_line_error, workdir, args, fragments):
    _check_inputs(workdir)
    inputs = {p.name for p in workdir.iterdir()}
    result = cli("check", *args, "--json", "out.json", "--junit", "out.xml", "--markdown", "out.md")
    assert_one_line_error(result, *fragments)
    assert _leftovers(workdir, inputs) == []


def test_an_accuracy_in_range_still_passes(cli, workdir):
    _check_inputs(workdir)
    assert cli("check", "good.json", "--min-accuracy", "0.5").exit_code == 0
    assert cli("check", "good.json", "--min-accuracy", "95%").exit_code == 1


@pytest.mark.parametrize("where", ["evaluate", "render_table", "write_json"])
def test_a_crash_in_check_is_exit_2_not_a_gate_verdict(cli, assert_one_line_error, workdir, monkeypatch, where):
    """Exit 1 means "a gate failed": an unexpected error must never read as that verdict."""
    import wasi_compress.cli.check as check_cli

    def boom(*_args, **_kwargs):
        raise RuntimeError("something broke\nsecond line")

    target = check_cli.gates if where == "evaluate" else check_cli
    monkeypatch.setattr(target, where, boom)
    _check_inputs(workdir)
    inputs = {p.name for p in workdir.iterdir()}
    result = cli("check", "convert.json", "--max-size", "1MB", *(["--json", "-"] if where == "write_json" else []))
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "not a gate verdict" in lines[-1] and "something broke" in lines[-1]
    assert "Traceback" not in result.output and "second line" not in result.output
    if where == "evaluate":
        assert_one_line_error(result, "RuntimeError")
    assert _leftovers(workdir, inputs) == []


# --------------------------------------------------------------------------------------------------
# --num-classes and data folders

@pytest.mark.parametrize("value", ["0", "-1", "-1000"])
@pytest.mark.parametrize("command", ["analyze", "convert", "finetune"])
def test_num_classes_below_one_is_refused(cli, assert_one_line_error, workdir, command, value):
    extra = {"analyze": ["--json", "out.json"],
             "convert": ["--budget", "10KB", "-o", "out.safetensors", "--json", "out.json"],
             "finetune": ["--data", "digits", "-o", "out.safetensors", "--json", "out.json"]}[command]
    result = cli(command, TINY, "--num-classes", value, *extra)
    assert_one_line_error(result, "--num-classes", value)
    assert _leftovers(workdir, {".git"}) == []


def _image(path: Path, size: int = 8, seed: int = 0) -> None:
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def _folder(root: Path, layout: dict[str, int], size: int = 8) -> Path:
    for cls, count in layout.items():
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            _image(root / cls / f"{i}.png", size, seed=i)
    return root


DATA_CASES = {
    "one class": ({"cats": 6}, ["only one class", "cats"]),
    "an empty class folder": ({"cats": 6, "dogs": 0}, ["dogs", "no images"]),
    "a class folder with only non-images": ({"cats": 6, "notes": 0, "dogs": 4}, ["notes", "no images"]),
    "no images at all": ({"cats": 0, "dogs": 0}, ["no images"]),
}


@pytest.mark.parametrize("layout, fragments", list(DATA_CASES.values()), ids=list(DATA_CASES))
def test_data_folders_without_two_classes_of_images_are_refused(cli, workdir, layout, fragments):
    data = _folder(workdir / "data", layout)
    (data / "notes").mkdir(exist_ok=True)
    (data / "notes" / "README.txt").write_text("not an image")
    if "notes" not in layout:
        (data / "notes" / "README.txt").unlink()
        (data / "notes").rmdir()
    result = cli("finetune", TINY, "--data", data, "--epochs", "1", "-o", "out.safetensors", "--json", "out.json")
    _one_error_line(result, *fragments)
    assert _leftovers(workdir, {".git", "data"}) == []


def test_a_decompression_bomb_in_a_data_folder_is_refused(cli, workdir, monkeypatch):
    from PIL import Image

    data = _folder(workdir / "data", {"a": 2, "b": 2})
    _image(data / "b" / "bomb.png", size=64)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64 // 3)  # 64x64 is then over twice PIL's limit
    result = cli("finetune", TINY, "--data", data, "--epochs", "1", "-o", "out.safetensors", "--json", "out.json")
    _one_error_line(result, "bomb.png", "DecompressionBombError")
    assert _leftovers(workdir, {".git", "data"}) == []


# --------------------------------------------------------------------------------------------------
# Training that diverges

@pytest.mark.slow  # a fine-tuning run
def test_divergence_in_the_first_epoch_stops_with_one_line_and_writes_nothing(cli, workdir):
    result = cli("finetune", TINY, "--data", "digits", "--lr", "1e30", "--epochs", "2", "-o", "out.safetensors",
                 "--json", "out.json")
    _one_error_line(result, "diverged", "epoch 1, step", "lower --lr", "no checkpoint")
    assert _leftovers(workdir, {".git"}) == []


@pytest.mark.slow  # two epochs of fine-tuning
def test_divergence_in_a_later_epoch_keeps_the_last_good_checkpoint(cli, workdir, monkeypatch):
    """A loss that turns NaN in epoch 2: epoch 1's checkpoint and resume state stay as they were."""
    import torch
    from safetensors.torch import load_file

    from wasi_compress.finetune import job

    epochs_done, written = [], {}
    end_epoch, train_step = job.FinetuneRun._end_epoch, job.train_step

    def end_epoch_then_remember(self, epoch, totals):
        record = end_epoch(self, epoch, totals)
        epochs_done.append(epoch)
        # the run's own output locks (removed when it ends) are not outputs
        written.update({p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file() and p.suffix != ".lock"})
        return record

    def nan_after_epoch_1(*args, **kwargs):
        loss, out = train_step(*args, **kwargs)
        return (loss * math.nan if epochs_done else loss), out

    monkeypatch.setattr(job.FinetuneRun, "_end_epoch", end_epoch_then_remember)
    monkeypatch.setattr(job, "train_step", nan_after_epoch_1)
    result = cli("finetune", TINY, "--data", "digits", "--epochs", "3", "-o",
                 "out.safetensors", "--json", "out.json")
    _one_error_line(result, "diverged", "epoch 2, step 1 ", "checkpoint of epoch 1", "is kept")
    assert epochs_done == [0]
    assert sorted(written) == ["out.safetensors", "out.safetensors.resume.pt"]
    assert {p.name: p.read_bytes() for p in workdir.iterdir() if p.is_file()} == written  # unchanged, no JSON
    assert all(bool(torch.isfinite(t).all()) for t in load_file(workdir / "out.safetensors").values()
               if t.is_floating_point())


def test_the_diverged_error_is_a_user_error():
    from wasi_compress.errors import DivergedError, UserError

    exc = DivergedError("training diverged", epoch=2, step=5)
    assert isinstance(exc, UserError) and exc.exit_code == 2 and (exc.epoch, exc.step) == (2, 5)


def test_epochs_zero_with_an_output_is_refused(cli, assert_one_line_error, tmp_path):
    out = tmp_path / "o.safetensors"
    result = cli("finetune", "vit_models:tiny_timm_vit", "--data", "digits", "--epochs", "0", "-o", out)
    assert result.exit_code == 2 and "--epochs 0 trains nothing" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_budget_above_the_model_is_stated(tmp_path):
    from wasi_compress.convert import ConvertConfig, convert
    from wasi_compress.loading import load_model

    result = convert(load_model("vit_models:tiny_timm_vit"), ConvertConfig(budget="99999999999999999999999GB"))
    assert any("is at least the model's own" in note for note in result.report["notes"])
    assert all(layer["rank"] is None for layer in result.report["layers"])


@pytest.mark.parametrize("doc,fragment", [
    ({"schema": "wasi-compress/analyze/1"}, "has no layers, totals"),
    ({"schema": "wasi-compress/convert/1", "layers": []}, "has no original_bytes"),
    ({"schema": "wasi-compress/finetune/1", "epochs": [], "final": {}}, "has no memory"),
    ({"schema": "wasi-compress/finetune/1", "epochs": [], "memory": None, "final": {"accuracy": float("nan")}},
     "final.accuracy is not a finite number"),
])
def test_report_refuses_documents_it_cannot_draw(tmp_path, cli, assert_one_line_error, doc, fragment):
    import json

    path = tmp_path / "r.json"
    path.write_text(json.dumps(doc))  # json.dumps writes NaN for nan: the damaged file a user might hand us
    assert_one_line_error(cli("report", path, "-o", tmp_path / "out"), fragment)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
