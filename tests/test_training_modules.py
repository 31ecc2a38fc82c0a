import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from wasi_compress.modules.asi import TuckerCompressor, mode_product, reconstruct
from wasi_compress.modules.subspace import SubspaceLinear, Whitening
from wasi_compress.modules.training import ASILinear, TrainingModuleTracer, WASILinear

torch.set_num_threads(1)


def _linear(in_f=12, out_f=10, dtype=torch.float64, seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Linear(in_f, out_f, bias=bias, dtype=dtype)


def _compressed_input(x, factors):
    """The X~ a compressor's factors stand for."""
    core = x.detach()
    for mode, factor in enumerate(factors):
        core = mode_product(core, factor, mode)
    return reconstruct(core, factors)


class _ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor any aten op produces while active."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.shapes += [(str(func), tuple(t.shape)) for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        return out


# ---------------------------------------------------------------- ASILinear


def test_asi_linear_shares_parameters_and_matches_dense_at_full_rank():
    linear = _linear()
    layer = ASILinear.from_linear(linear, ranks=[3, 4, 12])
    assert layer.weight is linear.weight and layer.bias is linear.bias
    x = torch.randn(3, 4, 12, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    grads = torch.autograd.grad(y.square().sum(), (x, layer.weight, layer.bias))
    expected_y = linear(x)
    expected = torch.autograd.grad(expected_y.square().sum(), (x, linear.weight, linear.bias))
    torch.testing.assert_close(y, expected_y)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)


def test_asi_linear_eval_and_no_grad_use_plain_forward():
    layer = ASILinear.from_linear(_linear(), eps=0.5)
    x = torch.randn(2, 3, 12, dtype=torch.float64)
    with torch.no_grad():
        layer(x)
    layer.eval()
    layer(x)
    assert layer.compressor.factors is None  # never compressed


# ---------------------------------------------------------------- WASILinear, factored rule


def test_factored_forward_equals_subspace_linear():
    linear = _linear()
    layer = WASILinear.from_linear(linear, rank=4)
    subspace = SubspaceLinear.from_linear(linear, rank=4)
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    torch.testing.assert_close(layer(x), subspace(x))
    torch.testing.assert_close(layer.to_subspace()(x), subspace(x))
    assert {name for name, _ in layer.named_parameters()} == {"L", "R", "bias"}


def test_from_linear_with_whitening_matches_subspace_linear():
    linear = _linear()
    whitening = Whitening(12)
    whitening.update(torch.randn(50, 12, dtype=torch.float64) * torch.logspace(0, -2, 12, dtype=torch.float64))
    layer = WASILinear.from_linear(linear, rank=3, whitening=whitening)
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    torch.testing.assert_close(layer(x), SubspaceLinear.from_linear(linear, rank=3, whitening=whitening)(x))


@pytest.mark.parametrize("ranks", [None, (2, 5, 12), (2, 3, 5)], ids=["exact", "full-rank", "low-rank"])
def test_factored_gradients(ranks):
    """dL, dR, dX, db equal autograd of the two-matmul graph on X~ (X itself when exact or full rank)."""
    compressor = None if ranks is None else TuckerCompressor(ranks=ranks)
    layer = WASILinear.from_linear(_linear(), rank=4, compressor=compressor)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    grad_out = torch.randn(2, 5, 10, dtype=torch.float64)
    y = layer(x)
    got = torch.autograd.grad(y, (x, layer.L, layer.R, layer.bias), grad_out)

    x_used = x if compressor is None else _compressed_input(x, compressor.factors)
    L, R, bias = (t.detach().requires_grad_() for t in (layer.L, layer.R, layer.bias))
    reference_y = F.linear(F.linear(x_used, R), L, bias)
    grad_L, grad_R, grad_bias = torch.autograd.grad(reference_y, (L, R, bias), grad_out, retain_graph=True)
    grad_x = grad_out @ layer.L.detach() @ layer.R.detach()  # exact whatever the compression
    torch.testing.assert_close(y, F.linear(F.linear(x, R), L, bias))
    for g, e in zip(got, (grad_x, grad_L, grad_R, grad_bias)):
        torch.testing.assert_close(g, e)


def test_reorthonormalize_keeps_product():
    layer = WASILinear.from_linear(_linear(), rank=4)
    with torch.no_grad():
        layer.L.add_(0.3 * torch.randn_like(layer.L))
    product = (layer.L @ layer.R).detach().clone()
    layer.reorthonormalize()
    torch.testing.assert_close(layer.L.t() @ layer.L, torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(layer.L @ layer.R, product)


def test_factored_trains_with_an_optimizer():
    torch.manual_seed(1)
    layer = WASILinear.from_linear(_linear(dtype=torch.float32), rank=4, compressor=TuckerCompressor(ranks=(4, 5, 6)))
    x, target = torch.randn(4, 5, 12), torch.randn(4, 5, 10)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.05)
    losses = []
    for _ in range(20):
        loss = F.mse_loss(layer(x), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        layer.reorthonormalize()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0]


# ---------------------------------------------------------------- WASILinear, subspace iteration


def _dense_reference_step(L, R, bias, x, target, lr, weight_decay):
    """The paper's rule with dense W and G, as the research code computes it."""
    L, R = L.clone(), R.clone()
    bias = bias.detach().clone().requires_grad_()
    x = x.detach().clone().requires_grad_()
    y = F.linear(F.linear(x, R), L, bias)
    loss = F.mse_loss(y, target)
    (grad_y,) = torch.autograd.grad(loss, y, retain_graph=True)
    grad_x, grad_bias = torch.autograd.grad(loss, (x, bias))
    G = grad_y.reshape(-1, L.shape[0]).t() @ x.detach().reshape(-1, R.shape[1])
    W = L @ R - lr * (G + weight_decay * L @ R)
    Q = W.t() @ L
    P = W @ Q
    new_L = torch.linalg.qr(P).Q
    new_R = new_L.t() @ W
    return new_L, new_R, bias.detach() - lr * grad_bias, grad_x


@pytest.mark.parametrize("compressed", [False, True], ids=["exact", "full-rank-compressed"])
def test_subspace_iteration_matches_dense_reference(compressed):
    torch.manual_seed(2)
    lr, weight_decay = 0.1, 0.05
    compressor = TuckerCompressor(ranks=(3, 4, 12)) if compressed else None
    layer = WASILinear.from_linear(_linear(), rank=4, update="subspace-iteration", lr=lr,
                                   weight_decay=weight_decay, compressor=compressor)
    assert {name for name, _ in layer.named_parameters()} == {"bias"}
    assert {name for name, _ in layer.named_buffers()} == {"L", "R"}
    optimizer = torch.optim.SGD([layer.bias], lr=lr)
    L, R, bias = layer.L.clone(), layer.R.clone(), layer.bias.detach().clone()
    for _ in range(5):
        x = torch.randn(3, 4, 12, dtype=torch.float64, requires_grad=True)
        target = torch.randn(3, 4, 10, dtype=torch.float64)
        L, R, bias, grad_x = _dense_reference_step(L, R, bias, x, target, lr, weight_decay)
        optimizer.zero_grad()
        F.mse_loss(layer(x), target).backward()
        optimizer.step()
        torch.testing.assert_close(x.grad, grad_x, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.L @ layer.R, L @ R, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.L, L, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.bias.detach(), bias, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.L.t() @ layer.L, torch.eye(4, dtype=torch.float64))


def test_subspace_iteration_updates_without_any_grad_input():
    layer = WASILinear.from_linear(_linear(bias=False), rank=4, update="subspace-iteration", lr=0.1)
    before = (layer.L @ layer.R).clone()
    layer(torch.randn(2, 3, 12, dtype=torch.float64)).square().sum().backward()
    assert not torch.allclose(layer.L @ layer.R, before)


def test_subspace_iteration_from_non_orthonormal_subspace():
    subspace = SubspaceLinear.from_linear(_linear(), rank=4)
    with torch.no_grad():
        subspace.L.mul_(2.0)
    layer = WASILinear.from_subspace(subspace, update="subspace-iteration", lr=0.1)
    torch.testing.assert_close(layer.L.t() @ layer.L, torch.eye(4, dtype=torch.float64))
    torch.testing.assert_close(layer.L @ layer.R, (subspace.L @ subspace.R).detach())
    assert layer.to_subspace().L is not layer.L


def test_argument_validation():
    linear = _linear()
    with pytest.raises(ValueError):
        WASILinear.from_linear(linear, rank=4, update="subspace-iteration")  # no lr
    with pytest.raises(ValueError):
        WASILinear.from_linear(linear, rank=4, lr=0.1)  # factored takes lr from the optimizer
    with pytest.raises(ValueError):
        WASILinear.from_linear(linear, rank=4, update="sgd")


# ---------------------------------------------------------------- no dense weight, ever

_IN, _OUT, _RANK = 48, 40, 4


@pytest.mark.parametrize("update", ["factored", "subspace-iteration"])
@pytest.mark.parametrize("ranks", [None, (2, 3, 6)], ids=["exact", "compressed"])
def test_no_dense_weight_anywhere(update, ranks):
    dense_shapes = {(_OUT, _IN), (_IN, _OUT)}
    kwargs = {"lr": 0.05, "weight_decay": 1e-4} if update == "subspace-iteration" else {}
    compressor = None if ranks is None else TuckerCompressor(ranks=ranks)
    layer = WASILinear.from_linear(_linear(_IN, _OUT, dtype=torch.float32), rank=_RANK, update=update,
                                   compressor=compressor, **kwargs)
    # (a) stored tensors
    for name, tensor in [*layer.named_parameters(), *layer.named_buffers()]:
        assert tuple(tensor.shape) not in dense_shapes, name
    x = torch.randn(2, 3, _IN, requires_grad=True)  # 2 * 3 rows: distinct from every layer size
    saved = []

    def pack(t):
        saved.append(t)
        return t

    optimizer = torch.optim.SGD(layer.parameters(), lr=0.05)
    with _ShapeRecorder() as recorder:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = layer(x)
        y.square().sum().backward()
        optimizer.step()
        if update == "factored":
            layer.reorthonormalize()
    # (b) saved activations
    assert saved
    for t in saved:
        assert tuple(t.shape) not in dense_shapes and t.numel() < _OUT * _IN
    # (c) every tensor produced in forward, backward and the update
    assert len(recorder.shapes) > 10
    dense = [(op, shape) for op, shape in recorder.shapes if shape in dense_shapes]
    assert not dense, dense
    assert x.grad.shape == x.shape


# ---------------------------------------------------------------- fx


def _model():
    torch.manual_seed(3)
    return nn.Sequential(
        ASILinear.from_linear(nn.Linear(12, 16), ranks=[2, 3, 4]),
        nn.GELU(),
        WASILinear.from_linear(nn.Linear(16, 8), rank=3, compressor=TuckerCompressor(ranks=(2, 3, 4))),
    )


def test_fx_tracing_through_records_the_plain_forward():
    model = _model()
    traced = torch.fx.symbolic_trace(model)
    x = torch.randn(2, 3, 12)
    torch.testing.assert_close(traced(x), model(x))


def test_fx_leaf_tracer_keeps_compressed_backward():
    model = _model()
    graph_module = torch.fx.GraphModule(model, TrainingModuleTracer().trace(model))
    assert [n.target for n in graph_module.graph.nodes if n.op == "call_module"] == ["0", "1", "2"]
    x = torch.randn(2, 3, 12)
    inputs = [x]  # the two compressed layers' inputs: x and the GELU output
    model[1].register_forward_hook(lambda module, args, out: inputs.append(out))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = graph_module(x)
    assert len(inputs) == 2
    assert not {t.data_ptr() for t in saved} & {t.data_ptr() for t in inputs}
    y.sum().backward()
    torch.testing.assert_close(y, model(x))
    assert model[0].compressor.factors is not None and model[0].weight.grad is not None
