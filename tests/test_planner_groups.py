"""Planners under group-limited routing (DeepSeek-V2/V3): every layer keeps a multiple of n_group experts,
at least the router's minimum, and the budget is met exactly."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grape_jax.calibration.stats import ModelStats
from grape_jax.planners import PLANNERS, make_plan
from grape_jax.planners.common import floors, snap_allocation, uniform_allocation
from grape_jax.planners.plan import PlanError
from tests.test_planners import FAST, option_strategy, random_stats


def grouped(stats: ModelStats, multiple: int, min_count: int) -> ModelStats:
    return ModelStats(
        tuple(dataclasses.replace(ls, count_multiple=multiple, min_count=min_count) for ls in stats.layers)
    )


def test_floors_round_up_to_whole_groups():
    stats = grouped(random_stats(2, 16, 3, seed=0), multiple=4, min_count=8)
    assert floors(stats).tolist() == [8, 8]
    assert floors(stats, min_experts=9).tolist() == [12, 12]
    assert floors(grouped(stats, 4, 0)).tolist() == [4, 4]  # top_k 3 -> one whole group


def test_budget_must_be_whole_groups():
    stats = grouped(random_stats(3, 8, 2, seed=1), multiple=4, min_count=4)
    with pytest.raises(PlanError, match=r"budget 6 is not a multiple of 4: .*n_group=4 \(nearest: 4 or 8\)"):
        make_plan(stats, method="grape", budget=6)
    with pytest.raises(PlanError, match=r"nearest: 8 or 12\)"):
        make_plan(stats, method="local", budget=11)
    with pytest.raises(PlanError, match="exceeds the 12 experts removable"):
        make_plan(stats, method="grape", budget=16)


def test_snap_allocation_by_largest_remainder():
    stats = grouped(random_stats(4, 16, 2, seed=2), multiple=4, min_count=4)
    assert snap_allocation(stats, [5, 3, 0, 0]) == [4, 4, 0, 0]  # remainders 1, 3: the 3 wins
    assert snap_allocation(stats, [2, 2, 2, 2]) == [4, 4, 0, 0]  # equal remainders: lowest layers
    assert snap_allocation(stats, [8, 0, 4, 0]) == [8, 0, 4, 0]
    assert snap_allocation(random_stats(2, 16, 2, seed=2), [3, 2]) == [3, 2]  # granularity 1: identity


def test_uniform_allocation_counts_groups():
    stats = grouped(random_stats(3, 16, 2, seed=3), multiple=4, min_count=4)
    alloc = uniform_allocation(stats, 8, floors(stats), tie_break=[0.0, 1.0, 0.0])
    assert alloc == [4, 4, 0]  # one group each to layers 0, 1 in tie-break order (1 first, then 0)


@settings(FAST, max_examples=15)
@given(
    num_layers=st.integers(1, 6),
    groups=st.integers(2, 8),
    multiple=st.sampled_from([2, 4]),
    frac=st.floats(0, 1),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_every_planner_keeps_whole_groups(num_layers, groups, multiple, frac, seed, data):
    num_experts = groups * multiple
    stats = grouped(random_stats(num_layers, num_experts, 2, seed), multiple=multiple, min_count=multiple)
    for method in sorted(PLANNERS):
        options = data.draw(option_strategy(method), label=method)
        floor = floors(stats, options["min_experts"])
        room = int(sum(num_experts - f for f in floor if f <= num_experts))
        budget = int(frac * room) // multiple * multiple
        if any(f > num_experts for f in floor):
            continue
        plan = make_plan(stats, method=method, budget=budget, **options)
        assert plan.num_removed == budget, method
        for lp, f in zip(plan.layers, floor, strict=True):
            assert lp.num_kept % multiple == 0 and lp.num_kept >= f, (method, lp.num_kept)
        greedy = plan.diagnostics.get("removed_per_layer_greedy")
        if greedy is not None:  # rounding moves each layer by less than one group
            removed = plan.diagnostics["removed_per_layer"]
            assert all(abs(a - b) < multiple for a, b in zip(removed, greedy, strict=True)), method
            assert sum(greedy) == sum(removed) == budget


def _two_layer_case(scale: float) -> tuple[ModelStats, list[int]]:
    """Two layers of different redundancy and the unconstrained greedy's removals for budget 8."""
    rng = np.random.default_rng(0)
    e = 16
    base = random_stats(2, e, 2, seed=5)
    sims = []
    for level in (0.9, 0.9 * scale):
        x = level + 0.05 * rng.random((e, e))
        x = (x + x.T) / 2
        np.fill_diagonal(x, 1.0)
        sims.append(x)
    free = ModelStats(
        tuple(dataclasses.replace(ls, sim={k: s for k in ls.sim}) for ls, s in zip(base.layers, sims, strict=True))
    )
    greedy = [e - lp.num_kept for lp in make_plan(free, method="grape", budget=8, guard="none").layers]
    return free, greedy


@pytest.mark.parametrize("scale", [0.7, 0.9, 0.95])
def test_grape_rounds_its_global_allocation(scale):
    """Two layers of different redundancy: the unconstrained greedy splits the budget unevenly; with
    groups of 4 each layer gets its whole groups plus, by largest leftover, the groups still owed, and
    its groups are its own first merges (what `local` gives on that layer alone)."""
    free, greedy = _two_layer_case(scale)
    e = free.layers[0].num_experts
    expected = [r // 4 * 4 for r in greedy]
    owed = (8 - sum(expected)) // 4
    for i in sorted(range(2), key=lambda i: (-(greedy[i] % 4), i))[:owed]:
        expected[i] += 4
    plan = make_plan(grouped(free, 4, 4), method="grape", budget=8, guard="none")
    assert [e - lp.num_kept for lp in plan.layers] == plan.diagnostics["removed_per_layer"] == expected
    for l, r in enumerate(expected):
        alone = make_plan(ModelStats((free.layers[l],)), method="local", budget=r)
        assert plan.layers[l].groups == alone.layers[0].groups


def test_grape_rounding_case_is_not_trivial():
    assert any(_two_layer_case(s)[1][0] % 4 for s in (0.9, 0.95))


def test_group_fields_survive_the_stats_file(tmp_path):
    stats = grouped(random_stats(2, 8, 2, seed=4), multiple=4, min_count=8)
    stats.save(tmp_path / "s.npz")
    again = ModelStats.load(tmp_path / "s.npz")
    assert [(ls.count_multiple, ls.min_count) for ls in again.layers] == [(4, 8), (4, 8)]
    with pytest.raises(PlanError, match="exceeds the 0 experts removable"):  # 8 experts, floor 8
        make_plan(again, method="grape", budget=4)


def test_stats_refuse_counts_off_the_multiple():
    from grape_jax.calibration.stats import StatsError

    with pytest.raises(StatsError, match=r"layer 0 keeps 6 experts; .* and a multiple of 4 \(n_group\)"):
        grouped(random_stats(1, 6, 2, seed=5), multiple=4, min_count=4).validate()
