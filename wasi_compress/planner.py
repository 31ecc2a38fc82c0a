"""Rank planning under a byte budget (METHOD.md section 3).

Every layer offers candidates (a rank, or "keep dense") with a cost in bytes and an error that the
caller has already put on a common scale; the planner picks one candidate per layer so that the summed
error is smallest while the summed real cost stays within the budget. This is a multiple-choice knapsack.

``plan_dp`` solves it exactly on a byte grid. Every layer's cheapest candidate is paid for up front, so
the grid only has to span the budget *above* the smallest feasible one; that keeps the resolution fine,
and the all-cheapest plan is always on the grid, so a budget that is feasible in bytes is never lost to
rounding. Costs are rounded up to the grid, so a plan that fits on the grid fits in real bytes; what
the rounding can cost is stated on the plan (``resolution_bytes``, ``max_slack_bytes``).
``plan_greedy`` is the marginal-error-per-byte baseline (as in JACTUS) and ``plan_brute_force`` is the
reference for tests. Everything here is pure and deterministic; no torch.
"""

from __future__ import annotations

import heapq
import itertools
import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from wasi_compress.errors import InfeasibleBudgetError
from wasi_compress.units import format_bytes

# Capacity cells of the DP grid: 200 layers x 32 candidates plan in well under a second on one core
# (benchmarks/bench_planner.py), and the choice tables take at most n_layers x 64 KiB.
DEFAULT_MAX_GRID = 1 << 16

# Brute force enumerates every combination; beyond this it is the wrong tool.
_BRUTE_FORCE_LIMIT = 1 << 20

ALLOCATORS = ("dp", "greedy", "brute")


@dataclass(frozen=True)
class Candidate:
    """One way to store a layer: ``cost_bytes`` real bytes for ``error`` (normalised by the caller, so
    that errors of different layers can be added). ``rank`` None means the layer stays dense."""

    cost_bytes: int
    error: float
    rank: int | None = None
    label: str = ""

    def __post_init__(self):
        what = f"candidate {self.label!r}"
        cost = _whole(self.cost_bytes, f"{what}: cost_bytes")
        if cost < 0:
            raise ValueError(f"{what}: cost_bytes must be >= 0, got {cost}")
        try:
            error = float(self.error)
        except (TypeError, ValueError):
            raise ValueError(f"{what}: error must be a number, got {self.error!r}") from None
        if not math.isfinite(error) or error < 0:
            raise ValueError(f"{what}: error must be finite and >= 0, got {self.error!r}")
        rank = None if self.rank is None else _whole(self.rank, f"{what}: rank")
        if rank is not None and rank < 0:
            raise ValueError(f"{what}: rank must be None or >= 0, got {rank}")
        # Plain Python numbers, so that plans compare, hash and serialise alike whatever the caller passed.
        object.__setattr__(self, "cost_bytes", cost)
        object.__setattr__(self, "error", error)
        object.__setattr__(self, "rank", rank)


@dataclass(frozen=True)
class LayerCandidates:
    """The candidates of one layer; the planner picks exactly one of them."""

    name: str
    candidates: tuple[Candidate, ...]

    def __post_init__(self):
        candidates = tuple(self.candidates)
        if not candidates:
            raise ValueError(f"layer {self.name!r}: needs at least one candidate, got none")
        for c in candidates:
            if not isinstance(c, Candidate):
                raise ValueError(f"layer {self.name!r}: candidates must be Candidate objects, got {type(c).__name__}")
        object.__setattr__(self, "candidates", candidates)


@dataclass(frozen=True)
class Plan:
    """The chosen candidate of every layer and what it costs.

    ``resolution_bytes`` is the DP grid step (1 for greedy and brute force). ``max_slack_bytes`` bounds
    what the grid can lose: with k = number of layers with more than one useful candidate (not
    dominated, and affordable within the budget),

        max_slack_bytes = k * (resolution_bytes - 1),

    and the plan's total error is at most the optimum at ``budget_bytes - max_slack_bytes``, because
    rounding each of those k costs up to the grid adds at most ``resolution_bytes - 1`` bytes. It is 0
    when the grid is exact.
    """

    allocator: str
    choices: tuple[int, ...]
    total_cost_bytes: int
    total_error: float
    budget_bytes: int
    resolution_bytes: int
    max_slack_bytes: int

    def chosen(self, layers: Sequence[LayerCandidates]) -> list[tuple[str, Candidate]]:
        """(layer name, chosen candidate) per layer, for the ``layers`` this plan was made from."""
        if len(layers) != len(self.choices):
            raise ValueError(f"plan has {len(self.choices)} layers but {len(layers)} were given")
        return [(layer.name, layer.candidates[j]) for layer, j in zip(layers, self.choices)]

    def to_dict(self) -> dict:
        return {
            "allocator": self.allocator,
            "budget_bytes": self.budget_bytes,
            "total_cost_bytes": self.total_cost_bytes,
            "total_error": self.total_error,
            "resolution_bytes": self.resolution_bytes,
            "max_slack_bytes": self.max_slack_bytes,
            "choices": list(self.choices),
        }


def smallest_feasible_budget(layers: Sequence[LayerCandidates]) -> int:
    """The smallest budget any plan fits in: every layer at its cheapest candidate."""
    return sum(min(c.cost_bytes for c in layer.candidates) for layer in _check_layers(layers))


def plan(layers: Sequence[LayerCandidates], budget_bytes: int, allocator: str = "dp") -> Plan:
    """Plan with the named allocator: ``dp`` (exact on a grid), ``greedy`` (baseline) or ``brute``."""
    if allocator == "dp":
        return plan_dp(layers, budget_bytes)
    if allocator == "greedy":
        return plan_greedy(layers, budget_bytes)
    if allocator == "brute":
        return plan_brute_force(layers, budget_bytes)
    raise ValueError(f"unknown allocator {allocator!r}; use one of {', '.join(ALLOCATORS)}")


def plan_dp(layers: Sequence[LayerCandidates], budget_bytes: int, *, max_grid: int = DEFAULT_MAX_GRID) -> Plan:
    """Multiple-choice knapsack by dynamic programming over a byte grid, exact when the grid is.

    With m_i the cheapest cost of layer i, the grid spans the extra budget E = budget - sum_i m_i at
    resolution res = E // max_grid + 1, the smallest step that keeps at most ``max_grid`` capacity
    cells. A candidate's extra cost c - m_i takes ceil((c - m_i) / res) cells and the capacity is
    floor(E / res) cells: rounding up means a plan on the grid fits in bytes. At res = 1 the plan is
    optimal. At res > 1 it is optimal on the grid, so its error is at most the optimum at
    ``budget - max_slack_bytes`` (see Plan); the bytes the rounding left unused are then spent by
    single-layer swaps, and since the greedy works in real bytes, its plan (milliseconds to find) is
    polished the same way and the better of the two is kept, so ``dp`` is never worse than ``greedy``.
    Time O(n_layers * n_candidates * min(E, max_grid)).
    """
    if max_grid < 1:
        raise ValueError(f"max_grid must be >= 1, got {max_grid}")
    layers, budget = _check_layers(layers), _check_budget(budget_bytes)
    extra = _extra_budget(layers, budget)
    fronts = [_pareto_front(layer, extra) for layer in layers]

    # If every layer can take its most accurate candidate, the budget does not bind.
    if sum(f[-1][0] for f in fronts) <= extra:
        return _make_plan("dp", layers, [f[-1][2] for f in fronts], budget, 1, 0)

    res = extra // max_grid + 1
    choices = _grid_optimum(fronts, extra // res, res)
    if res > 1:
        contenders = [choices, plan_greedy(layers, budget).choices]
        choices = min(
            (_spend_leftover(layers, c, budget) for c in contenders),
            key=lambda c: (_total_error(layers, c), _total_cost(layers, c), c),
        )
    with_choice = sum(1 for f in fronts if len(f) > 1)
    return _make_plan("dp", layers, choices, budget, res, with_choice * (res - 1))


def _grid_optimum(fronts: list[list[tuple[int, float, int]]], cap: int, res: int) -> list[int]:
    """Candidate indices of the least-error plan within ``cap`` cells of ``res`` bytes.

    dp[c] is the least error of the layers so far within c cells; it is non-increasing in c. Layer i
    only needs dp on [cap - (cells later layers can still take), cells earlier layers can take at
    most]: above that window dp is flat and below it no complete plan ends, so only the window is
    computed. A tie in error keeps the option with fewer cells.
    """
    # Per layer: (cells, error, index), keeping only the most accurate of equal cell counts.
    grids = []
    for front in fronts:
        cells: dict[int, tuple[float, int]] = {}
        for cost, err, idx in front:
            u = -(-cost // res)
            if u <= cap:
                cells[u] = (err, idx)  # the front has increasing cost and decreasing error
        grids.append(sorted((u, err, idx) for u, (err, idx) in cells.items()))
    # Beyond the sum of every layer's largest option the budget cannot bind.
    cap = min(cap, sum(g[-1][0] for g in grids))
    later = list(itertools.accumulate(g[-1][0] for g in reversed(grids)))[::-1][1:] + [0]

    prev, cur = np.zeros(cap + 1), np.empty(cap + 1)
    cand = np.empty(cap + 1)
    better = np.empty(cap + 1, dtype=bool)
    hi = 0  # prev holds the previous layer's window, ending at hi; dp is flat above it
    windows: list[tuple[int, int, np.ndarray | None]] = []  # per layer: lo, hi, winning option on [lo, hi]
    for grid, rest in zip(grids, later):
        lo, new_hi = max(0, cap - rest), min(cap, hi + grid[-1][0])
        prev[hi + 1 : new_hi + 1] = prev[hi]
        np.add(prev[lo : new_hi + 1], grid[0][1], out=cur[lo : new_hi + 1])  # the cheapest option: 0 cells
        table = None
        if len(grid) > 1:
            table = np.zeros(new_hi + 1 - lo, dtype=np.min_scalar_type(len(grid) - 1))
            for j in range(1, len(grid)):
                u, err = grid[j][0], grid[j][1]
                start = max(lo, u)
                n = new_hi + 1 - start
                np.add(prev[start - u : start - u + n], err, out=cand[:n])
                # strict: on a tie the cheaper option stays
                np.less(cand[:n], cur[start : new_hi + 1], out=better[:n])
                np.copyto(cur[start : new_hi + 1], cand[:n], where=better[:n])
                np.copyto(table[start - lo :], j, where=better[:n])
        windows.append((lo, new_hi, table))
        prev, cur, hi = cur, prev, new_hi

    c, choices = cap, []
    for grid, (lo, top, table) in zip(reversed(grids), reversed(windows)):
        u, _, idx = grid[0 if table is None else int(table[min(c, top) - lo])]
        choices.append(idx)
        c -= u
    return choices[::-1]


def plan_greedy(layers: Sequence[LayerCandidates], budget_bytes: int) -> Plan:
    """Marginal error drop per byte, the JACTUS-style baseline.

    Every layer starts at its cheapest candidate. Upgrades run along the lower convex hull of each
    layer's (cost, error) points, where the drop per byte only shrinks, so one heap entry per layer
    suffices: repeatedly take the upgrade with the largest drop per extra byte (ties: lower layer
    index); if it does not fit, that layer is finished, since its later upgrades cost more. Not optimal:
    it never leaves the hull and stops a layer at the first upgrade that does not fit.
    """
    layers, budget = _check_layers(layers), _check_budget(budget_bytes)
    left = _extra_budget(layers, budget)
    hulls = [_lower_hull(_pareto_front(layer, left)) for layer in layers]
    pos = [0] * len(hulls)
    heap = [(-_drop_per_byte(h, 0), i) for i, h in enumerate(hulls) if len(h) > 1]
    heapq.heapify(heap)
    while heap:
        _, i = heapq.heappop(heap)
        h, k = hulls[i], pos[i]
        step = h[k + 1][0] - h[k][0]
        if step > left:
            continue
        left -= step
        pos[i] = k + 1
        if k + 2 < len(h):
            heapq.heappush(heap, (-_drop_per_byte(h, k + 1), i))
    return _make_plan("greedy", layers, [h[k][2] for h, k in zip(hulls, pos)], budget, 1, 0)


def plan_brute_force(layers: Sequence[LayerCandidates], budget_bytes: int) -> Plan:
    """Try every combination; the reference for tests. Ties: lower cost, then the first combination
    in lexicographic order of candidate indices."""
    layers, budget = _check_layers(layers), _check_budget(budget_bytes)
    n_combinations = math.prod(len(layer.candidates) for layer in layers)
    if n_combinations > _BRUTE_FORCE_LIMIT:
        raise ValueError(f"brute force would try {n_combinations} combinations (limit {_BRUTE_FORCE_LIMIT}); use dp")
    best = None
    for choices in itertools.product(*(range(len(layer.candidates)) for layer in layers)):
        picked = [layer.candidates[j] for layer, j in zip(layers, choices)]
        cost = sum(c.cost_bytes for c in picked)
        if cost > budget:
            continue
        key = (sum(c.error for c in picked), cost)
        if best is None or key < best[0]:
            best = (key, choices)
    if best is None:
        _extra_budget(layers, budget)  # raises InfeasibleBudgetError naming the smallest budget
        raise AssertionError("a feasible budget must have a plan")
    return _make_plan("brute", layers, best[1], budget, 1, 0)


def pareto_front(
    layers: Sequence[LayerCandidates], budgets: Sequence[int], allocator: str = "dp"
) -> list[tuple[int, float]]:
    """(budget, best total error) for each feasible budget, in increasing budget order.

    A plan that fits a budget fits every larger one, so each error is the best the allocator found at
    this budget or any smaller one in the sweep; that keeps the curve non-increasing even where the
    allocator alone is not (the greedy, or a DP whose grid coarsens as the budget grows).
    """
    layers = _check_layers(layers)
    floor = smallest_feasible_budget(layers)
    front: list[tuple[int, float]] = []
    best = math.inf
    for budget in sorted({_check_budget(b) for b in budgets}):
        if budget < floor:
            continue
        best = min(best, plan(layers, budget, allocator).total_error)
        front.append((budget, best))
    return front


def _check_layers(layers) -> list[LayerCandidates]:
    layers = list(layers)
    for layer in layers:
        if not isinstance(layer, LayerCandidates):
            raise ValueError(f"layers must be LayerCandidates objects, got {type(layer).__name__}")
    return layers


def _check_budget(budget_bytes) -> int:
    return _whole(budget_bytes, "budget")


def _whole(value, what: str) -> int:
    """``value`` as a Python int (numpy integers included); ValueError for bools, floats and the rest."""
    if isinstance(value, bool):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    try:
        return int(operator.index(value))
    except TypeError:
        raise ValueError(f"{what} must be an integer, got {value!r}") from None


def _extra_budget(layers, budget) -> int:
    """Bytes of budget above the smallest feasible one; InfeasibleBudgetError when there are none."""
    floor = smallest_feasible_budget(layers)
    if floor > budget:
        raise InfeasibleBudgetError(
            f"budget {budget} bytes is infeasible: the smallest feasible budget is {floor} bytes "
            f"({format_bytes(floor)})",
            floor,
        )
    return budget - floor


def _pareto_front(layer: LayerCandidates, limit: int) -> list[tuple[int, float, int]]:
    """(extra cost over the cheapest, error, index) of the candidates no other beats on both cost and
    error, within ``limit`` extra bytes; increasing cost, strictly decreasing error. Among equal
    candidates the lower index wins."""
    base = min(c.cost_bytes for c in layer.candidates)
    front: list[tuple[int, float, int]] = []
    for idx, c in sorted(enumerate(layer.candidates), key=lambda ic: (ic[1].cost_bytes, ic[1].error, ic[0])):
        extra = c.cost_bytes - base
        if extra > limit:
            break
        if not front or c.error < front[-1][1]:
            front.append((extra, c.error, idx))
    return front


def _lower_hull(front: list[tuple[int, float, int]]) -> list[tuple[int, float, int]]:
    """The convex part of a Pareto front: the drop in error per extra byte never grows along it.
    Collinear points stay, as smaller steps for the greedy."""
    hull: list[tuple[int, float, int]] = []
    for p in front:
        while len(hull) >= 2:
            (ca, ea, _), (cb, eb, _) = hull[-2], hull[-1]
            # drop rate a->b below rate b->p means b lies above the chord a->p
            if (ea - eb) * (p[0] - cb) < (eb - p[1]) * (cb - ca):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def _drop_per_byte(hull: list[tuple[int, float, int]], k: int) -> float:
    return (hull[k][1] - hull[k + 1][1]) / (hull[k + 1][0] - hull[k][0])


def _spend_leftover(layers, choices, budget) -> list[int]:
    """Spend the bytes a plan leaves unused (the grid's rounding, the greedy's stopping rule) by
    single-layer swaps, each time the one with the largest error drop that fits (ties: less cost,
    then lower layer and index), until none lowers the error."""
    choices = list(choices)
    left = budget - _total_cost(layers, choices)
    while True:
        best = None
        for i, (layer, j) in enumerate(zip(layers, choices)):
            now = layer.candidates[j]
            for k, c in enumerate(layer.candidates):
                step = c.cost_bytes - now.cost_bytes
                if c.error < now.error and step <= left:
                    key = (c.error - now.error, step, i, k)
                    if best is None or key < best:
                        best = key
        if best is None:
            return choices
        _, step, i, k = best
        choices[i] = k
        left -= step


def _total_error(layers, choices) -> float:
    return sum(layer.candidates[j].error for layer, j in zip(layers, choices))


def _total_cost(layers, choices) -> int:
    return sum(layer.candidates[j].cost_bytes for layer, j in zip(layers, choices))


def _make_plan(allocator, layers, choices, budget, resolution, max_slack) -> Plan:
    cost = _total_cost(layers, choices)
    if cost > budget:
        raise AssertionError(f"{allocator} plan costs {cost} bytes, over the budget of {budget}")
    return Plan(
        allocator=allocator,
        choices=tuple(int(j) for j in choices),
        total_cost_bytes=cost,
        total_error=_total_error(layers, choices),
        budget_bytes=budget,
        resolution_bytes=resolution,
        max_slack_bytes=max_slack,
    )
