"""Token embeddings as planner candidates of `lowrank_` (issue 10, section 2): a table E (vocab x d)
beside the linears, a rank k costing k (vocab + d) elements, E ~ A B (modules/lowrank_embedding.py).

Error measures, on the linears' scale (relative, so they add up across layers):
- ``objective="weight"``: ||E - E_k||_F / ||E||_F;
- ``objective="data"``: the relative output error over the token distribution the calibration text
  estimates, sqrt(sum_t w_t ||E_t - (E_k)_t||^2 / sum_t w_t ||E_t||^2) (`row_weights`): each seen token
  its share of the calibration tokens, and the tokens it never saw the Good-Turing estimate of their
  mass (tokens seen once over all tokens; 0.077 on the MiniLM benchmark's calibration, whose held-out
  sentences have 0.078 of their tokens unseen), spread evenly. The padding row is not counted. Until
  this estimate a fixed floor gave the unseen rows half the mass, which on MiniLM put the table's few
  ranks into 29k rows the text hardly uses.
Both read off one spectrum: of E, or of D^(1/2) E with D = diag(w).

Under the data objective the table has a second family of candidates: the rows of the calibration's
most frequent tokens (covering ``KEPT_COVERAGE`` of its tokens) stored exactly beside a rank-k
factorization of the other rows (modules/lowrank_embedding.py); their error is the other rows' share.
A kept row costs d elements, a rank (vocab + d): on MiniLM (30522 x 384) the 1162 rows of every
calibration token cost 15 ranks, and they cover 92% of the held-out tokens."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from wasi_compress.marks import mark_module
from wasi_compress.modules.lowrank_embedding import LowRankEmbedding
from wasi_compress.planner import Candidate
from wasi_compress.spectrum import singular_values
from wasi_compress.transforms._lowrank_candidates import SiteWeights, rank_candidates

MIN_SIDE = 8      # smaller tables (token types, a handful of positions) are not worth a candidate
UNSEEN_CAP = 0.5  # the unseen tokens' mass at most (a calibration of singletons alone says little)
# shares of the calibration tokens whose rows a candidate keeps; the steps near 1 let a plan keep the
# repeated tokens without the singletons, which unseen text meets least (measured on MiniLM: README)
KEPT_COVERAGE = (0.5, 0.75, 0.9, 0.95, 0.98, 1.0)


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
    """w_t, summing to 1: seen rows their share of the calibration tokens, scaled by 1 - p0; unseen rows
    (the padding row among them) p0 evenly, p0 = (tokens seen once) / (all tokens), at least one token's
    worth, at most UNSEEN_CAP (see the module docstring)."""
    counts = counts.to(torch.float64).clone()
    if padding_idx is not None:
        counts[padding_idx] = 0
    total = float(counts.sum())
    unseen = counts == 0
    if total == 0:
        return torch.full_like(counts, 1.0 / counts.numel())
    if not bool(unseen.any()):
        return counts / total
    p0 = min(max(float((counts == 1).sum()), 1.0) / total, UNSEEN_CAP)
    w = counts / total * (1.0 - p0)
    w[unseen] = p0 / float(unseen.sum())
    return w


def frequent_rows(counts: torch.Tensor, padding_idx: int | None) -> dict[float, torch.Tensor]:
    """Per share in KEPT_COVERAGE, the fewest most frequent rows (ties: lower id first) that cover that
    share of the calibration tokens (two shares may give the same rows)."""
    counts = counts.to(torch.float64).clone()
    if padding_idx is not None:
        counts[padding_idx] = 0
    total = float(counts.sum())
    if total == 0:
        return {}
    order = torch.argsort(counts, descending=True, stable=True)
    cumulative = torch.cumsum(counts[order], 0)
    seen = int((counts > 0).sum())
    return {share: order[:min(int(torch.searchsorted(cumulative, share * total * (1 - 1e-12))) + 1, seen)]
            for share in KEPT_COVERAGE}


def kept_family(layer: SiteWeights, rows: torch.Tensor, weights: torch.Tensor, config, elem: int) -> list[Candidate]:
    """The candidates keeping `rows` exactly beside a rank k of the rest: cost k (vocab + d) + (n + 1) d
    elements + the int32 slots; error the rest's weighted residual over the whole table's weighted energy.
    Only those cheaper than the dense table."""
    vocab, width = layer.site.out_features, layer.site.in_features
    table = layer.weight.to(torch.float64)
    energy = float((table.square().sum(1) * weights).sum()) or 1.0
    rest = weights.clone()
    rest[rows] = 0.0
    spectrum = singular_values(table * rest.sqrt()[:, None])
    share = math.sqrt(float(spectrum.double().square().sum()) / energy)
    extra = (rows.numel() + 1) * width * elem + vocab * 4
    return [Candidate(c.cost_bytes + extra, c.error * share, c.rank, f"rank {c.rank} + {rows.numel()} rows")
            for c in rank_candidates(layer, spectrum, config, elem)
            if c.rank is not None and c.cost_bytes + extra < vocab * width * elem]


def kept_candidates(layer: SiteWeights, counts: torch.Tensor, weights: torch.Tensor, padding_idx: int | None,
                    config, elem: int) -> dict[float, list[Candidate]]:
    """Per coverage share (rows already taken by a smaller share left out), the `kept_family` of the
    calibration's most frequent rows; records label -> rows in ``layer.kept``."""
    out, done = {}, set()
    for share, rows in frequent_rows(counts, padding_idx).items():
        if rows.numel() in done:
            continue
        done.add(rows.numel())
        out[share] = kept_family(layer, rows, weights, config, elem)
        layer.kept.update((c.label, rows) for c in out[share])
    return out


def embedding_spectrum(layer: SiteWeights, weights: torch.Tensor | None) -> torch.Tensor:
    w = layer.weight.to(torch.float64)
    return singular_values(w if weights is None else w * weights.sqrt()[:, None])


def factor_embeddings(target: nn.Module, layers: list[SiteWeights], chosen: dict[str, Candidate],
                      weights: dict[str, torch.Tensor]) -> int:
    """Replace each embedding the plan gave a rank with its LowRankEmbedding (with the chosen candidate's
    kept rows, if any); returns how many."""
    done = 0
    for layer in layers:
        name = layer.site.name
        if chosen[name].rank is None:
            continue
        new = LowRankEmbedding.from_embedding(target.get_submodule(name), chosen[name].rank, weights.get(name),
                                              layer.kept.get(chosen[name].label))
        target.set_submodule(name, mark_module(new, "lowrank", site=name, kind="module", origin="embedding"))
        done += 1
    return done
