"""Checkpoints: save, restore without SVD or planning, shared tensors, dtypes, damaged metadata, and
converting a checkpoint again (its source architecture and structure carry through)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import wasi_compress
from wasi_compress.checkpoint import FORMAT, METADATA_KEY, restore, save_checkpoint
from wasi_compress.convert import ConvertConfig, convert
from wasi_compress.errors import UserError
from wasi_compress.loading import load_model
from wasi_compress.modules.lowrank_conv import LowRankConv2d
from wasi_compress.modules.subspace import SubspaceLinear

torch.set_num_threads(1)
HERE = Path(__file__).parent


@pytest.fixture(autouse=True)
def _factories_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(HERE))  # MODEL "convert_models:<factory>"


def _metadata(path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()[METADATA_KEY])


def _keys(path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def _forbid_decompositions(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("restore must not decompose anything")

    for name in ("svd", "svdvals", "eigvalsh", "eigh", "qr", "cholesky", "cholesky_ex"):
        monkeypatch.setattr(torch.linalg, name, boom)
    monkeypatch.setattr(torch, "svd", boom)
    monkeypatch.setattr(torch, "svd_lowrank", boom)


@pytest.fixture(scope="module")
def hand_ckpt(tmp_path_factory):
    """hand_vit (nn.MultiheadAttention + functional head) converted at its smallest budget, so every
    site, the functional head included, is factored; float16 storage."""
    import sys

    sys.path.insert(0, str(HERE))
    try:
        loaded = load_model("convert_models:hand_vit")
        out = tmp_path_factory.mktemp("ckpt") / "hand.safetensors"
        probe = None
        try:
            convert(loaded, ConvertConfig(budget=1, dtype="float16"))
        except UserError as exc:
            probe = exc.smallest_feasible_bytes
        result = convert(loaded, ConvertConfig(budget=probe, dtype="float16", output=str(out)))
    finally:
        sys.path.remove(str(HERE))
    return loaded, result, out


def test_restore_rebuilds_without_decomposing(hand_ckpt, monkeypatch):
    loaded, result, out = hand_ckpt
    meta = _metadata(out)
    assert meta["format"] == FORMAT and meta["toolkit_version"] == wasi_compress.__version__
    assert meta["source"] == {"arch": "convert_models:hand_vit", "num_classes": None, "img_size": None}
    assert meta["dtype"] == "float16" and meta["explicit_attention"] is True
    assert {"functional"} <= {e["kind"] for e in meta["structure"]}
    assert all(set(e) == {"name", "kind", "module", "rank", "bias", "in_features", "out_features"} for e in meta["structure"])
    assert meta["plan"]["ranks"]["head_weight"] == 1 and meta["seed"] == 0
    with safe_open(str(out), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}

    _forbid_decompositions(monkeypatch)
    model = wasi_compress.load(out, trust_code=True)  # our own file, naming our own factory
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # at the smallest feasible budget the patch embedding's convolution is factored too (convs="auto")
    assert {e["module"] for e in meta["structure"]} == {"subspace", "lowrank_conv"}
    assert sum(isinstance(m, (SubspaceLinear, LowRankConv2d)) for m in model.modules()) == len(meta["structure"])
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), result.model(x), rtol=0, atol=0)  # the result computes what is stored
    for p, q in zip(model.state_dict().values(), result.model.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_reconvert_a_checkpoint_carries_source_and_merges_structure(hand_ckpt, tmp_path):
    _, result, out = hand_ckpt
    loaded = load_model(str(out), trust_code=True)
    assert loaded.input_size == (3, 16, 16)
    again = tmp_path / "again.safetensors"
    budget = result.report["total_bytes"] * 2  # float32 now: the same bytes as before, ranks may only stay
    second = convert(loaded, ConvertConfig(budget=budget, output=str(again)))
    meta = _metadata(again)
    first = _metadata(out)
    assert meta["source"] == first["source"]
    assert [(e["kind"], e["name"]) for e in meta["structure"]] == [(e["kind"], e["name"]) for e in first["structure"]]
    model = wasi_compress.load(again, trust_code=True)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), second.model(x), rtol=1e-5, atol=1e-6)


def test_shared_tensors_are_stored_once(tmp_path):
    torch.manual_seed(0)

    model = _Tied()
    out = tmp_path / "tied.safetensors"
    save_checkpoint(out, model, source={"arch": "test_checkpoint:_Tied"}, structure=[])
    keys = _keys(out)
    assert len(keys) == len(model.state_dict()) - 1
    meta = _metadata(out)
    assert list(meta["aliases"].items()) == [("decoder.weight", "encoder.weight")]
    import sys

    sys.modules.setdefault("test_checkpoint", sys.modules[__name__])
    restored = restore(out, meta, trust_code=True)
    torch.testing.assert_close(restored.decoder.weight, model.encoder.weight)


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(6, 6, bias=False)
        self.decoder = nn.Linear(6, 6, bias=False)
        self.decoder.weight = self.encoder.weight

    def forward(self, x):
        return self.decoder(self.encoder(x))


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(format="wasi-compress/checkpoint/99"), "format"),
    (lambda m: m.update(source={"arch": ""}), "architecture"),
    (lambda m: m["structure"][0].pop("rank"), "structure entry"),
    (lambda m: m["structure"][0].update(rank=0), "rank"),
    (lambda m: m["structure"][0].update(name="blocks.9.fc1"), "does not have"),
])
def test_damaged_metadata_is_one_clear_error(hand_ckpt, change, message):
    _, _, out = hand_ckpt
    meta = _metadata(out)
    change(meta)
    with pytest.raises(UserError, match=message):
        restore(out, meta, trust_code=True)


def test_save_is_atomic_and_checks_its_input(tmp_path, monkeypatch):
    model = nn.Sequential(nn.Linear(4, 4))
    out = tmp_path / "m.safetensors"
    import safetensors.torch

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", fail)
    with pytest.raises(OSError):
        save_checkpoint(out, model, source={"arch": "x:y"}, structure=[])
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    with pytest.raises(UserError, match="suffix"):
        save_checkpoint(tmp_path / "m.pt", model, source={"arch": "x:y"}, structure=[])
    with pytest.raises(UserError, match="dtype"):
        save_checkpoint(out, model, source={"arch": "x:y"}, structure=[], dtype="int8")
    with pytest.raises(ValueError, match="override"):
        save_checkpoint(out, model, source={"arch": "x:y"}, structure=[], extra={"structure": []})
    assert list(tmp_path.iterdir()) == []


def test_analyze_reads_a_checkpoint(hand_ckpt):
    from click.testing import CliRunner

    from wasi_compress.cli.main import main

    _, _, out = hand_ckpt
    result = CliRunner().invoke(main, ["analyze", str(out), "--trust-code", "--batch-size", "1", "--json", "-"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout[result.stdout.index("{"):])
    assert doc["layers"] and all(layer["kind"] == "module" for layer in doc["layers"])


def test_builtin_checkpoint_restores_from_the_bare_architecture(tmp_path, monkeypatch):
    from wasi_compress.builtin import mnist_vit

    if not mnist_vit.WEIGHTS.exists():
        pytest.skip("builtin:mnist-vit weights not present")
    loaded = load_model("builtin:mnist-vit")
    out = tmp_path / "m.safetensors"
    result = convert(loaded, ConvertConfig(budget="4MB", rank_grid=8, output=str(out)))
    assert _metadata(out)["source"] == {"arch": "builtin:mnist-vit", "num_classes": 10, "img_size": None}

    def no_weights():
        raise AssertionError("restore must build the architecture, not load the shipped weights")

    import dataclasses

    from wasi_compress import architectures

    monkeypatch.setattr(mnist_vit, "pretrained", no_weights)
    entry = architectures.builtin_architectures()["mnist-vit"]
    monkeypatch.setitem(architectures._REGISTRY, "mnist-vit", dataclasses.replace(entry, pretrained=no_weights))
    _forbid_decompositions(monkeypatch)
    model = wasi_compress.load(out, trust_code=True)  # our own file, naming our own factory
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(model(x), result.model(x), rtol=0, atol=0)
