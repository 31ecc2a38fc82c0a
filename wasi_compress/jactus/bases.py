"""Task-aware union bases of one layer (METHOD.md section 7) and what a choice of ranks keeps.

From W (out x in) and the shrunk second moments C_x, C_g:
- U_w, V_w: W's top-k_w singular vectors, k_w the smallest rank keeping `alpha` of ||W||_F^2;
- V_x: C_x's top-k_i eigenvectors, k_i the smallest count keeping `beta` of tr(C_x);
- U_g: C_g's top-k_o eigenvectors at `gamma` of tr(C_g);
- Q_L = [U_w, orth((I - U_w U_w^T) U_g)], Q_R = [V_w, orth((I - V_w V_w^T) V_x)]: the first k_w columns
  are the weight's own singular vectors exactly; the task's directions add what they do not span
  (directions whose residual falls under UNION_TOL are dropped as already covered).
- the core C = Q_L^T W Q_R; the layer stores O k_L + k_L k_R + k_R I parameters (+ the bias).

Captured energy (the allocator's gain), in [0, 1] per layer so layers add on one scale: the mean of
- the weight energy kept, ||Q_L^T W Q_R||_F^2 / ||W||_F^2 (what compression keeps of the model), and
- the gradient energy kept, ||Q_L^T D Q_R||_F^2 / ||D||_F^2 with D = sum G^T X the calibration weight
  gradient (what the trained core can follow of the task's first update).
Both halves matter: a union that keeps W but not the task's gradient cannot adapt, one that follows the
gradient but drops W forgets. (A K-FAC-weighted energy ||C_g^(1/2) (W - W~) C_x^(1/2)||, tried first,
was within 1e-3 of 1 for every candidate on builtin:mnist-vit: the inputs' mean direction dominates C_x,
so it could not rank candidates.)"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["LayerSpectra", "RankChoice", "energy_rank", "union_basis"]

UNION_TOL = 1e-6  # a task direction whose part outside the weight's subspace is below this is not added


def energy_rank(values: Tensor, fraction: float) -> int:
    """Smallest k >= 1 with sum(values[:k]) >= fraction * sum(values) (values descending, >= 0)."""
    total = float(values.sum())
    if total <= 0.0:
        return 1
    cumulative = torch.cumsum(values.to(torch.float64), 0) / total
    k = int(torch.searchsorted(cumulative, torch.tensor([fraction - 1e-12], dtype=torch.float64)).item()) + 1
    return max(1, min(k, values.numel()))


def union_basis(first: Tensor, second: Tensor, tol: float = UNION_TOL) -> Tensor:
    """[first, orth((I - first first^T) second)]: orthonormal, its first columns exactly `first`
    (orthonormal columns), spanning both. Deterministic: the residual's left singular vectors, signs fixed."""
    if second.shape[1] == 0:
        return first.clone()
    residual = second - first @ (first.t() @ second)
    residual = residual - first @ (first.t() @ residual)  # a second pass: Gram-Schmidt twice is enough
    u, s, _ = torch.linalg.svd(residual, full_matrices=False)
    keep = int((s > tol).sum())
    extra = u[:, :keep]
    signs = torch.sign(extra[extra.abs().argmax(0), torch.arange(keep)])  # largest entry positive
    extra = extra * torch.where(signs == 0, torch.ones_like(signs), signs)
    room = first.shape[0] - first.shape[1]
    return torch.cat([first, extra[:, :room]], 1)


def _top_eigen(m: Tensor) -> tuple[Tensor, Tensor]:
    values, vectors = torch.linalg.eigh(m)
    order = torch.argsort(values, descending=True)
    vectors = vectors[:, order]
    signs = torch.sign(vectors[vectors.abs().argmax(0), torch.arange(vectors.shape[1])])
    return values[order].clamp_min(0), vectors * torch.where(signs == 0, torch.ones_like(signs), signs)


@dataclass
class RankChoice:
    """One candidate of a layer: the thresholds, the three truncation ranks, the union ranks, its
    parameter count and what it keeps."""

    thresholds: tuple[float, float, float]  # (alpha, beta, gamma)
    k_w: int
    k_i: int
    k_o: int
    k_left: int
    k_right: int
    params: int
    task_energy: float      # the gain: mean of the two below (see the module docstring)
    weight_energy: float    # ||Q_L^T W Q_R||^2 / ||W||^2
    gradient_energy: float  # ||Q_L^T D Q_R||^2 / ||D||^2

    def to_dict(self) -> dict:
        return {"thresholds": list(self.thresholds), "k_w": self.k_w, "k_i": self.k_i, "k_o": self.k_o, "k_left": self.k_left,
                "k_right": self.k_right, "params": self.params, "task_energy": self.task_energy,
                "weight_energy": self.weight_energy, "gradient_energy": self.gradient_energy}


class LayerSpectra:
    """The decompositions of one layer, computed once; `choice` builds any candidate from them (float64)."""

    def __init__(self, weight: Tensor, c_x: Tensor, c_g: Tensor, gradient: Tensor, has_bias: bool):
        w = weight.detach().to(device="cpu", dtype=torch.float64)
        self.weight, self.has_bias = w, has_bias
        self.out_features, self.in_features = w.shape
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        signs = torch.sign(u[u.abs().argmax(0), torch.arange(u.shape[1])])
        signs = torch.where(signs == 0, torch.ones_like(signs), signs)
        self.u_w, self.s_w, self.v_w = u * signs, s, vh.t() * signs  # sign-fixed: deterministic bases
        self.x_values, self.v_x = _top_eigen(c_x)
        self.g_values, self.u_g = _top_eigen(c_g)
        self.gradient = gradient.detach().to(device="cpu", dtype=torch.float64)
        self.w_energy = float(w.square().sum())
        self.d_energy = float(self.gradient.square().sum())

    @property
    def dense_params(self) -> int:
        return self.out_features * self.in_features + (self.out_features if self.has_bias else 0)

    def ranks(self, alpha: float, beta: float, gamma: float) -> tuple[int, int, int]:
        return (energy_rank(self.s_w.square(), alpha), energy_rank(self.x_values, beta),
                energy_rank(self.g_values, gamma))

    def bases(self, k_w: int, k_i: int, k_o: int) -> tuple[Tensor, Tensor]:
        """(Q_L, Q_R) of the union at these truncation ranks (float64)."""
        return (union_basis(self.u_w[:, :k_w], self.u_g[:, :k_o]), union_basis(self.v_w[:, :k_w], self.v_x[:, :k_i]))

    def choice(self, alpha: float, beta: float | None = None, gamma: float | None = None) -> RankChoice:
        beta = alpha if beta is None else beta
        gamma = alpha if gamma is None else gamma
        k_w, k_i, k_o = self.ranks(alpha, beta, gamma)
        q_left, q_right = self.bases(k_w, k_i, k_o)
        core = q_left.t() @ self.weight @ q_right
        weight = float(core.square().sum()) / self.w_energy if self.w_energy > 0 else 1.0
        follow = float((q_left.t() @ self.gradient @ q_right).square().sum()) / self.d_energy if self.d_energy > 0 else 1.0
        k_l, k_r = q_left.shape[1], q_right.shape[1]
        params = self.out_features * k_l + k_l * k_r + k_r * self.in_features + (self.out_features if self.has_bias else 0)
        return RankChoice(thresholds=(float(alpha), float(beta), float(gamma)), k_w=k_w, k_i=k_i, k_o=k_o,
                          k_left=k_l, k_right=k_r, params=params, task_energy=0.5 * (weight + follow),
                          weight_energy=weight, gradient_energy=follow)
