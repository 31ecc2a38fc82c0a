"""Activation subspace (ASI, METHOD.md section 2): Tucker compression of a linear layer's saved input.

A linear layer keeps its input X for the weight gradient dY^T X. ASI keeps instead a Tucker form
X ~ S x_1 U_1 x_2 U_2 ... (core S, one orthonormal factor U_m per mode), found by one warm-started
power-iteration step per mode and training step, and contracts the weight gradient directly from S and
the U_m without ever rebuilding X.

Mode products here view a tensor as (pre, size_m, post), which is free for a contiguous tensor, so no
mode is ever unfolded by an explicit permute-and-copy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from wasi_compress.spectrum import rank_for_threshold

__all__ = [
    "ASILinearFunction",
    "TuckerCompressor",
    "asi_linear",
    "compressed_bytes",
    "compressed_matmul",
    "grad_core",
    "grad_core_cost",
    "mode_gram",
    "mode_product",
    "reconstruct",
    "reduced_qr",
    "weight_grad_from_compressed",
]


def mode_product(a: Tensor, matrix: Tensor, mode: int) -> Tensor:
    """Contract mode `mode` of `a` (size s) with the rows of `matrix` (s, t): the result has size t in
    that mode. With matrix = U (s, k) this projects onto U (a x_m U^T); with U^T it expands back."""
    shape = a.shape
    size = shape[mode]
    pre, post = math.prod(shape[:mode]), math.prod(shape[mode + 1:])
    if post == 1:
        out = a.reshape(pre, size) @ matrix
    elif pre == 1:
        out = matrix.t() @ a.reshape(size, post)
    else:
        out = torch.matmul(matrix.t(), a.reshape(pre, size, post))
    return out.reshape(*shape[:mode], matrix.shape[1], *shape[mode + 1:])


def mode_gram(a: Tensor, b: Tensor, mode: int) -> Tensor:
    """Contract two tensors over every mode except `mode`: A_(m) B_(m)^T, shape (a_m, b_m)."""
    pre, post = math.prod(a.shape[:mode]), math.prod(a.shape[mode + 1:])
    a3, b3 = a.reshape(pre, a.shape[mode], post), b.reshape(pre, b.shape[mode], post)
    if pre == 1:
        return a3[0] @ b3[0].t()
    if post == 1:
        return a3[:, :, 0].t() @ b3[:, :, 0]
    return torch.bmm(a3, b3.transpose(1, 2)).sum(0)


def reconstruct(core: Tensor, factors: Sequence[Tensor]) -> Tensor:
    """S x_1 U_1 x_2 U_2 ...: the full tensor a compressed form stands for (tests and diagnostics; the
    training path never calls it). Modes that grow least are expanded first, while the tensor is small."""
    out = core
    for mode in sorted(range(core.dim()), key=lambda m: factors[m].shape[0] / factors[m].shape[1]):
        out = mode_product(out, factors[mode].t(), mode)
    return out


def compressed_matmul(core: Tensor, factors: Sequence[Tensor], matrix: Tensor) -> Tensor:
    """X~ @ matrix for X~ = reconstruct(core, factors) and matrix (I, p), without forming X~: the last
    factor U_d (I, k_d) becomes matrix^T U_d (p, k_d) and the rest is a reconstruction of size p."""
    return reconstruct(core, [*factors[:-1], matrix.t() @ factors[-1]])


def weight_grad_from_compressed(core: Tensor, factors: Sequence[Tensor], grad_out: Tensor) -> Tensor:
    """dY^T X~ of shape (O, I), contracted in the order of METHOD.md section 2.

    dY (..., O) has the leading shape of X~. Its leading modes are projected onto U_1, U_2, ... first
    (B N O -> K1 N O -> K1 K2 O), then the core absorbs them (-> K3 O), and U_d expands last
    (-> O I): about 2 O (B N K1 + N K1 K2 + K1 K2 K3 + K3 I) FLOPs for 3 modes instead of 2 B N O I."""
    return grad_core(core, factors, grad_out).t() @ factors[-1].t()


def grad_core(core: Tensor, factors: Sequence[Tensor], grad_out: Tensor) -> Tensor:
    """T of shape (K_d, O) with dY^T X~ = T^T U_d^T: the weight gradient before its last factor expands
    it. Products of the gradient with small matrices then need no dense (O, I) tensor:
    A^T (dY^T X~) = (A^T T^T) U_d^T and (dY^T X~) B = T^T (U_d^T B)."""
    projected = grad_out
    for mode in range(core.dim() - 1):
        projected = mode_product(projected, factors[mode], mode)
    out_features = grad_out.shape[-1]
    last_rank = core.shape[-1]
    return core.reshape(-1, last_rank).t() @ projected.reshape(-1, out_features)  # (K_d, O)


def grad_core_cost(core: Tensor, factors: Sequence[Tensor], out_features: int) -> int:
    """Multiply-adds of `grad_core` for an output gradient of `out_features` columns."""
    sizes, ranks = [f.shape[0] for f in factors], list(core.shape)
    cost, shape = 0, list(sizes[:-1])
    for mode in range(core.dim() - 1):
        cost += math.prod(shape) * out_features * ranks[mode]
        shape[mode] = ranks[mode]
    return cost + math.prod(ranks) * out_features


def compressed_bytes(core: Tensor, factors: Sequence[Tensor]) -> int:
    """Bytes of the compressed form: the core plus every factor."""
    return sum(t.numel() * t.element_size() for t in (core, *factors))


class TuckerCompressor:
    """Per-layer Tucker compressor with warm start (one instance per layer, reused every step).

    Ranks are either fixed (`ranks`, one per mode; clipped to the mode's size) or chosen once, at the
    first call, as the smallest rank explaining `eps` of each unfolding's energy, and then kept, so a
    layer's activation memory is fixed after the first step.

    Initialisation is always the truncated SVD of each unfolding, also for fixed ranks (METHOD.md
    allows random orthonormal there): the first step then starts from the best subspace instead of a
    random one, at the cost of one eigendecomposition of each mode's Gram matrix A_(m) A_(m)^T (whose
    eigenvectors are the left singular vectors of A_(m)), paid once per layer. Later calls do one
    power-iteration step per mode from the previous factor: V = A_(m)^T U; U = orth(A_(m) V). A mode
    whose size changed since the last call (the batch mode, on the last batch) is initialised afresh.
    """

    def __init__(self, ranks: Sequence[int] | None = None, eps: float | None = None):
        if (ranks is None) == (eps is None):
            raise ValueError("give exactly one of ranks= or eps=")
        if eps is not None and not 0.0 < eps <= 1.0:
            raise ValueError(f"eps must be in (0, 1], got {eps}")
        if ranks is not None and any(int(r) < 1 for r in ranks):
            raise ValueError(f"ranks must be positive, got {list(ranks)}")
        self.eps = eps
        self.ranks: list[int] | None = None if ranks is None else [int(r) for r in ranks]
        self.factors: list[Tensor] | None = None

    @torch.no_grad()
    def compress(self, a: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Tucker form (core, factors) of `a` (any number of modes >= 2), factors[m] of shape
        (a.shape[m], rank_m) with orthonormal columns, core of shape (rank_1, ..., rank_d)."""
        a = a.detach()
        if a.dim() < 2:
            raise ValueError(f"expected at least 2 modes, got shape {tuple(a.shape)}")
        if self.ranks is not None and len(self.ranks) != a.dim():
            raise ValueError(f"{len(self.ranks)} ranks given for an input of {a.dim()} modes {tuple(a.shape)}")
        a = a.contiguous()
        previous = self.factors if self.factors is not None and len(self.factors) == a.dim() else None
        factors, chosen_ranks = [], []
        for mode in range(a.dim()):
            prev = None if previous is None else previous[mode]
            if prev is not None and prev.shape[0] == a.shape[mode] and prev.dtype == a.dtype and prev.device == a.device:
                factor = self._power_step(a, prev, mode)
            else:
                factor = self._svd_init(a, mode)
            factors.append(factor)
            chosen_ranks.append(factor.shape[1])
        if self.ranks is None:
            self.ranks = chosen_ranks
        self.factors = factors
        core = a
        # strongest reductions first, so later projections run on an already small tensor
        for mode in sorted(range(a.dim()), key=lambda m: factors[m].shape[1] / a.shape[m]):
            core = mode_product(core, factors[mode], mode)
        return core, factors

    def _svd_init(self, a: Tensor, mode: int) -> Tensor:
        gram = mode_gram(a, a, mode)
        eigenvalues, eigenvectors = torch.linalg.eigh(_at_least_float32(gram))
        eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
        if self.ranks is None:
            rank = rank_for_threshold(eigenvalues.clamp_min(0).sqrt(), self.eps)
        else:
            rank = min(self.ranks[mode], a.shape[mode])
        return eigenvectors[:, :rank].to(a.dtype).contiguous()

    @staticmethod
    def _power_step(a: Tensor, previous: Tensor, mode: int) -> Tensor:
        projected = mode_product(a, previous, mode)  # V = A_(m)^T U, kept in tensor form
        return reduced_qr(mode_gram(a, projected, mode))[0]  # orth(A_(m) V)

    def __repr__(self) -> str:
        return f"TuckerCompressor(ranks={self.ranks}, eps={self.eps})"


class ASILinearFunction(torch.autograd.Function):
    """y = x W^T + b that saves only the Tucker form of x (plus W, which is a parameter, not an
    activation). dX = dY W is exact; dW is contracted from the compressed x; db = sum dY."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, compressor: TuckerCompressor) -> Tensor:
        core, factors = compressor.compress(x)
        ctx.save_for_backward(weight, core, *factors)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        weight, core, *factors = ctx.saved_tensors
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ weight
        if ctx.needs_input_grad[1]:
            grad_weight = weight_grad_from_compressed(core, factors, grad_out)
        if ctx.needs_input_grad[2]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_weight, grad_bias, None


def asi_linear(x: Tensor, weight: Tensor, bias: Tensor | None, compressor: TuckerCompressor) -> Tensor:
    """Functional form of `ASILinearFunction`."""
    return ASILinearFunction.apply(x, weight, bias, compressor)


def _at_least_float32(t: Tensor) -> Tensor:
    """Half-precision factorizations are too inaccurate (and often unsupported); compute them in float32."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def reduced_qr(p: Tensor) -> tuple[Tensor, Tensor]:
    """Reduced QR of p, computed in at least float32 and returned in p's dtype."""
    q, r = torch.linalg.qr(_at_least_float32(p))
    return q.to(p.dtype), r.to(p.dtype)
