import pytest
import torch
from torch import nn

from wasi_compress.modules.subspace import (
    SubspaceLinear,
    Whitening,
    errors_for_ranks,
    lowrank_error,
    whitened_singular_values,
)
from wasi_compress.spectrum import rank_for_threshold, singular_values

torch.set_num_threads(1)


def _linear(in_f=24, out_f=16, bias=True, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias)


def _calibration(rows=400, in_f=24, seed=1):
    """Inputs with very unequal channel scales, so whitening matters."""
    torch.manual_seed(seed)
    return torch.randn(rows, in_f) @ torch.diag(torch.logspace(0, -2, in_f)) @ torch.linalg.qr(torch.randn(in_f, in_f)).Q


@pytest.mark.parametrize("bias", [True, False])
def test_full_rank_equals_dense(bias):
    linear = _linear(bias=bias)
    layer = SubspaceLinear.from_linear(linear, rank=16)
    x = torch.randn(3, 5, 24)
    torch.testing.assert_close(layer(x), linear(x), rtol=1e-4, atol=1e-5)
    assert (layer.in_features, layer.out_features, layer.rank) == (24, 16, 16)
    torch.testing.assert_close(layer.L.t() @ layer.L, torch.eye(16), atol=1e-5, rtol=0)


def test_truncation_and_threshold():
    linear = _linear()
    s = singular_values(linear.weight)
    layer = SubspaceLinear.from_linear(linear, threshold=0.8)
    assert layer.rank == rank_for_threshold(s, 0.8)
    with torch.no_grad():
        error = torch.linalg.norm(layer.to_linear().weight - linear.weight) / torch.linalg.norm(linear.weight)
    assert float(error) == pytest.approx(lowrank_error(linear, layer.rank), rel=1e-4)
    with pytest.raises(ValueError):
        SubspaceLinear.from_linear(linear)
    with pytest.raises(ValueError):
        SubspaceLinear.from_linear(linear, rank=3, threshold=0.5)
    with pytest.raises(ValueError):
        SubspaceLinear.from_linear(linear, rank=17)


def test_to_linear_round_trip():
    linear = _linear()
    layer = SubspaceLinear.from_linear(linear, rank=5)
    dense = layer.to_linear()
    x = torch.randn(4, 24)
    torch.testing.assert_close(dense(x), layer(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dense.bias, linear.bias)
    again = SubspaceLinear.from_linear(dense, rank=5)
    torch.testing.assert_close(again.to_linear().weight, dense.weight, rtol=1e-4, atol=1e-5)


def test_empty_restores_from_state_dict():
    layer = SubspaceLinear.from_linear(_linear(), rank=4)
    restored = SubspaceLinear.empty(24, 16, 4, bias=True, dtype=torch.float32)
    restored.load_state_dict(layer.state_dict())
    x = torch.randn(2, 24)
    torch.testing.assert_close(restored(x), layer(x))
    assert "rank=4" in repr(restored)


def test_whitening_predicts_output_error_and_beats_plain_svd():
    linear = _linear(bias=False)
    x = _calibration()
    whitening = Whitening(24)
    for chunk in x.reshape(4, 10, 10, 24):  # any leading shape, several batches
        whitening.update(chunk)
    assert whitening.rows == 400
    spectrum = whitened_singular_values(linear.weight, whitening)
    reference = linear(x)
    for rank in (2, 4, 8):
        data_aware = SubspaceLinear.from_linear(linear, rank=rank, whitening=whitening)
        plain = SubspaceLinear.from_linear(linear, rank=rank)
        with torch.no_grad():
            data_error = float(torch.linalg.norm(data_aware(x) - reference) / torch.linalg.norm(reference))
            plain_error = float(torch.linalg.norm(plain(x) - reference) / torch.linalg.norm(reference))
        predicted = errors_for_ranks(spectrum, [rank])[0]
        assert data_error == pytest.approx(predicted, rel=1e-3)
        assert lowrank_error(linear, rank, whitening) == pytest.approx(predicted)
        assert data_error < plain_error
        torch.testing.assert_close(data_aware.L.t() @ data_aware.L, torch.eye(rank), atol=1e-5, rtol=0)
        # the factorization is METHOD.md's W_k = U_k diag(s_k) V_k^T S^-1
        factor = whitening.cholesky()
        u, s, vh = torch.linalg.svd(linear.weight.detach().double() @ factor)
        expected = u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank] @ torch.linalg.inv(factor)
        torch.testing.assert_close((data_aware.L @ data_aware.R).double(), expected, rtol=1e-4, atol=1e-5)


def test_whitening_threshold_uses_whitened_spectrum():
    linear = _linear()
    whitening = Whitening(24)
    whitening.update(_calibration())
    layer = SubspaceLinear.from_linear(linear, threshold=0.9, whitening=whitening)
    assert layer.rank == rank_for_threshold(whitened_singular_values(linear.weight, whitening), 0.9)


def test_whitening_singular_calibration_is_regularised():
    whitening = Whitening(24)
    whitening.update(torch.randn(5, 24))  # fewer rows than features: X^T X is singular
    factor = whitening.cholesky()
    assert torch.isfinite(factor).all()
    layer = SubspaceLinear.from_linear(_linear(), rank=4, whitening=whitening)
    assert torch.isfinite(layer.R).all()
    with pytest.raises(ValueError):
        Whitening(24).cholesky()
    with pytest.raises(ValueError):
        whitening.update(torch.randn(3, 23))


def test_fx_traceable():
    model = nn.Sequential(nn.Linear(8, 24), nn.GELU(), SubspaceLinear.from_linear(_linear(), rank=6))
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 8)
    torch.testing.assert_close(traced(x), model(x))
    linear_calls = [n for n in traced.graph.nodes if n.op == "call_function" and n.target is torch._C._nn.linear]
    assert len(linear_calls) == 2


@pytest.mark.slow  # the first ONNX export of a session pays for importing the exporter
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_onnx_export_is_two_matmuls():
    import io

    import onnx

    layer = SubspaceLinear.from_linear(_linear(), rank=4).eval()
    buffer = io.BytesIO()
    torch.onnx.export(layer, (torch.randn(2, 3, 24),), buffer, dynamo=False)
    ops = [node.op_type for node in onnx.load_from_string(buffer.getvalue()).graph.node]
    assert ops.count("MatMul") == 2 and "Gemm" not in ops
