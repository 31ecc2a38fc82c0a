"""Low-rank convolutions: a k x k convolution W (O, I, k, k) as a rank-r k x k convolution (r output
channels) followed by a 1 x 1 convolution (r -> O).

This is the SVD of W unfolded to (O, I k k), the matrix a convolution multiplies each im2col patch by:
W_(O, Ikk) ~ L R with L (O, r), R (r, I k k), so R reshaped to (r, I, k, k) is the first convolution and
L the 1 x 1 after it. Chosen over Tucker-2 (a 1 x 1 into r_in channels, an r_in -> r_out k x k core, a
1 x 1 out) because it is a linear layer on patches: the best rank-r form in weight error by Eckart-Young,
the whitened SVD (METHOD.md section 4) on the im2col patches gives the best in output error, and the
planner's errors and costs are the linears' own (a rank costs r (I k k + O) elements). Tucker-2 needs
an iterative HOSVD/ALS without that guarantee and three kernels instead of two. Exports as two Conv
nodes. Plain ``nn.Conv2d`` with ``groups == 1`` only (a depthwise convolution has nothing to factor)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from wasi_compress.modules.subspace import SubspaceLinear, Whitening


def factorable_conv(m: nn.Module) -> bool:
    """A plain 2-d convolution with a channel mixing worth factoring (groups 1)."""
    return type(m) is nn.Conv2d and m.groups == 1 and not isinstance(m.padding, str) \
        and min(m.out_channels, m.weight[0].numel()) > 1


class LowRankConv2d(nn.Module):
    """``second(first(x))``: ``first`` a k x k convolution to ``rank`` channels (the conv's stride,
    padding and dilation, no bias), ``second`` a 1 x 1 convolution to ``out_channels`` with the bias."""

    def __init__(self, first: nn.Conv2d, second: nn.Conv2d):
        super().__init__()
        if first.out_channels != second.in_channels or second.kernel_size != (1, 1):
            raise ValueError("second must be a 1x1 convolution taking first's output channels")
        self.first, self.second = first, second
        self.rank = first.out_channels
        self.in_channels, self.out_channels = first.in_channels, second.out_channels
        self.in_features = first.weight[0].numel()  # I k k: the unfolded patch the rank is taken over
        self.out_features = self.out_channels

    @classmethod
    def empty_like(cls, conv: nn.Conv2d, rank: int, *, dtype: torch.dtype | None = None) -> LowRankConv2d:
        """The shape of `conv` at `rank`, zero-filled, to be filled by `load_state_dict` (no SVD)."""
        kwargs = {"dtype": dtype or conv.weight.dtype, "device": conv.weight.device if conv.weight.device.type != "meta" else None}
        first = nn.Conv2d(conv.in_channels, rank, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                          bias=False, padding_mode=conv.padding_mode, **kwargs)
        second = nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None, **kwargs)
        for p in (*first.parameters(), *second.parameters()):
            nn.init.zeros_(p)
        return cls(first, second)

    @classmethod
    @torch.no_grad()
    def from_conv(cls, conv: nn.Conv2d, rank: int, whitening: Whitening | None = None) -> LowRankConv2d:
        """Factor `conv` at `rank`: plain SVD of its unfolded weight, or whitened by the second moment of
        its im2col patches (`conv_patches`)."""
        if not factorable_conv(conv):
            raise ValueError(f"only plain nn.Conv2d with groups=1 can be factored, got {conv}")
        weight = conv.weight.detach()
        unfolded = nn.Linear(weight[0].numel(), conv.out_channels, bias=conv.bias is not None, device="meta")
        unfolded.weight = nn.Parameter(weight.reshape(conv.out_channels, -1), requires_grad=False)
        unfolded.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), requires_grad=False)
        sub = SubspaceLinear.from_linear(unfolded, rank=rank, whitening=whitening)
        new = cls.empty_like(conv, rank)
        new.first.weight.copy_(sub.R.reshape(rank, *weight.shape[1:]))
        new.second.weight.copy_(sub.L.reshape(conv.out_channels, rank, 1, 1))
        if conv.bias is not None:
            new.second.bias.copy_(conv.bias)
        return new

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(x))

    @torch.no_grad()
    def to_conv(self) -> nn.Conv2d:
        """The dense convolution W = L R (for reverting a conversion)."""
        f = self.first
        conv = nn.Conv2d(f.in_channels, self.out_channels, f.kernel_size, f.stride, f.padding, f.dilation,
                         bias=self.second.bias is not None, padding_mode=f.padding_mode,
                         device=f.weight.device, dtype=f.weight.dtype)
        L = self.second.weight.reshape(self.out_channels, self.rank)
        conv.weight.copy_((L @ f.weight.reshape(self.rank, -1)).reshape(conv.weight.shape))
        if self.second.bias is not None:
            conv.bias.copy_(self.second.bias)
        return conv

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, out_channels={self.out_channels}, rank={self.rank}"


def conv_patches(conv: nn.Conv2d, x: Tensor) -> Tensor:
    """The im2col patches `conv` multiplies by its unfolded weight: (N * positions, I k k)."""
    import torch.nn.functional as F

    if conv.padding_mode != "zeros":
        pad = conv._reversed_padding_repeated_twice
        x = F.pad(x, pad, mode=conv.padding_mode)
        padding = 0
    else:
        padding = conv.padding
    if isinstance(padding, str):  # "same" / "valid"
        raise ValueError(f"padding={padding!r} is not supported for calibration patches")
    cols = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=padding, stride=conv.stride)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])
