"""Loading a file never imports or calls code the file names (issue 11, section 1): a checkpoint's
metadata may name a ``package.module:factory``; building it needs the user's explicit trust."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import save_file

import wasi_compress
from wasi_compress.errors import UserError

SENTINEL = '''
import pathlib
pathlib.Path({marks!r}, "imported").touch()  # top-level code runs on import


def factory(**kwargs):
    pathlib.Path({marks!r}, "called").touch()
    import vit_models
    return vit_models.tiny_timm_vit(**kwargs)
'''


@pytest.fixture
def sentinel(tmp_path, monkeypatch, vit_models):
    """An importable module `wasi_sentinel` that records being imported and its factory being called."""
    marks = tmp_path / "marks"
    marks.mkdir()
    (tmp_path / "wasi_sentinel.py").write_text(SENTINEL.format(marks=str(marks)))
    monkeypatch.syspath_prepend(str(tmp_path))
    return marks


_GENUINE: dict = {}  # budget -> (tensors, metadata) of a genuine checkpoint, converted once per session


def _genuine(budget) -> tuple[dict, dict]:
    from wasi_compress.convert import ConvertConfig, convert
    from wasi_compress.loading import load_model

    if budget not in _GENUINE:
        result = convert(load_model("vit_models:tiny_timm_vit"), ConvertConfig(budget=budget))
        import tempfile

        with tempfile.TemporaryDirectory() as folder:
            good = Path(folder) / "good.safetensors"
            result.save(str(good))
            with safe_open(str(good), framework="pt") as f:
                _GENUINE[budget] = ({k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["wasi_compress"]))
    tensors, meta = _GENUINE[budget]
    return dict(tensors), json.loads(json.dumps(meta))


def _tampered(tmp_path, arch: str = "wasi_sentinel:factory", metadata=None, budget=10**9):
    """A genuine checkpoint of the tiny ViT whose metadata (tensors untouched) names `arch`."""
    tensors, meta = _genuine(budget)
    meta["source"]["arch"] = arch
    evil = tmp_path / "evil.safetensors"
    save_file(tensors, str(evil), metadata={"wasi_compress": json.dumps(meta if metadata is None else metadata)})
    return evil


def test_a_file_naming_a_factory_is_refused_and_nothing_is_imported(sentinel, tmp_path):
    evil = _tampered(tmp_path)
    with pytest.raises(UserError, match="--trust-code"):
        wasi_compress.load(evil)
    assert not any(sentinel.iterdir())  # neither imported nor called


@pytest.mark.parametrize("args", [["analyze", "{evil}"], ["check", "{evil}", "--max-size", "1KB"],
                                  ["convert", "{evil}", "--budget", "1MB", "-o", "{evil}.out.safetensors"]])
def test_commands_refuse_it_with_one_line(sentinel, tmp_path, cli, assert_one_line_error, args):
    evil = _tampered(tmp_path)
    result = cli(*[a.format(evil=evil) for a in args])
    assert_one_line_error(result, "wasi_sentinel:factory", "--trust-code")  # exit 2: never a passed gate
    assert not any(sentinel.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".safetensors") == ["evil.safetensors"]


def test_trust_code_or_the_same_arch_lets_a_genuine_factory_through(sentinel, tmp_path):
    evil = _tampered(tmp_path)
    assert wasi_compress.load(evil, trust_code=True) is not None
    assert (sentinel / "called").exists()
    (sentinel / "called").unlink()
    wasi_compress.load(evil, arch="wasi_sentinel:factory")  # the user named the code themselves
    assert (sentinel / "called").exists()


def test_a_path_looking_model_is_a_path_not_an_import(sentinel, tmp_path, monkeypatch, cli, assert_one_line_error):
    (tmp_path / "models.py").write_text(f"import pathlib\npathlib.Path({str(sentinel)!r}, 'imported').touch()\n")
    monkeypatch.chdir(tmp_path)
    assert_one_line_error(cli("analyze", "models:v2.safetensors"), "no such file")
    assert not any(sentinel.iterdir())


@pytest.mark.parametrize("metadata", [[1, 2], "a string", 3])
def test_metadata_of_the_wrong_json_type_is_one_line(tmp_path, cli, assert_one_line_error, metadata):
    evil = _tampered(tmp_path, metadata=metadata)
    assert_one_line_error(cli("analyze", evil), "not an object")


@pytest.mark.parametrize("command", ["convert", "finetune"])
def test_no_output_may_overwrite_the_input(tmp_path, cli, assert_one_line_error, command):
    from wasi_compress.convert import ConvertConfig, convert
    from wasi_compress.loading import load_model

    model = tmp_path / "m.safetensors"
    convert(load_model("builtin:mnist-vit"), ConvertConfig(budget=10**9, output=str(model)))
    before = model.read_bytes()
    extra = ["--budget", "5MB", "-o", tmp_path / "o.safetensors"] if command == "convert" else \
        ["--data", "digits", "--epochs", "1", "-o", tmp_path / "o.safetensors"]
    assert_one_line_error(cli(command, model, *extra, "--json", model), "--json", "input MODEL")
    assert model.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_two_outputs_may_not_share_a_path(tmp_path, cli, assert_one_line_error):
    out = tmp_path / "o.safetensors"
    result = cli("finetune", "builtin:mnist-vit", "--data", "digits", "-o", out, "--json", f"{out}.resume.pt")
    assert_one_line_error(result, "same file")
    assert list(tmp_path.iterdir()) == []


def test_notes_from_a_file_are_shown_never_obeyed(tmp_path, cli):
    """Metadata notes with ANSI escapes and rich markup reach the terminal as plain text; a note that is
    not a string is dropped."""
    from wasi_compress.cli._common import plain
    from wasi_compress.convert import ConvertConfig, convert
    from wasi_compress.loading import load_model

    assert plain("\x1b[2Ja [b]x[/b]") == "[2Ja \\[b]x\\[/b]"
    good = tmp_path / "good.safetensors"
    convert(load_model("builtin:mnist-vit"), ConvertConfig(budget=10**9, output=str(good)))
    with safe_open(str(good), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["wasi_compress"])
    meta["notes"] = ["\x1b[2Jcleared [link=http://x]click[/link] [/bogus]", 42]
    evil = tmp_path / "notes.safetensors"
    save_file(tensors, str(evil), metadata={"wasi_compress": json.dumps(meta)})
    result = cli("analyze", evil, "--batch-size", "1")
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "[link=http://x]click[/link] [/bogus]" in result.output
    assert "42" not in [line.strip() for line in result.output.splitlines()]


def test_analyze_and_check_refuse_to_overwrite_their_input(tmp_path, cli, assert_one_line_error):
    report = tmp_path / "a.json"
    report.write_text('{"schema": "wasi-compress/analyze/1"}')
    before = report.read_text()
    assert_one_line_error(cli("check", report, "--max-size", "1KB", "--junit", report), "--junit", "input TARGET")
    weights = tmp_path / "w.safetensors"
    weights.write_bytes(b"not really")
    assert_one_line_error(cli("analyze", weights, "--arch", "timm:vit_tiny_patch16_224", "--json", weights), "input MODEL")
    assert report.read_text() == before and weights.read_bytes() == b"not really"


NAMES = "wasi_sentinel:factory"  # what a tampered field holds: the importable sentinel, by name
FIELDS = [("source", "arch"), ("source", "num_classes"), ("source", "img_size"), ("format",), ("dtype",),
          ("toolkit_version",), ("explicit_attention",), ("notes",), ("plan",), ("convert",), ("seed",), ("aliases",),
          ("structure",), *[("structure", 0, key) for key in ("name", "kind", "module", "rank", "in_features",
                                                              "out_features", "bias")]]


@pytest.mark.parametrize("field", FIELDS, ids=[".".join(map(str, f)) for f in FIELDS])
def test_no_metadata_field_imports_or_calls_what_it_names(sentinel, tmp_path, field):
    """Each field of a genuine checkpoint's metadata set to the sentinel's name (a string, a one-entry
    mapping, a one-item list): loading it, with the user naming the architecture themselves, either works
    or is refused with one UserError line, and the sentinel is never imported nor called."""
    evil = _tampered(tmp_path, arch="vit_models:tiny_timm_vit", budget="60KB")  # some layers factored
    with safe_open(str(evil), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["wasi_compress"])
    assert meta["structure"]
    wasi_compress.load(evil, arch="vit_models:tiny_timm_vit")  # untampered, it loads
    for value in (NAMES, {NAMES: NAMES}, [NAMES]):
        *parents, last = field
        holder = meta
        for step in parents:
            holder = holder[step]
        holder[last] = value
        save_file(tensors, str(evil), metadata={"wasi_compress": json.dumps(meta)})
        try:
            wasi_compress.load(evil, arch="vit_models:tiny_timm_vit")
        except UserError as exc:
            assert "\n" not in str(exc), str(exc)
        assert not any(sentinel.iterdir()), (field, value)
