"""Hostile and broken input (issue 11, sections 4 and 6): every case is refused with exit code 2, exactly
one line on stderr starting with "error:", no traceback, and no output file left behind. Training that
diverges stops at the first non-finite loss and keeps the last good checkpoint; JSON outputs are strict
(null where a value is not a finite number)."""

from __future__ import annotations

import json
import math
import os
import warnings
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
    """finetune prints its status lines on stdout; the rest of conftest's contract holds."""
    from conftest import _assert_one_line_error

    return _assert_one_line_error(result, *fragments, status_on_stdout=True)


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


# --------------------------------------------------------------------------------------------------
# Every command, every file kind: a library of hostile files built once, copied into each case's empty
# folder; each case must be refused with one line naming what was wrong, leave every input byte for
# byte as it was and add nothing (no output, no temporary, no lock, no folder).

BIG = "1" + "0" * 5000  # an integer of thousands of digits
OUT = "o.safetensors"   # the output every finetune case names (its resume state is o.safetensors.resume.pt)


def _png(width: int, height: int, idat: bytes) -> bytes:
    """A grey PNG whose header claims width x height, with `idat` as its (compressed) pixel data."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _image_folders(lib: Path) -> None:
    import zlib

    good = _png(8, 8, zlib.compress(b"".join(b"\x00" + bytes(range(i * 8, i * 8 + 8)) for i in range(8))))
    bomb = _png(30000, 30000, zlib.compress(b"\x00" * 64))  # 900 M pixels claimed, 100 bytes on disk
    for name, odd in {"bomb": ("bomb.png", bomb), "cut": ("cut.png", good[:40]),
                      "fake": ("fake.png", b"this is not a picture\n")}.items():
        for cls in ("a", "b"):
            for i in range(3):
                (lib / name / cls).mkdir(parents=True, exist_ok=True)
                (lib / name / cls / f"{i}.png").write_bytes(good)
        (lib / name / "b" / odd[0]).write_bytes(odd[1])


def _checkpoints(lib: Path) -> None:
    """A genuine converted checkpoint of the tiny ViT, its state dict, and copies with damaged bytes or
    tampered metadata (tensors untouched)."""
    import struct

    from safetensors import safe_open
    from safetensors.torch import save_file

    from wasi_compress.convert import ConvertConfig, convert
    from wasi_compress.loading import load_model

    loaded = load_model(TINY)
    save_file({k: v.contiguous() for k, v in loaded.model.state_dict().items()}, str(lib / "w.safetensors"))
    good = lib / "good.safetensors"
    convert(loaded, ConvertConfig(budget="60KB", output=str(good)))
    data = good.read_bytes()
    (lib / "cut.safetensors").write_bytes(data[: len(data) // 2])
    (lib / "garbage.safetensors").write_bytes(bytes(range(256)) * 40)
    (lib / "empty.safetensors").write_bytes(b"")
    (lib / "hugeheader.safetensors").write_bytes(struct.pack("<Q", 2 ** 62) + b"{}")
    (lib / "badheader.safetensors").write_bytes(struct.pack("<Q", 10) + b"not json!!")
    (lib / "garbage.bin").write_bytes(b"\x80\x04garbage" * 100)
    with safe_open(str(good), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["wasi_compress"])
    fc1 = next(e for e in meta["structure"] if e["name"] == "blocks.0.mlp.fc1")
    tampered = {
        "format": {"format": "wasi-compress/checkpoint/99"},
        "structure": {"structure": "all of them"},
        "dunder": {"structure": [{**fc1, "name": "blocks.0.__class__"}]},
        "rank": {"structure": [{**fc1, "rank": 10 ** 6}]},
        "kind": {"structure": [{**fc1, "kind": "eval"}]},
        "dtype": {"dtype": "__import__('os').mkdir('pwned')"},
        "classes": {"source": {**meta["source"], "num_classes": "ten"}},
        "alias": {"aliases": {"head.weight": "no.such.tensor"}},
        "exit": {"source": {**meta["source"], "arch": "sys:exit"}},
    }
    for name, change in tampered.items():
        save_file(tensors, str(lib / f"meta-{name}.safetensors"), metadata={"wasi_compress": json.dumps({**meta, **change})})
    save_file(tensors, str(lib / "meta-notjson.safetensors"), metadata={"wasi_compress": "{not json"})
    save_file({k: v for k, v in tensors.items() if k != "blocks.0.mlp.fc1.L"}, str(lib / "meta-missing.safetensors"),
              metadata={"wasi_compress": json.dumps(meta)})


def _hf_folders(lib: Path) -> None:
    """hf: MODELs that cannot be loaded: a folder with weights but no config.json, a config of a model
    type hf: does not support, and a BERT config for naming classes."""
    bert = {"model_type": "bert", "vocab_size": 50, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 16}
    (lib / "hf-noconfig").mkdir()
    (lib / "hf-noconfig" / "model.safetensors").write_bytes((lib / "w.safetensors").read_bytes())
    (lib / "hf-gpt2").mkdir()
    (lib / "hf-gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1}))
    (lib / "hf-bert.json").write_text(json.dumps(bert))


class _Payload:
    """Unpickling this runs os.mkdir("pwned"): a refused file must never get that far."""

    def __reduce__(self):
        return os.mkdir, ("pwned",)


def _torch_files(lib: Path) -> None:
    import pickle

    import torch

    from wasi_compress.finetune import FinetuneConfig
    from wasi_compress.loading import load_model

    torch.save(torch.nn.Linear(2, 2), lib / "module.pt")
    torch.save(load_model(TINY).model.state_dict(), lib / "w.safetensors.resume.pt")  # weights, named like a state
    (lib / "evil.pt").write_bytes(pickle.dumps(_Payload()))
    config = FinetuneConfig(model=TINY, data="digits", epochs=1, output=OUT, measure_memory=False)
    state = {"version": 1, "config": config.to_json(), "epoch": 1, "model": {}, "optimizer": {}, "history": [],
             "step_times": [], "weight_ranks": {}, "activation_ranks": None, "planning": "null", "per_rank": [{}]}
    other = json.loads(config.to_json())
    states = {"pickle": None, "garbage": None, "list": [1, 2, 3], "version": {**state, "version": 99},
              "epoch": {**state, "epoch": "one"}, "ranks": {**state, "per_rank": "all"},
              "nokey": {k: v for k, v in state.items() if k != "optimizer"},
              "lr": {**state, "config": json.dumps({**other, "lr": 0.5})}}
    for name, value in states.items():
        path = lib / f"resume-{name}.pt"
        if name == "pickle":
            path.write_bytes(pickle.dumps(_Payload()))
        elif name == "garbage":
            path.write_bytes(b"PK\x03\x04 not really a zip")
        else:
            torch.save(value, path)


def _reports(lib: Path) -> None:
    convert = json.dumps(_fixture("convert"))
    analyze = _fixture("analyze")
    (lib / "convert.json").write_text(convert)
    (lib / "analyze.json").write_text(json.dumps(analyze))
    (lib / "analyze2.json").write_text(json.dumps(analyze))
    (lib / "finetune.json").write_text(json.dumps(_fixture("finetune")))
    (lib / "notjson.json").write_text("{'schema': 'wasi-compress/analyze/1'")
    (lib / "list.json").write_text("[1, 2, 3]")
    (lib / "empty.json").write_text("")
    (lib / "schema.json").write_text(json.dumps({"schema": "wasi-compress/nothing/7", "layers": []}))
    (lib / "check.json").write_text(json.dumps({"schema": "wasi-compress/check/1", "gates": [], "passed": True}))
    (lib / "bigint.json").write_text(convert.replace('"total_bytes": 19752', f'"total_bytes": {BIG}'))
    (lib / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (lib / "nan.json").write_text(json.dumps({**analyze, "totals": {**analyze["totals"], "params": float("nan")}}))
    (lib / "gates.toml").write_text("[gates]\nmax-size = '1MB'\n")
    (lib / "rep").mkdir()
    (lib / "rep" / "report.html").write_text(json.dumps(analyze))  # a report document where report.html goes


@pytest.fixture(scope="session")
def hostile_library(tmp_path_factory):
    """Every hostile file, built once (under a minute on two cores)."""
    import sys

    lib = tmp_path_factory.mktemp("hostile")
    here, tests = os.getcwd(), str(Path(__file__).resolve().parent)
    os.chdir(lib)  # FinetuneConfig probes that its (relative) outputs could be written here
    sys.path.insert(0, tests)  # the tiny ViT's factory (as the vit_models fixture, for the whole session)
    try:
        _checkpoints(lib)
        _torch_files(lib)
        _reports(lib)
        _image_folders(lib)
        _hf_folders(lib)
        (lib / "afile").write_text("a file where a folder should be\n")
        os.mkfifo(lib / "fifo")
    finally:
        os.chdir(here)
        sys.path.remove(tests)
    return lib


def _snapshot(folder: Path) -> dict[str, bytes | None]:
    """Every path under `folder` (hidden ones too) with its bytes (None for folders and FIFOs)."""
    return {str(p.relative_to(folder)): (p.read_bytes() if p.is_file() else None) for p in sorted(folder.rglob("*"))}


T = TINY
TRUST = f"--trust-code"
FT = f"--data digits --epochs 1 -o {OUT}"          # a finetune run that would write
FT_RESUME = f"finetune {T} {FT} --resume"
CV = "--budget 1MB -o c.safetensors"                # a convert run that would write

HOSTILE = {
    # ---- weights files: damaged bytes, given to every command that loads a model
    "analyze a truncated safetensors": (f"analyze cut.safetensors --arch {T}", ["cut.safetensors"]),
    "convert a garbage safetensors": (f"convert garbage.safetensors --arch {T} {CV}", ["garbage.safetensors"]),
    "check an empty safetensors": ("check empty.safetensors --max-size 1MB", ["empty.safetensors"]),
    "finetune a safetensors with a 2**62-byte header": (f"finetune hugeheader.safetensors --arch {T} {FT}",
                                                        ["hugeheader.safetensors"]),
    "analyze a safetensors whose header is not JSON": (f"analyze badheader.safetensors --arch {T}",
                                                       ["badheader.safetensors"]),
    "convert a garbage .bin": (f"convert garbage.bin --arch {T} {CV}", ["garbage.bin"]),
    "analyze a pickled module": ("analyze module.pt", ["module.pt", "--trust-pickle"]),
    "analyze a pickle that would run code": (f"analyze evil.pt --arch {T}", ["evil.pt"]),
    "finetune a pickle that would run code": (f"finetune evil.pt --arch {T} {FT}", ["evil.pt"]),
    "analyze weights of another architecture": ("analyze w.safetensors --arch timm:vit_small_patch16_224",
                                                ["w.safetensors"]),
    "analyze weights with an unknown timm name": ("analyze w.safetensors --arch timm:no_such_model_xyz",
                                                  ["no_such_model_xyz"]),
    "analyze a folder as MODEL": ("analyze rep", ["rep"]),
    "convert a missing file": (f"convert missing.safetensors {CV}", ["missing.safetensors", "no such file"]),
    # ---- hf: models (issue 10)
    "analyze an hf: folder without config.json": ("analyze hf:hf-noconfig", ["hf-noconfig", "no config.json"]),
    "convert an hf: folder of an unsupported model type": (f"convert hf:hf-gpt2 {CV}", ["gpt2", "not supported"]),
    "analyze an unknown hf: ModelClass": ("analyze hf:NoSuchModel:hf-bert.json", ["NoSuchModel", "not a supported"]),
    "finetune an hf: class not on the allow-list": (f"finetune hf:os.system:hf-bert.json {FT}", ["os.system"]),
    "check an hf: config that is missing": ("check hf:BertModel:nothere.json --max-size 1MB", ["nothere.json"]),
    # ---- checkpoints with tampered metadata (the code is trusted, so every later check is reached)
    "check a checkpoint naming sys:exit": ("check meta-exit.safetensors --max-size 1GB", ["sys:exit", "--trust-code"]),
    "analyze a checkpoint whose metadata is not JSON": (f"analyze meta-notjson.safetensors {TRUST}",
                                                        ["meta-notjson.safetensors"]),
    "analyze a checkpoint of a future format": (f"analyze meta-format.safetensors {TRUST}", ["checkpoint/99"]),
    "analyze a checkpoint whose structure is not a list": (f"analyze meta-structure.safetensors {TRUST}",
                                                           ["structure is not a list"]),
    "convert a checkpoint naming a dunder attribute": (f"convert meta-dunder.safetensors {TRUST} {CV}",
                                                       ["blocks.0.__class__"]),
    "finetune a checkpoint with a rank above full": (f"finetune meta-rank.safetensors {TRUST} {FT}", ["1000000"]),
    "analyze a checkpoint with a structure kind 'eval'": (f"analyze meta-kind.safetensors {TRUST}", ["kind"]),
    "analyze a checkpoint with num_classes 'ten'": (f"analyze meta-classes.safetensors {TRUST}", ["num_classes"]),
    "analyze a checkpoint with a dangling alias": (f"analyze meta-alias.safetensors {TRUST}", ["no.such.tensor"]),
    "analyze a checkpoint missing a tensor": (f"analyze meta-missing.safetensors {TRUST}", ["blocks.0.mlp.fc1.L"]),
    # ---- resume states (each copied to o.safetensors.resume.pt)
    "resume from a pickle that would run code": (FT_RESUME, ["resume.pt", "pickled Python objects"], "pickle"),
    "resume from a garbage file": (FT_RESUME, ["not a readable resume state"], "garbage"),
    "resume from a list": (FT_RESUME, ["not a resume state", "list"], "list"),
    "resume from a state of version 99": (FT_RESUME, ["version 99"], "version"),
    "resume from a state whose epoch is text": (FT_RESUME, ["'epoch'", "str"], "epoch"),
    "resume from a state whose per_rank is text": (FT_RESUME, ["'per_rank'"], "ranks"),
    "resume from a state missing the optimizer": (FT_RESUME, ["'optimizer' is missing"], "nokey"),
    "resume with other settings": (FT_RESUME, ["lr=0.5"], "lr"),
    "resume without a state": (FT_RESUME, ["does not exist"]),
    # ---- report JSONs
    "check a report that is not JSON": ("check notjson.json --max-size 1MB", ["notjson.json", "not valid JSON"]),
    "check a report that is a list": ("check list.json --max-size 1MB", ["list.json"]),
    "check an empty report": ("check empty.json --max-size 1MB", ["empty.json"]),
    "check a report of an unknown schema": ("check schema.json --max-size 1MB", ["wasi-compress/nothing/7"]),
    "check a missing baseline": ("check convert.json --baseline missing.json --max-regression 5", ["missing.json"]),
    "check a baseline of thousands of digits": ("check convert.json --baseline bigint.json --max-regression 5",
                                                ["bigint.json"]),
    "report a report of thousands of digits": ("report bigint.json -o out", ["bigint.json"]),
    "report a report nested too deep": ("report deep.json -o out", ["deep.json"]),
    "report a report holding NaN": ("report nan.json -o out", ["totals.params", "not a finite number"]),
    "report a check document": ("report check.json -o out", ["check/1", "unknown schema"]),
    "report two analyze reports": ("report analyze.json analyze2.json -o out", ["second analyze"]),
    "report a report that is not JSON": ("report notjson.json -o out", ["not valid JSON"]),
    "report an unknown schema": ("report schema.json -o out", ["wasi-compress/nothing/7"]),
    # ---- image folders
    "finetune on a folder with a decompression bomb": (f"finetune {T} --data bomb --epochs 1 -o {OUT}",
                                                       ["bomb.png", "DecompressionBombError"]),
    "convert calibrated on a decompression bomb": (f"convert {T} {CV} --objective data --calib bomb",
                                                   ["bomb.png", "DecompressionBombError"]),
    "convert evaluated on a decompression bomb": (f"convert {T} {CV} --eval bomb", ["bomb.png"]),
    "finetune on a folder with a truncated PNG": (f"finetune {T} --data cut --epochs 1 -o {OUT}", ["cut.png"]),
    "finetune on a folder with a text file named .png": (f"finetune {T} --data fake --epochs 1 -o {OUT}",
                                                         ["fake.png", "not a readable image"]),
    "finetune on a missing folder": (f"finetune {T} --data nowhere/ --epochs 1 -o {OUT}", ["nowhere"]),
    # ---- budgets
    "convert a budget that is a word": (f"convert {T} --budget lots -o c.safetensors", ["--budget", "lots"]),
    "convert a negative budget": (f"convert {T} --budget -5MB -o c.safetensors", ["--budget"]),
    "convert a budget of 0": (f"convert {T} --budget 0 -o c.safetensors", ["--budget"]),
    "convert a budget of 1e400": (f"convert {T} --budget 1e400 -o c.safetensors", ["--budget", "1e400"]),
    "convert a budget of thousands of digits": (f"convert {T} --budget {BIG} -o c.safetensors", ["--budget"]),
    "convert an infeasible budget": (f"convert {T} --budget 10B -o c.safetensors", ["smallest feasible budget"]),
    "finetune an activation budget that is a word": (f"finetune {T} {FT} --activation-budget some",
                                                     ["--activation-budget"]),
    "finetune an activation budget of thousands of digits": (f"finetune {T} {FT} --activation-budget {BIG}",
                                                             ["--activation-budget"]),
    # ---- thresholds
    "analyze a threshold above 1": (f"analyze {T} --thresholds 0.5,1.5", ["1.5"]),
    "analyze a threshold that is a word": (f"analyze {T} --thresholds half", ["--thresholds", "half"]),
    "convert a negative threshold": (f"convert {T} {CV} --thresholds -0.1", ["-0.1"]),
    "finetune a weight threshold of 0": (f"finetune {T} {FT} --threshold 0", ["threshold"]),
    "finetune an activation threshold of 2": (f"finetune {T} {FT} --activation-threshold 2", ["activation"]),
    "finetune a learning rate of nan": (f"finetune {T} {FT} --lr nan", ["--lr", "nan"]),
    "finetune a negative momentum": (f"finetune {T} {FT} --momentum -1", ["--momentum"]),
    "check a negative --max-onnx-diff": ("check convert.json --max-onnx-diff -1", ["--max-onnx-diff"]),
    "check a --max-regression of nan": ("check convert.json --baseline analyze.json --max-regression nan",
                                        ["--max-regression"]),
    "check a --max-size of thousands of digits": (f"check convert.json --max-size {BIG}", ["--max-size"]),
    "check a --max-params of thousands of digits": (f"check convert.json --max-params {BIG}", ["--max-params"]),
    # ---- sizes
    "analyze an input size with a 0": (f"analyze {T} --input-size 1,0,8", ["--input-size"]),
    "analyze a batch size of 0": (f"analyze {T} --batch-size 0", ["batch"]),
    "analyze an image size of 0": (f"analyze {T} --img-size 0", ["--img-size", "not an image size"]),
    "finetune a batch size of 0": (f"finetune {T} {FT} --batch-size 0", ["batch"]),
    "finetune --finetune-last 0": (f"finetune {T} {FT} --finetune-last 0", ["--finetune-last"]),
    "finetune --frozen-dtype with nothing frozen": (f"finetune {T} {FT} --frozen-dtype bfloat16",
                                                    ["--frozen-dtype", "--finetune-last"]),
    "finetune --frozen-dtype beside --memory-budget": (
        f"finetune {T} {FT} --finetune-last 1 --frozen-dtype bfloat16 --memory-budget 1MB", ["--memory-budget"]),
    "finetune a negative number of epochs": (f"finetune {T} --data digits --epochs -1", ["epochs"]),
    # ---- JACTUS: a retained share outside (0, 100%], a share without its method, too few calibration rows
    "finetune jactus retaining 0%": (f"finetune {T} {FT} --method jactus --retain 0%", ["--retain", "(0, 100%]"]),
    "finetune jactus retaining 120%": (f"finetune {T} {FT} --method jactus --retain 120%", ["--retain", "(0, 100%]"]),
    "finetune jactus retaining a word": (f"finetune {T} {FT} --method jactus --retain most", ["--retain"]),
    "finetune jactus with both --retain and --budget": (f"finetune {T} {FT} --method jactus --retain 80% --budget 1MB",
                                                        ["not both"]),
    "finetune --retain with method wasi": (f"finetune {T} {FT} --retain 80%", ["--retain", "--method jactus"]),
    "finetune --budget with method vanilla": (f"finetune {T} {FT} --method vanilla --budget 1MB", ["--budget"]),
    "finetune jactus on a calibration set too small": (f"finetune {T} {FT} --method jactus --batch-size 1 "
                                                       "--calib-batches 1", ["too small", "--calib-batches"]),
    "finetune jactus under an infeasible budget": (f"finetune {T} {FT} --method jactus --budget 1KB",
                                                   ["smallest feasible"]),
    "convert a rank multiple of 0": (f"convert {T} {CV} --rank-multiple 0", ["rank-multiple"]),
    "convert 0 calibration batches": (f"convert {T} {CV} --calib-batches 0", ["calib-batches"]),
    "check a batch size of 0": ("check w.safetensors --batch-size 0 --max-size 1MB", ["--batch-size"]),
    # ---- an output that is an input
    "convert -o onto MODEL": (f"convert good.safetensors {TRUST} --budget 1MB -o good.safetensors",
                              ["-o", "input MODEL"]),
    "convert --onnx onto --weights": (f"convert {T} --weights w.onnx {CV} --onnx w.onnx", ["--onnx", "input --weights"]),
    "convert --onnx's data file onto --weights": (f"convert {T} --weights m.onnx.data {CV} --onnx m.onnx",
                                                  ["--onnx weights", "input --weights"]),
    "convert --json onto MODEL": (f"convert w.safetensors --arch {T} {CV} --json w.safetensors", ["--json", "input MODEL"]),
    "convert --report onto MODEL": (f"convert rep/report.html --arch {T} {CV} --report rep", ["--report", "input MODEL"]),
    "finetune -o onto MODEL": (f"finetune good.safetensors {TRUST} --data digits --epochs 1 -o good.safetensors",
                               ["-o", "input MODEL"]),
    "finetune --json onto --weights": (f"finetune {T} --weights w.safetensors {FT} --json w.safetensors",
                                       ["--json", "input --weights"]),
    "finetune's resume state onto MODEL": (f"finetune w.safetensors.resume.pt --arch {T} --data digits --epochs 1 "
                                           "-o w.safetensors", ["resume state", "input MODEL"]),
    "finetune --report onto --weights": (f"finetune {T} --weights rep/report.html {FT} --report rep",
                                         ["--report", "input --weights"]),
    "analyze --json onto MODEL": ("analyze w.safetensors --arch {T} --json w.safetensors".format(T=T),
                                  ["--json", "input MODEL"]),
    "analyze --report onto MODEL": (f"analyze rep/report.html --arch {T} --report rep", ["--report", "input MODEL"]),
    "check --json onto TARGET": ("check convert.json --max-size 1MB --json convert.json", ["--json", "input TARGET"]),
    "check --markdown onto --baseline": ("check convert.json --baseline analyze.json --max-regression 5 "
                                         "--markdown analyze.json", ["--markdown", "input --baseline"]),
    "check --junit onto --config": ("check convert.json --config gates.toml --junit gates.toml", ["input --config"]),
    "finetune --json inside the --data folder": (f"finetune {T} --data cut --epochs 1 -o {OUT} --json cut/a/0.png",
                                                 ["--json", "inside the input folder --data"]),
    "convert --report inside the --calib folder": (f"convert {T} {CV} --objective data --calib fake --report fake/b",
                                                   ["--report", "inside the input folder --calib"]),
    "report -o onto a report": ("report rep/report.html -o rep", ["-o", "input REPORT"]),
    "report -o's plots onto a report": ("report analyze.json rep/analyze-energy.png -o rep", ["analyze-energy.png"]),
    # ---- two outputs on one path
    "convert -o and --json on one path": (f"convert {T} --budget 1MB -o c.safetensors --json c.safetensors",
                                          ["same file"]),
    "convert --json onto --onnx's data file": (f"convert {T} {CV} --onnx m.onnx --json m.onnx.data", ["same file"]),
    "convert --json onto a plot of --report": (f"convert {T} {CV} --json r/convert-ranks.png --report r",
                                               ["same file"]),
    "finetune --json onto the resume state": (f"finetune {T} {FT} --json {OUT}.resume.pt", ["same file"]),
    "finetune --json onto --report's report.html": (f"finetune {T} {FT} --json r/report.html --report r",
                                                    ["same file"]),
    "analyze --json onto a plot of --report": (f"analyze {T} --json r/analyze-memory.png --report r", ["same file"]),
    "check --junit and --markdown on one path": ("check convert.json --max-size 1MB --junit g.xml --markdown g.xml",
                                                 ["same file"]),
    # ---- outputs that cannot be written
    "analyze --json under /proc": (f"analyze {T} --json /proc/a.json", ["/proc", "cannot write"]),
    "analyze --report under a file": (f"analyze {T} --report afile/r", ["afile", "not a folder"]),
    "analyze --json into a FIFO": (f"analyze {T} --json fifo", ["fifo", "not a regular file"]),
    "convert -o under /proc": (f"convert {T} --budget 1MB -o /proc/c.safetensors", ["/proc", "cannot write"]),
    "convert --onnx under a file": (f"convert {T} {CV} --onnx afile/m.onnx", ["afile", "not a folder"]),
    "convert --json under /sys": (f"convert {T} {CV} --json /sys/c.json", ["/sys", "cannot write"]),
    "convert --report under /proc": (f"convert {T} {CV} --report /proc/r", ["/proc", "cannot write"]),
    "finetune -o under a file": (f"finetune {T} --data digits --epochs 1 -o afile/o.safetensors",
                                 ["afile", "not a folder"]),
    "finetune -o under /proc": (f"finetune {T} --data digits --epochs 1 -o /proc/o.safetensors",
                                ["/proc", "cannot write"]),
    "finetune --json under /proc": (f"finetune {T} {FT} --json /proc/f.json", ["/proc", "cannot write"]),
    "finetune --report that is a file": (f"finetune {T} {FT} --report afile", ["afile", "is a file"]),
    "finetune --report under a file": (f"finetune {T} {FT} --report afile/r", ["afile", "not a folder"]),
    "check --junit under /proc": ("check convert.json --max-size 1MB --junit /proc/g.xml", ["/proc", "cannot write"]),
    "check --markdown under a file": ("check convert.json --max-size 1MB --markdown afile/g.md",
                                      ["afile", "not a folder"]),
    "check --json into a FIFO": ("check convert.json --max-size 1MB --json fifo", ["fifo", "not a regular file"]),
    "report -o under /proc": ("report analyze.json -o /proc/r", ["/proc", "cannot write"]),
    "report -o that is a file": ("report analyze.json -o afile", ["afile"]),
    "finetune --json that is a folder": (f"finetune {T} {FT} --json rep", ["rep", "folder"]),
}


def _run_hostile(cli, lib: Path, workdir: Path, args: str, resume: str | None):
    import shutil

    for entry in lib.iterdir():
        if entry.name == "fifo":  # copied as what it is: a FIFO (shutil.copy would block reading it)
            os.mkfifo(workdir / "fifo")
        elif entry.is_dir():
            shutil.copytree(entry, workdir / entry.name)
        else:
            shutil.copy(entry, workdir / entry.name)
    if resume is not None:
        shutil.copy(lib / f"resume-{resume}.pt", workdir / f"{OUT}.resume.pt")
    before = _snapshot(workdir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = cli(*args.split())
    # a warning Python shows by default would be a second line on a real process's stderr
    shown = [f"{w.category.__name__}: {w.message}" for w in caught if not issubclass(
        w.category, (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning))]
    assert not shown, shown
    return result, before


@pytest.mark.parametrize("case", list(HOSTILE.values()), ids=list(HOSTILE))
def test_hostile_input_is_one_line_and_leaves_nothing(cli, hostile_library, workdir, case):
    args, fragments, *resume = case
    result, before = _run_hostile(cli, hostile_library, workdir, args, resume[0] if resume else None)
    _one_error_line(result, *fragments)
    if not args.startswith("finetune"):  # finetune shows its progress on stdout; the others print nothing
        assert result.stdout == "", result.stdout
    assert _snapshot(workdir) == before  # every input as it was, nothing added (no output, temporary or lock)


def test_a_code_string_in_checkpoint_metadata_is_never_run(cli, hostile_library, workdir):
    """The dtype recorded in a checkpoint is information (the tensors carry their own): a code string
    there loads as data and runs nothing."""
    import shutil

    shutil.copy(hostile_library / "meta-dtype.safetensors", workdir)
    result = cli("analyze", "meta-dtype.safetensors", "--trust-code", "--batch-size", "1")
    assert result.exit_code == 0, result.output
    assert not (workdir / "pwned").exists()
