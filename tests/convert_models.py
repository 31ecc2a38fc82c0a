"""Tiny models for the convert, checkpoint and pass tests, importable as MODEL `convert_models:<factory>`
(the tests put this folder on sys.path)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import wasi_compress  # noqa: F401  (before timm)


def tiny_vit(num_classes: int = 10, img_size: int = 32):
    """timm ViT, 2 blocks of width 192, patch 8: about 0.9 M parameters."""
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=2, img_size=img_size, patch_size=8,
                             num_classes=num_classes)


class HandViT(nn.Module):
    """A hand-written ViT: patch embedding, nn.MultiheadAttention blocks, and a functional head
    (F.linear on raw parameters), so capture sees module and functional linears."""

    def __init__(self, num_classes: int = 10, img_size: int = 16, patch: int = 4, dim: int = 32, depth: int = 2,
                 heads: int = 2, in_chans: int = 3):
        super().__init__()
        self.num_classes = num_classes
        self.default_input_size = (in_chans, img_size, img_size)
        self.patch_embed = nn.Conv2d(in_chans, dim, patch, patch)
        n = (img_size // patch) ** 2
        self.pos = nn.Parameter(torch.randn(1, n, dim) * 0.02)
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            block = nn.Module()
            block.norm1 = nn.LayerNorm(dim)
            block.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
            block.norm2 = nn.LayerNorm(dim)
            block.fc1 = nn.Linear(dim, dim * 4)
            block.fc2 = nn.Linear(dim * 4, dim)
            self.blocks.append(block)
        self.norm = nn.LayerNorm(dim)
        self.head_weight = nn.Parameter(torch.randn(num_classes, dim) * dim ** -0.5)
        self.head_bias = nn.Parameter(torch.zeros(num_classes))

    def forward(self, x):
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            h = block.norm1(x)
            x = x + block.attn(h, h, h, need_weights=False)[0]
            x = x + block.fc2(F.gelu(block.fc1(block.norm2(x))))
        return F.linear(self.norm(x).mean(1), self.head_weight, self.head_bias)


def hand_vit(num_classes: int = 10, img_size: int = 16):
    torch.manual_seed(0)
    return HandViT(num_classes=num_classes, img_size=img_size)


def structured_mlp(num_classes: int = 10):
    """An MLP on 1x8x8 images whose weights have decaying spectra (like trained layers), with a shared
    (tied) tensor, for budget and objective tests."""
    torch.manual_seed(0)
    return _StructuredMLP(num_classes)


class _StructuredMLP(nn.Module):
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
