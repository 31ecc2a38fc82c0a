"""`analyze`: the Python API on hand-written models with hand-computed figures, the analyze/1 document,
and the `wasi-compress analyze` command (click's CliRunner), including the done-when check on
timm:vit_base_patch32_224."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from wasi_compress.analysis import DEFAULT_THRESHOLDS, SCHEMA, analyze, analyze_model, check_thresholds
from wasi_compress.errors import UserError
from wasi_compress.loading import load_model

FACTORY = "vit_models:functional_head_vit"
F32 = 4
LAYER_KEYS = {"name", "role", "kind", "in_features", "out_features", "params", "weight_bytes", "activation_shape",
              "activation_bytes", "ranks", "break_even_rank", "param_fraction", "flops", "singular_values"}
TOP_KEYS = {"schema", "model", "capture", "capture_note", "batch_size", "input_shape", "dtype", "thresholds", "layers",
            "totals", "skipped", "notes", "sources", "source_kinds"}
TRAIN_MEMORY_KEYS = {"params_bytes", "grads_bytes", "optimizer_bytes", "saved_activation_bytes", "total_bytes", "sources"}
TOTALS_KEYS = {"params", "weight_bytes", "flops", "flops_convention", "train_memory", "saved_by_family", "linear"}
FAMILY_KEYS = {"linear_inputs", "layernorm", "activation", "attention", "other"}


def _brute_break_even(out_f: int, in_f: int) -> int:
    return max([k for k in range(0, min(out_f, in_f) + 1) if k * (out_f + in_f) < out_f * in_f], default=0)


def _numpy_rank(s: np.ndarray, eps: float) -> int:
    cumulative = np.cumsum(s.astype(np.float64) ** 2)
    return int(np.argmax(cumulative >= eps * cumulative[-1] * (1 - 1e-12))) + 1


def check_layers(doc: dict, model: nn.Module) -> None:
    """Invariants every analyze/1 layer satisfies, checked against the model's own weights."""
    thresholds = doc["thresholds"]
    for layer in doc["layers"]:
        assert set(layer) == LAYER_KEYS
        in_f, out_f = layer["in_features"], layer["out_features"]
        keys = list(layer["ranks"])
        assert [float(k) for k in keys] == thresholds
        ranks = [layer["ranks"][k] for k in keys]
        assert ranks == sorted(ranks), (layer["name"], ranks)  # non-decreasing in the threshold
        assert all(1 <= r <= min(in_f, out_f) for r in ranks), (layer["name"], ranks)
        assert layer["break_even_rank"] == _brute_break_even(out_f, in_f)
        for k in keys:
            assert layer["param_fraction"][k] == pytest.approx(layer["ranks"][k] * (in_f + out_f) / (in_f * out_f), abs=1e-6)
        shape = layer["activation_shape"]
        assert shape[0] == doc["batch_size"] and shape[-1] == in_f
        assert layer["activation_bytes"] == math.prod(shape) * F32
        assert layer["flops"] == math.prod(shape[:-1]) * in_f * out_f
        s = np.asarray(layer["singular_values"])
        assert len(s) == min(in_f, out_f) and np.all(np.diff(s) <= 1e-6)
        weight = _weight_of(model, layer).detach().double().numpy()
        np.testing.assert_allclose(s, np.linalg.svd(weight, compute_uv=False), rtol=1e-4, atol=1e-6)
        assert {k: _numpy_rank(np.linalg.svd(weight, compute_uv=False), float(k)) for k in keys} == layer["ranks"]


def _weight_of(model: nn.Module, layer: dict) -> torch.Tensor:
    """A layer is named after its module (weight `name.weight`) or, for F.linear on a bare parameter, after
    that parameter."""
    try:
        return model.get_parameter(layer["name"])
    except AttributeError:
        return model.get_parameter(layer["name"] + ".weight")


# --------------------------------------------------------------------------------------------------
# API


def test_analyze_mlp_by_hand():
    """Linear(8,16) -> GELU -> Linear(16,4) at batch 3: every figure worked out by hand (see test_memory)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
    doc = analyze(model, batch_size=3, input_size=(8,), thresholds=(0.9, 0.5))
    assert doc["thresholds"] == [0.5, 0.9]
    assert [(l["name"], l["in_features"], l["out_features"]) for l in doc["layers"]] == [("0", 8, 16), ("2", 16, 4)]
    assert [l["params"] for l in doc["layers"]] == [8 * 16 + 16, 16 * 4 + 4]
    assert [l["weight_bytes"] for l in doc["layers"]] == [144 * F32, 68 * F32]
    assert [l["activation_bytes"] for l in doc["layers"]] == [3 * 8 * F32, 3 * 16 * F32]
    assert [l["flops"] for l in doc["layers"]] == [3 * 8 * 16, 3 * 16 * 4]
    assert [l["break_even_rank"] for l in doc["layers"]] == [5, 3]  # 5 * 24 = 120 < 128; 3 * 20 = 60 < 64
    check_layers(doc, model)
    totals = doc["totals"]
    assert totals["params"] == 212 and totals["weight_bytes"] == 848
    assert totals["flops"] == 576
    tm = totals["train_memory"]
    assert (tm["params_bytes"], tm["grads_bytes"], tm["optimizer_bytes"]) == (848, 848, {"sgd_momentum": 848, "adamw": 1696})
    assert tm["saved_activation_bytes"] == 480  # x, GELU's input, GELU's output (= fc2's input)
    assert tm["total_bytes"] == 848 + 848 + 1696 + 480
    lin = totals["linear"]
    assert (lin["params"], lin["weight_bytes"], lin["flops"]) == (212, 848, 576)
    assert lin["train_memory"]["saved_activation_bytes"] == 288  # the two linears' inputs
    # by op family: the linears' inputs, and GELU's own saved input (fc1's output, 3 x 16)
    assert totals["saved_by_family"] == {"linear_inputs": 288, "layernorm": 0, "activation": 3 * 16 * F32,
                                         "attention": 0, "other": 0}
    assert doc["source_kinds"]["totals.saved_by_family"] == "measured"


def test_analyze_hand_written_vit_finds_every_linear_with_the_functional_head(vit_models):
    loaded = load_model(FACTORY)
    doc = analyze(loaded, batch_size=2)
    assert doc["schema"] == SCHEMA == "wasi-compress/analyze/1"
    assert set(doc) == TOP_KEYS
    assert (doc["model"], doc["capture"], doc["capture_note"]) == (FACTORY, "fx", None)
    assert doc["input_shape"] == [2, 3, 32, 32] and doc["dtype"] == "float32"
    assert doc["thresholds"] == list(DEFAULT_THRESHOLDS)
    assert doc["skipped"] == []
    layers = doc["layers"]
    assert len(layers) == vit_models.EXPECTED_LINEARS["functional_head_vit"] == 9
    assert [l["role"] for l in layers] == ["qkv", "proj", "fc1", "fc2"] * 2 + ["head"]
    head = layers[-1]
    assert (head["name"], head["kind"], head["in_features"], head["out_features"]) == ("head_weight", "functional", 32, 10)
    assert head["params"] == 32 * 10 + 10 and head["activation_shape"] == [2, 32]
    assert all(l["activation_shape"] == [2, 17, l["in_features"]] for l in layers[:-1])
    check_layers(doc, loaded.model)

    totals, dim, tokens = doc["totals"], vit_models.DIM, 17
    assert totals["params"] == sum(p.numel() for p in loaded.model.parameters())
    assert totals["linear"]["params"] == sum(l["params"] for l in layers)
    assert totals["linear"]["flops"] == sum(l["flops"] for l in layers)
    conv = 2 * 16 * 3 * 8 * 8 * dim
    attention = 2 * 2 * 2 * tokens * tokens * (16 + 16)
    norms = 5 * 2 * tokens * dim * 5
    assert totals["flops"] == totals["linear"]["flops"] + conv + attention + norms
    # measured: each linear saves its input; the head's input is a view of the final norm's (2, 17, 32)
    # output, whose whole storage it keeps alive
    measured = totals["linear"]["train_memory"]["saved_activation_bytes"]
    assert measured == sum(l["activation_bytes"] for l in layers[:-1]) + 2 * tokens * dim * F32
    assert totals["train_memory"]["saved_activation_bytes"] > measured
    assert set(totals["train_memory"]) == TRAIN_MEMORY_KEYS
    assert set(totals) == TOTALS_KEYS and set(totals["saved_by_family"]) == FAMILY_KEYS
    by_family = totals["saved_by_family"]
    assert sum(by_family.values()) == totals["train_memory"]["saved_activation_bytes"]
    assert by_family["linear_inputs"] == measured
    assert by_family["layernorm"] > 0 and by_family["activation"] > 0 and by_family["attention"] > 0
    json.dumps(doc)  # plain JSON types only


def test_analyze_tiny_timm_vit_saved_by_family(vit_models):
    """timm's ViT: every op family saves something for backward; the families add up to the measured total
    exactly and linear inputs are the linear layers' figure."""
    doc = analyze(load_model("vit_models:tiny_timm_vit"), batch_size=2)
    totals = doc["totals"]
    by_family = totals["saved_by_family"]
    assert set(totals) == TOTALS_KEYS and set(by_family) == FAMILY_KEYS
    assert sum(by_family.values()) == totals["train_memory"]["saved_activation_bytes"]
    assert by_family["linear_inputs"] == totals["linear"]["train_memory"]["saved_activation_bytes"]
    assert min(by_family["layernorm"], by_family["activation"], by_family["attention"]) > 0
    assert doc["source_kinds"]["totals.saved_by_family"] == "measured"


def test_analyze_multihead_attention_vit(vit_models):
    doc = analyze(load_model("vit_models:mha_vit"), batch_size=1)
    assert doc["capture"] == "fx" and doc["skipped"] == []
    assert [l["role"] for l in doc["layers"]] == ["q", "k", "v", "proj", "fc1", "fc2"] * 2 + ["head"]
    assert doc["layers"][0]["name"] == "blocks.0.attn.q_proj"


def test_analyze_untraceable_vit_uses_hooks_and_says_why(vit_models):
    loaded = load_model("vit_models:untraceable_vit")
    doc = analyze(loaded, batch_size=2)
    assert doc["capture"] == "hooks"
    assert "fx could not trace" in doc["capture_note"]
    assert len(doc["layers"]) == 9 and doc["skipped"] == []
    check_layers(doc, loaded.model)


def test_analyze_model_and_input_size(vit_models):
    doc = analyze_model(FACTORY, batch_size=1, img_size=48, num_classes=4)
    assert doc["input_shape"] == [1, 3, 48, 48]
    assert doc["layers"][0]["activation_shape"] == [1, 37, 32]  # 36 patches + the class token
    assert doc["layers"][-1]["out_features"] == 4


def test_progress_is_reported(vit_models):
    seen = []
    analyze(load_model(FACTORY), batch_size=1, on_progress=lambda done, total, what: seen.append((done, total, what)))
    assert seen[-1] == (11, 11, "done")
    assert [d for d, _, _ in seen] == sorted(d for d, _, _ in seen)
    assert any("head_weight" in w for _, _, w in seen)


@pytest.mark.parametrize("bad", [(), (0.0,), (1.5,), (float("nan"),), (-0.1, 0.5)])
def test_bad_thresholds(bad):
    with pytest.raises(UserError, match="thresholds"):
        check_thresholds(bad)


def test_thresholds_are_sorted_and_deduplicated():
    assert check_thresholds([0.9, 0.5, 0.9, 1]) == (0.5, 0.9, 1.0)


def test_bad_batch_size(vit_models):
    with pytest.raises(UserError, match="batch-size"):
        analyze(load_model(FACTORY), batch_size=0)


def test_documented_layer_keys_match():
    """docs/schemas.md names every key of a layer; the document carries exactly those."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "schemas.md").read_text()
    section = text.split("## `wasi-compress/analyze/1`")[1].split("## ")[0]
    for key in LAYER_KEYS | TOP_KEYS | TRAIN_MEMORY_KEYS | TOTALS_KEYS:
        assert f"`{key}`" in section, key


# --------------------------------------------------------------------------------------------------
# CLI


def test_cli_json_to_stdout(cli):
    result = cli("analyze", FACTORY, "--batch-size", "2", "--json", "-")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)  # stdout holds the JSON document and nothing else
    assert doc["schema"] == SCHEMA and doc["batch_size"] == 2 and len(doc["layers"]) == 9
    assert doc["layers"][-1]["kind"] == "functional"
    assert "9 linear layers" in result.stderr and "capture: fx" in result.stderr  # the table went to stderr


def test_cli_json_to_a_file_with_options(cli, tmp_path):
    out = tmp_path / "reports" / "analyze.json"
    result = cli("analyze", FACTORY, "--batch-size", "1", "--thresholds", "0.9,0.5", "--img-size", "48",
                 "--input-size", "3,48,48", "--num-classes", "4", "--device", "cpu", "--json", out)
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["thresholds"] == [0.5, 0.9]
    assert all(set(l["ranks"]) == {"0.5", "0.9"} for l in doc["layers"])
    assert doc["input_shape"] == [1, 3, 48, 48]
    assert doc["layers"][-1]["out_features"] == 4
    assert "wrote" in result.stdout and "head_weight" in result.stdout
    assert result.stderr == ""


def test_cli_without_json_prints_tables(cli):
    result = cli("analyze", "vit_models:untraceable_vit", "--batch-size", "1")
    assert result.exit_code == 0, result.output
    assert "capture: hooks" in result.stdout and "fx could not trace" in result.stdout
    assert "saved activations" in result.stdout and "measured" in result.stdout
    assert "saved for backward, by op family" in result.stdout
    assert all(label in result.stdout for label in ("linear inputs", "LayerNorm", "activation functions", "attention"))


def test_cli_state_dict_with_arch(cli, tmp_path, vit_models):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file(vit_models.functional_head_vit().state_dict(), str(path))
    result = cli("analyze", path, "--arch", FACTORY, "--batch-size", "1", "--json", "-")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["model"] == str(path)


def test_cli_whole_module_with_trust_pickle(cli, tmp_path):
    path = tmp_path / "whole.pt"
    torch.save(nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5)), path)
    result = cli("analyze", path, "--trust-pickle", "--input-size", "3,4,4", "--batch-size", "2", "--json", "-")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [(l["name"], l["activation_bytes"]) for l in doc["layers"]] == [("1", 2 * 48 * F32)]


@pytest.mark.parametrize("args,fragments", [
    (["--batch-size", "0"], ["--batch-size"]),
    (["--thresholds", "0,0.5"], ["thresholds", "(0, 1]"]),
    (["--thresholds", "0.5,1.5"], ["thresholds"]),
    (["--thresholds", "abc"], ["--thresholds"]),
    (["--input-size", "3,32"], ["--input-size", "C,H,W"]),
    (["--input-size", "3,0,32"], ["--input-size"]),
    (["--input-size", "a,b,c"], ["--input-size"]),
    (["--input-size", "1,32,32"], ["channels"]),
    (["--input-size", "3,40,40"], ["size of tensor"]),
    (["--device", "no-such-device"], ["--device"]),
])
def test_cli_bad_options_are_one_line_and_exit_2(cli, assert_one_line_error, args, fragments):
    assert_one_line_error(cli("analyze", FACTORY, *args), *fragments)


def test_cli_input_size_that_timm_rejects_is_one_line(cli, assert_one_line_error):
    """timm checks the input size with an assertion; the message carries the real sizes."""
    assert_one_line_error(cli("analyze", "timm:vit_tiny_patch16_224", "--img-size", "32", "--input-size", "3,64,64"),
                          "Input height (64) doesn't match model (32)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
def test_cli_cuda_without_cuda_is_one_line(cli, assert_one_line_error):
    assert_one_line_error(cli("analyze", FACTORY, "--device", "cuda"), "CUDA is not available")


def test_cli_help_lists_the_options(cli):
    result = cli("analyze", "--help")
    assert result.exit_code == 0
    for option in ("--batch-size", "--input-size", "--thresholds", "--json", "--device", "--arch", "--weights",
                   "--trust-pickle", "--num-classes", "--img-size"):
        assert option in result.stdout


# --------------------------------------------------------------------------------------------------
# done-when: timm:vit_base_patch32_224 at the default batch size (8)


@pytest.mark.slow
def test_vit_base_patch32_done_when(cli):
    result = cli("analyze", "timm:vit_base_patch32_224", "--json", "-")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    b, n = 8, 50  # 7 x 7 patches + the class token
    assert doc["batch_size"] == b and doc["input_shape"] == [b, 3, 224, 224]
    assert doc["capture"] == "fx" and doc["skipped"] == []
    layers = doc["layers"]
    assert len(layers) == 49
    assert [l["role"] for l in layers] == ["qkv", "proj", "fc1", "fc2"] * 12 + ["head"]
    for layer in layers:
        ranks = list(layer["ranks"].values())
        assert ranks == sorted(ranks) and max(ranks) <= min(layer["in_features"], layer["out_features"])
        tokens = [] if layer["role"] == "head" else [n]
        assert layer["activation_shape"] == [b, *tokens, layer["in_features"]]
        assert layer["activation_bytes"] == b * math.prod(tokens) * layer["in_features"] * 4
    blocks = layers[:-1]
    assert all(l["activation_bytes"] == b * n * l["in_features"] * 4 for l in blocks)

    totals = doc["totals"]
    assert totals["params"] == 88_224_232  # timm's ViT-B/32 with its 1000-class head
    # fvcore: linears + patch conv + fused attention (QK^T and AV) + 25 LayerNorms (5 per element)
    conv = b * 49 * (3 * 32 * 32) * 768
    attention = 12 * b * 12 * n * n * (64 + 64)
    norms = 25 * b * n * 768 * 5
    assert totals["flops"] == totals["linear"]["flops"] + conv + attention + norms
    linear_saved = totals["linear"]["train_memory"]["saved_activation_bytes"]
    # every block linear's input, plus the head's input: a view of the final norm output (8, 50, 768)
    assert linear_saved == sum(l["activation_bytes"] for l in blocks) + b * n * 768 * 4
    assert totals["train_memory"]["saved_activation_bytes"] > linear_saved
    by_family = totals["saved_by_family"]
    assert sum(by_family.values()) == totals["train_memory"]["saved_activation_bytes"]
    assert by_family["linear_inputs"] == linear_saved
