"""Model-scale errors for the planner (``error_scale="model"``): each layer's candidate errors are
rescaled so that they estimate the relative error of the MODEL's output, not of the layer's own output.

Why: the layer-scale errors add one relative error per layer, which treats every layer as equally
important. That is a fair proxy among the linears of a stack of blocks, but not between them and a
token embedding, whose output is the input of every block: on the real MiniLM the layer-scale plan
cut the embedding to rank 13 and kept every linear dense (mean cosine 0.39 at half the bytes).

How: per layer, a few probe ranks (``PROBES``, spread over its candidates' bytes) are built as they
would be (one factorization, truncated), swapped in alone, and the model's output on a calibration
batch is compared with the original's: s(k) = ||f_k(x) - f(x)||_F / ||f(x)||_F over the probe's
layer-scale error. Every candidate's error is multiplied by s interpolated at its rank (first order
across layers: errors of different layers add). An embedding's candidates that keep rows exactly
(_lowrank_embeddings.py) take the s of its plain probes at their rank: on the calibration rows a probe
runs, the kept rows are exact, and it would measure none of the error unseen tokens meet.

Text models count their real tokens only (`real_tokens`): padding positions, which the attention mask
hides from every real token, are left out of the reference and of the error."""

from __future__ import annotations

import statistics

import numpy as np
import torch
from torch import nn

from wasi_compress.modules.lowrank_embedding import LowRankEmbedding
from wasi_compress.modules.subspace import SubspaceLinear
from wasi_compress.planner import Candidate
from wasi_compress.transforms._lowrank_candidates import real_rows, real_tokens

PROBES = 5          # probe ranks per layer
PROBE_ROWS = 8      # calibration rows the model runs per probe


def _probes(layer) -> list[Candidate]:
    ranked = sorted((c for c in layer.candidates if c.rank is not None and c.error > 0), key=lambda c: c.rank)
    if len(ranked) <= PROBES:
        return ranked
    picks = np.linspace(0, len(ranked) - 1, PROBES).round().astype(int)
    return [ranked[i] for i in sorted(set(picks.tolist()))]


def _truncations(dense: nn.Module, top: int, whitening, weights):
    """A function rank -> the factored module at that rank (one factorization at `top`, sliced)."""
    if type(dense) is nn.Linear:
        full = SubspaceLinear.from_linear(dense, rank=top, whitening=whitening)
        bias = None if full.bias is None else full.bias.detach()
        return lambda k: SubspaceLinear(full.L.detach()[:, :k], full.R.detach()[:k], bias)
    if type(dense) is nn.Embedding:
        full = LowRankEmbedding.from_embedding(dense, top, weights)

        def at(k: int) -> LowRankEmbedding:
            new = LowRankEmbedding(full.num_embeddings, full.embedding_dim, k, padding_idx=full.padding_idx)
            new.A.data, new.B.data = full.A.detach()[:, :k], full.B.detach()[:k]
            return new

        return at
    return None


@torch.no_grad()
def model_error_scales(model: nn.Module, layers, batch: torch.Tensor, whitenings: dict, token_weights: dict,
                       progress) -> dict[str, list[tuple[int, float]]]:
    """Layer name -> [(probe rank, s)]; layers that cannot be probed (functional linears, layers
    factored before) take the median s of the others at every rank."""
    was_training = model.training
    model.eval()
    batch = batch[:PROBE_ROWS]
    real = real_tokens(model, batch)  # the positions that count (text models: not the padding)
    reference = real_rows(model(batch).float(), real)
    norm = float(reference.norm()) or 1.0
    scales: dict[str, list[tuple[int, float]]] = {}
    for i, layer in enumerate(layers):
        name = layer.site.name
        progress(i, len(layers), f"model-scale error of {name}")
        probes = _probes(layer)
        dense = model.get_submodule(name) if layer.site.kind == "module" and probes else None
        make = _truncations(dense, probes[-1].rank, whitenings.get(name), token_weights.get(name)) if dense is not None else None
        if make is None:
            continue
        points = []
        try:
            for probe in probes:
                model.set_submodule(name, make(probe.rank))
                error = real_rows(model(batch).float(), real) - reference
                points.append((probe.rank, float(error.norm()) / norm / probe.error))
        finally:
            model.set_submodule(name, dense)
        scales[name] = points
    model.train(was_training)
    fallback = statistics.median(s for points in scales.values() for _, s in points) if scales else 1.0
    return {layer.site.name: scales.get(layer.site.name, [(1, fallback)]) for layer in layers}


def rescale(layers, scales: dict[str, list[tuple[int, float]]]) -> None:
    """Each candidate's error becomes its estimated model-output error squared: (error x s)^2, with s
    interpolated linearly in rank (constant beyond the probes). Squared, because errors that different
    layers cause in the output are close to independent, so their squares add, not their norms."""
    for layer in layers:
        layer.candidates = rescaled(layer.candidates, scales[layer.site.name])


def rescaled(candidates: list[Candidate], points: list[tuple[int, float]]) -> list[Candidate]:
    """The candidates with model-scale errors (see `rescale`), s from the (probe rank, s) points."""
    ranks, s = zip(*points)
    return [Candidate(c.cost_bytes, (c.error * float(np.interp(c.rank or ranks[-1], ranks, s))) ** 2, c.rank, c.label)
            for c in candidates]
