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
across layers: errors of different layers add). An embedding's candidates are probed on held-out rows
instead (`held_out_scales`): the first calibration rows are left out of the token counts that weight
the factors and choose the kept rows, so the tokens of theirs that the other rows never used meet the
factors as unseen text would. On the rows
it counted, a probe would see every kept row exact and the factors fitted to the very tokens it runs:
it would miss the error unseen tokens meet. Priced that way the planner spent too little on MiniLM's
unseen tokens (rank 13 + 2809 rows, held-out mean cosine 0.948). Where the held-out rows miss no row
(a position table at one sequence length), the plain probes' s stands.

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
from wasi_compress.transforms._lowrank_embeddings import counting_tokens, frequent_rows, kept_family, row_weights

PROBES = 5          # probe ranks per layer
PROBE_ROWS = 32     # calibration rows the model runs per probe (8 sentences left s noisy on MiniLM)
HELD_OUT_ROWS = 64  # calibration rows the embeddings' probes hold out of the token counts, at most
MIN_MISSED = 16     # lookups of rows not kept the held-out rows must make for a measured s
PLAIN = 0.0         # the key of the plain factorization (no rows kept) in `held_out_scales`


def _probes(candidates: list[Candidate]) -> list[Candidate]:
    ranked = sorted((c for c in candidates if c.rank is not None and c.error > 0), key=lambda c: c.rank)
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
        return lambda k: _sliced(full, k)
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
        probes = _probes(layer.candidates)
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


def _held_out_batch(calib: list, device) -> torch.Tensor | None:
    """The first calibration rows (at most HELD_OUT_ROWS and half of all, from batches of one shape)."""
    cap = min(HELD_OUT_ROWS, sum(len(b) for b in calib) // 2)
    rows: list[torch.Tensor] = []
    taken = 0
    for b in calib:
        if taken >= cap or (rows and b.shape[1:] != rows[0].shape[1:]):
            break
        rows.append(b[:cap - taken])
        taken += len(rows[-1])
    return torch.cat(rows).to(device) if taken else None


def _sliced(full: LowRankEmbedding, k: int) -> LowRankEmbedding:
    new = LowRankEmbedding(full.num_embeddings, full.embedding_dim, k, kept=full.kept, padding_idx=full.padding_idx)
    new.A.data, new.B.data = full.A.detach()[:, :k], full.B.detach()[:k]
    if full.kept:
        new.D.data, new.slots = full.D.detach(), full.slots
    return new


@torch.no_grad()
def held_out_scales(model: nn.Module, layer, calib: list, counts: torch.Tensor, padding: int | None, config,
                    elem: int) -> dict[float, list[tuple[int, float]]]:
    """An embedding's s measured on held-out calibration rows (see the module docstring): PLAIN -> the
    plain factorization's [(probe rank, s)], coverage share -> those of the candidates keeping that share's
    frequent rows. Shares whose held-out rows miss fewer than MIN_MISSED lookups are left out (the caller
    keeps the plain probes' s)."""
    device = next(model.parameters()).device
    batch = _held_out_batch(list(calib), device)
    if batch is None:
        return {}
    name, was_training = layer.site.name, model.training
    dense = model.get_submodule(name)
    model.eval()
    with counting_tokens(model, [layer]) as held:
        out = model(batch)
    real = real_tokens(model, batch)
    reference = real_rows(out.float(), real)
    norm = float(reference.norm()) or 1.0
    fit = counts.to(torch.float64) - held[name]  # the other rows' counts
    weights, scales = row_weights(fit, padding), {}
    families = {PLAIN: torch.zeros(0, dtype=torch.long), **frequent_rows(fit, padding)}
    by_size: dict[int, float] = {}  # two shares may keep the same rows: probed once
    try:
        for share, rows in families.items():
            if rows.numel() in by_size:
                if by_size[rows.numel()] in scales:
                    scales[share] = scales[by_size[rows.numel()]]
                continue
            by_size[rows.numel()] = share
            missed = held[name].clone()
            missed[rows] = 0
            if padding is not None:
                missed[padding] = 0
            probes = _probes(kept_family(layer, rows, weights, config, elem))
            if float(missed.sum()) < MIN_MISSED or not probes:
                continue
            full = LowRankEmbedding.from_embedding(dense, probes[-1].rank, weights, rows if rows.numel() else None)
            points = []
            for probe in probes:
                model.set_submodule(name, _sliced(full, probe.rank))
                error = real_rows(model(batch).float(), real) - reference
                points.append((probe.rank, float(error.norm()) / norm / probe.error))
            scales[share] = points
    finally:
        model.set_submodule(name, dense)
        model.train(was_training)
    return scales
