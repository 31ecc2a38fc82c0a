"""Low-rank linear layers for inference: W ~ L R (METHOD.md sections 1 and 4).

`SubspaceLinear` computes Y = (X R^T) L^T + b as two plain `F.linear` calls, so it traces with torch.fx
and exports to ONNX as two MatMul nodes. The factors come from a plain SVD of W (best in ||W - W_k||)
or from a truncation-aware whitened SVD (best in the layer's output error on calibration inputs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wasi_compress.modules.registry import register_linear_type
from wasi_compress.spectrum import errors_for_ranks, rank_for_threshold, singular_values

__all__ = [
    "SubspaceLinear",
    "Whitening",
    "errors_for_ranks",
    "lowrank_error",
    "whitened_singular_values",
]


class Whitening:
    """Second moment C = X^T X of a layer's calibration inputs, and its Cholesky factor S (C = S S^T).

    C is accumulated in float64: over thousands of tokens a float32 sum loses the small directions
    that decide the whitened spectrum's tail, and the Cholesky factor of a nearly singular C would be
    dominated by that rounding."""

    def __init__(self, in_features: int):
        self.in_features = int(in_features)
        self.gram = torch.zeros(self.in_features, self.in_features, dtype=torch.float64)
        self.rows = 0
        self._cholesky_cache: tuple[float, Tensor] | None = None

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Add the rows of x (any leading shape, last dim in_features) to C."""
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected inputs with last dimension {self.in_features}, got {tuple(x.shape)}")
        rows = x.detach().reshape(-1, self.in_features).to(torch.float64)
        if self.gram.device != rows.device:
            self.gram = self.gram.to(rows.device)
        self.gram.addmm_(rows.t(), rows)
        self.rows += rows.shape[0]
        self._cholesky_cache = None

    def cholesky(self, delta: float = 1e-6, max_tries: int = 8) -> Tensor:
        """Lower-triangular S (float64) with S S^T = C + d I, d = delta * mean(diag C).

        Calibration sets often have fewer tokens than features, or dead input channels, which make C
        singular; the ridge d keeps S invertible. If Cholesky still fails (rounding), d grows tenfold
        per retry. The result is cached until the next `update`."""
        if self.rows == 0:
            raise ValueError("Whitening has no calibration inputs; call update() first")
        if self._cholesky_cache is not None and self._cholesky_cache[0] == delta:
            return self._cholesky_cache[1]
        scale = float(self.gram.diagonal().mean())
        if scale <= 0:
            raise ValueError("calibration inputs are all zero; whitening is undefined")
        eye = torch.eye(self.in_features, dtype=torch.float64, device=self.gram.device)
        ridge = delta
        for _ in range(max_tries):
            factor, info = torch.linalg.cholesky_ex(self.gram + (ridge * scale) * eye)
            if int(info) == 0:
                self._cholesky_cache = (delta, factor)
                return factor
            ridge *= 10.0
        raise RuntimeError(f"Cholesky of the calibration second moment failed even with ridge {ridge / 10:g}")


def whitened_singular_values(weight: Tensor, whitening: Whitening) -> Tensor:
    """Singular values of W S (float32, descending): its tail energy is the output error of truncation."""
    return torch.linalg.svdvals(_whitened_weight(weight, whitening).to(torch.float32))


def lowrank_error(linear: nn.Linear, rank: int, whitening: Whitening | None = None) -> float:
    """Relative error of the rank-`rank` factorization of one layer.

    Without whitening: ||W - W_k||_F / ||W||_F. With whitening: ||X W^T - X W_k^T||_F / ||X W^T||_F on
    the calibration inputs. For many ranks use `errors_for_ranks` on one spectrum instead."""
    spectrum = singular_values(linear.weight) if whitening is None else whitened_singular_values(linear.weight, whitening)
    return errors_for_ranks(spectrum, [rank])[0]


class SubspaceLinear(nn.Module):
    """Y = (X R^T) L^T + b with L (out, rank) and R (rank, in): the inference form of a factored layer."""

    def __init__(self, L: Tensor, R: Tensor, bias: Tensor | None = None):
        super().__init__()
        if L.dim() != 2 or R.dim() != 2 or L.shape[1] != R.shape[0]:
            raise ValueError(f"L (out, k) and R (k, in) do not match: {tuple(L.shape)}, {tuple(R.shape)}")
        if bias is not None and bias.shape != (L.shape[0],):
            raise ValueError(f"bias of shape {tuple(bias.shape)} does not match out_features {L.shape[0]}")
        self.out_features, self.rank = L.shape
        self.in_features = R.shape[1]
        self.L = nn.Parameter(L)
        self.R = nn.Parameter(R)
        self.bias = None if bias is None else nn.Parameter(bias)

    @classmethod
    def empty(cls, in_features: int, out_features: int, rank: int, bias: bool,
              dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> SubspaceLinear:
        """Zero-filled layer of the given shape, to be filled by `load_state_dict` (no SVD)."""
        kwargs = {"dtype": dtype, "device": device}
        return cls(torch.zeros(out_features, rank, **kwargs), torch.zeros(rank, in_features, **kwargs),
                   torch.zeros(out_features, **kwargs) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, rank: int | None = None, threshold: float | None = None,
                    whitening: Whitening | None = None) -> SubspaceLinear:
        """Factor a dense layer at a rank, or at the smallest rank explaining `threshold` of the energy.

        Plain (whitening=None): W = U diag(s) V^T, L = U_k, R = diag(s_k) V_k^T, so L R is the best
        rank-k approximation of W. Whitened (SVD-LLM): W S = U diag(s) V^T, L = U_k,
        R = diag(s_k) V_k^T S^-1, the best rank-k approximation in output error on the calibration
        inputs; the threshold then applies to the spectrum of W S. L has orthonormal columns either way.

        The whitened R is computed as U_k^T W, which equals diag(s_k) V_k^T S^-1 exactly (since
        U_k^T W S = diag(s_k) V_k^T) but never applies S^-1: with a nearly singular calibration
        second moment, S^-1 would amplify rounding in the directions the calibration never excited."""
        if (rank is None) == (threshold is None):
            raise ValueError("give exactly one of rank= or threshold=")
        weight = linear.weight.detach()
        if whitening is None:
            u, s, vh = torch.linalg.svd(weight.to(torch.float32), full_matrices=False)
        else:
            u, s, _ = torch.linalg.svd(_whitened_weight(weight, whitening), full_matrices=False)
        max_rank = s.numel()
        if threshold is not None:
            rank = rank_for_threshold(s, threshold)
        if not 1 <= rank <= max_rank:
            raise ValueError(f"rank must be in [1, {max_rank}] for a {tuple(weight.shape)} weight, got {rank}")
        L = u[:, :rank]
        if whitening is None:
            R = s[:rank, None] * vh[:rank]
        else:
            R = L.t() @ weight.to(device=L.device, dtype=L.dtype)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        like = {"dtype": weight.dtype, "device": weight.device}
        return cls(L.to(**like).contiguous(), R.to(**like).contiguous(), bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.R), self.L, self.bias)

    @property
    def weight(self) -> Tensor:
        """W = L R, for code that passes the layer's weight to F.linear itself instead of calling the layer
        (torchvision's shifted_window_attention): the factors are stored, the product is formed per call."""
        return self.L @ self.R

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """The dense layer W = L R (for reverting a conversion)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.L.device, dtype=self.L.dtype)
        linear.weight.copy_(self.L @ self.R)
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}")


def _whitened_weight(weight: Tensor, whitening: Whitening) -> Tensor:
    """W S in float64 (S is the calibration Cholesky factor)."""
    if weight.shape[1] != whitening.in_features:
        raise ValueError(f"weight {tuple(weight.shape)} does not match whitening of {whitening.in_features} inputs")
    factor = whitening.cholesky()
    return weight.detach().to(device=factor.device, dtype=torch.float64) @ factor


# A converted model is itself a model to analyze or convert again: its factored layers are linear sites
# (fx leaves), with L as the weight-like tensor. Registered next to the layer, as timm keeps its
# fx-traceability declarations.
register_linear_type(SubspaceLinear, "L")
