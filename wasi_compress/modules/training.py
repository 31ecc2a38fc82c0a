"""Training modules: ASI alone (`ASILinear`) and weight + activation subspaces (`WASILinear`).

`WASILinear` stores only L (out, k), R (k, in) and the bias. Neither the dense weight nor a dense
weight gradient is ever formed: every product in its backward has one side k wide (METHOD.md
section 1), and with a `TuckerCompressor` attached the saved input is the Tucker form of X.

Both modules fall back to the plain forward (same outputs, ordinary autograd, nothing compressed) in
eval mode, under no_grad, and when torch.fx traces through them: an fx graph cannot hold their
custom backward. `TrainingModuleTracer` keeps them as leaf modules, so a traced model still trains
with the compressed backward.
"""

from __future__ import annotations

import math

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from wasi_compress.modules.asi import (
    TuckerCompressor,
    asi_linear,
    compressed_matmul,
    grad_core,
    grad_core_cost,
    reduced_qr,
    weight_grad_from_compressed,
)
from wasi_compress.modules.subspace import SubspaceLinear, Whitening

__all__ = ["ASILinear", "CompactInputLinear", "TrainingModuleTracer", "UPDATE_ALIASES", "UPDATE_RULES", "WASILinear",
           "canonical_update"]

# "optimizer-step": L and R are Parameters stepped by an optimizer, then re-orthonormalised;
# "subspace-iteration": the paper's rule, L and R updated inside backward (plain SGD, no optimizer state).
UPDATE_RULES = ("optimizer-step", "subspace-iteration")
UPDATE_ALIASES = {"factored": "optimizer-step"}  # the spelling before the rename, still accepted


def canonical_update(update: str) -> str:
    """The update rule's current name (old spellings map to it)."""
    return UPDATE_ALIASES.get(update, update) if isinstance(update, str) else update


class ASILinear(nn.Module):
    """A dense linear whose saved input is Tucker-compressed ("ASI alone").

    Shares the Parameters of the layer it wraps, so optimizers and state dicts see the same tensors."""

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None, compressor: TuckerCompressor):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = weight
        self.bias = bias
        self.compressor = compressor

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, eps: float | None = None, ranks: list[int] | None = None) -> ASILinear:
        return cls(linear.weight, linear.bias, TuckerCompressor(ranks=ranks, eps=eps))

    def forward(self, x: Tensor) -> Tensor:
        if _custom_backward_path(self, x) and self.weight.requires_grad:
            return asi_linear(x, self.weight, self.bias, self.compressor)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, compressor={self.compressor}")


class CompactInputLinear(nn.Linear):
    """A dense linear that never saves a view for backward: in training, an input that is a view into a
    larger tensor (a ViT head reads x[:, 0], one token of the final norm's (B, N, C) output) is copied
    first, so autograd keeps B x C values for the weight gradient instead of the whole (B, N, C) storage.
    Same parameters, same outputs and gradients as the nn.Linear it replaces."""

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> CompactInputLinear:
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight = linear.weight
        new.bias = linear.bias
        return new

    def forward(self, x: Tensor) -> Tensor:
        if _custom_backward_path(self, x) and self.weight.requires_grad and _is_partial_view(x):
            x = x.clone(memory_format=torch.contiguous_format)
        return F.linear(x, self.weight, self.bias)


def _is_partial_view(x: Tensor) -> bool:
    return x.untyped_storage().nbytes() > x.numel() * x.element_size()


class WASILinear(nn.Module):
    """Subspace linear for training: Y = (X R^T) L^T + b with only L, R, bias stored.

    update="optimizer-step" (old spelling "factored"): L and R are Parameters trained by any optimizer. Gradients
    dL = dY^T (X~ R^T), dR = (dY L)^T X~. Without a compressor these are exactly what autograd does
    for the two matmuls (it saves X and X R^T), so plain autograd runs; with a compressor a custom
    function saves the Tucker form of X and contracts both products from it. Call
    `reorthonormalize()` after each optimizer step to keep L orthonormal (L R is unchanged; an
    optimizer's per-parameter state such as momentum is not transformed with it).

    update="subspace-iteration": the paper's rule. L and R are buffers; each backward computes
    dX with the old factors and then replaces L, R by one subspace-iteration step on
    W' = L R - lr (G + weight_decay L R) (plain SGD, no momentum), in factored form, with this
    layer's `lr` and `weight_decay` attributes (set them to follow a schedule). The bias stays a
    Parameter trained by the optimizer through ordinary autograd, so bias, norms and heads share one
    optimizer and one schedule. One forward per backward: a second forward through the same layer
    before backward would see its factors change under it, which autograd reports as an in-place error.
    The update uses this process's gradient only (no all-reduce), so it is for single-process training.
    """

    def __init__(self, L: Tensor, R: Tensor, bias: Tensor | None = None, *, update: str = "optimizer-step",
                 lr: float | None = None, weight_decay: float = 0.0, compressor: TuckerCompressor | None = None):
        super().__init__()
        update = canonical_update(update)
        if update not in UPDATE_RULES:
            raise ValueError(f"update must be one of {UPDATE_RULES}, got {update!r}")
        if L.dim() != 2 or R.dim() != 2 or L.shape[1] != R.shape[0]:
            raise ValueError(f"L (out, k) and R (k, in) do not match: {tuple(L.shape)}, {tuple(R.shape)}")
        if update == "subspace-iteration":
            if lr is None or lr <= 0:
                raise ValueError("update='subspace-iteration' needs a positive lr")
            if weight_decay < 0:
                raise ValueError(f"weight_decay must be non-negative, got {weight_decay}")
        elif lr is not None or weight_decay:
            raise ValueError("update='optimizer-step' takes lr and weight decay from the optimizer, not the layer")
        self.out_features, self.rank = L.shape
        self.in_features = R.shape[1]
        self.update = update
        self.lr = lr
        self.weight_decay = weight_decay
        self.compressor = compressor
        if update == "optimizer-step":
            self.L = nn.Parameter(L)
            self.R = nn.Parameter(R)
        else:
            self.register_buffer("L", L)
            self.register_buffer("R", R)
            self.reorthonormalize()  # the update's closed forms assume L^T L = I
        self.bias = None if bias is None else nn.Parameter(bias)

    @classmethod
    def from_linear(cls, linear: nn.Linear, *, rank: int | None = None, threshold: float | None = None,
                    update: str = "optimizer-step", lr: float | None = None, weight_decay: float = 0.0,
                    compressor: TuckerCompressor | None = None, whitening: Whitening | None = None) -> WASILinear:
        """Factor a dense layer (plain or whitened SVD, see `SubspaceLinear.from_linear`) and wrap it
        for training."""
        subspace = SubspaceLinear.from_linear(linear, rank=rank, threshold=threshold, whitening=whitening)
        return cls.from_subspace(subspace, update=update, lr=lr, weight_decay=weight_decay, compressor=compressor)

    @classmethod
    def from_subspace(cls, subspace: SubspaceLinear, *, update: str = "optimizer-step", lr: float | None = None,
                      weight_decay: float = 0.0, compressor: TuckerCompressor | None = None) -> WASILinear:
        """Training copy of an inference layer (tensors are cloned, so the two never alias)."""
        bias = None if subspace.bias is None else subspace.bias.detach().clone()
        return cls(subspace.L.detach().clone(), subspace.R.detach().clone(), bias,
                   update=update, lr=lr, weight_decay=weight_decay, compressor=compressor)

    @torch.no_grad()
    def to_subspace(self) -> SubspaceLinear:
        bias = None if self.bias is None else self.bias.detach().clone()
        return SubspaceLinear(self.L.detach().clone(), self.R.detach().clone(), bias)

    @torch.no_grad()
    def reorthonormalize(self) -> None:
        """L, T = qr(L); R = T R: L gets orthonormal columns and L R stays the same."""
        q, t = reduced_qr(self.L)
        self.R.copy_(t @ self.R)
        self.L.copy_(q)

    @property
    def weight(self) -> Tensor:
        """W = L R, for code that passes the layer's weight to F.linear itself instead of calling the layer
        (torchvision's shifted_window_attention): gradients reach L and R through autograd, and the
        input is saved as F.linear saves it (not compressed)."""
        return self.L @ self.R

    def forward(self, x: Tensor) -> Tensor:
        if _custom_backward_path(self, x):
            if self.update == "subspace-iteration":
                # the update runs in backward, so something must require grad for backward to reach it
                needs_trigger = not (x.requires_grad or (self.bias is not None and self.bias.requires_grad))
                trigger = torch.empty(0, device=x.device, requires_grad=True) if needs_trigger else None
                return _SubspaceIterationFunction.apply(x, self.L, self.R, self.bias, trigger, self)
            if self.compressor is not None and (self.L.requires_grad or self.R.requires_grad):
                return _CompressedFactoredFunction.apply(x, self.L, self.R, self.bias, self.compressor)
        return F.linear(F.linear(x, self.R), self.L, self.bias)

    @torch.no_grad()
    def _subspace_iteration_step(self, L: Tensor, R: Tensor, grad_out: Tensor, grad_out_L: Tensor,
                                 saved_input: tuple[Tensor, ...]) -> None:
        """Replace L, R by one subspace-iteration step on W' = L R - lr (G + wd L R), G = dY^T X~.

        With L^T L = I (METHOD.md section 1), a = 1 - lr wd:
            Q  = a R^T - lr X~^T (dY L)                  (in, k)
            P  = a L (R Q) - lr dY^T (X~ Q)              (out, k)
            L' = orth(P)
            R' = a (L'^T L) R - lr (dY L')^T X~          (k, in)"""
        lr, shrink = self.lr, 1.0 - self.lr * self.weight_decay
        if _use_grad_core(saved_input, self.out_features, self.rank, products=2):
            # G~ = T^T U_d^T (asi.grad_core): every product of G~ with a k-wide matrix costs O(K_d (O + I) k),
            # so the two products of dY with k-wide matrices below (dY^T (X~ Q) and dY L') are not needed.
            core, *factors = saved_input
            t, last = grad_core(core, factors, grad_out), factors[-1]  # (K_d, O), (I, K_d)
            q = (shrink * R - lr * ((L.t() @ t.t()) @ last.t())).t()
            p = shrink * (L @ (R @ q)) - lr * (t.t() @ (last.t() @ q))
            new_L = reduced_qr(p)[0]
            new_R = shrink * ((new_L.t() @ L) @ R) - lr * ((new_L.t() @ t.t()) @ last.t())
        else:
            if grad_out_L is None:
                grad_out_L = grad_out @ L
            grad_rows = grad_out.reshape(-1, self.out_features)
            q = (shrink * R - lr * _grad_times_input(saved_input, grad_out_L)).t()
            input_q = _input_times(saved_input, q).reshape(-1, self.rank)
            p = shrink * (L @ (R @ q)) - lr * (grad_rows.t() @ input_q)
            new_L = reduced_qr(p)[0]
            new_R = shrink * ((new_L.t() @ L) @ R) - lr * _grad_times_input(saved_input, grad_out @ new_L)
        self.L.copy_(new_L)
        self.R.copy_(new_R)

    def extra_repr(self) -> str:
        text = (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}, update={self.update}")
        if self.update == "subspace-iteration":
            text += f", lr={self.lr}, weight_decay={self.weight_decay}"
        if self.compressor is not None:
            text += f", compressor={self.compressor}"
        return text


class TrainingModuleTracer(torch.fx.Tracer):
    """fx Tracer that records ASILinear and WASILinear as call_module leaves, so the traced model keeps
    their compressed backward and in-backward updates."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, (ASILinear, CompactInputLinear, WASILinear)) or super().is_leaf_module(m, module_qualified_name)


class _CompressedFactoredFunction(torch.autograd.Function):
    """Two-matmul linear that saves the Tucker form of x; dL and dR are contracted from it."""

    @staticmethod
    def forward(ctx, x, L, R, bias, compressor):
        core, factors = compressor.compress(x)
        ctx.save_for_backward(L, R, core, *factors)
        return F.linear(F.linear(x, R), L, bias)

    @staticmethod
    def backward(ctx, grad_out):
        L, R, *saved_input = ctx.saved_tensors
        grad_x = grad_L = grad_R = grad_bias = None
        if _use_grad_core(saved_input, L.shape[0], L.shape[1], products=1):
            # dL = G~ R^T = T^T (U_d^T R^T), dR = L^T G~ = (L^T T^T) U_d^T (asi.grad_core): no product of dY
            # with a k-wide matrix beyond the dY L that dX needs
            core, *factors = saved_input
            t, last = grad_core(core, factors, grad_out), factors[-1]
            if ctx.needs_input_grad[0]:
                grad_x = (grad_out @ L) @ R
            if ctx.needs_input_grad[1]:
                grad_L = t.t() @ (last.t() @ R.t())
            if ctx.needs_input_grad[2]:
                grad_R = (L.t() @ t.t()) @ last.t()
        else:
            grad_out_L = grad_out @ L
            if ctx.needs_input_grad[0]:
                grad_x = grad_out_L @ R
            if ctx.needs_input_grad[1]:
                input_R = _input_times(saved_input, R.t())  # X~ R^T without rebuilding X~
                grad_L = grad_out.reshape(-1, L.shape[0]).t() @ input_R.reshape(-1, L.shape[1])
            if ctx.needs_input_grad[2]:
                grad_R = _grad_times_input(saved_input, grad_out_L)
        if ctx.needs_input_grad[3]:
            grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0)
        return grad_x, grad_L, grad_R, grad_bias, None


class _SubspaceIterationFunction(torch.autograd.Function):
    """Two-matmul linear whose backward returns dX (old factors) and db, then updates the layer's L, R."""

    @staticmethod
    def forward(ctx, x, L, R, bias, trigger, layer):
        saved_input = (x,) if layer.compressor is None else _flatten_compressed(layer.compressor.compress(x))
        ctx.save_for_backward(L, R, *saved_input)
        ctx.layer = layer
        return F.linear(F.linear(x, R), L, bias)

    @staticmethod
    def backward(ctx, grad_out):
        L, R, *saved_input = ctx.saved_tensors
        grad_out_L = grad_out @ L if ctx.needs_input_grad[0] or len(saved_input) == 1 else None
        grad_x = grad_out_L @ R if ctx.needs_input_grad[0] else None
        grad_bias = grad_out.reshape(-1, grad_out.shape[-1]).sum(0) if ctx.needs_input_grad[3] else None
        ctx.layer._subspace_iteration_step(L, R, grad_out, grad_out_L, tuple(saved_input))
        return grad_x, None, None, grad_bias, None, None


def _custom_backward_path(module: nn.Module, x: Tensor) -> bool:
    """Whether a forward should take the custom-backward path (training, grad enabled, not fx-traced)."""
    return module.training and torch.is_grad_enabled() and not isinstance(x, torch.fx.Proxy)


def _use_grad_core(saved_input, out_features: int, rank: int, *, products: int) -> bool:
    """Whether contracting dY through the compressed input (asi.grad_core) is cheaper than the
    `products` products of dY (rows x out) with a k-wide matrix that it replaces."""
    if len(saved_input) == 1:
        return False
    core, *factors = saved_input
    rows = math.prod(f.shape[0] for f in factors[:-1])
    return grad_core_cost(core, factors, out_features) < products * rows * out_features * rank


def _flatten_compressed(compressed: tuple[Tensor, list[Tensor]]) -> tuple[Tensor, ...]:
    core, factors = compressed
    return (core, *factors)


def _input_times(saved_input: tuple[Tensor, ...], matrix: Tensor) -> Tensor:
    """X~ @ matrix (..., p) from the saved input: exact x, or (core, *factors)."""
    if len(saved_input) == 1:
        return saved_input[0] @ matrix
    core, *factors = saved_input
    return compressed_matmul(core, factors, matrix)


def _grad_times_input(saved_input: tuple[Tensor, ...], grad: Tensor) -> Tensor:
    """grad^T X~ of shape (p, in) for grad (..., p) with the leading shape of the input."""
    if len(saved_input) == 1:
        x = saved_input[0]
        return grad.reshape(-1, grad.shape[-1]).t() @ x.reshape(-1, x.shape[-1])
    core, *factors = saved_input
    return weight_grad_from_compressed(core, factors, grad)
