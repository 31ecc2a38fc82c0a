"""Token embeddings as planner candidates of `lowrank_` (issue 10, section 2): a table E (vocab x d)
beside the linears, a rank k costing k (vocab + d) elements, E ~ A B (modules/lowrank_embedding.py).

Error measures, on the linears' scale (relative, so they add up across layers):
- ``objective="weight"``: ||E - E_k||_F / ||E||_F;
- ``objective="data"``: the relative output error over the calibration tokens,
  sqrt(sum_t w_t ||E_t - (E_k)_t||^2 / sum_t w_t ||E_t||^2), with w_t the token's share of the
  calibration tokens plus a uniform floor (``SMOOTHING`` / vocab: the same mass again, spread over
  every row), so tokens the calibration text never saw still count. The padding row is not counted.
Both read off one spectrum: of E, or of D^(1/2) E with D = diag(w)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from wasi_compress.marks import mark_module
from wasi_compress.modules.lowrank_embedding import LowRankEmbedding
from wasi_compress.spectrum import singular_values
from wasi_compress.transforms._lowrank_candidates import SiteWeights

MIN_SIDE = 8      # smaller tables (token types, a handful of positions) are not worth a candidate
SMOOTHING = 1.0   # the uniform floor's mass, relative to the calibration tokens'


@dataclass
class EmbeddingSite:
    """An nn.Embedding as a planner site. ``out_features`` is the vocabulary, ``in_features`` the width
    (so the factored cost k (in + out) reads as for a linear)."""

    name: str
    in_features: int
    out_features: int
    weight_name: str
    kind: str = "module"
    role: str = "embedding"
    bias: bool = False
    bias_name: str | None = None
    input_shape: tuple[int, ...] | None = None
    output_shape: tuple[int, ...] | None = None
    node: str | None = None
    calls: int = 1


def is_embedding_site(site) -> bool:
    return isinstance(site, EmbeddingSite)


def embedding_layers(model: nn.Module, skipped: list[dict[str, str]]) -> list[SiteWeights]:
    """Every plain nn.Embedding of `model` large enough to factor, as a planner layer."""
    uses: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    layers = []
    for name, m in model.named_modules():
        if type(m) is not nn.Embedding or min(m.num_embeddings, m.embedding_dim) < MIN_SIDE:
            continue
        if uses.get(id(m.weight), 0) > 1:
            skipped.append({"name": name, "reason": "its table is shared with another layer (tied weights)"})
            continue
        if m.max_norm is not None or m.sparse:
            skipped.append({"name": name, "reason": "max_norm or sparse embeddings are kept as they are"})
            continue
        site = EmbeddingSite(name, m.embedding_dim, m.num_embeddings, f"{name}.weight")
        layers.append(SiteWeights(site, m.weight.detach(), 0, None))
    return layers


@contextlib.contextmanager
def counting_tokens(model: nn.Module, layers: list[SiteWeights]) -> Iterator[dict[str, torch.Tensor]]:
    """Per embedding layer, how often each row is looked up by the forward passes run inside."""
    counts, handles = {}, []
    for layer in layers:
        m = model.get_submodule(layer.site.name)
        counts[layer.site.name] = torch.zeros(m.num_embeddings, dtype=torch.float64)

        def hook(mod, args, name=layer.site.name):
            ids = args[0].detach().reshape(-1).cpu()
            counts[name] += torch.bincount(ids, minlength=mod.num_embeddings).to(torch.float64)

        handles.append(m.register_forward_pre_hook(hook))
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def row_weights(counts: torch.Tensor, padding_idx: int | None) -> torch.Tensor:
    """w_t: the calibration share of each row plus the uniform floor (see the module docstring)."""
    counts = counts.clone()
    if padding_idx is not None:
        counts[padding_idx] = 0
    total = float(counts.sum())
    uniform = torch.full_like(counts, 1.0 / counts.numel())
    return uniform if total == 0 else counts / total + SMOOTHING * uniform


def embedding_spectrum(layer: SiteWeights, weights: torch.Tensor | None) -> torch.Tensor:
    w = layer.weight.to(torch.float64)
    return singular_values(w if weights is None else w * weights.sqrt()[:, None])


def factor_embeddings(target: nn.Module, layers: list[SiteWeights], ranks: dict[str, int | None],
                      weights: dict[str, torch.Tensor]) -> int:
    """Replace each embedding the plan gave a rank with its LowRankEmbedding; returns how many."""
    done = 0
    for layer in layers:
        rank = ranks.get(layer.site.name)
        if rank is None:
            continue
        dense = target.get_submodule(layer.site.name)
        new = LowRankEmbedding.from_embedding(dense, rank, weights.get(layer.site.name))
        target.set_submodule(layer.site.name, mark_module(new, "lowrank", site=layer.site.name, kind="module",
                                                          origin="embedding"))
        done += 1
    return done
