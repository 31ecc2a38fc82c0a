"""The rank planner: exact against brute force, never worse than the greedy, always within budget."""

import itertools
import json
import math
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wasi_compress.errors import InfeasibleBudgetError, UserError
from wasi_compress.planner import (
    Candidate,
    LayerCandidates,
    Plan,
    pareto_front,
    plan,
    plan_brute_force,
    plan_dp,
    plan_greedy,
    smallest_feasible_budget,
)
from wasi_compress.planner import _grid_optimum, _pareto_front

# Whole-number errors make ties common, which is where determinism and tie-breaking are tested.
errors = st.one_of(st.integers(0, 5).map(float), st.floats(0, 100, allow_nan=False, allow_infinity=False))


def instances(max_cost):
    candidate = st.builds(Candidate, cost_bytes=st.integers(0, max_cost), error=errors)
    layer = st.lists(candidate, min_size=1, max_size=5)
    return st.lists(layer, min_size=1, max_size=5).map(
        lambda ls: [LayerCandidates(f"layer{i}", tuple(cs)) for i, cs in enumerate(ls)]
    )


def _infeasible(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except InfeasibleBudgetError:
        return True
    return False


def _check_plan(p: Plan, layers, budget):
    chosen = p.chosen(layers)
    assert p.total_cost_bytes == sum(c.cost_bytes for _, c in chosen) <= budget
    assert p.total_error == pytest.approx(sum(c.error for _, c in chosen), abs=1e-12)
    assert p.budget_bytes == budget


def _quick_and_thorough(**strategies):
    """The property as two tests: a quick one (25 examples, in `make test-fast`) and a thorough one
    (200 examples, marked slow, in `make test`)."""
    def make(body):
        common = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
        quick = settings(max_examples=25, **common)(given(**strategies)(body))
        thorough = pytest.mark.slow(settings(max_examples=200, **common)(given(**strategies)(body)))
        return quick, thorough

    return make


def _dp_matches_brute_force_and_is_never_worse_than_greedy(layers, budget):
    floor = smallest_feasible_budget(layers)
    infeasible = _infeasible(plan_brute_force, layers, budget)
    assert infeasible == (floor > budget)
    assert _infeasible(plan_dp, layers, budget) == infeasible
    assert _infeasible(plan_greedy, layers, budget) == infeasible
    if infeasible:
        return
    brute, dp, greedy = (plan(layers, budget, a) for a in ("brute", "dp", "greedy"))
    for p in (brute, dp, greedy):
        _check_plan(p, layers, budget)
    assert dp.resolution_bytes == 1 and dp.max_slack_bytes == 0
    assert dp.total_error == pytest.approx(brute.total_error, abs=1e-9)
    assert dp.total_error <= greedy.total_error + 1e-9


test_dp_matches_brute_force_and_is_never_worse_than_greedy, test_dp_matches_brute_force_thoroughly = \
    _quick_and_thorough(layers=instances(1000), budget=st.integers(-10, 5000))(
        _dp_matches_brute_force_and_is_never_worse_than_greedy)


def _coarse_grid_fits_in_bytes_and_loses_at_most_the_slack(layers, budget, max_grid):
    floor = smallest_feasible_budget(layers)
    if floor > budget:
        assert _infeasible(plan_dp, layers, budget, max_grid=max_grid)
        return
    dp = plan_dp(layers, budget, max_grid=max_grid)
    _check_plan(dp, layers, budget)
    assert dp.resolution_bytes >= 1
    assert dp.max_slack_bytes <= len(layers) * (dp.resolution_bytes - 1)
    assert dp.total_error <= plan_greedy(layers, budget).total_error + 1e-9
    shrunk = budget - dp.max_slack_bytes
    if shrunk >= floor:
        assert dp.total_error <= plan_brute_force(layers, shrunk).total_error + 1e-9


test_coarse_grid_fits_in_bytes_and_loses_at_most_the_slack, test_coarse_grid_thoroughly = _quick_and_thorough(
    layers=instances(10**6), budget=st.integers(0, 3 * 10**6), max_grid=st.integers(1, 50))(
        _coarse_grid_fits_in_bytes_and_loses_at_most_the_slack)


def _grid_dp_is_exact_on_its_grid(layers, extra, res):
    """The core claim behind max_slack_bytes, checked without the polishing plan_dp adds on top:
    the grid DP finds the least error among plans whose rounded-up cells fit the capacity."""
    fronts = [_pareto_front(layer, extra) for layer in layers]
    cap = extra // res
    base = [min(c.cost_bytes for c in layer.candidates) for layer in layers]

    def cells(choices):
        return sum(-(-(layer.candidates[j].cost_bytes - m) // res) for layer, j, m in zip(layers, choices, base))

    def error(choices):
        return sum(layer.candidates[j].error for layer, j in zip(layers, choices))

    got = _grid_optimum(fronts, cap, res)
    assert cells(got) <= cap
    every = itertools.product(*(range(len(layer.candidates)) for layer in layers))
    assert error(got) == pytest.approx(min(error(c) for c in every if cells(c) <= cap), abs=1e-9)


test_grid_dp_is_exact_on_its_grid, test_grid_dp_is_exact_thoroughly = _quick_and_thorough(
    layers=instances(1000), extra=st.integers(0, 3000), res=st.integers(1, 300))(_grid_dp_is_exact_on_its_grid)


def test_coarse_grid_with_gigabyte_costs():
    """Costs far above the default grid force res > 1; the plan must still fit in real bytes."""
    rng = random.Random(7)
    layers = []
    for i in range(5):
        costs = sorted(rng.randrange(10**9) for _ in range(5))
        errs = sorted((rng.random() for _ in range(5)), reverse=True)  # no candidate dominated
        layers.append(LayerCandidates(f"l{i}", tuple(Candidate(c, e) for c, e in zip(costs, errs))))
    floor = smallest_feasible_budget(layers)
    most = sum(max(c.cost_bytes for c in layer.candidates) for layer in layers)
    budget = (floor + most) // 2
    dp = plan_dp(layers, budget)
    assert dp.resolution_bytes > 1
    assert dp.max_slack_bytes == 5 * (dp.resolution_bytes - 1)
    _check_plan(dp, layers, budget)
    assert dp.total_error <= plan_brute_force(layers, budget - dp.max_slack_bytes).total_error + 1e-9
    assert dp.total_error <= plan_greedy(layers, budget).total_error


def test_larger_instance_fits_and_beats_greedy():
    rng = np.random.default_rng(3)
    layers = []
    for i in range(40):
        costs = np.sort(rng.integers(10_000, 5_000_000, 12))
        errs = np.sort(rng.random(12))[::-1]
        layers.append(LayerCandidates(f"l{i}", tuple(Candidate(int(c), float(e)) for c, e in zip(costs, errs))))
    budget = int(0.4 * sum(layer.candidates[-1].cost_bytes for layer in layers))
    dp, greedy = plan_dp(layers, budget), plan_greedy(layers, budget)
    _check_plan(dp, layers, budget)
    _check_plan(greedy, layers, budget)
    assert dp.total_error <= greedy.total_error


@pytest.mark.parametrize("allocator", ["dp", "greedy", "brute"])
def test_infeasible_budget_names_the_smallest_feasible_budget(allocator):
    layers = [
        LayerCandidates("a", (Candidate(700, 0.0), Candidate(500, 1.0))),
        LayerCandidates("b", (Candidate(734, 0.5), Candidate(900, 0.1))),
    ]
    assert smallest_feasible_budget(layers) == 1234
    with pytest.raises(InfeasibleBudgetError) as info:
        plan(layers, 1000, allocator)
    assert info.value.smallest_feasible_bytes == 1234
    assert "1234 bytes" in str(info.value) and "1000" in str(info.value)
    assert isinstance(info.value, UserError)
    assert plan(layers, 1234, allocator).choices == (1, 0)


def test_empty_model_plans_to_nothing():
    for allocator in ("dp", "greedy", "brute"):
        p = plan([], 0, allocator)
        assert p.choices == () and p.total_cost_bytes == 0 and p.total_error == 0


@settings(max_examples=50, deadline=None)
@given(layers=instances(10**6), budget=st.integers(0, 3 * 10**6))
def test_same_input_gives_the_same_plan(layers, budget):
    if smallest_feasible_budget(layers) > budget:
        return
    copy = [LayerCandidates(layer.name, tuple(layer.candidates)) for layer in layers]
    for allocator in ("dp", "greedy", "brute"):
        assert plan(layers, budget, allocator) == plan(copy, budget, allocator)
    assert plan_dp(layers, budget, max_grid=7) == plan_dp(copy, budget, max_grid=7)


@settings(max_examples=50, deadline=None)
@given(layers=instances(1000), budgets=st.lists(st.integers(-10, 5000), max_size=12))
def test_pareto_front_is_non_increasing(layers, budgets):
    floor = smallest_feasible_budget(layers)
    for allocator in ("dp", "greedy"):
        front = pareto_front(layers, budgets, allocator)
        assert [b for b, _ in front] == sorted({b for b in budgets if b >= floor})
        errs = [e for _, e in front]
        assert all(later <= earlier for earlier, later in zip(errs, errs[1:]))


def test_dominated_candidates_are_never_chosen():
    layers = [
        LayerCandidates("a", (Candidate(20, 2.0), Candidate(10, 1.0), Candidate(30, 1.0), Candidate(40, 0.5))),
        LayerCandidates("b", (Candidate(5, 3.0), Candidate(5, 3.0), Candidate(8, 4.0))),
    ]
    for allocator in ("dp", "greedy", "brute"):
        assert plan(layers, 15, allocator).choices == (1, 0)
        assert plan(layers, 45, allocator).choices == (3, 0)


def test_unconstrained_budget_takes_the_most_accurate_candidates():
    layers = [LayerCandidates(f"l{i}", (Candidate(10**9, 0.0, rank=None), Candidate(10, 1.0, rank=4))) for i in range(3)]
    p = plan_dp(layers, 10**10)
    assert p.choices == (0, 0, 0) and p.resolution_bytes == 1 and p.max_slack_bytes == 0


def test_plan_chosen_and_to_dict():
    layers = [
        LayerCandidates("fc1", (Candidate(1000, 0.0, None, "dense"), Candidate(300, 0.2, 8, "eps=0.8"))),
        LayerCandidates("fc2", (Candidate(1000, 0.0, None, "dense"), Candidate(400, 0.1, 16, "eps=0.9"))),
    ]
    p = plan_dp(layers, 1400)
    assert [(name, c.label) for name, c in p.chosen(layers)] == [("fc1", "dense"), ("fc2", "eps=0.9")]
    d = json.loads(json.dumps(p.to_dict()))
    assert d == {
        "allocator": "dp", "budget_bytes": 1400, "total_cost_bytes": 1400, "total_error": 0.1,
        "resolution_bytes": 1, "max_slack_bytes": 0, "choices": [0, 1],
    }
    with pytest.raises(ValueError, match="2 layers"):
        p.chosen(layers[:1])


def test_numpy_numbers_are_accepted_as_plain_python():
    c = Candidate(np.int64(12), np.float32(0.5), rank=np.int32(3))
    assert type(c.cost_bytes) is int and type(c.error) is float and type(c.rank) is int


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: LayerCandidates("x", ()), "at least one candidate"),
        (lambda: Candidate(-1, 0.0), "cost_bytes must be >= 0"),
        (lambda: Candidate(1.5, 0.0), "cost_bytes must be an integer"),
        (lambda: Candidate(1, 0.0, rank=2.0), "rank must be an integer"),
        (lambda: Candidate(1, math.nan), "finite"),
        (lambda: Candidate(1, math.inf), "finite"),
        (lambda: Candidate(1, -0.1), ">= 0"),
        (lambda: LayerCandidates("x", ((1, 0.0),)), "Candidate objects"),
        (lambda: plan([], 10, "knapsack"), "unknown allocator"),
        (lambda: plan_dp([], 10.5), "budget must be an integer"),
        (lambda: plan_dp([], 10, max_grid=0), "max_grid"),
    ],
)
def test_bad_input_is_a_value_error(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_brute_force_refuses_large_instances():
    layers = [LayerCandidates(f"l{i}", tuple(Candidate(j, 1.0 / (j + 1)) for j in range(10))) for i in range(7)]
    with pytest.raises(ValueError, match="combinations"):
        plan_brute_force(layers, 100)
