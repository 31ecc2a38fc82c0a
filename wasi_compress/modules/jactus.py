"""The JACTUS layer (METHOD.md section 7): y = Q_L C Q_R^T x + b with frozen orthonormal bases.

Q_L (out, k_L) and Q_R (in, k_R) are buffers: saved in checkpoints, never trained, never in an
optimizer. The core C (k_L, k_R) and the bias are the only parameters. The dense weight is never stored.

In training the forward runs through `JactusFunction`, whose backward needs only z = x Q_R (k_R wide per
token) besides the frozen bases and C: dC = (dY Q_L)^T z, dx = (dY Q_L) C Q_R^T, db = sum dY. Autograd
on the plain three-matmul forward would save x (in wide) and the intermediate u = z C^T as well.
In eval mode, under no_grad and when traced, the plain forward runs (three MatMuls in ONNX)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wasi_compress.modules.registry import register_linear_type

__all__ = ["JactusFunction", "JactusLinear"]


class JactusFunction(torch.autograd.Function):
    """y = ((x Q_R) C^T) Q_L^T + b, saving z = x Q_R only (plus the frozen bases and C)."""

    @staticmethod
    def forward(ctx, x: Tensor, q_left: Tensor, q_right: Tensor, core: Tensor, bias: Tensor | None) -> Tensor:
        z = x @ q_right
        y = (z @ core.t()) @ q_left.t()
        if bias is not None:
            y = y + bias
        ctx.save_for_backward(z, q_left, q_right, core)
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y: Tensor):
        z, q_left, q_right, core = ctx.saved_tensors
        du = grad_y @ q_left                                   # (..., k_L)
        grad_x = grad_core = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = (du @ core) @ q_right.t()
        if ctx.needs_input_grad[3]:
            grad_core = du.reshape(-1, du.shape[-1]).t() @ z.reshape(-1, z.shape[-1])
        if ctx.has_bias and ctx.needs_input_grad[4]:
            grad_bias = grad_y.reshape(-1, grad_y.shape[-1]).sum(0)
        return grad_x, None, None, grad_core, grad_bias


class JactusLinear(nn.Module):
    """A linear layer in its task-aware union subspace: W ~ Q_L C Q_R^T, only C (and bias) trainable."""

    def __init__(self, q_left: Tensor, q_right: Tensor, core: Tensor, bias: Tensor | None = None):
        super().__init__()
        if q_left.dim() != 2 or q_right.dim() != 2 or core.shape != (q_left.shape[1], q_right.shape[1]):
            raise ValueError(f"Q_L (out, k_L), Q_R (in, k_R) and C (k_L, k_R) do not match: {tuple(q_left.shape)}, "
                             f"{tuple(q_right.shape)}, {tuple(core.shape)}")
        if bias is not None and bias.shape != (q_left.shape[0],):
            raise ValueError(f"bias of shape {tuple(bias.shape)} does not match out_features {q_left.shape[0]}")
        self.out_features, self.rank_out = q_left.shape
        self.in_features, self.rank_in = q_right.shape
        self.register_buffer("Q_L", q_left.contiguous())
        self.register_buffer("Q_R", q_right.contiguous())
        self.C = nn.Parameter(core.contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.contiguous())

    @property
    def rank(self) -> int:
        """The output-side rank k_L (the checkpoint's ``rank``; ``rank_in`` is k_R)."""
        return self.rank_out

    @classmethod
    def empty(cls, in_features: int, out_features: int, rank: int, bias: bool, rank_in: int | None = None,
              dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> JactusLinear:
        """Zero-filled layer of the given ranks, to be filled by `load_state_dict` (no calibration)."""
        if rank_in is None:
            raise ValueError("a JactusLinear needs both ranks: rank (k_L) and rank_in (k_R)")
        kw = {"dtype": dtype, "device": device}
        return cls(torch.zeros(out_features, rank, **kw), torch.zeros(in_features, rank_in, **kw),
                   torch.zeros(rank, rank_in, **kw), torch.zeros(out_features, **kw) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, q_left: Tensor, q_right: Tensor) -> JactusLinear:
        """Project a dense layer onto the bases: C = Q_L^T W Q_R (the best core for these bases in ||.||_F)."""
        weight = linear.weight.detach()
        like = {"dtype": weight.dtype, "device": weight.device}
        q_left, q_right = q_left.to(**like), q_right.to(**like)
        core = (q_left.t().to(torch.float64) @ weight.to(torch.float64) @ q_right.to(torch.float64)).to(**like)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        return cls(q_left, q_right, core, bias)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and self.training and (self.C.requires_grad or x.requires_grad) \
                and not isinstance(x, torch.fx.Proxy):
            return JactusFunction.apply(x, self.Q_L, self.Q_R, self.C, self.bias)
        return F.linear(F.linear(F.linear(x, self.Q_R.t()), self.C), self.Q_L, self.bias)

    @property
    def parameter_count(self) -> int:
        """What the layer stores: O k_L + k_L k_R + k_R I (+ bias), the count a budget is spent in."""
        return (self.out_features * self.rank_out + self.rank_out * self.rank_in + self.rank_in * self.in_features
                + (self.out_features if self.bias is not None else 0))

    @torch.no_grad()
    def to_linear(self) -> nn.Linear:
        """The dense layer W = Q_L C Q_R^T (for checks; a deployed model keeps the factors)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.C.device, dtype=self.C.dtype)
        linear.weight.copy_(self.Q_L @ self.C @ self.Q_R.t())
        if self.bias is not None:
            linear.bias.copy_(self.bias)
        return linear

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank_out={self.rank_out}, "
                f"rank_in={self.rank_in}, bias={self.bias is not None}")


# A JACTUS model is a model to analyze again: its layers are linear sites and fx leaves. Its weight-like
# tensor is Q_L (out, k_L), as SubspaceLinear's is L.
register_linear_type(JactusLinear, "Q_L")
