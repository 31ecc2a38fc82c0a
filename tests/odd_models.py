"""Small models whose structure names do not tell (the graph must), for tests/test_structure.py:

- ``odd_names_vit``: a ViT whose blocks are ``trunk.units.N`` with ``mix.a`` (q, k, v in one), ``mix.b``
  (the output), ``ff.0`` / ``ff.2`` (the MLP) and a BatchNorm1d after the projection (LeViT's way);
- ``wrapped_attention_vit``: attention through a ``torch.fx.wrap``ped function that is given the q/k/v and
  output linears' weights and calls F.linear itself (torchvision's shifted_window_attention);
- ``pointwise_mlp_net``: a conv net whose MLPs are 1x1 convolutions (visformer, FastViT) and a 3x3
  convolution holding most parameters;
- ``no_block_net``: linears without attention or an MLP between them (nothing for WASI to train).
Factories are seeded and tiny; ``odd_models:<factory>`` is a MODEL string with the tests folder on sys.path."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

DIM, HEADS = 32, 2


def _seeded(build):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build().eval()


class OddBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.mix = nn.ModuleDict({"a": nn.Linear(DIM, 3 * DIM), "b": nn.Linear(DIM, DIM)})
        self.bn = nn.BatchNorm1d(DIM)
        self.ff = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.Hardswish(), nn.Linear(2 * DIM, DIM))

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.mix["a"](self.norm1(x)).reshape(b, n, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        attn = (q @ k.transpose(-2, -1) * (c // HEADS) ** -0.5).softmax(dim=-1)
        y = self.mix["b"]((attn @ v).transpose(1, 2).reshape(b, n, c))
        x = x + self.bn(y.flatten(0, 1)).reshape(b, n, c)
        return x + self.ff(self.norm2(x))


class OddNamesViT(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.default_input_size = (3, 16, 16)
        self.num_classes = num_classes
        self.stem = nn.Conv2d(3, DIM, 4, stride=4)
        self.trunk = nn.ModuleDict({"units": nn.ModuleList([OddBlock(), OddBlock()])})
        self.out = nn.Linear(DIM, num_classes)

    def forward(self, x):
        x = self.stem(x).flatten(2).transpose(1, 2)
        for unit in self.trunk["units"]:
            x = unit(x)
        return self.out(x.mean(1))


def odd_names_vit(num_classes: int = 10) -> nn.Module:
    return _seeded(lambda: OddNamesViT(num_classes))


@fx.wrap
def windowed_attention(x, qkv_weight, proj_weight, heads: int, qkv_bias=None, proj_bias=None):
    b, n, c = x.shape
    if n % 2:  # data-dependent on the shape: fx cannot trace into this (why torchvision wraps its function)
        x = F.pad(x, (0, 0, 0, 1))
    q, k, v = F.linear(x, qkv_weight, qkv_bias).reshape(b, -1, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
    y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, c)[:, :n]
    return F.linear(y, proj_weight, proj_bias)


class WrappedAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)

    def forward(self, x):
        return windowed_attention(x, self.qkv.weight, self.proj.weight, HEADS, qkv_bias=self.qkv.bias,
                                  proj_bias=self.proj.bias)


class WrappedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.attn = WrappedAttention()
        self.mlp = nn.Sequential(nn.Linear(DIM, 4 * DIM), nn.GELU(), nn.Dropout(0.0), nn.Linear(4 * DIM, DIM))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class WrappedAttentionViT(OddNamesViT):
    def __init__(self, num_classes: int = 10):
        super().__init__(num_classes)
        self.trunk = nn.ModuleDict({"units": nn.ModuleList([WrappedBlock(), WrappedBlock()])})


def wrapped_attention_vit(num_classes: int = 10) -> nn.Module:
    return _seeded(lambda: WrappedAttentionViT(num_classes))


class PointwiseMlpNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.default_input_size = (3, 16, 16)
        self.num_classes = num_classes
        self.stem = nn.Conv2d(3, 48, 3, padding=1, stride=2)
        self.mix = nn.Conv2d(48, 48, 3, padding=1)
        self.mlp = nn.Sequential(nn.Conv2d(48, 96, 1), nn.GELU(), nn.Conv2d(96, 48, 1))
        self.head = nn.Linear(48, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.mix(x)
        x = x + self.mlp(x)
        return self.head(x.mean((2, 3)))


def pointwise_mlp_net(num_classes: int = 10) -> nn.Module:
    return _seeded(lambda: PointwiseMlpNet(num_classes))


class NoBlockNet(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.default_input_size = (1, 8, 8)
        self.num_classes = num_classes
        self.a = nn.Linear(64, 64)
        self.head = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.head(self.a(x.flatten(1)))


def no_block_net(num_classes: int = 10) -> nn.Module:
    return _seeded(lambda: NoBlockNet(num_classes))
