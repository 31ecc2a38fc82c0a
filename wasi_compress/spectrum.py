"""Ranks and truncation errors read off a singular-value spectrum (METHOD.md sections 1 and 4).

Everything here works on singular values only: the planner evaluates many candidate ranks per layer,
and all of them follow from one `svdvals` call, so no function here ever needs singular vectors.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor


def singular_values(weight: Tensor) -> Tensor:
    """Singular values of a weight matrix, descending, in float32.

    Computed as the square roots of the eigenvalues of the smaller Gram matrix (W W^T or W^T W) in
    float64: on CPU this is about 25x faster than torch.linalg.svdvals for a 768 x 3072 weight, and
    explained variance needs only s^2, which the Gram matrix holds exactly up to float64 rounding.
    Values below about 1e-7 of the largest lose relative precision, which no energy threshold sees."""
    if weight.dim() != 2:
        raise ValueError(f"expected a matrix, got a tensor of shape {tuple(weight.shape)}")
    w = weight.detach().to(torch.float64)
    gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
    eig = _eigvalsh(gram)
    return torch.flip(eig.clamp_min(0).sqrt(), [0]).to(torch.float32)


def _eigvalsh(gram: Tensor) -> Tensor:
    """eigvalsh, single-threaded on CPU. MKL's threaded symmetric eigensolver degrades badly when the
    cores are busy with other work: on a loaded 2-core machine 12 Gram matrices of 768 x 768 took 17 s
    with 2 threads and 0.7 s with 1 (analyze of ViT-B/32: spectra 60-86 s instead of 10 s)."""
    if gram.device.type != "cpu":
        return torch.linalg.eigvalsh(gram)
    threads = torch.get_num_threads()
    if threads == 1:
        return torch.linalg.eigvalsh(gram)
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigvalsh(gram)
    finally:
        torch.set_num_threads(threads)


def energy_curve(singular_values: Tensor) -> Tensor:
    """Cumulative explained-energy fraction: entry k-1 is sum_{i<=k} s_i^2 / sum_i s_i^2 (float64).

    The last entry is exactly 1. An all-zero spectrum has nothing to explain, so its curve is all ones."""
    energy = _energies(singular_values)
    cumulative = torch.cumsum(energy, 0)
    total = cumulative[-1]
    if total <= 0:
        return torch.ones_like(cumulative)
    return cumulative / total


def rank_for_threshold(singular_values: Tensor, eps: float) -> int:
    """Smallest k with sum_{i<=k} s_i^2 >= eps * sum_i s_i^2, for eps in (0, 1]. All-zero spectrum -> 1."""
    return _rank_on_curve(energy_curve(singular_values), eps)


def ranks_for_thresholds(singular_values: Tensor, thresholds: Iterable[float]) -> dict[float, int]:
    """`rank_for_threshold` for several thresholds, sharing one energy curve."""
    curve = energy_curve(singular_values)
    return {float(eps): _rank_on_curve(curve, eps) for eps in thresholds}


def break_even_rank(out_features: int, in_features: int) -> int:
    """Largest k with k (out + in) < out * in: the highest rank at which the factorization still has
    fewer parameters than the dense matrix. 0 when no rank pays."""
    if out_features < 1 or in_features < 1:
        raise ValueError(f"layer sizes must be positive, got out={out_features}, in={in_features}")
    return (out_features * in_features - 1) // (out_features + in_features)


def errors_for_ranks(singular_values: Tensor, ranks: Sequence[int]) -> list[float]:
    """Relative truncation error for each rank k: sqrt(sum_{i>k} s_i^2 / sum_i s_i^2).

    For the plain spectrum of W this is ||W - W_k||_F / ||W||_F (Eckart-Young); for the spectrum of W S
    (whitened, section 4) it is the relative output error ||X W^T - X W_k^T||_F / ||X W^T||_F. One
    spectrum serves every candidate rank. A rank at or above the spectrum's length has error 0; an
    all-zero spectrum has error 0 at every rank."""
    energy = _energies(singular_values)
    # tail[k] = sum_{i>=k} s_i^2, summed from the small end so small tails keep their precision
    tail = torch.cat([torch.flip(torch.cumsum(torch.flip(energy, [0]), 0), [0]), energy.new_zeros(1)])
    tail = tail.tolist()  # one device-to-host transfer for all ranks
    total = tail[0]
    errors = []
    for k in ranks:
        if k < 0:
            raise ValueError(f"rank must be non-negative, got {k}")
        discarded = tail[min(int(k), energy.numel())]
        errors.append((discarded / total) ** 0.5 if total > 0 else 0.0)
    return errors


def _energies(singular_values: Tensor) -> Tensor:
    if singular_values.dim() != 1 or singular_values.numel() == 0:
        raise ValueError(f"expected a non-empty vector of singular values, got shape {tuple(singular_values.shape)}")
    return singular_values.detach().to(torch.float64) ** 2


def _rank_on_curve(curve: Tensor, eps: float) -> int:
    eps = float(eps)
    if not 0.0 < eps <= 1.0:
        raise ValueError(f"explained-variance threshold must be in (0, 1], got {eps}")
    # first index whose cumulative fraction reaches eps; the curve ends at exactly 1, so one exists
    return int(torch.searchsorted(curve, torch.tensor([eps], dtype=curve.dtype, device=curve.device))[0]) + 1
