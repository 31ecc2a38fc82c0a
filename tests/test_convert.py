"""`convert`: budget semantics, infeasible budgets, file size, determinism, ONNX parity, atomic outputs,
the configuration's validation and JSON round trip, and the two objectives."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import wasi_compress
from wasi_compress.convert import SCHEMA, ConvertConfig, convert
from wasi_compress.errors import InfeasibleBudgetError, UserError
from wasi_compress.loading import load_model

torch.set_num_threads(1)
HERE = Path(__file__).parent
VIT = "convert_models:tiny_vit"   # timm ViT, 2 blocks, 32 px: 3.73 MB in float32
MLP = "convert_models:structured_mlp"  # 1x8x8 inputs (digits), decaying spectra


@pytest.fixture(autouse=True)
def _factories_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))


def _cli(*args):
    from wasi_compress.cli.main import main

    return CliRunner().invoke(main, ["convert", *map(str, args)])


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------------------------------------------
# configuration


@pytest.mark.parametrize("budget", ["0", "-5MB", "inf", "nan", "fifty", "5 XB", "0.1"])
def test_bad_budgets_exit_2_with_one_line(budget, tmp_path):
    result = _cli(VIT, f"--budget={budget}", "-o", tmp_path / "o.safetensors")
    assert result.exit_code == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --budget"), result.stderr
    assert _files(tmp_path) == []


@pytest.mark.parametrize("kwargs, message", [
    ({"dtype": "int8"}, "--dtype"),
    ({"allocator": "best"}, "--allocator"),
    ({"objective": "loss"}, "--objective"),
    ({"objective": "data"}, "--calib"),
    ({"calib_batches": 0}, "--calib-batches"),
    ({"rank_multiple": -8}, "--rank-multiple"),
    ({"thresholds": "0.5,1.5"}, "--thresholds"),
    ({"thresholds": "0.5,x"}, "--thresholds"),
    ({"seed": -1}, "--seed"),
    ({"seed": True}, "--seed"),
    ({"output": "model.pt"}, "safetensors"),
    ({"output": "a.safetensors", "json": "a.safetensors"}, "same file"),
    ({"eval": "random"}, "--eval"),
    ({"onnx_tolerance": float("nan")}, "onnx_tolerance"),
])
def test_config_validates_itself(kwargs, message):
    with pytest.raises(UserError, match=re.escape(message)) as info:
        ConvertConfig(budget="1MB", **kwargs)
    assert "\n" not in str(info.value)


def test_config_json_round_trip():
    config = ConvertConfig(budget="12MiB", dtype="float16", allocator="greedy", objective="data", calib="digits",
                           calib_batches=3, rank_multiple=8, thresholds=(0.9, 0.5), seed=7, onnx="m.onnx")
    assert config.budget_bytes == 12 * 1024**2 and config.thresholds == (0.5, 0.9)
    again = ConvertConfig.from_json(config.to_json())
    assert again == config and again.budget_bytes == config.budget_bytes
    assert ConvertConfig.from_dict(config.to_dict()) == config
    with pytest.raises(UserError, match="unknown convert setting"):
        ConvertConfig.from_dict({**config.to_dict(), "budgett": 1})
    with pytest.raises(UserError, match="needs a budget"):
        ConvertConfig.from_dict({"dtype": "float32"})
    with pytest.raises(UserError, match="not valid JSON"):
        ConvertConfig.from_json("{")


# ---------------------------------------------------------------------------------------------------
# budgets


@pytest.fixture(scope="module")
def vit():
    import sys

    sys.path.insert(0, str(HERE))
    try:
        return load_model(VIT)
    finally:
        sys.path.remove(str(HERE))


def test_infeasible_budget_names_the_smallest_feasible(vit, tmp_path):
    # linears only (--convs never): the patch embedding's convolution stays dense
    result = _cli(VIT, "--budget", "100KB", "--convs", "never", "-o", tmp_path / "o.safetensors")
    assert result.exit_code == 2 and result.stdout == ""
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith("error: ") and "smallest feasible budget is" in line
    smallest = int(re.search(r"smallest feasible budget is (\d+) bytes", line).group(1))
    assert _files(tmp_path) == []
    # the named budget is feasible (every linear at rank 1), one byte less is not
    ok = convert(vit, ConvertConfig(budget=smallest, convs="never"))
    assert ok.report["total_bytes"] == smallest
    assert all(layer["rank"] == 1 for layer in ok.report["layers"])
    with pytest.raises(InfeasibleBudgetError) as info:
        convert(vit, ConvertConfig(budget=smallest - 1, convs="never"))
    assert info.value.smallest_feasible_bytes == smallest


@pytest.mark.slow  # the command end to end
def test_cli_convert_fits_the_budget_and_exports_matching_onnx(vit, tmp_path):
    out, onnx_path, js = tmp_path / "vit.safetensors", tmp_path / "vit.onnx", tmp_path / "r.json"
    budget = 1_800_000
    result = _cli(VIT, "--budget", "1.8MB", "-o", out, "--onnx", onnx_path, "--json", js, "--seed", 3)
    assert result.exit_code == 0, result.output
    assert "rank per linear layer" in result.output and "FLOPs" in result.output
    doc = json.loads(js.read_text())
    assert doc["schema"] == SCHEMA and doc["budget_bytes"] == budget
    assert doc["total_bytes"] <= doc["budget_bytes"] < doc["original_bytes"]
    assert out.stat().st_size <= budget * 1.01 and doc["file_bytes"] == out.stat().st_size
    for key in ("model", "dtype", "allocator", "objective", "seed", "resolution_bytes", "max_slack_bytes",
                "layers", "params", "flops", "pareto", "onnx", "sources"):
        assert key in doc
    assert doc["seed"] == 3 and doc["objective"] == "weight" and doc["allocator"] == "dp"
    assert doc["params"]["converted"] < doc["params"]["original"]
    assert doc["flops"]["converted"] < doc["flops"]["original"]
    assert sum(layer["bytes"] for layer in doc["layers"]) + doc["fixed_bytes"] == doc["total_bytes"]
    assert {"name", "rank", "bytes", "error"} == set(doc["layers"][0])
    budgets = [p["budget_bytes"] for p in doc["pareto"]]
    errors = [p["error"] for p in doc["pareto"]]
    assert budgets == sorted(budgets) and errors == sorted(errors, reverse=True) and errors[-1] == 0
    assert doc["onnx"]["max_abs_diff"] <= 1e-4 and doc["onnx"]["path"] == str(onnx_path)
    import onnx

    graph = onnx.load(str(onnx_path)).graph
    assert sum(n.op_type == "MatMul" for n in graph.node) >= 2 * sum(layer["rank"] is not None for layer in doc["layers"])
    model = wasi_compress.load(out, trust_code=True)  # names the test factory convert_models:tiny_vit
    x = torch.randn(2, 3, 32, 32)
    import onnxruntime as ort

    got = ort.InferenceSession(str(onnx_path)).run(None, {"input": x.numpy()})[0]
    with torch.no_grad():
        assert float((model(x) - torch.from_numpy(got)).abs().max()) <= 1e-4
    assert _files(tmp_path) == ["r.json", "vit.onnx", "vit.safetensors"]


@pytest.mark.slow  # the command end to end
def test_same_inputs_and_seed_give_identical_bytes(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    for out in (a, b):
        result = _cli(MLP, "--budget", "30KB", "--objective", "data", "--calib", "digits", "--calib-batches", 2,
                      "--seed", 5, "-o", out)
        assert result.exit_code == 0, result.output
    assert a.read_bytes() == b.read_bytes()


def test_huge_budget_keeps_every_layer_dense(vit):
    result = convert(vit, ConvertConfig(budget="1GB"))
    assert all(layer["rank"] is None and layer["error"] == 0 for layer in result.report["layers"])
    assert result.report["total_bytes"] == result.report["original_bytes"]
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), vit.model(x))
    assert type(result.model) is type(vit.model)


def test_dtype_rank_multiple_and_greedy(vit):
    result = convert(vit, ConvertConfig(budget="1MB", dtype="bfloat16", rank_multiple=8, allocator="greedy"))
    doc = result.report
    assert doc["original_bytes"] == 3_730_216 // 2 and doc["total_bytes"] <= 1_000_000
    ranks = [layer["rank"] for layer in doc["layers"] if layer["rank"] is not None]
    assert ranks and all(r % 8 == 0 for r in ranks)
    assert all(p.dtype == torch.float32 for p in result.model.parameters())
    w = next(p for p in result.model.parameters() if p.dim() == 2)
    torch.testing.assert_close(w, w.to(torch.bfloat16).float(), rtol=0, atol=0)  # values as stored
    assert doc["allocator"] == "greedy"


# ---------------------------------------------------------------------------------------------------
# atomicity


def test_failure_after_planning_leaves_nothing(vit, tmp_path, monkeypatch):
    import wasi_compress.convert.job as job

    def boom(*args, **kwargs):
        raise RuntimeError("forced failure after planning")

    monkeypatch.setattr(job, "merge_structure", boom)
    config = ConvertConfig(budget="1.5MB", output=str(tmp_path / "o.safetensors"), onnx=str(tmp_path / "o.onnx"),
                           json=str(tmp_path / "o.json"))
    with pytest.raises(RuntimeError, match="forced"):
        convert(vit, config)
    assert _files(tmp_path) == []


@pytest.mark.slow  # an ONNX export and the command
def test_onnx_parity_failure_writes_nothing(vit, tmp_path, monkeypatch):
    import onnxruntime as ort

    real = ort.InferenceSession

    class Drifting:
        def __init__(self, *args, **kwargs):
            self.session = real(*args, **kwargs)

        def get_inputs(self):
            return self.session.get_inputs()

        def run(self, *args, **kwargs):
            return [y + 1e-3 for y in self.session.run(*args, **kwargs)]

    monkeypatch.setattr(ort, "InferenceSession", Drifting)
    result = _cli(VIT, "--budget", "1.5MB", "-o", tmp_path / "o.safetensors", "--onnx", tmp_path / "o.onnx",
                  "--json", tmp_path / "o.json")
    assert result.exit_code == 2 and result.stdout == ""
    assert "ONNX parity check failed" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert _files(tmp_path) == []


@pytest.mark.slow  # an ONNX export
def test_failure_while_writing_removes_what_was_written(vit, tmp_path, monkeypatch):
    import wasi_compress.fileio as fileio

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(fileio, "write_json", fail)
    config = ConvertConfig(budget="1.5MB", output=str(tmp_path / "o.safetensors"), onnx=str(tmp_path / "o.onnx"),
                           json=str(tmp_path / "o.json"))
    with pytest.raises(OSError):
        convert(vit, config)
    assert _files(tmp_path) == []


@pytest.mark.slow  # an ONNX export
def test_large_models_keep_onnx_weights_beside_the_file(vit, tmp_path, monkeypatch):
    import wasi_compress.onnx_export as onnx_export

    monkeypatch.setattr(onnx_export, "ONNX_EXTERNAL_DATA_BYTES", 1000)
    result = convert(vit, ConvertConfig(budget="1.5MB", onnx=str(tmp_path / "m.onnx")))
    assert _files(tmp_path) == ["m.onnx", "m.onnx.data"]
    assert result.report["onnx"]["max_abs_diff"] <= 1e-4
    assert (tmp_path / "m.onnx").stat().st_size < 100_000


# ---------------------------------------------------------------------------------------------------
# objectives


@pytest.mark.slow  # two calibrated conversions
def test_data_objective_beats_weight_objective_on_output_error():
    from wasi_compress.data import load_images, normalize

    loaded = load_model(MLP)
    x = normalize(load_images("digits", "test").images, loaded.mean, loaded.std)
    with torch.no_grad():
        reference = loaded.model(x)
    errors = {}
    for objective in ("weight", "data"):
        result = convert(loaded, ConvertConfig(budget="30KB", objective=objective, calib="digits", calib_batches=4,
                                               eval="digits"))
        with torch.no_grad():
            errors[objective] = float((result.model(x) - reference).norm() / reference.norm())
        assert result.report["objective"] == objective and "accuracy" in result.report
        assert result.report["total_bytes"] <= 30_000
    assert errors["data"] < 0.5 * errors["weight"]
    doc = result.report
    assert doc["calibration"] == {"data": "digits", "batches": 4, "batch_size": 32}
    assert "output error" in doc["sources"]["layers.error"]
