"""A 1 x 1 convolution computed as the linear layer it is: over channels, at every position
(NCHW -> NHWC -> linear -> NCHW). Hybrid and MetaFormer-style ViTs (visformer, FastViT, PoolFormer)
write their MLPs, and sometimes q/k/v, as 1 x 1 convolutions; wrapped, the linear layer's training
modules (WASI, ASI) apply to them. `to_conv` turns one back: a dense 1 x 1 conv, or, when its linear was
trained in a subspace (SubspaceLinear), a LowRankConv2d of two 1 x 1 convs, which checkpoints record."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from wasi_compress.modules.lowrank_conv import LowRankConv2d
from wasi_compress.modules.subspace import SubspaceLinear


def pointwise_conv(m: nn.Module) -> bool:
    """A plain 1 x 1 convolution that is exactly a linear layer over channels."""
    return type(m) is nn.Conv2d and m.kernel_size == (1, 1) and m.stride == (1, 1) and m.groups == 1 \
        and m.dilation == (1, 1) and m.padding in ((0, 0), "valid")


class PointwiseConv(nn.Module):
    def __init__(self, linear: nn.Module):
        super().__init__()
        self.linear = linear

    @classmethod
    def from_conv(cls, conv: nn.Conv2d) -> PointwiseConv:
        """Shares the conv's tensors (no copy)."""
        linear = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None, device="meta")
        linear.weight = nn.Parameter(conv.weight.detach().reshape(conv.out_channels, conv.in_channels),
                                     requires_grad=conv.weight.requires_grad)
        linear.bias = conv.bias
        return cls(linear)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)

    @torch.no_grad()
    def to_conv(self) -> nn.Module:
        lin = self.linear
        if isinstance(lin, SubspaceLinear):
            new = LowRankConv2d.empty_like(nn.Conv2d(lin.in_features, lin.out_features, 1, bias=lin.bias is not None,
                                                     device="meta"), lin.rank, dtype=lin.L.dtype)
            new = new.to(lin.L.device)
            new.first.weight.copy_(lin.R.reshape(*lin.R.shape, 1, 1))
            new.second.weight.copy_(lin.L.reshape(*lin.L.shape, 1, 1))
            if lin.bias is not None:
                new.second.bias.copy_(lin.bias)
            return new
        if type(lin) is not nn.Linear:
            raise TypeError(f"{type(lin).__name__} inside a PointwiseConv has no convolution form; call to_inference first")
        conv = nn.Conv2d(lin.in_features, lin.out_features, 1, bias=lin.bias is not None,
                         device=lin.weight.device, dtype=lin.weight.dtype)
        conv.weight.copy_(lin.weight.reshape(conv.weight.shape))
        if lin.bias is not None:
            conv.bias.copy_(lin.bias)
        return conv


def wrap_pointwise_convs_(model: nn.Module) -> list[str]:
    """Replace every plain 1 x 1 convolution of `model` by a PointwiseConv, in place; returns their names."""
    names = [name for name, m in model.named_modules() if name and pointwise_conv(m)]
    for name in names:
        model.set_submodule(name, PointwiseConv.from_conv(model.get_submodule(name)))
    return names


def unwrap_pointwise_convs_(model: nn.Module) -> list[str]:
    """Every PointwiseConv back to its convolution form (see `PointwiseConv.to_conv`), in place."""
    names = [name for name, m in model.named_modules() if isinstance(m, PointwiseConv)]
    for name in names:
        model.set_submodule(name, model.get_submodule(name).to_conv())
    return names
