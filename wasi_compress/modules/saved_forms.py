"""Memory-saving forms of what a transformer block saves for backward, other than linear inputs (issue 13).

Each form is a subclass of the module it stands for (so the op-family meter of
``wasi_compress.measure.saved`` still classes it as layernorm or activation), computes the same forward
output, and saves less for backward through its own autograd function:

- ``SharedOutputLayerNorm``: saves its OUTPUT y (the very tensor it returns: when the next linear saves
  its input exactly, the storage is shared and counted once) and the per-token rstd, never its input x.
  Backward (METHOD.md section 6): xhat = (y - beta) / gamma, g = dy * gamma,
  dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), dgamma = sum(dy * xhat), dbeta = sum(dy). Exact.
  Where gamma has a (near-)zero entry xhat cannot be recovered from y, so that forward saves xhat instead
  (decided once per forward, from the parameters at that moment). When the next linear keeps its input
  compressed (ASI), y is kept by the LayerNorm alone: 1 unit, as the plain LayerNorm's input was.
  Gradients equal autograd's to float tolerance in float32 and float64; in bfloat16 the xhat recovered
  from the rounded output differs from autograd's by the output's rounding (about 0.5% at most).
- ``CodedGELU`` / ``CodedSiLU``: forward returns exactly F.gelu / F.silu; backward uses a code of z:
  ``bits=8``: z clamped to [-c, c] and quantized uniformly to uint8 (numel bytes), the derivative taken
  at the dequantized z. c = 4 for GELU: beyond it GELU' is within 6e-4 of 0 or 1, and a wider range
  only coarsens the step (measured relative error 0.007 for z ~ N(0, 1), below 0.011 for N(0, s^2),
  s = 0.5..8); c = 6 for SiLU, whose derivative settles more slowly (within 0.013 of 0 or 1 beyond 6;
  0.008 for N(0, 1), at most 0.012 for s = 0.5..8). ``bits=2``: a piecewise-constant derivative
  (3 breakpoints, 4 levels, codes packed 4 to a byte: numel/4 bytes; ``STEP_DERIVATIVE``).
- ``MaskedReLU``: saves the 1-bit mask z > 0, packed 8 to a byte. Exact.

The 2-bit levels are fitted (``fit_step_derivative``) to minimise the expected squared derivative error
for z ~ N(0, 1), not taken from ReGELU2 (Approx-BP, ICML 2024, the authors' LowMemoryBP code: breakpoints
-3.19, -0.001, 3.19, levels 0, -0.049, 1.049, 1.0), because those fit the primitive function (a sum of
ReLUs close to GELU), and their gradient error for z ~ N(0, 1) is 0.36 against the fit's 0.13 (SiLU:
0.47 against 0.14). The fit for GELU: breakpoints -0.499, 0, 0.499, levels -0.046, 0.313, 0.687, 1.046.
``derivative_error`` measures any code's relative gradient error.

Attention (measured with saved_tensors_hooks, torch 2.13 CPU, float32, q/k/v of shape (B, H, N, D)):

- F.scaled_dot_product_attention with grad enabled and dropout_p = 0 runs the fused kernel
  (``ScaledDotProductFlashAttentionForCpuBackward0``), with or without ``is_causal`` and with a bool or
  float ``attn_mask`` that does not require grad. It saves q, k, v themselves (no copies: in timm they
  are views of the qkv output, one storage of 3 units), the output (B, H, N, D) and the log-sum-exp
  (B, H, N), plus the mask when one is given (a bool mask as an additive float mask of the mask's own,
  broadcast, shape). No (B, H, N, N) tensor. The same holds in float64 and bfloat16 (log-sum-exp float32).
- dropout_p > 0 (timm in training with attn_drop > 0), or an attn_mask that requires grad, falls back to
  the math path, which saves the (B, H, N, N) probabilities (and, with dropout, the mask too). timm's
  Swin adds its trainable relative-position bias to the mask, so its "fused" path saves the
  probabilities all the same on CPU.
- Under torch.no_grad, or when none of q, k, v requires grad, nothing is saved.
- timm's non-fused path (``fused_attn = False``) keeps q * scale, contiguous copies of k and v (matmul
  copies the strided views of the qkv output), the softmax probabilities (B, H, N, N) and the attention
  output copied for the projection: 4 units and the probabilities, against the fused kernel's qkv storage
  (3 units), output (1, which the projection's input shares) and log-sum-exp. Switching saves exactly
  B H (N^2 - N) elements a block (measured on timm's ViT). ``use_fused_attention_`` switches timm
  modules to the fused path.
  On a traced GraphModule the attention path was fixed when it was traced: switch before capture."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CLAMP", "KINDS", "STEP_DERIVATIVE", "CodedGELU", "CodedSiLU", "MaskedReLU", "SharedOutputLayerNorm",
           "coded_grad", "derivative_error", "encode", "exact_grad", "fit_step_derivative", "pack_codes",
           "step_derivative", "unpack_codes", "use_fused_attention_"]

KINDS = ("gelu", "gelu_tanh", "silu", "relu")
CLAMP = {"gelu": 4.0, "gelu_tanh": 4.0, "silu": 6.0}  # the 8-bit code's range [-c, c] (module docstring)
RECOVERY_RATIO = 1e-3  # xhat from y loses about eps * |beta / gamma|: recover only where |gamma| > 1e-3 |beta|


# ---- packing codes of 1, 2 or 8 bits into bytes

def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Flat uint8 holding ``8 // bits`` codes a byte (codes: uint8 values below 2**bits, any shape)."""
    flat = codes.reshape(-1).to(torch.uint8)
    if bits == 8:
        return flat
    per_byte = 8 // bits
    pad = (-flat.numel()) % per_byte
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    rows = flat.view(-1, per_byte)
    packed = rows[:, 0].clone()
    for i in range(1, per_byte):
        packed |= rows[:, i] << (i * bits)
    return packed


def unpack_codes(packed: Tensor, bits: int, numel: int) -> Tensor:
    """The first ``numel`` codes of ``pack_codes``'s output, flat uint8."""
    if bits == 8:
        return packed[:numel]
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
    return ((packed.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1)[:numel]


# ---- exact activations and derivatives

def _activation(z: Tensor, kind: str) -> Tensor:
    if kind == "gelu":
        return F.gelu(z)
    if kind == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if kind == "silu":
        return F.silu(z)
    return F.relu(z)


def exact_grad(dy: Tensor, z: Tensor, kind: str) -> Tensor:
    """dy * f'(z) as autograd computes it."""
    if kind in ("gelu", "gelu_tanh"):
        return torch.ops.aten.gelu_backward(dy, z, approximate="none" if kind == "gelu" else "tanh")
    if kind == "silu":
        return torch.ops.aten.silu_backward(dy, z)
    return dy * (z > 0)


# The 2-bit codes' (3 breakpoints, 4 levels): ``fit_step_derivative(kind)`` on 160001 points, rounded to
# 4 decimals (f'(-z) = 1 - f'(z) for GELU and SiLU, so the optimum is symmetric about 0 and 1/2).
STEP_DERIVATIVE: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "gelu": ((-0.4990, 0.0, 0.4990), (-0.0464, 0.3127, 0.6874, 1.0464)),
    "gelu_tanh": ((-0.4992, 0.0, 0.4992), (-0.0464, 0.3126, 0.6874, 1.0464)),
    "silu": ((-0.6686, 0.0, 0.6686), (0.0336, 0.3445, 0.6555, 0.9664)),
}


def step_derivative(kind: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(3 breakpoints, 4 levels) of ``kind``'s 2-bit code (``STEP_DERIVATIVE``)."""
    return STEP_DERIVATIVE[kind]


def fit_step_derivative(kind: str, points: int = 160001, iterations: int = 100) -> tuple[list[float], list[float]]:
    """Fit a piecewise-constant f' (3 breakpoints, 4 levels) minimising E[(f'(z) - level(z))^2] for
    z ~ N(0, 1), deterministically, on ``points`` points of [-8, 8] in float64, by alternating steps from
    breakpoints (-1, 0, 1): each level becomes the Gaussian-weighted mean of f' over its interval, each
    breakpoint the crossing of f' with the midpoint of its two levels nearest to it (a Lloyd iteration;
    other starts reach no lower error). How ``STEP_DERIVATIVE`` was made."""
    z = torch.linspace(-8.0, 8.0, points, dtype=torch.float64)
    weight = torch.exp(-z * z / 2)
    d = exact_grad(torch.ones_like(z), z, kind)
    breaks, levels = [-1.0, 0.0, 1.0], [0.0] * 4
    for _ in range(iterations):
        interval = torch.bucketize(z, torch.tensor(breaks, dtype=torch.float64))
        levels = (torch.bincount(interval, d * weight, 4) / torch.bincount(interval, weight, 4)).tolist()
        moved = sorted(_nearest_crossing(z, d, (levels[i] + levels[i + 1]) / 2, breaks[i]) for i in range(3))
        if max(abs(a - b) for a, b in zip(moved, breaks)) < 1e-12:
            break
        breaks = moved
    return breaks, levels


def _nearest_crossing(z: Tensor, d: Tensor, value: float, near: float) -> float:
    """The z nearest to ``near`` where d crosses ``value``, interpolated linearly (``near`` if it never does)."""
    above = d > value
    i = torch.nonzero(above[1:] != above[:-1]).flatten()
    if i.numel() == 0:
        return near
    crossings = z[i] + (value - d[i]) * (z[i + 1] - z[i]) / (d[i + 1] - d[i])
    return float(crossings[(crossings - near).abs().argmin()])


# ---- codes

def encode(z: Tensor, kind: str, bits: int) -> Tensor:
    """The code of z that the backward needs (flat uint8): 8-bit quantized z, 2-bit interval index, or the
    1-bit ReLU mask, packed."""
    z = z.detach()
    if kind == "relu":
        return pack_codes(z > 0, 1)
    if bits == 8:
        c = CLAMP[kind]  # in float32: a half-precision z would round the code itself
        return pack_codes(((z.float().clamp(-c, c) + c) * (255 / (2 * c))).round_(), 8)
    breaks = torch.tensor(step_derivative(kind)[0], dtype=z.dtype, device=z.device)
    return pack_codes(torch.bucketize(z, breaks), 2)


def coded_grad(dy: Tensor, code: Tensor, kind: str, bits: int) -> Tensor:
    """dy * f'(z) with f'(z) read from ``encode``'s code of z."""
    codes = unpack_codes(code, 1 if kind == "relu" else bits, dy.numel()).view(dy.shape)
    if kind == "relu":
        return dy * codes
    if bits == 8:
        c = CLAMP[kind]
        return exact_grad(dy, (codes.float() * (2 * c / 255) - c).to(dy.dtype), kind)
    levels = torch.tensor(step_derivative(kind)[1], dtype=dy.dtype, device=dy.device)
    return dy * levels[codes.int()]  # int32 indices: half the transient of int64


def derivative_error(kind: str, bits: int, *, numel: int = 1 << 16, scale: float = 1.0, seed: int = 0) -> float:
    """Relative error ||dz~ - dz|| / ||dz|| of the input gradient through ``kind``'s code of ``bits``
    (``relu``: the mask, exact), for z ~ N(0, scale^2) and dy ~ N(0, 1) in float32 (a seeded generator)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(numel, generator=gen) * scale
    dy = torch.randn(numel, generator=gen)
    exact = exact_grad(dy, z, kind)
    coded = coded_grad(dy, encode(z, kind, bits), kind, bits)
    return float((coded - exact).norm() / exact.norm())


class _CodedActivation(torch.autograd.Function):
    """f(z) exactly; saves only the code of z."""

    @staticmethod
    def forward(ctx, z: Tensor, kind: str, bits: int) -> Tensor:
        ctx.kind, ctx.bits = kind, bits
        ctx.save_for_backward(encode(z, kind, bits))
        return _activation(z, kind)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: Tensor):
        (code,) = ctx.saved_tensors
        return coded_grad(dy.contiguous(), code, ctx.kind, ctx.bits), None, None


def _records_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd will save anything for these inputs (else the plain forward is enough)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _check_bits(bits: int) -> int:
    if bits not in (2, 8):
        raise ValueError(f"bits must be 2 or 8, got {bits!r}")
    return bits


class _KeepsPlain:
    """A form remembers the module it replaced (outside the module tree: its parameters are the form's
    own), so that ``to_plain`` gives back that very module, of its own class (timm's LayerNorm, say)."""

    def _remember(self, plain: nn.Module):
        self.__dict__["_plain"] = plain  # not setattr: a submodule would list the parameters twice
        return self

    def _plain_or(self, build) -> nn.Module:
        plain = self.__dict__.get("_plain")
        return (build() if plain is None else plain).train(self.training)


class CodedGELU(_KeepsPlain, nn.GELU):
    """nn.GELU whose backward reads a 2- or 8-bit code of its input (module docstring). The forward
    output is F.gelu's exactly."""

    def __init__(self, approximate: str = "none", bits: int = 2):
        super().__init__(approximate=approximate)
        self.bits = _check_bits(bits)

    @property
    def kind(self) -> str:
        return "gelu" if self.approximate == "none" else "gelu_tanh"

    def forward(self, z: Tensor) -> Tensor:
        if not _records_grad(z):
            return super().forward(z)
        return _CodedActivation.apply(z, self.kind, self.bits)

    @classmethod
    def from_module(cls, gelu: nn.GELU, bits: int = 2) -> CodedGELU:
        return cls(gelu.approximate, bits).train(gelu.training)._remember(gelu)

    def to_plain(self) -> nn.GELU:
        """The module this form replaced (or a new nn.GELU)."""
        return self._plain_or(lambda: nn.GELU(self.approximate))

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}, bits={self.bits}"


class CodedSiLU(_KeepsPlain, nn.SiLU):
    """nn.SiLU whose backward reads a 2- or 8-bit code of its input. Always out of place (``inplace`` is
    kept only to give it back by ``to_plain``)."""

    def __init__(self, inplace: bool = False, bits: int = 2):
        super().__init__(inplace=inplace)
        self.bits = _check_bits(bits)

    def forward(self, z: Tensor) -> Tensor:
        if not _records_grad(z):
            return F.silu(z)
        return _CodedActivation.apply(z, "silu", self.bits)

    @classmethod
    def from_module(cls, silu: nn.SiLU, bits: int = 2) -> CodedSiLU:
        return cls(silu.inplace, bits).train(silu.training)._remember(silu)

    def to_plain(self) -> nn.SiLU:
        """The module this form replaced (or a new nn.SiLU)."""
        return self._plain_or(lambda: nn.SiLU(self.inplace))

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


class MaskedReLU(_KeepsPlain, nn.ReLU):
    """nn.ReLU that saves the 1-bit mask z > 0 packed 8 to a byte (exact). Always out of place."""

    def forward(self, z: Tensor) -> Tensor:
        if not _records_grad(z):
            return F.relu(z)
        return _CodedActivation.apply(z, "relu", 1)

    @classmethod
    def from_module(cls, relu: nn.ReLU) -> MaskedReLU:
        return cls(relu.inplace).train(relu.training)._remember(relu)

    def to_plain(self) -> nn.ReLU:
        """The module this form replaced (or a new nn.ReLU)."""
        return self._plain_or(lambda: nn.ReLU(self.inplace))


# ---- LayerNorm that saves its output

def _xhat_recoverable(weight: Tensor | None, bias: Tensor | None) -> bool:
    """Whether xhat = (y - beta) / gamma is accurate: every |gamma| above a floor and above
    RECOVERY_RATIO |beta| (y's rounding error eps |y| becomes eps |beta / gamma| in xhat)."""
    if weight is None:
        return True
    g = weight.detach().abs()
    ok = g > torch.finfo(g.dtype).tiny ** 0.5
    if bias is not None:
        ok &= g > RECOVERY_RATIO * bias.detach().abs()
    return bool(ok.all())


class _SharedOutputLayerNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, normalized_shape: tuple[int, ...],
                eps: float) -> Tensor:
        y, mean, rstd = torch.native_layer_norm(x, normalized_shape, weight, bias, eps)
        ctx.normalized_dims = len(normalized_shape)
        ctx.from_output = _xhat_recoverable(weight, bias)
        kept = y if ctx.from_output else (x - mean) * rstd  # near-zero gamma: keep xhat itself
        ctx.save_for_backward(kept, rstd, weight, bias)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy: Tensor):
        kept, rstd, weight, bias = ctx.saved_tensors
        acc = torch.promote_types(dy.dtype, torch.float32)  # low-precision inputs: reduce in float32
        dy_, kept, rstd = dy.to(acc), kept.to(acc), rstd.to(acc)
        w = weight.to(acc) if weight is not None else None
        xhat = kept
        if ctx.from_output:
            xhat = kept - bias.to(acc) if bias is not None else kept
            xhat = xhat / w if w is not None else xhat
        dims = tuple(range(-ctx.normalized_dims, 0))
        dx = None
        if ctx.needs_input_grad[0]:  # not when the input is frozen (only gamma and beta train)
            g = dy_ * w if w is not None else dy_
            dx = (rstd * (g - g.mean(dims, keepdim=True) - xhat * (g * xhat).mean(dims, keepdim=True))).to(dy.dtype)
        leading = tuple(range(dy.dim() - ctx.normalized_dims))
        dweight = (dy_ * xhat).sum(leading).to(weight.dtype) if ctx.needs_input_grad[1] else None
        dbias = dy_.sum(leading).to(bias.dtype) if ctx.needs_input_grad[2] else None
        return dx, dweight, dbias, None, None


class SharedOutputLayerNorm(_KeepsPlain, nn.LayerNorm):
    """nn.LayerNorm that saves its output and the per-token rstd for backward, not its input (module
    docstring); exact. Where gamma has a near-zero entry (|gamma| <= RECOVERY_RATIO |beta|, or below
    sqrt of the dtype's smallest normal), xhat cannot be recovered from y: that forward saves xhat
    instead of y (same bytes, but no longer shared with the next linear's input)."""

    def forward(self, x: Tensor) -> Tensor:
        if not _records_grad(x, self.weight, self.bias):
            return super().forward(x)
        return _SharedOutputLayerNormFn.apply(x, self.weight, self.bias, tuple(self.normalized_shape), self.eps)

    @classmethod
    def from_layernorm(cls, ln: nn.LayerNorm) -> SharedOutputLayerNorm:
        """The same LayerNorm (its own parameters, shared, not copied) with the memory-sharing backward."""
        new = cls(ln.normalized_shape, eps=ln.eps, elementwise_affine=ln.elementwise_affine,
                  bias=ln.bias is not None, device="meta")
        return _with_parameters(new, ln)._remember(ln)

    def to_layernorm(self) -> nn.LayerNorm:
        """The LayerNorm this form replaced (or a new nn.LayerNorm), holding this form's parameters."""
        return _with_parameters(self._plain_or(lambda: nn.LayerNorm(
            self.normalized_shape, eps=self.eps, elementwise_affine=self.elementwise_affine,
            bias=self.bias is not None, device="meta")), self)

    to_plain = to_layernorm


def _with_parameters(target: nn.LayerNorm, source: nn.LayerNorm):
    target.weight = source.weight
    target.bias = source.bias
    return target.train(source.training)


# ---- attention

def use_fused_attention_(model: nn.Module) -> list[str]:
    """Set ``fused_attn = True`` on every module that has that attribute set to False (timm's Attention,
    WindowAttention, ...), so F.scaled_dot_product_attention's fused CPU kernel runs and no (B, H, N, N)
    probabilities are saved (except where it falls back to the math path: module docstring). Returns the
    names of the modules it changed."""
    changed = []
    for name, module in model.named_modules():
        if getattr(module, "fused_attn", None) is False:
            module.fused_attn = True
            changed.append(name)
    return changed

