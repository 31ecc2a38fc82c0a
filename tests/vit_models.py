"""Hand-written vision transformers for the tests, given to the CLI as ``vit_models:<factory>`` (the tests
folder is put on sys.path by conftest.py).

- ``functional_head_vit``: nn.Linear qkv/proj/fc1/fc2, fused attention (F.scaled_dot_product_attention)
  and a FUNCTIONAL classifier head, ``F.linear(x, self.head_weight, self.head_bias)``;
- ``mha_vit``: blocks built on nn.MultiheadAttention, whose projections are hidden until rewritten;
- ``untraceable_vit``: data-dependent control flow (``if x.sum() > 0``) that torch.fx cannot trace, so
  capture must fall back to forward hooks;
- ``hand_vit``: nn.MultiheadAttention blocks AND a functional head at 16 px (module, rewritten-attention
  and functional sites in one model; the checkpoint tests use it as ``convert_models:hand_vit``);
- ``tiny_timm_vit``: timm's own VisionTransformer at 8x8 px, one channel (the fine-tuning tests: digits
  images fit it without resizing);
- ``tiny_vit``: timm ``vit_tiny_patch16_224`` at 32 px, 2 blocks of width 192 (the convert tests' model);
- ``tiny_swin``: timm Swin at 32 px, one block per stage (windows, patch merging);
- ``structured_mlp``: an MLP on 1x8x8 images with decaying weight spectra (budget/objective tests).

This is the one file that defines the test models; tests/convert_models.py re-exports the convert
tests' names, and tests/models.py lists them all (TEST_MODELS) with what a generic test may expect of
each. Every factory is seeded without touching the caller's generator and is tiny (a test on it runs in
about a second)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DIM, DEPTH, HEADS, PATCH, MLP_RATIO = 32, 2, 2, 8, 2


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch: int, in_chans: int, dim: int):
        super().__init__()
        self.img_size = (img_size, img_size)
        self.proj = nn.Conv2d(in_chans, dim, patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """qkv as one nn.Linear, attention through F.scaled_dot_product_attention."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, MLP_RATIO * dim)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MHABlock(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, MLP_RATIO * dim)

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class _ViTBase(nn.Module):
    def __init__(self, block, *, num_classes: int, img_size: int, in_chans: int = 3):
        super().__init__()
        self.num_classes = num_classes
        self.patch_embed = PatchEmbed(img_size, PATCH, in_chans, DIM)
        n = (img_size // PATCH) ** 2
        self.cls_token = nn.Parameter(torch.randn(1, 1, DIM) * 0.02)
        self.pos_embed = nn.Parameter(torch.randn(1, n + 1, DIM) * 0.02)
        self.blocks = nn.Sequential(*[block(DIM, HEADS) for _ in range(DEPTH)])
        self.norm = nn.LayerNorm(DIM)

    def features(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        return self.norm(self.blocks(x))[:, 0]


class FunctionalHeadViT(_ViTBase):
    """The classifier is a raw parameter pair used through F.linear: only a graph shows it."""

    def __init__(self, *, num_classes: int, img_size: int):
        super().__init__(Block, num_classes=num_classes, img_size=img_size)
        self.head_weight = nn.Parameter(torch.randn(num_classes, DIM) * 0.02)
        self.head_bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, x):
        return F.linear(self.features(x), self.head_weight, self.head_bias)


class MHAViT(_ViTBase):
    def __init__(self, *, num_classes: int, img_size: int):
        super().__init__(MHABlock, num_classes=num_classes, img_size=img_size)
        self.head = nn.Linear(DIM, num_classes)

    def forward(self, x):
        return self.head(self.features(x))


class UntraceableViT(_ViTBase):
    """Branches on a tensor value: fine eagerly, a TraceError for torch.fx."""

    def __init__(self, *, num_classes: int, img_size: int):
        super().__init__(Block, num_classes=num_classes, img_size=img_size)
        self.head = nn.Linear(DIM, num_classes)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow
            x = x * 1.0
        return self.head(self.features(x))


class HandViT(_ViTBase):
    """nn.MultiheadAttention blocks and a functional head (F.linear on raw parameters): capture sees
    module sites, the projections of the rewritten attention and a functional site."""

    def __init__(self, *, num_classes: int, img_size: int):
        super().__init__(MHABlock, num_classes=num_classes, img_size=img_size)
        self.default_input_size = (3, img_size, img_size)
        self.head_weight = nn.Parameter(torch.randn(num_classes, DIM) * DIM ** -0.5)
        self.head_bias = nn.Parameter(torch.randn(num_classes) * 0.1)

    def forward(self, x):
        return F.linear(self.features(x), self.head_weight, self.head_bias)


class StructuredMLP(nn.Module):
    """An MLP on 1x8x8 images whose weights have decaying spectra (like trained layers)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.default_input_size = (1, 8, 8)
        self.num_classes = num_classes
        self.fc1 = nn.Linear(64, 96)
        self.fc2 = nn.Linear(96, 96)
        self.head = nn.Linear(96, num_classes)
        with torch.no_grad():
            for lin in (self.fc1, self.fc2):
                u, _, vh = torch.linalg.svd(torch.randn(lin.out_features, lin.in_features), full_matrices=False)
                s = torch.logspace(0, -2, u.shape[1])
                lin.weight.copy_(u @ torch.diag(s) @ vh)

    def forward(self, x):
        x = x.flatten(1)
        return self.head(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


def _seeded(build):
    """Seeded weights (seed 0) without touching the caller's generator."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return build()


def functional_head_vit(num_classes: int = 10, img_size: int = 32) -> nn.Module:
    return _seeded(lambda: FunctionalHeadViT(num_classes=num_classes, img_size=img_size))


def mha_vit(num_classes: int = 10, img_size: int = 32) -> nn.Module:
    return _seeded(lambda: MHAViT(num_classes=num_classes, img_size=img_size))


def untraceable_vit(num_classes: int = 10, img_size: int = 32) -> nn.Module:
    return _seeded(lambda: UntraceableViT(num_classes=num_classes, img_size=img_size))


def hand_vit(num_classes: int = 10, img_size: int = 16) -> nn.Module:
    return _seeded(lambda: HandViT(num_classes=num_classes, img_size=img_size))


def structured_mlp(num_classes: int = 10) -> nn.Module:
    return _seeded(lambda: StructuredMLP(num_classes))


# linears per model at DEPTH blocks: qkv, proj, fc1, fc2 per block (q, k, v, out_proj, fc1, fc2 with MHA)
EXPECTED_LINEARS = {
    "functional_head_vit": DEPTH * 4 + 1,
    "mha_vit": DEPTH * 6 + 1,
    "untraceable_vit": DEPTH * 4 + 1,
    "hand_vit": DEPTH * 6 + 1,
}


def not_a_module(num_classes: int = 10, img_size: int = 32):
    return "not a module"


def _timm(name: str, **kwargs) -> nn.Module:
    import wasi_compress  # noqa: F401  (installs the torchvision shim timm needs: before timm)
    import timm

    return _seeded(lambda: timm.create_model(name, pretrained=False, **kwargs))


def tiny_timm_vit(num_classes: int = 10, img_size: int | None = None) -> nn.Module:
    """timm's VisionTransformer, dim 32, 2 blocks, 1x8x8 inputs (digits without resizing)."""
    model = _timm("vit_tiny_patch16_224", img_size=8, patch_size=4, in_chans=1, num_classes=num_classes, embed_dim=32,
                  depth=2, num_heads=2)
    model.pretrained_cfg = {"input_size": (1, 8, 8), "mean": (0.5,), "std": (0.5,), "num_classes": num_classes}
    return model


def tiny_vit(num_classes: int = 10, img_size: int = 32) -> nn.Module:
    """timm ViT, 2 blocks of width 192, patch 8: about 0.9 M parameters."""
    return _timm("vit_tiny_patch16_224", depth=2, img_size=img_size, patch_size=8, num_classes=num_classes)


def tiny_swin(num_classes: int = 10, img_size: int = 32) -> nn.Module:
    """timm Swin, width 16, one block per stage, windows of 4: shifted windows and a patch merging."""
    return _timm("swin_tiny_patch4_window7_224", img_size=img_size, window_size=4, depths=(1, 1), num_heads=(1, 2),
                 embed_dim=16, patch_size=4, num_classes=num_classes)
