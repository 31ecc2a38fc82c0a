import numpy as np
import pytest
import torch

from wasi_compress.spectrum import (
    break_even_rank,
    energy_curve,
    errors_for_ranks,
    rank_for_threshold,
    ranks_for_thresholds,
    singular_values,
)

THRESHOLDS = [0.1, 0.4, 0.5, 0.75, 0.9, 0.99, 1.0]


def _numpy_rank(matrix: np.ndarray, eps: float) -> int:
    energy = np.linalg.svd(matrix, compute_uv=False) ** 2
    cumulative = np.cumsum(energy)
    return next(k + 1 for k in range(energy.size) if cumulative[k] >= eps * cumulative[-1])


@pytest.mark.parametrize("shape", [(12, 7), (7, 12), (20, 20)])
def test_ranks_match_numpy(shape):
    rng = np.random.default_rng(sum(shape))
    # decaying spectrum so thresholds land on different ranks
    matrix = rng.standard_normal(shape) @ np.diag(0.7 ** np.arange(shape[1]))
    s = singular_values(torch.from_numpy(matrix))
    assert s.dtype == torch.float32
    np.testing.assert_allclose(s.numpy(), np.linalg.svd(matrix, compute_uv=False), rtol=1e-5)
    expected = {eps: _numpy_rank(matrix, eps) for eps in THRESHOLDS}
    assert {eps: rank_for_threshold(s, eps) for eps in THRESHOLDS} == expected
    assert ranks_for_thresholds(s, THRESHOLDS) == expected


def test_rank_edge_cases():
    assert rank_for_threshold(torch.zeros(5), 0.9) == 1
    assert rank_for_threshold(torch.tensor([3.0, 0.0, 0.0]), 1.0) == 1
    assert rank_for_threshold(torch.tensor([1.0, 1.0, 1.0, 1.0]), 1.0) == 4
    assert rank_for_threshold(torch.tensor([1.0, 1.0, 1.0, 1.0]), 0.5) == 2
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError):
            rank_for_threshold(torch.ones(3), bad)


def test_energy_curve():
    curve = energy_curve(torch.tensor([2.0, 1.0, 1.0]))
    torch.testing.assert_close(curve, torch.tensor([4 / 6, 5 / 6, 1.0], dtype=torch.float64))
    assert torch.equal(energy_curve(torch.zeros(3)), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("out_f,in_f", [(1, 1), (2, 2), (3, 5), (768, 3072), (40, 48), (1000, 1)])
def test_break_even_rank(out_f, in_f):
    k = break_even_rank(out_f, in_f)
    assert k * (out_f + in_f) < out_f * in_f
    assert (k + 1) * (out_f + in_f) >= out_f * in_f


def test_break_even_examples():
    assert break_even_rank(1, 1) == 0
    assert break_even_rank(768, 768) == 383
    assert break_even_rank(768, 3072) == 614


def test_errors_for_ranks_match_truncation():
    torch.manual_seed(0)
    weight = torch.randn(15, 9, dtype=torch.float64) @ torch.diag(0.8 ** torch.arange(9, dtype=torch.float64))
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    ranks = list(range(0, 10))
    errors = errors_for_ranks(singular_values(weight), ranks)
    for k, error in zip(ranks, errors):
        truncated = u[:, :k] @ torch.diag(s[:k]) @ vh[:k]
        measured = float(torch.linalg.norm(weight - truncated) / torch.linalg.norm(weight))
        assert error == pytest.approx(measured, rel=1e-5, abs=1e-7)
    assert errors[-1] == 0.0
    assert errors == sorted(errors, reverse=True)
    assert errors_for_ranks(torch.zeros(4), [1, 2]) == [0.0, 0.0]
