"""The candidates of `lowrank_`: one entry per linear site (its dense weight, bias bytes, current rank)
and its rank candidates, read off one spectrum; with the data objective, of the whitened weight."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from wasi_compress.errors import UserError
from wasi_compress.modules.subspace import SubspaceLinear, Whitening
from wasi_compress.planner import Candidate
from wasi_compress.spectrum import break_even_rank, errors_for_ranks, ranks_for_thresholds

_LINEAR_FUNCS = (F.linear, torch._C._nn.linear)
Progress = Callable[[int, int, str], None]  # (done, total, what)


@dataclass
class SiteWeights:
    site: Any                    # LinearSite
    weight: torch.Tensor         # the dense weight (L R for factored layers), detached
    bias_bytes: int
    current_rank: int | None     # rank of an already factored layer
    candidates: list[Candidate] = field(default_factory=list)
    kept: dict[str, torch.Tensor] = field(default_factory=dict)  # embeddings: candidate label -> rows kept exactly


def conv_sites(model: nn.Module, taken: set[str]) -> list:
    """Every factorable convolution (modules/lowrank_conv.py) as a site: in_features is its unfolded
    patch (I k k), out_features its output channels, role "conv"; `taken`: names already sites."""
    from wasi_compress.modules.lowrank_conv import factorable_conv
    from wasi_compress.passes.capture import LinearSite

    from wasi_compress.modules.lowrank_conv import LowRankConv2d

    factored = [name for name, m in model.named_modules() if isinstance(m, LowRankConv2d)]
    sites = []
    for name, m in model.named_modules():
        if name in taken or not factorable_conv(m) or any(name.startswith(f + ".") for f in factored):
            continue
        sites.append(LinearSite(name=name, kind="conv", role="conv", in_features=m.weight[0].numel(),
                                out_features=m.out_channels, bias=m.bias is not None, weight_name=f"{name}.weight",
                                bias_name=f"{name}.bias" if m.bias is not None else None))
    return sites


def unsupported(model: nn.Module, site) -> str | None:
    """Why a site cannot be factored, or None."""
    if site.kind == "conv":
        return None
    if site.kind == "functional":
        if site.calls > 1:
            return f"F.linear on this weight runs {site.calls} times; replacing one call would break the others"
        if site.node is None:
            return "functional linear without an fx node"
        return None
    m = model.get_submodule(site.name)
    if type(m) is nn.Linear or isinstance(m, SubspaceLinear):
        return None
    return f"{type(m).__name__} is neither nn.Linear nor SubspaceLinear"


def site_weights(model: nn.Module, site, elem: int) -> SiteWeights:
    bias_bytes = site.out_features * elem if site.bias_name else 0
    if site.kind == "conv":  # the unfolded weight (O, I k k)
        weight = model.get_submodule(site.name).weight.detach()
        return SiteWeights(site, weight.reshape(weight.shape[0], -1), bias_bytes, None)
    if site.kind == "module":
        m = model.get_submodule(site.name)
        if isinstance(m, SubspaceLinear):
            with torch.no_grad():
                weight = (m.L.float() @ m.R.float()).detach()
            return SiteWeights(site, weight, bias_bytes, int(m.rank))
        return SiteWeights(site, m.weight.detach(), bias_bytes, None)
    return SiteWeights(site, model.get_parameter(site.weight_name).detach(), bias_bytes, None)


def rank_candidates(layer: SiteWeights, spectrum: torch.Tensor, config, elem: int) -> list[Candidate]:
    """Rank candidates (thresholds + grid, rounded up to the multiple) and the dense layer (or, for an
    already factored layer, its current rank as the zero-error candidate)."""
    site = layer.site
    i, o = site.in_features, site.out_features
    full = min(i, o)
    top = layer.current_rank if layer.current_rank is not None else full
    be = break_even_rank(o, i)
    wanted = set(ranks_for_thresholds(spectrum, config.thresholds).values())
    if be >= 1 and config.rank_grid:
        g = config.rank_grid
        wanted |= {max(1, int(round(1 + (be - 1) * j / max(g - 1, 1)))) for j in range(g)}
    wanted.add(1)
    m = config.rank_multiple
    ranks = sorted({min(-(-k // m) * m, full) for k in wanted})
    if layer.current_rank is None:
        ranks = [k for k in ranks if k <= be]  # at or above break-even the dense layer costs no more
    else:
        ranks = [k for k in ranks if k < top] + [top]
    errors = errors_for_ranks(spectrum, ranks)
    out = [Candidate(k * (i + o) * elem + layer.bias_bytes, e, k, f"rank {k}") for k, e in zip(ranks, errors)]
    if layer.current_rank is None:
        out.append(Candidate(i * o * elem + layer.bias_bytes, 0.0, None, "dense"))
    else:
        out[-1] = Candidate(out[-1].cost_bytes, 0.0, top, f"keep rank {top}")
    return out


class _GramCollector(TorchFunctionMode):
    """Adds the input of every F.linear whose weight is a watched tensor to that layer's Whitening (this
    sees nn.Linear modules, functional linears and the R factor of subspace layers alike), and the
    im2col patches of every watched convolution's input to its own."""

    def __init__(self, watched: dict[int, Whitening], convs: dict[int, tuple[Whitening, nn.Conv2d]] | None = None):
        super().__init__()
        self.watched = watched
        self.convs = convs or {}
        self.real: torch.Tensor | None = None  # (batch, seq) positions to count, see real_tokens

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _LINEAR_FUNCS:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            wh = self.watched.get(id(weight))
            if wh is not None:
                wh.update(real_rows(args[0] if args else kwargs["input"], self.real))
        elif func is F.conv2d and self.convs:
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            watched = self.convs.get(id(weight))
            if watched is not None:
                from wasi_compress.modules.lowrank_conv import conv_patches

                with torch._C.DisableTorchFunction():
                    watched[0].update(conv_patches(watched[1], args[0] if args else kwargs["input"]))
        return func(*args, **kwargs)


def real_tokens(model: nn.Module, batch: torch.Tensor) -> torch.Tensor | None:
    """The (batch, seq) mask of the real tokens of a text model whose padding its attention mask hides
    (hf.py derives the mask from ``pad_token_id``); None for any other model. Padding positions never
    reach a real token's output, so their rows would only dilute the calibration statistics and the
    model-scale probes (on the MiniLM benchmark they are 55% of the positions)."""
    tokens = getattr(model, "token_input", None)
    pad = getattr(tokens, "pad_token_id", None)
    if pad is None or batch.dim() != 2 or batch.is_floating_point():
        return None
    real = batch != pad
    return None if bool(real.all()) or not bool(real.any()) else real


def real_rows(x: torch.Tensor, real: torch.Tensor | None) -> torch.Tensor:
    """The rows of x (batch, seq, features) at real positions; x itself when it has no such positions."""
    return x if real is None or x.dim() != 3 or x.shape[:2] != real.shape else x[real]


def whitenings_from(model: nn.Module, layers: list[SiteWeights], batches: Iterable[torch.Tensor],
                    device: torch.device, progress: Progress) -> dict[str, Whitening]:
    """Second moments of every layer's inputs over the calibration batches (no_grad forward passes)."""
    whitenings = {layer.site.name: Whitening(layer.site.in_features) for layer in layers}
    watched, convs = {}, {}
    for layer in layers:
        if layer.site.kind == "conv":
            m = model.get_submodule(layer.site.name)
            convs[id(m.weight)] = (whitenings[layer.site.name], m)
            continue
        if layer.site.kind == "module":
            m = model.get_submodule(layer.site.name)
            tensor = m.R if isinstance(m, SubspaceLinear) else m.weight
        else:
            tensor = model.get_parameter(layer.site.weight_name)
        watched[id(tensor)] = whitenings[layer.site.name]
    batches = list(batches)
    with torch.no_grad(), _GramCollector(watched, convs) as collector:
        for b, batch in enumerate(batches):
            progress(b, len(batches), f"calibrating ({len(batches)} batches)")
            collector.real = real_tokens(model, batch.to(device))
            model(batch.to(device))
    progress(len(batches), len(batches), "calibrated")
    for layer in layers:
        if whitenings[layer.site.name].rows == 0:
            raise UserError(f"{layer.site.name}: saw no calibration input (is it called by forward?)")
    return whitenings
