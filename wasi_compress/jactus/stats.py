"""Calibration statistics of JACTUS: per linear layer the input second moment C_x = X^T X (in x in), the
pre-activation gradient second moment C_g = G^T G (out x out), G = dLoss/dY, and the weight gradient
G^T X summed over the calibration batches (what the core must be able to follow; bases.py).

Rows are tokens (every leading dimension is flattened). Sums are kept in float64 with the sum of the
rows' fourth powers ||r||^4, which is what the Ledoit-Wolf shrinkage intensity needs."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["SecondMoment", "collect_statistics", "shrunk"]


class SecondMoment:
    """Running S = sum_r r r^T over rows r of width `features` (float64), with the row count and sum ||r||^4."""

    def __init__(self, features: int):
        self.features = int(features)
        self.gram = torch.zeros(self.features, self.features, dtype=torch.float64)
        self.rows = 0
        self.fourth = 0.0

    @torch.no_grad()
    def update(self, t: Tensor) -> None:
        rows = t.detach().reshape(-1, self.features).to(device="cpu", dtype=torch.float64)
        self.gram.addmm_(rows.t(), rows)
        self.rows += rows.shape[0]
        self.fourth += float((rows.square().sum(1) ** 2).sum())


def shrunk(moment: SecondMoment) -> tuple[Tensor, float]:
    """The Ledoit-Wolf (2004) estimate of the per-row second moment, (1 - rho) S + rho mu I, and rho.

    S = gram / n (n rows), mu = tr(S) / p. The intensity rho = min(1, b^2 / d^2) with d^2 = ||S - mu I||_F^2
    and b^2 = (1/n^2) sum_r ||r r^T - S||_F^2 = (sum_r ||r||^4 - n ||S||_F^2) / n^2 (not centred: these are
    second moments about zero, as C_x and C_g are). rho is near 0 when the rows are many beside the width,
    and grows where S is a noisy estimate (few rows, heavy tails)."""
    n, p = moment.rows, moment.features
    if n == 0:
        raise ValueError("no calibration rows were recorded")
    s = moment.gram / n
    mu = float(s.diagonal().sum()) / p
    eye = torch.eye(p, dtype=torch.float64)
    d2 = float((s - mu * eye).square().sum())
    b2 = max(0.0, (moment.fourth - n * float(s.square().sum())) / n**2)
    rho = 1.0 if d2 <= 0.0 else min(1.0, b2 / d2)
    return (1.0 - rho) * s + (rho * mu) * eye, rho


def collect_statistics(model: nn.Module, modules: dict[str, nn.Module], batches: Iterable[tuple[Tensor, Tensor]],
                       loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
                       ) -> dict[str, tuple[SecondMoment, SecondMoment, Tensor]]:
    """(C_x, C_g, weight gradient G^T X) per named linear module over `batches` of (inputs, labels): a forward hook records
    each module's input and hooks its output for dLoss/dY; one backward per batch. The model runs in
    eval mode (no dropout) and is left as it was; parameter gradients are cleared afterwards."""
    loss_fn = loss_fn or F.cross_entropy
    stats = {name: (SecondMoment(m.in_features), SecondMoment(m.out_features),
                    torch.zeros(m.out_features, m.in_features, dtype=torch.float64)) for name, m in modules.items()}
    handles = []
    for name, m in modules.items():
        def hook(_m, args, out, name=name):
            x = args[0].detach()
            stats[name][0].update(x)
            if out.requires_grad:
                out.register_hook(lambda g, name=name, x=x: _on_grad(stats[name], g, x))

        handles.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            for x, y in batches:
                model.zero_grad(set_to_none=True)
                loss = loss_fn(model(x), y)
                loss.backward()
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return stats


@torch.no_grad()
def _on_grad(entry, g: Tensor, x: Tensor) -> None:
    entry[1].update(g)
    rows_g = g.reshape(-1, g.shape[-1]).to(device="cpu", dtype=torch.float64)
    rows_x = x.reshape(-1, x.shape[-1]).to(device="cpu", dtype=torch.float64)
    entry[2].addmm_(rows_g.t(), rows_x)
