import math

import pytest
import torch

from wasi_compress.modules.asi import (
    TuckerCompressor,
    asi_linear,
    compressed_bytes,
    compressed_matmul,
    mode_gram,
    reconstruct,
    weight_grad_from_compressed,
)
from wasi_compress.spectrum import rank_for_threshold

torch.set_num_threads(1)


def _low_rank_ish(shape, decay=0.5, noise=1e-3, seed=0, dtype=torch.float64):
    """Tucker tensor with a geometrically decaying core, plus a little noise."""
    gen = torch.Generator().manual_seed(seed)
    core = torch.randn(*shape, generator=gen, dtype=dtype)
    for mode, size in enumerate(shape):
        scale = decay ** torch.arange(size, dtype=dtype)
        core = core * scale.reshape([-1 if m == mode else 1 for m in range(len(shape))])
    factors = [torch.linalg.qr(torch.randn(size, size, generator=gen, dtype=dtype)).Q for size in shape]
    return reconstruct(core, factors) + noise * torch.randn(*shape, generator=gen, dtype=dtype)


def _subspace_distance(u, v):
    """Spectral norm of the difference of the two orthogonal projectors (sine of the largest angle)."""
    return float(torch.linalg.matrix_norm(u @ u.t() - v @ v.t(), ord=2))


def _unfolding(a, mode):
    return a.movedim(mode, 0).reshape(a.shape[mode], -1)


@pytest.mark.parametrize("shape", [(4, 5, 6), (2, 3, 4, 6)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_full_rank_gradients_equal_autograd(shape, dtype):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=dtype, requires_grad=True)
    weight = torch.randn(7, shape[-1], dtype=dtype, requires_grad=True)
    bias = torch.randn(7, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(*shape[:-1], 7, dtype=dtype)
    compressor = TuckerCompressor(ranks=list(shape))
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    for _ in range(2):  # first call (SVD init) and a warm-started call
        y = asi_linear(x, weight, bias, compressor)
        got = torch.autograd.grad(y, (x, weight, bias), grad_out)
        expected_y = torch.nn.functional.linear(x, weight, bias)
        expected = torch.autograd.grad(expected_y, (x, weight, bias), grad_out)
        torch.testing.assert_close(y, expected_y)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, **tol)


@pytest.mark.parametrize("shape,ranks", [((6, 7, 8), (3, 4, 5)), ((3, 4, 5, 6), (2, 3, 3, 4))])
def test_contractions_match_reconstruction(shape, ranks):
    torch.manual_seed(1)
    a = torch.randn(*shape, dtype=torch.float64)
    core, factors = TuckerCompressor(ranks=ranks).compress(a)
    assert core.shape == ranks
    assert [tuple(f.shape) for f in factors] == list(zip(shape, ranks))
    dense = reconstruct(core, factors)
    grad_out = torch.randn(*shape[:-1], 9, dtype=torch.float64)
    expected = grad_out.reshape(-1, 9).t() @ dense.reshape(-1, shape[-1])
    torch.testing.assert_close(weight_grad_from_compressed(core, factors, grad_out), expected)
    matrix = torch.randn(shape[-1], 3, dtype=torch.float64)
    torch.testing.assert_close(compressed_matmul(core, factors, matrix), dense @ matrix)
    assert compressed_bytes(core, factors) == 8 * (math.prod(ranks) + sum(s * r for s, r in zip(shape, ranks)))


def test_first_call_is_truncated_hosvd():
    a = _low_rank_ish((6, 7, 8))
    core, factors = TuckerCompressor(ranks=(2, 3, 4)).compress(a)
    for mode, factor in enumerate(factors):
        u = torch.linalg.svd(_unfolding(a, mode), full_matrices=False).U[:, : factor.shape[1]]
        assert _subspace_distance(factor, u) < 1e-6
        torch.testing.assert_close(factor.t() @ factor, torch.eye(factor.shape[1], dtype=a.dtype))


def test_eps_ranks_chosen_once_from_each_unfolding():
    a = _low_rank_ish((6, 7, 12), decay=0.7, noise=1e-2)
    compressor = TuckerCompressor(eps=0.9)
    core, _ = compressor.compress(a)
    expected = [rank_for_threshold(torch.linalg.svdvals(_unfolding(a, m)), 0.9) for m in range(3)]
    assert list(core.shape) == compressor.ranks == expected
    assert 1 < min(expected) and max(expected) < 6
    core, _ = compressor.compress(torch.randn(6, 7, 12, dtype=torch.float64))  # ranks stay
    assert list(core.shape) == expected


def test_gradient_error_falls_as_ranks_grow():
    shape = (8, 10, 16)
    x = _low_rank_ish(shape, decay=0.7, noise=1e-2, dtype=torch.float32)
    torch.manual_seed(2)
    grad_out = torch.randn(8, 10, 12)
    exact = grad_out.reshape(-1, 12).t() @ x.reshape(-1, 16)
    errors = []
    for ranks in [(2, 2, 3), (4, 4, 6), (6, 7, 11), shape]:
        core, factors = TuckerCompressor(ranks=ranks).compress(x)
        errors.append(float(torch.linalg.norm(weight_grad_from_compressed(core, factors, grad_out) - exact)))
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-4 * float(torch.linalg.norm(exact))


def test_warm_start_tracks_a_rotating_subspace():
    """Factors follow a subspace that drifts step by step, far from where it started."""
    gen = torch.Generator().manual_seed(3)
    dtype = torch.float64
    batch, tokens, channels = 6, 20, 30
    core = torch.randn(batch, 3, 3, generator=gen, dtype=dtype) * torch.tensor([3.0, 2.0, 1.5], dtype=dtype)
    u_batch = torch.linalg.qr(torch.randn(batch, batch, generator=gen, dtype=dtype)).Q
    bases = [torch.linalg.qr(torch.randn(size, size, generator=gen, dtype=dtype)).Q for size in (tokens, channels)]
    drifts = []
    for size in (tokens, channels):
        skew = torch.randn(size, size, generator=gen, dtype=dtype)
        drifts.append(torch.linalg.matrix_exp(0.04 * (skew - skew.t())))
    compressor = TuckerCompressor(ranks=(batch, 3, 3))
    truth = [b[:, :3] for b in bases]
    start = [t.clone() for t in truth]
    for _ in range(25):
        a = reconstruct(core, [u_batch, *truth]) + 0.02 * torch.randn(batch, tokens, channels, generator=gen, dtype=dtype)
        _, factors = compressor.compress(a)
        for factor, target in zip(factors[1:], truth):
            assert _subspace_distance(factor, target) < 0.1
        truth = [drift @ t for drift, t in zip(drifts, truth)]
    for begin, end in zip(start, truth):
        assert _subspace_distance(begin, end) > 0.5


def test_batch_size_change_gets_fresh_batch_factor():
    compressor = TuckerCompressor(ranks=(8, 10, 16))
    compressor.compress(torch.randn(8, 10, 16))
    previous_token_factor = compressor.factors[1]
    small = torch.randn(5, 10, 16)
    core, factors = compressor.compress(small)
    assert factors[0].shape == (5, 5) and core.shape == (5, 10, 16)  # rank clipped to the mode size
    assert factors[1] is not previous_token_factor
    torch.testing.assert_close(reconstruct(core, factors), small, rtol=1e-4, atol=1e-4)
    core, factors = compressor.compress(torch.randn(8, 10, 16))
    assert factors[0].shape == (8, 8)


def test_rank_validation():
    with pytest.raises(ValueError):
        TuckerCompressor()
    with pytest.raises(ValueError):
        TuckerCompressor(ranks=(2, 2), eps=0.5)
    with pytest.raises(ValueError):
        TuckerCompressor(eps=1.5)
    with pytest.raises(ValueError):
        TuckerCompressor(ranks=(2, 2)).compress(torch.randn(3, 4, 5))


def test_mode_gram_matches_unfolding():
    torch.manual_seed(4)
    a, b = torch.randn(3, 4, 5), torch.randn(3, 2, 5)
    torch.testing.assert_close(mode_gram(a, b, 1), _unfolding(a, 1) @ _unfolding(b, 1).t())


def test_saved_tensors_are_only_the_compressed_input():
    torch.manual_seed(5)
    x = torch.randn(8, 16, 32, requires_grad=True)
    weight = torch.randn(24, 32, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = asi_linear(x, weight, None, TuckerCompressor(ranks=(2, 3, 4)))
    activations = [t for t in saved if t.data_ptr() != weight.data_ptr()]
    assert len(activations) == 4  # core and three factors
    assert all(t.numel() < x.numel() for t in saved if t is not weight)
    saved_bytes = sum(t.numel() * t.element_size() for t in activations)
    assert saved_bytes < x.numel() * x.element_size() / 10
    y.sum().backward()
    assert x.grad is not None and weight.grad is not None


def test_input_without_grad_and_no_bias():
    x = torch.randn(2, 3, 4)
    weight = torch.randn(5, 4, requires_grad=True)
    y = asi_linear(x, weight, None, TuckerCompressor(ranks=(2, 3, 4)))
    (grad_weight,) = torch.autograd.grad(y.sum(), weight)
    torch.testing.assert_close(grad_weight, torch.ones(2, 3, 5).reshape(-1, 5).t() @ x.reshape(-1, 4),
                               rtol=1e-4, atol=1e-4)
