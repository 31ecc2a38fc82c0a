"""Global rank allocation of JACTUS under a parameter budget: a pure function of the candidates.

Every layer offers candidates (index 0 the cheapest) with a parameter cost and a gain (captured energy
in [0, 1], see bases.py; layers' gains add on one scale). `allocate_greedy` is the budgeted
maximum-coverage greedy the paper names: every layer starts at its cheapest candidate; then, repeatedly,
among all upgrades (layer i from its current candidate to any costlier one) that fit in what is left,
take the one with the largest gain added per parameter added (ties: the larger gain, then the lower
layer, then the lower candidate), until none fits or none adds gain. `allocate_dp` solves the same
instance exactly with the toolkit's multiple-choice knapsack (wasi_compress.planner.plan_dp, minimising
the summed lost energy 1 - gain), the cross-check every JACTUS plan reports beside the greedy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from wasi_compress.errors import InfeasibleBudgetError

__all__ = ["Allocation", "allocate_dp", "allocate_greedy", "check_candidates"]


@dataclass(frozen=True)
class Allocation:
    allocator: str
    choices: tuple[int, ...]
    total_params: int
    total_gain: float
    budget_params: int

    def to_dict(self) -> dict:
        return {"allocator": self.allocator, "choices": list(self.choices), "total_params": self.total_params,
                "total_gain": self.total_gain, "budget_params": self.budget_params}


def check_candidates(costs: Sequence[Sequence[int]], gains: Sequence[Sequence[float]], budget: int) -> None:
    """Same shapes, at least one candidate a layer, finite gains; the budget covers every cheapest candidate."""
    if len(costs) != len(gains):
        raise ValueError(f"{len(costs)} layers of costs but {len(gains)} of gains")
    for i, (c, g) in enumerate(zip(costs, gains)):
        if not c or len(c) != len(g):
            raise ValueError(f"layer {i}: needs as many gains as costs, at least one, got {len(c)} and {len(g)}")
        if any(int(x) < 0 for x in c) or any(not float(x) == float(x) for x in g):
            raise ValueError(f"layer {i}: costs must be >= 0 and gains numbers")
    floor = sum(min(int(x) for x in c) for c in costs)
    if budget < floor:
        raise InfeasibleBudgetError(f"the budget of {budget} parameters is below the smallest feasible one, {floor} "
                                    "(every layer at its smallest candidate)", floor)


def allocate_greedy(costs: Sequence[Sequence[int]], gains: Sequence[Sequence[float]], budget: int) -> Allocation:
    """The budgeted maximum-coverage greedy (see the module docstring)."""
    check_candidates(costs, gains, budget)
    current = [min(range(len(c)), key=lambda j, c=c: (int(c[j]), -float(gains[i][j]), j)) for i, c in enumerate(costs)]
    left = budget - sum(int(costs[i][j]) for i, j in enumerate(current))
    while True:
        best = None
        for i, (c, g) in enumerate(zip(costs, gains)):
            c0, g0 = int(c[current[i]]), float(g[current[i]])
            for j in range(len(c)):
                extra, added = int(c[j]) - c0, float(g[j]) - g0
                if added <= 0.0 or extra > left:
                    continue
                ratio = float("inf") if extra <= 0 else added / extra
                key = (-ratio, -added, i, j)
                if best is None or key < best:
                    best = key
        if best is None:
            break
        _, _, i, j = best
        left -= int(costs[i][j]) - int(costs[i][current[i]])
        current[i] = j
    return _allocation("greedy", costs, gains, current, budget)


def allocate_dp(costs: Sequence[Sequence[int]], gains: Sequence[Sequence[float]], budget: int) -> Allocation:
    """The exact multiple-choice knapsack on the same instance (planner.plan_dp; cost unit: one parameter)."""
    from wasi_compress.planner import Candidate, LayerCandidates, plan_dp

    check_candidates(costs, gains, budget)
    top = max(max(float(x) for x in g) for g in gains)
    layers = [LayerCandidates(str(i), tuple(Candidate(cost_bytes=int(c[j]), error=max(0.0, top - float(g[j])), rank=j)
                                            for j in range(len(c)))) for i, (c, g) in enumerate(zip(costs, gains))]
    return _allocation("dp", costs, gains, list(plan_dp(layers, budget).choices), budget)


def _allocation(name, costs, gains, choices, budget) -> Allocation:
    total = sum(int(costs[i][j]) for i, j in enumerate(choices))
    if total > budget:
        raise AssertionError(f"{name} allocation costs {total} parameters, over the budget of {budget}")
    return Allocation(name, tuple(int(j) for j in choices), total,
                      float(sum(float(gains[i][j]) for i, j in enumerate(choices))), int(budget))
