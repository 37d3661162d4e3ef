"""Planners: properties over random stats, naive/brute-force oracles, and hand-built cases."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import squareform

from grape_jax.calibration.stats import LayerStats, ModelStats
from grape_jax.core.config import ExpertCountRule
from grape_jax.planners import DEFAULT_METHOD, PLANNERS, budget_from_per_layer, make_plan, planner_options
from grape_jax.planners.common import normalised_entropy
from grape_jax.planners.grape_l import loss_cost
from grape_jax.planners.grape_r import substitution_cost
from grape_jax.planners.plan import Plan, PlanError

FAST = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def layer(l, sim, freq=None, k=2, reap=None, y=None, seed=0):
    """LayerStats with routed moments of per-expert output vectors y: M = f_i <y_i, y_j>, N = f_i |y_j|^2."""
    e = sim.shape[0]
    rng = np.random.default_rng(seed + 7 * l)
    freq = np.full(e, k / e) if freq is None else np.asarray(freq, float)
    y = rng.normal(size=(e, 6)) if y is None else np.asarray(y, float)
    m = freq[:, None] * (y @ y.T)
    n = freq[:, None] * (y**2).sum(1)[None, :]
    sims = {"cka": sim, "cos_mean": sim, "router": sim, "weight": sim}
    reap = rng.random(e) if reap is None else np.asarray(reap, float)
    return LayerStats(l, 1000, k, freq, freq / k, reap, sims, m, n, **sensitivities(freq / k, rng.normal(size=e)))


def sensitivities(g, u):
    """sens_* of constant per-expert gates g_i and first-order losses u_j on every token."""
    return {
        "sens_m": (g**2)[:, None] * np.outer(u, u),
        "sens_n": (g**2)[:, None] * (u**2)[None, :],
        "sens_g": g[:, None] * u[None, :],
    }


def sym(rng, e, lo=0.0, hi=1.0):
    x = rng.uniform(lo, hi, (e, e))
    s = (x + x.T) / 2
    np.fill_diagonal(s, 1.0)
    return s


def random_stats(num_layers, num_experts, k, seed):
    rng = np.random.default_rng(seed)
    return ModelStats(
        tuple(
            layer(l, sym(rng, num_experts) ** (1 + l % 3), rng.dirichlet(np.ones(num_experts)) * k, k, seed=seed)
            for l in range(num_layers)
        )
    )


def option_strategy(method):
    """Hypothesis strategy of valid options for `method` (operators, guards, linkages, ranks, floors)."""
    merge_ops = st.sampled_from(["freq", "uniform", "dominant", "fit"])
    common = {"min_experts": st.integers(0, 3), "router_rule": st.sampled_from(["dominant", "mean"])}
    extra = {
        "grape": {
            "operator": merge_ops,
            "guard": st.sampled_from(["entropy", "none", "cap"]),
            "linkage": st.sampled_from(["single-zero", "average"]),
            "gamma": st.sampled_from([0.0, 0.01, 0.1]),
        },
        "local": {"operator": merge_ops, "linkage": st.sampled_from(["single-zero", "average"])},
        "grape-r": {
            "operator": merge_ops,
            "guard": st.sampled_from(["entropy", "none", "cap"]),
            "normalise": st.sampled_from(["none", "energy"]),
        },
        "grape-l": {
            "operator": merge_ops,
            "guard": st.sampled_from(["entropy", "none", "cap"]),
            "cost": st.sampled_from(["fisher", "taylor"]),
        },
        "hc-smoe": {"operator": merge_ops},
        "m-smoe": {"operator": merge_ops},
        "ream": {  # group_size 0 (MC-SMoE) or large enough for any budget: C * kept >= E always
            "operator": st.sampled_from(["freq", "aligned", "uniform", "dominant", "fit"]),
            "group_size": st.sampled_from([0, 256]),
            "similarity": st.sampled_from(["gated", "cka"]),
        },
        "frequency": {"operator": st.sampled_from(["drop", "freq", "fit"]), "global_rank": st.booleans()},
        "reap": {"operator": st.sampled_from(["drop", "dominant"]), "global_rank": st.booleans()},
        "random": {
            "operator": st.sampled_from(["drop", "uniform"]),
            "global_rank": st.booleans(),
            "seed": st.integers(0, 10),
        },
    }[method]
    return st.fixed_dictionaries({**common, **extra})


@settings(FAST, max_examples=30)
@given(
    num_layers=st.one_of(st.integers(1, 4), st.integers(5, 100)),
    num_experts=st.one_of(st.integers(2, 10), st.integers(11, 256)),
    k=st.integers(1, 3),
    frac=st.floats(0, 1),
    seed=st.integers(0, 2**16),
    data=st.data(),
)
def test_every_plan_is_a_partition_at_exactly_the_budget(num_layers, num_experts, k, frac, seed, data):
    num_layers = min(num_layers, max(1, 1500 // num_experts))  # keep each example fast
    k = min(k, num_experts)
    stats = random_stats(num_layers, num_experts, k, seed)
    for method in sorted(PLANNERS):
        options = data.draw(option_strategy(method), label=method)
        floor = max(k, options["min_experts"])
        room = num_layers * max(num_experts - floor, 0)
        budget = int(frac * room)
        plan = make_plan(stats, method=method, budget=budget, **options)
        assert plan.num_removed == budget == plan.budget, method
        for lp in plan.layers:
            members = sorted([e for g in lp.groups for e in g] + list(lp.dropped))
            assert members == list(range(num_experts)), method
            assert lp.num_kept >= min(floor, num_experts), method
            for w in lp.weights:
                assert min(w) >= 0 and abs(sum(w) - 1) < 1e-9
        if floor <= num_experts:
            rule = ExpertCountRule(k, k)
            assert all(rule.problem(lp.num_kept, min_experts=options["min_experts"]) is None for lp in plan.layers)
        assert make_plan(stats, method=method, budget=budget, **options) == plan, method  # deterministic
        assert Plan.from_json(plan.to_json()) == plan, method


# ------------------------------------------------------------------------------ naive oracles


def naive_grape(stats, budget, *, gamma=0.01, guard="entropy", linkage_="single-zero", min_experts=0, cap_gamma=1.0):
    """Algorithm 1 written plainly: labels per layer, full recomputation of every choice at every step."""
    L = len(stats.layers)
    d = [ls.sim["cka"] * (1 - np.eye(ls.num_experts)) for ls in stats.layers]
    labels = [list(range(ls.num_experts)) for ls in stats.layers]
    red = [float(x.sum()) for x in d]
    floor = [max(ls.top_k, min_experts, 1) for ls in stats.layers]

    def counts():
        return [len(set(lab)) for lab in labels]

    def entropy(c):
        t = sum(c)
        return -sum(x / t * math.log(x / t) for x in c if x)

    threshold = entropy(counts()) * (1 - gamma)
    cap = math.ceil(cap_gamma * budget / L)
    frozen, removed = set(), [0] * L
    for _ in range(budget):
        c = counts()
        open_ = [l for l in range(L) if c[l] > floor[l]]
        if guard == "entropy":
            if all(l in frozen for l in open_):
                frozen = set()
            open_ = [l for l in open_ if l not in frozen]
        elif guard == "cap":
            open_ = [l for l in open_ if removed[l] < cap] or open_
        layer_ = max(open_, key=lambda l: (red[l], -l))
        lab, dl = labels[layer_], d[layer_]
        clusters = sorted({x: [i for i in range(len(lab)) if lab[i] == x] for x in set(lab)}.values(), key=min)
        best, pick = -np.inf, None
        if linkage_ == "single-zero":
            for i in range(len(lab)):
                for j in range(i + 1, len(lab)):
                    if lab[i] != lab[j] and dl[i, j] > best:
                        best, pick = dl[i, j], (lab[i], lab[j])
        else:
            for a in range(len(clusters)):
                for b in range(a + 1, len(clusters)):
                    v = dl[np.ix_(clusters[a], clusters[b])].mean()
                    if v > best:
                        best, pick = v, (clusters[a][0], clusters[b][0])
        ma = [i for i in range(len(lab)) if lab[i] == pick[0]]
        mb = [i for i in range(len(lab)) if lab[i] == pick[1]]
        red[layer_] -= 2.0 * float(dl[np.ix_(ma, mb)].sum())
        for i in mb:
            lab[i] = pick[0]
        removed[layer_] += 1
        if guard == "entropy" and entropy(counts()) < threshold:
            frozen.add(layer_)
    return [tuple(sorted(tuple(i for i in range(len(lab)) if lab[i] == x) for x in set(lab))) for lab in labels]


@settings(FAST, max_examples=80)
@given(
    num_layers=st.integers(1, 6),
    num_experts=st.integers(2, 9),
    k=st.integers(1, 2),
    frac=st.floats(0, 1),
    seed=st.integers(0, 2**16),
    gamma=st.sampled_from([0.0, 0.005, 0.02, 0.2]),
    guard=st.sampled_from(["entropy", "none", "cap"]),
    linkage_=st.sampled_from(["single-zero", "average"]),
    min_experts=st.integers(0, 3),
)
def test_grape_equals_naive_algorithm(num_layers, num_experts, k, frac, seed, gamma, guard, linkage_, min_experts):
    stats = random_stats(num_layers, num_experts, min(k, num_experts), seed)
    floor = max(k, min_experts, 1)
    budget = int(frac * num_layers * max(num_experts - floor, 0))
    plan = make_plan(
        stats,
        method="grape",
        budget=budget,
        gamma=gamma,
        guard=guard,
        linkage=linkage_,
        min_experts=min_experts,
        cap_gamma=0.5,
    )
    expected = naive_grape(
        stats, budget, gamma=gamma, guard=guard, linkage_=linkage_, min_experts=min_experts, cap_gamma=0.5
    )
    assert [lp.groups for lp in plan.layers] == expected


def naive_grape_r(stats, budget, *, normalise="none"):
    """Brute force: every (A into B) absorption of every layer costed from C directly at every step."""
    costs = [substitution_cost(ls, normalise) for ls in stats.layers]
    clusters = [{i: [i] for i in range(ls.num_experts)} for ls in stats.layers]  # representative -> members
    total = 0.0
    for _ in range(budget):
        options = []
        for l, (c, cl) in enumerate(zip(costs, clusters)):
            if len(cl) <= stats.layers[l].top_k:
                continue
            for ra in sorted(cl):
                for rb in sorted(cl):
                    if ra != rb:
                        delta = sum(c[i, rb] - c[i, ra] for i in cl[ra])
                        options.append((delta, l, ra, rb))
        delta, l, ra, rb = min(options)
        clusters[l][rb] += clusters[l].pop(ra)
        total += delta
    groups = [tuple(sorted(tuple(sorted(m)) for m in cl.values())) for cl in clusters]
    reps = [{tuple(sorted(m)): r for r, m in cl.items()} for cl in clusters]
    return groups, reps, total


@settings(FAST, max_examples=50)
@given(
    num_layers=st.integers(1, 5),
    num_experts=st.integers(2, 8),
    frac=st.floats(0, 1),
    seed=st.integers(0, 2**16),
    normalise=st.sampled_from(["none", "energy"]),
)
def test_grape_r_equals_brute_force(num_layers, num_experts, frac, seed, normalise):
    stats = random_stats(num_layers, num_experts, 1, seed)
    budget = int(frac * num_layers * (num_experts - 1))
    plan = make_plan(stats, method="grape-r", budget=budget, normalise=normalise)
    groups, reps, total = naive_grape_r(stats, budget, normalise=normalise)
    assert [lp.groups for lp in plan.layers] == groups
    assert [dict(zip(lp.groups, lp.dominant)) for lp in plan.layers] == reps
    np.testing.assert_allclose(plan.diagnostics["estimated_cost"], total, rtol=1e-9, atol=1e-12)
    # the cost of the plan is Σ_G Σ_{i∈G} C[i, rep_G]: the telescoped absorptions
    direct = sum(
        substitution_cost(ls, normalise)[list(g), d].sum()
        for ls, lp in zip(stats.layers, plan.layers)
        for g, d in zip(lp.groups, lp.dominant)
    )
    np.testing.assert_allclose(plan.diagnostics["estimated_cost"], direct, rtol=1e-9, atol=1e-12)


def test_substitution_cost_matches_brute_force():
    rng = np.random.default_rng(4)
    t, e, d = 50, 4, 5
    y = rng.normal(size=(e, t, d))
    y[3] = y[1]
    g = rng.random((t, e))
    g[:, 2] = 0
    m = np.einsum("ti,itd,jtd->ij", g, y, y)
    n = np.einsum("ti,jtd->ij", g, y**2)
    ls = LayerStats(0, t, 2, g.mean(0), g.mean(0), g.mean(0), {"cka": np.eye(e)}, m, n)
    brute = np.einsum("ti,ijtd->ij", g, (y[:, None] - y[None, :]) ** 2)
    np.testing.assert_allclose(substitution_cost(ls, "none"), brute, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(substitution_cost(ls), brute / np.einsum("ti,itd->", g, y**2), rtol=1e-10, atol=1e-12)
    c = substitution_cost(ls)
    assert c[1, 3] < 1e-12 and c[3, 1] < 1e-12 and np.all(c[2] == 0)


def test_hc_smoe_equals_scipy_average_linkage():
    stats = random_stats(3, 12, 2, 5)
    plan = make_plan(stats, method="hc-smoe", budget=3 * 7)
    for ls, lp in zip(stats.layers, plan.layers):
        dist = 1.0 - ls.sim["cos_mean"]
        np.fill_diagonal(dist, 0.0)
        labels = fcluster(linkage(squareform(dist), "average"), t=5, criterion="maxclust")
        expected = sorted((tuple(np.flatnonzero(labels == c)) for c in set(labels)), key=min)
        assert list(lp.groups) == expected


# -------------------------------------------------------------------------------- hand cases


def test_equally_redundant_layers_get_local_allocation():
    s = sym(np.random.default_rng(0), 8)
    stats = ModelStats(tuple(layer(l, s) for l in range(4)))
    g = make_plan(stats, method="grape", budget=8)
    lo = make_plan(stats, method="local", budget=8)
    assert g.kept_per_layer == lo.kept_per_layer == (6, 6, 6, 6)
    assert [lp.groups for lp in g.layers] == [lp.groups for lp in lo.layers]


def test_redundant_layer_loses_more():
    rng = np.random.default_rng(1)
    sims = [sym(rng, 8, 0.0, 0.3) for _ in range(4)]
    sims[2] = 0.97 + 0.01 * sims[2]
    np.fill_diagonal(sims[2], 1)
    stats = ModelStats(tuple(layer(l, s) for l, s in enumerate(sims)))
    for guard in ("none", "entropy"):
        removed = [8 - k for k in make_plan(stats, method="grape", budget=8, guard=guard, gamma=0.05).kept_per_layer]
        assert removed[2] == max(removed) and removed[2] > 2, guard


def test_entropy_guard_restarts_and_keeps_entropy():
    """One layer of near-duplicates: unguarded greedy piles most of the budget there; the guard does not.

    With equal initial counts E_init = log L, so the normalised threshold is Ê / log L = 1 - γ. Once E is
    below Ê each layer merges at most once per round, so the final entropy drifts below Ê only by rounds of
    near-uniform removals; for budgets up to a quarter of the experts we require τ = 1 - 2γ.
    """
    rng = np.random.default_rng(2)
    sims = [np.full((16, 16), 0.99)] + [sym(rng, 16, 0.0, 0.2) for _ in range(3)]
    np.fill_diagonal(sims[0], 1)
    stats = ModelStats(tuple(layer(l, s) for l, s in enumerate(sims)))
    budget, gamma = 16, 0.01
    tau = 1 - 2 * gamma
    free = make_plan(stats, method="grape", budget=budget, guard="none")
    removed_free = [16 - k for k in free.kept_per_layer]
    assert removed_free[0] > budget / 2
    assert normalised_entropy(free.kept_per_layer) < tau
    guarded = make_plan(stats, method="grape", budget=budget, gamma=gamma)
    diag = guarded.diagnostics
    assert diag["restarts"] >= 1
    assert diag["entropy_threshold_normalised"] == pytest.approx(1 - gamma)
    assert diag["entropy_final_normalised"] == pytest.approx(normalised_entropy(guarded.kept_per_layer))
    assert diag["entropy_final_normalised"] >= tau
    assert max(16 - k for k in guarded.kept_per_layer) <= budget / 2


def test_hand_computed_grape_steps():
    """3 layers x 4 experts, top-1. R^l = 2 Σ_{i<j} D_ij: R = (1.4, 6.0, 2.0); Ê = log(3)·0.99 = 1.08762.

    Guarded: 1) l1 (6.0) merges (0,1): R1 = 4.2, counts (4,3,4), E = 1.09013 >= Ê.
    2) l1 merges (2,3): R1 = 2.6, counts (4,2,4), E = 1.05492 < Ê: freeze l1.
    3) l2 (2.0 > 1.4) merges (1,2): R2 = 0.6, (4,2,3), E = 1.06085: freeze l2.
    4) only l0 is open: merges (0,1): R0 = 0.4, (3,2,3), E = 1.08219: freeze l0.
    5) all frozen: restart; l1 (2.6) merges {0,1} with {2,3} via (0,2): R1 = 0, (3,1,3), E = 1.00424.
    Unguarded: l1, l1, l1 (2.6 > 2.0), then l2 (2.0 > 1.4), then l0.
    """

    def hand(pairs):
        s = np.eye(4)
        for (i, j), v in pairs.items():
            s[i, j] = s[j, i] = v
        return s

    s0 = hand({(0, 1): 0.5, (1, 2): 0.2})
    s1 = hand({(0, 1): 0.9, (2, 3): 0.8, (0, 2): 0.7, (1, 3): 0.6})
    s2 = hand({(1, 2): 0.7, (0, 3): 0.3})
    stats = ModelStats(tuple(layer(l, s, k=1) for l, s in enumerate((s0, s1, s2))))
    plan = make_plan(stats, method="grape", budget=5, gamma=0.01)
    d = plan.diagnostics
    assert d["merge_order"] == [1, 1, 2, 0, 1]
    assert d["restarts"] == 1
    assert d["entropy_threshold"] == pytest.approx(1.0986123 * 0.99, abs=1e-6)
    assert d["entropy_final"] == pytest.approx(6 / 7 * math.log(7 / 3) + math.log(7) / 7, rel=1e-12)  # 1.00424
    np.testing.assert_allclose(d["redundancy_final"], [0.4, 0.0, 0.6], atol=1e-12)
    assert [lp.groups for lp in plan.layers] == [((0, 1), (2,), (3,)), ((0, 1, 2, 3),), ((0,), (1, 2), (3,))]
    free = make_plan(stats, method="grape", budget=5, guard="none")
    assert free.diagnostics["merge_order"] == [1, 1, 1, 2, 0]
    assert free.diagnostics["restarts"] == 0


def test_identical_experts_merged_first():
    rng = np.random.default_rng(6)
    s = sym(rng, 6, 0.0, 0.5)
    s[2, 5] = s[5, 2] = 1.0
    y = rng.normal(size=(6, 6))
    y[5] = y[2]
    stats = ModelStats((layer(0, s, y=y), layer(1, sym(rng, 6, 0.0, 0.1), seed=1)))
    for method in ("grape", "local", "hc-smoe", "grape-r"):
        plan = make_plan(stats, method=method, budget=2 if method == "local" else 1)
        assert (2, 5) in plan.layers[0].groups, method


def test_never_routed_expert_goes_first():
    rng = np.random.default_rng(3)
    freq, reap = np.array([0.5, 0.0, 0.7, 0.8]), np.array([1.0, 0.0, 2.0, 3.0])
    s = sym(rng, 4)
    stats = ModelStats((layer(0, s, freq, k=2, reap=reap), layer(1, s, [0.5] * 4, k=2, seed=1)))
    for method, options, budget in (
        ("frequency", {}, 2),
        ("reap", {}, 2),
        ("frequency", {"global_rank": True}, 1),
        ("reap", {"global_rank": True}, 1),
    ):
        plan = make_plan(stats, method=method, budget=budget, **options)
        assert plan.layers[0].dropped == (1,), (method, options)
    plan = make_plan(stats, method="grape-r", budget=1)
    assert plan.kept_per_layer == (3, 4)
    [group] = [g for g in plan.layers[0].groups if 1 in g]
    assert len(group) == 2 and plan.layers[0].dominant[plan.layers[0].groups.index(group)] != 1


def test_global_rank_uses_shares_of_each_layer():
    s = np.eye(4)
    stats = ModelStats(
        (layer(0, s, [0.5, 0.0, 0.7, 0.8], k=2, reap=[10, 20, 30, 40]), layer(1, s, [0.5] * 4, k=2, reap=[1, 2, 3, 4]))
    )
    # frequency shares: l0 (0.25, 0, 0.35, 0.4), l1 0.25 each; ties -> lowest layer, then lowest id
    assert [lp.dropped for lp in make_plan(stats, method="frequency", budget=3, global_rank=True).layers] == [
        (0, 1),
        (0,),
    ]
    # REAP shares are equal across the two layers although the scales differ tenfold
    assert [lp.dropped for lp in make_plan(stats, method="reap", budget=2, global_rank=True).layers] == [(0,), (0,)]
    assert [lp.dropped for lp in make_plan(stats, method="reap", budget=3, global_rank=True).layers] == [(0, 1), (0,)]


def test_uniform_remainder_rules():
    rng = np.random.default_rng(7)
    sims = [sym(rng, 6, 0.0, hi) for hi in (0.2, 0.9, 0.5)]
    stats = ModelStats(tuple(layer(l, s) for l, s in enumerate(sims)))
    # local: B // L = 1 each, the remainder 1 to the most redundant layer (layer 1)
    assert make_plan(stats, method="local", budget=4).kept_per_layer == (5, 4, 5)
    assert make_plan(stats, method="hc-smoe", budget=5).kept_per_layer == (5, 4, 4)
    # scores: remainder to the lowest total score; equal frequency totals -> lowest layer
    assert make_plan(stats, method="frequency", budget=4).kept_per_layer == (4, 5, 5)
    # a layer at its floor passes its share on: 9 // 3 = 3 each, layer 0 (4 experts, top-2) can give 2
    uneven = ModelStats((layer(0, sym(rng, 4, 0.0, 0.9)), *stats.layers[1:]))
    assert make_plan(uneven, method="local", budget=9).kept_per_layer == (2, 2, 3)
    assert make_plan(uneven, method="frequency", budget=9).kept_per_layer == (2, 2, 3)


def test_m_smoe_by_hand():
    s = np.eye(5)
    s[3, 0] = s[0, 3] = 0.9
    s[3, 1] = s[1, 3] = 0.8
    s[4, 1] = s[1, 4] = 0.6
    s[4, 2] = s[2, 4] = 0.6  # tie -> lowest centre id (1)
    stats = ModelStats((layer(0, s, [0.6, 0.5, 0.5, 0.2, 0.2], k=2),))
    plan = make_plan(stats, method="m-smoe", budget=2)
    lp = plan.layers[0]
    assert lp.groups == ((0, 3), (1, 4), (2,))
    np.testing.assert_allclose(lp.weights[0], [0.75, 0.25])
    assert lp.dominant == (0, 1, 2)


def test_folding_pruned_experts():
    s = np.eye(4)
    s[0, 3] = s[3, 0] = 0.9
    s[0, 2] = s[2, 0] = 0.1
    s[1, 3] = s[3, 1] = 0.2
    stats = ModelStats((layer(0, s, [0.1, 0.6, 0.5, 0.8], k=2),))
    drop = make_plan(stats, method="frequency", budget=1)
    assert drop.operator == "drop" and drop.layers[0].dropped == (0,)
    fold = make_plan(stats, method="frequency", budget=1, operator="freq", router_rule="mean")
    lp = fold.layers[0]
    assert lp.dropped == () and lp.groups == ((0, 3), (1,), (2,))
    assert lp.dominant[0] == 3  # the kept expert represents its group
    np.testing.assert_allclose(lp.weights[0], [0.1 / 0.9, 0.8 / 0.9])


def test_random_is_seeded():
    stats = random_stats(3, 16, 2, 0)
    a, b = (make_plan(stats, method="random", budget=12, seed=s) for s in (1, 2))
    assert a == make_plan(stats, method="random", budget=12, seed=1) and a.seed == 1
    assert [lp.dropped for lp in a.layers] != [lp.dropped for lp in b.layers]


def test_errors():
    stats = random_stats(2, 4, 2, 0)
    cases = [
        (("grap", {}), "method 'grap' unknown; expected one of"),
        (("grape", {"gama": 0.1}), r"grape: unknown option\(s\) \['gama'\]; accepted: \["),
        (("grape", {"linkage": "x"}), r"linkage 'x' unknown; expected one of \('single-zero', 'average'\)"),
        (("grape", {"guard": "x"}), "guard 'x' unknown"),
        (("grape", {"gamma": 1.5}), r"gamma must be in \[0, 1\)"),
        (("grape", {"operator": "drop"}), "operator 'drop' unknown"),
        (("local", {"operator": "mean"}), "operator 'mean' unknown"),
        (("grape", {"router_rule": "x"}), "router_rule 'x' unknown"),
        (("grape", {"metric": "l2"}), r"similarity metric 'l2' not in stats"),
        (("grape-r", {"normalise": "x"}), "normalise 'x' unknown"),
        (("frequency", {"operator": "avg"}), r"operator 'avg' unknown; expected one of \('drop',"),
        (("reap", {"min_experts": -1}), "min_experts must be an integer >= 0"),
    ]
    for (method, options), message in cases:
        with pytest.raises(ValueError, match=message):
            make_plan(stats, method=method, budget=1, **options)
    with pytest.raises(PlanError, match="budget 5 exceeds the 4 experts removable above the per-layer floors"):
        make_plan(stats, method="grape", budget=5)
    with pytest.raises(PlanError, match="budget 3 exceeds the 2 experts removable"):
        make_plan(stats, method="local", budget=3, min_experts=3)
    with pytest.raises(PlanError, match="budget must be >= 0"):
        make_plan(stats, method="reap", budget=-1)
    no_moments = ModelStats(
        tuple(LayerStats(l.layer, l.num_tokens, l.top_k, l.freq, l.gate_mass, l.reap, l.sim) for l in stats.layers)
    )
    with pytest.raises(PlanError, match=r"layer 0: stats have no routed moments \(routed_m/routed_n\)"):
        make_plan(no_moments, method="grape-r", budget=1)
    assert budget_from_per_layer(2, stats) == 4
    with pytest.raises(PlanError, match=r"per_layer \(--per-layer\) must be an integer >= 0"):
        budget_from_per_layer(-1, stats)
    assert "gamma" in planner_options("grape") and "seed" in planner_options("random")
    assert all({"operator", "router_rule", "min_experts"} <= set(planner_options(m)) for m in PLANNERS)


def test_loss_cost_matches_brute_force():
    rng = np.random.default_rng(6)
    t, e = 60, 4
    u = rng.normal(size=(e, t))
    u[3] = u[1]
    g = rng.random((t, e))
    g[:, 2] = 0
    sens = {
        "sens_m": np.einsum("ti,it,jt->ij", g**2, u, u),
        "sens_n": np.einsum("ti,jt->ij", g**2, u**2),
        "sens_g": np.einsum("ti,jt->ij", g, u),
    }
    ls = LayerStats(0, t, 2, g.mean(0), g.mean(0), g.mean(0), {"cka": np.eye(e)}, **sens)
    fisher = np.einsum("ti,ijt->ij", g**2, (u[:, None] - u[None, :]) ** 2)
    first = np.abs(np.einsum("ti,ijt->ij", g, u[None, :] - u[:, None]))
    np.testing.assert_allclose(loss_cost(ls), fisher, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(loss_cost(ls, "taylor"), first + 0.5 * fisher, rtol=1e-10, atol=1e-12)
    c = loss_cost(ls)
    assert c[1, 3] < 1e-12 and np.all(c[2] == 0)
    with pytest.raises(PlanError, match="calibrated without gradients, which grape-l plans from"):
        loss_cost(dataclasses.replace(ls, sens_m=None))


def test_grape_l_spends_removals_where_the_loss_is_insensitive():
    """Layer 0's experts differ a lot in output (so grape-r keeps them) but the loss gradient there is ~0;
    layer 1's outputs differ less but the loss sees them: grape-l removes from layer 0, grape-r from 1."""
    e = 4
    base = [layer(0, np.eye(e), y=np.eye(e) * 10.0), layer(1, np.eye(e), y=np.eye(e))]
    quiet, loud = 1e-3 * np.arange(1, e + 1), np.arange(1, e + 1, dtype=float)
    stats = ModelStats(
        tuple(
            dataclasses.replace(ls, **sensitivities(ls.freq / 2, u)) for ls, u in zip(base, (quiet, loud), strict=True)
        )
    )
    assert make_plan(stats, method="grape-l", budget=2).kept_per_layer == (2, 4)
    assert make_plan(stats, method="grape-r", budget=2).kept_per_layer == (4, 2)
    plan = make_plan(stats, budget=2)
    assert DEFAULT_METHOD == "grape-l" and plan.method == "grape-l" and plan.operator == "fit"
