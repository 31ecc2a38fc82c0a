"""Issue 10, section 3 on small models: blocks and roles read from the graph (not names), linears used
through an fx-wrapped function, low-rank convolutions (planner, checkpoint, ONNX), 1x1 convolutions
trained as linears, a method that would change nothing refused, ONNX parity relative to the output's
scale on a non-degenerate output, BatchNorm at batch 1, and specialised forward arguments."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import wasi_compress
from wasi_compress.errors import UserError
from wasi_compress.modules.lowrank_conv import LowRankConv2d, conv_patches
from wasi_compress.modules.pointwise import PointwiseConv
from wasi_compress.modules.subspace import SubspaceLinear, Whitening
from wasi_compress.modules.training import ASILinear, WASILinear
from wasi_compress.passes.capture import capture, trace
from wasi_compress.transforms import LowRankConfig, WasiConfig, lowrank_, prepare_training_, to_inference_

torch.set_num_threads(1)


@pytest.fixture
def odd(monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent))
    import odd_models

    return odd_models


def _x(model, batch=2, seed=0):
    return torch.randn(batch, *model.default_input_size, generator=torch.Generator().manual_seed(seed))


def test_roles_and_blocks_come_from_the_graph_not_the_names(odd):
    model = odd.odd_names_vit()
    cap = capture(model, _x(model))
    assert cap.structure == "graph"
    got = [(s.name, s.role, s.block) for s in cap.sites]
    expected = []
    for i in range(2):
        b = f"trunk.units.{i}"
        expected += [(f"{b}.mix.a", "qkv", b), (f"{b}.mix.b", "proj", b), (f"{b}.ff.0", "fc1", b), (f"{b}.ff.2", "fc2", b)]
    assert got == expected + [("out", "head", None)]


def test_wasi_replaces_the_block_linears_of_a_model_named_otherwise(odd):
    model = odd.odd_names_vit()
    x = _x(model, 4)
    handle = prepare_training_(model, WasiConfig(threshold=0.5), example=x)
    replaced = {n for n, m in handle.model.named_modules() if isinstance(m, (WASILinear, ASILinear))}
    assert replaced == {s.name for s in handle.capture.sites if s.role != "head"}
    assert handle.blocks == ["trunk.units.0", "trunk.units.1"]
    loss = F.cross_entropy(handle.model.train()(x), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    assert all(m.L.grad is not None for m in handle.model.modules() if isinstance(m, WASILinear))


def test_a_method_that_would_change_nothing_is_refused_unless_allowed(odd):
    model = odd.no_block_net()
    with pytest.raises(UserError, match="would change nothing.*--allow-unchanged"):
        prepare_training_(model, WasiConfig(), example=_x(model))
    assert type(model.a) is nn.Linear  # left as it was
    handle = prepare_training_(model, WasiConfig(allow_unchanged=True), example=_x(model))
    assert not any(isinstance(m, (WASILinear, ASILinear)) for m in handle.model.modules())
    prepare_training_(odd.no_block_net(), WasiConfig(method="vanilla"), example=_x(model))  # vanilla changes nothing by design


@pytest.mark.slow  # the fine-tuning job (data, the model's dense twin)
def test_finetune_command_says_so_in_one_line(odd, cli, tmp_path):
    result = cli("finetune", "odd_models:no_block_net", "--data", "digits", "--epochs", "1", "-o", tmp_path / "o.safetensors")
    assert result.exit_code == 2 and "Traceback" not in result.output  # (stdout has the progress line so far)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "would change nothing" in lines[0] \
        and "--allow-unchanged" in lines[0], result.stderr
    assert list(tmp_path.iterdir()) == []


def test_linears_used_through_a_wrapped_function_are_captured_replaced_and_trained(odd, tmp_path):
    model = odd.wrapped_attention_vit()
    x = _x(model, 4)
    cap = capture(copy.deepcopy(model), x)
    assert not cap.skipped
    through = {s.name: (s.role, s.block) for s in cap.sites if s.through == "windowed_attention"}
    assert through == {"trunk.units.0.attn.qkv": ("qkv", "trunk.units.0"), "trunk.units.0.attn.proj": ("proj", "trunk.units.0"),
                       "trunk.units.1.attn.qkv": ("qkv", "trunk.units.1"), "trunk.units.1.attn.proj": ("proj", "trunk.units.1")}
    # low rank: the factored module serves the function through its weight W = L R
    full = copy.deepcopy(model)
    qkv = full.trunk["units"][0].attn.qkv
    full.trunk["units"][0].attn.qkv = SubspaceLinear.from_linear(qkv, rank=min(qkv.in_features, qkv.out_features))
    with torch.no_grad():
        torch.testing.assert_close(full(x), model(x), rtol=1e-4, atol=1e-5)
    converted = copy.deepcopy(model)
    total = 4 * sum(p.numel() for p in model.parameters())
    plan = lowrank_(converted, LowRankConfig(budget=total - 4 * qkv.weight.numel() // 2, convs="never"), example=x,
                    filter_fn=lambda m, name: name == "trunk.units.0.attn.qkv")
    assert isinstance(plan.model.get_submodule("trunk.units.0.attn.qkv"), SubspaceLinear)
    path = wasi_compress.save(plan.model, tmp_path / "w.safetensors", arch="odd_models:wrapped_attention_vit")
    restored = wasi_compress.load(path, trust_code=True)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), plan.model(x), rtol=0, atol=0)
    # WASI: L and R get gradients through the function's own F.linear
    handle = prepare_training_(copy.deepcopy(model), WasiConfig(threshold=0.5), example=x)
    qkv = handle.model.get_submodule("trunk.units.0.attn.qkv")
    assert isinstance(qkv, WASILinear)
    F.cross_entropy(handle.model.train()(x), torch.tensor([0, 1, 2, 3])).backward()
    assert qkv.L.grad is not None and qkv.L.grad.abs().sum() > 0


def test_low_rank_convolution_is_the_svd_of_the_unfolded_weight():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 10, 3, stride=2, padding=1)
    x = torch.randn(2, 6, 9, 9)
    full = LowRankConv2d.from_conv(conv, rank=10)
    torch.testing.assert_close(full(x), conv(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(full.to_conv().weight, conv.weight, rtol=1e-4, atol=1e-5)
    # whitened: the spectrum's tail is the relative output error on the calibration patches
    wh = Whitening(6 * 9)
    wh.update(conv_patches(conv, x))
    from wasi_compress.modules.subspace import whitened_singular_values
    from wasi_compress.spectrum import errors_for_ranks

    w = conv.weight.reshape(10, -1)
    predicted = errors_for_ranks(whitened_singular_values(w, wh), [3])[0]
    low = LowRankConv2d.from_conv(conv, rank=3, whitening=wh)
    nobias = lambda m, t: F.conv2d(t, m.weight, None, m.stride, m.padding)  # noqa: E731
    got = low.second(nobias(low.first, x)) - low.second.bias.reshape(1, -1, 1, 1)
    want = nobias(conv, x)
    measured = float((torch.linalg.vector_norm(got - want) / torch.linalg.vector_norm(want)).detach())
    assert measured == pytest.approx(predicted, rel=1e-3)


@pytest.mark.slow  # ONNX export and parity
@pytest.mark.parametrize("objective", ["weight", "data"])
def test_convert_reaches_half_the_bytes_through_convolutions_and_restores(odd, on_path_odd, tmp_path, objective):
    from wasi_compress.convert import ConvertConfig, convert
    from wasi_compress.loading import load_model

    loaded = load_model("odd_models:pointwise_mlp_net")
    total = 4 * sum(p.numel() for p in loaded.model.parameters())
    with pytest.raises(UserError, match="every linear at its smallest rank"):
        convert(loaded, ConvertConfig(budget=total // 2, convs="never"))
    out, onnx_path = tmp_path / "half.safetensors", tmp_path / "half.onnx"
    result = convert(loaded, ConvertConfig(budget=total // 2, output=str(out), onnx=str(onnx_path), objective=objective,
                                           calib="random" if objective == "data" else None))
    assert result.report["total_bytes"] <= total // 2
    assert any(isinstance(m, LowRankConv2d) for m in result.model.modules())
    assert result.report["onnx"]["rel_diff"] <= 1e-4
    restored = wasi_compress.load(out, trust_code=True)
    x = _x(restored, 3, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), result.model(x), rtol=0, atol=0)


@pytest.fixture
def on_path_odd(monkeypatch):
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parent))


def test_pointwise_convolutions_are_trained_as_linears_and_saved_as_convolutions(odd, tmp_path):
    model = odd.pointwise_mlp_net()
    x = _x(model, 4)
    before = model(x).detach()
    handle = prepare_training_(model, WasiConfig(threshold=0.5), example=x)
    assert handle.pointwise_convs == ["mlp.0", "mlp.2"]
    assert {type(m) for m in handle.model.modules()} & {WASILinear, ASILinear}
    trained = handle.model.train()
    F.cross_entropy(trained(x), torch.tensor([0, 1, 2, 3])).backward()
    to_inference_(trained)
    assert not any(isinstance(m, PointwiseConv) for m in trained.modules())
    assert isinstance(trained.mlp[0], (nn.Conv2d, LowRankConv2d)) and isinstance(trained.mlp[2], (nn.Conv2d, LowRankConv2d))
    with torch.no_grad():
        assert torch.allclose(trained.eval()(x), before, atol=0.5)  # same function up to the rank
    path = wasi_compress.save(trained, tmp_path / "t.safetensors", arch="odd_models:pointwise_mlp_net")
    restored = wasi_compress.load(path, trust_code=True)
    with torch.no_grad():
        torch.testing.assert_close(restored(x), trained(x), rtol=0, atol=0)


def test_onnx_parity_is_relative_and_checked_on_a_non_degenerate_output(odd, tmp_path):
    from wasi_compress.onnx_export import export_onnx
    from wasi_compress.outputs import Outputs

    model = odd.odd_names_vit()
    x = _x(model)
    with torch.no_grad():  # scale the output up: an absolute 1e-4 would fail on float32 rounding alone
        model.out.weight.mul_(1e4)
    notes: list[str] = []
    with Outputs() as outputs:
        parity = export_onnx(model, x, tmp_path / "big.onnx", outputs, tolerance=1e-4, opset=17, notes=notes)
        outputs.commit()
    assert parity.output_scale > 1e3 and parity.rel_diff <= 1e-4 and not parity.reinitialised
    with torch.no_grad():  # a zero head (torchvision's ViT): every output is 0, a check of nothing
        model.out.weight.zero_()
        model.out.bias.zero_()
    with Outputs() as outputs:
        parity = export_onnx(model, x, tmp_path / "zero.onnx", outputs, tolerance=1e-4, opset=17, notes=notes)
        outputs.commit()
    assert parity.reinitialised == ["out.weight"] and parity.output_scale > 0
    assert any("re-initialised" in n for n in notes)
    assert not model.out.weight.any()  # the exported model itself is untouched


def test_analyze_at_batch_1_runs_batch_norm_on_its_running_statistics(odd):
    from wasi_compress.analysis import analyze

    model = odd.odd_names_vit()
    doc = analyze(model, batch_size=1)
    assert doc["totals"]["train_memory"] and any("BatchNorm" in n for n in doc["notes"])
    assert model.trunk["units"][0].bn.training is False  # analyze worked on a copy; the model is as it was


def test_trace_specialises_plain_default_arguments():
    class Flagged(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, mask=None, is_causal: bool = False):
            y = self.lin(x)
            return y.flip(-1) if is_causal else y

    gm = trace(Flagged())
    assert [n.name for n in gm.graph.nodes if n.op == "placeholder"] == ["x"]
    x = torch.randn(2, 4)
    torch.testing.assert_close(gm(x), gm.lin(x))


def test_fold_exports_as_col2im_with_a_size_computed_from_the_input(tmp_path):
    """F.fold (VOLO's outlook attention) with an output size read off the input's shape exports at opset 18
    as ONNX Col2Im and matches torch (torch's own symbolic fails on such a size)."""
    import onnx
    import torch.nn.functional as F
    from torch import nn

    from wasi_compress.onnx_export import export_onnx
    from wasi_compress.outputs import Outputs

    class Folding(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            h, w = x.shape[-2:]
            cols = F.unfold(self.proj(x), kernel_size=3, padding=1, stride=2)
            return F.fold(cols * 0.5, output_size=(h, w), kernel_size=3, padding=1, stride=2)

    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with Outputs() as outputs:
        parity = export_onnx(Folding().eval(), x, tmp_path / "fold.onnx", outputs, tolerance=1e-4, opset=18, notes=[])
        outputs.commit()
    assert parity.rel_diff <= 1e-5
    assert "Col2Im" in {node.op_type for node in onnx.load(str(tmp_path / "fold.onnx")).graph.node}
