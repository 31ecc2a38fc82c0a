"""Time the rank planner on a model-sized instance and compare the DP with the greedy baseline.

200 linear layers with 32 candidates each (31 ranks below break-even, plus keep-dense), dense sizes
10 KB to 10 MB in fp32, budget 40% of the dense total. A candidate's error is the relative Frobenius
error of a rank-k truncation of a synthetic power-law spectrum, the normalised scale the planner expects.
Such error curves are nearly convex in bytes, where the greedy is close to optimal; a second instance
multiplies every error by noise in [0.5, 1.5] (as errors measured on a calibration batch are), which
makes the curves non-convex. The LP relaxation (fractional greedy over the convex hulls) is a lower
bound on the optimum, so it shows how far from optimal each plan can be.
Target: plan_dp under 1 s on both; exits 1 if it is missed.

    .venv/bin/python benchmarks/bench_planner.py
"""

from __future__ import annotations

import platform
import statistics
import sys
import time

import numpy as np

from wasi_compress.planner import (
    DEFAULT_MAX_GRID,
    Candidate,
    LayerCandidates,
    _extra_budget,
    _grid_optimum,
    _lower_hull,
    _pareto_front,
    _spend_leftover,
    _total_error,
    plan_dp,
    plan_greedy,
)
from wasi_compress.units import format_bytes

SEED = 0
N_LAYERS = 200
N_RANKS = 31  # plus keep-dense: 32 candidates
BUDGET_FRACTION = 0.4
REPEATS = 5
TARGET_S = 1.0


def make_instance(noise: bool) -> list[LayerCandidates]:
    rng, noise_rng = np.random.default_rng(SEED), np.random.default_rng(SEED + 1)  # same shapes either way
    layers = []
    while len(layers) < N_LAYERS:
        o, i = (int(x) for x in rng.integers(50, 1600, size=2))
        dense = 4 * o * i
        if not 10_000 <= dense <= 10_000_000:
            continue
        energy = np.arange(1, min(o, i) + 1) ** (-2 * rng.uniform(0.3, 1.5))  # s_k^2 of a power law
        tail = np.concatenate([np.cumsum(energy[::-1])[::-1], [0.0]]) / energy.sum()  # tail[k] = share past rank k
        break_even = (o * i - 1) // (o + i)  # largest k with k (O + I) < O I
        ranks = np.unique(np.linspace(1, break_even, N_RANKS).astype(int))
        errors = np.sqrt(tail[ranks]) * (noise_rng.uniform(0.5, 1.5, ranks.size) if noise else 1.0)
        candidates = [
            Candidate(4 * int(k) * (o + i), float(e), rank=int(k), label=f"rank={k}") for k, e in zip(ranks, errors)
        ]
        candidates.append(Candidate(dense, 0.0, rank=None, label="dense"))
        layers.append(LayerCandidates(f"layer{len(layers)}.{o}x{i}", tuple(candidates)))
    return layers


def lp_lower_bound(layers: list[LayerCandidates], budget: int) -> float:
    """Least error of the LP relaxation: take hull upgrades by drop per byte, the last one fractionally."""
    floor = sum(min(c.cost_bytes for c in layer.candidates) for layer in layers)
    left = budget - floor
    hulls = [_lower_hull(_pareto_front(layer, left)) for layer in layers]
    error = sum(h[0][1] for h in hulls)
    steps = sorted(
        ((h[k][1] - h[k + 1][1]) / (h[k + 1][0] - h[k][0]), h[k + 1][0] - h[k][0], h[k][1] - h[k + 1][1])
        for h in hulls
        for k in range(len(h) - 1)
    )[::-1]
    for _, size, drop in steps:
        if size > left:
            return error - drop * left / size
        error, left = error - drop, left - size
    return error


def median_time(fn, *args):
    times, result = [], None
    for _ in range(REPEATS):
        start = time.perf_counter()
        result = fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def run(noise: bool) -> float:
    layers = make_instance(noise)
    dense_total = sum(layer.candidates[-1].cost_bytes for layer in layers)
    budget = int(BUDGET_FRACTION * dense_total)
    n_candidates = sum(len(layer.candidates) for layer in layers)
    print(f"instance ({'noisy, non-convex' if noise else 'smooth'} errors): {len(layers)} layers, "
          f"{n_candidates} candidates, seed {SEED}")
    print(f"  dense total {format_bytes(dense_total)}, budget {format_bytes(budget)} ({budget} bytes)")

    t_dp, dp = median_time(plan_dp, layers, budget)
    t_greedy, greedy = median_time(plan_greedy, layers, budget)
    for name, t, p in (("dp", t_dp, dp), ("greedy", t_greedy, greedy)):
        print(
            f"  {name:6s} median {t * 1000:7.1f} ms over {REPEATS} runs  total error {p.total_error:.6f}  "
            f"cost {p.total_cost_bytes} B  resolution {p.resolution_bytes} B  "
            f"max slack {p.max_slack_bytes} B ({format_bytes(p.max_slack_bytes)})"
        )
    # What plan_dp chose from: its grid optimum and the greedy plan, each with the unused bytes spent.
    extra = _extra_budget(layers, budget)
    res = extra // DEFAULT_MAX_GRID + 1
    grid = _grid_optimum([_pareto_front(layer, extra) for layer in layers], extra // res, res)
    polished = _spend_leftover(layers, grid, budget)
    greedy_polished = _spend_leftover(layers, greedy.choices, budget)
    print(
        f"  inside dp: grid optimum {_total_error(layers, grid):.6f}, with unused bytes spent "
        f"{_total_error(layers, polished):.6f}; greedy with unused bytes spent {_total_error(layers, greedy_polished):.6f}"
    )
    print(f"  LP lower bound on the optimum: {lp_lower_bound(layers, budget):.6f}")
    print(f"  greedy_error / dp_error = {greedy.total_error / dp.total_error:.6f}")
    return t_dp


def main() -> int:
    print(f"python {platform.python_version()}, numpy {np.__version__}, {platform.machine()}")
    worst = max(run(noise=False), run(noise=True))
    ok = worst < TARGET_S
    print(f"{'PASS' if ok else 'FAIL'}: slowest dp median {worst:.3f} s, target < {TARGET_S:.1f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
