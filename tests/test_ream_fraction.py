"""Budgets by fraction (`fraction=` / `--fraction`) and the REAM planner against a float64 NumPy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest

from grape_jax.calibration.stats import LayerStats, ModelStats
from grape_jax.cli.main import main as grape
from grape_jax.core.config import MoEConfig
from grape_jax.core.model import model_from_arrays, param_view
from grape_jax.core.params import init_params
from grape_jax.merge.alignment import align_and_average
from grape_jax.merge.state import merge_model
from grape_jax.pipeline import check_plan_request
from grape_jax.planners import make_plan
from grape_jax.planners.common import budget_from_fraction
from grape_jax.planners.plan import PlanError

# ----------------------------------------------------------------------------------------- helpers


def _layer(l, e, *, k=2, reap=None, cos=None, router=None, multiple=1, min_count=0, seed=0):
    rng = np.random.default_rng(seed + 31 * l)
    if cos is None:
        y = rng.normal(size=(e, 5))
        g = y @ y.T
        cos = g / np.sqrt(np.outer(np.diag(g), np.diag(g)))
    if router is None:
        z = rng.normal(size=(e, 7))
        z -= z.mean(1, keepdims=True)
        g = z @ z.T
        router = g / np.sqrt(np.outer(np.diag(g), np.diag(g)))
    freq = rng.dirichlet(np.ones(e)) * k
    reap = rng.random(e) if reap is None else np.asarray(reap, float)
    sims = {"cka": np.abs(cos), "cos_mean": np.asarray(cos, float), "router": np.asarray(router, float), "weight": cos}
    return LayerStats(l, 100, k, freq, freq / k, reap, sims, count_multiple=multiple, min_count=min_count)


def _stats(num_layers, e, **kw):
    return ModelStats(tuple(_layer(l, e, **kw) for l in range(num_layers)))


# ------------------------------------------------------------------------------------- fraction


@pytest.mark.parametrize(
    ("layers", "experts", "fraction", "budget"),
    [
        (4, 32, 0.25, 32),  # 8 per layer, as REAP/REAM state it
        (4, 32, 0.5, 64),
        (4, 32, 0.75, 96),
        (3, 6, 0.3, 5),  # 5.4 -> 5
        (3, 6, 0.25, 5),  # 4.5 -> 5: halves round up
        (3, 6, 0.2, 4),  # 3.6 -> 4
    ],
)
def test_fraction_rounds_to_the_nearest_expert(layers, experts, fraction, budget):
    stats = _stats(layers, experts)
    assert budget_from_fraction(fraction, stats) == budget
    plan = make_plan(stats, method="reap", fraction=fraction)
    assert plan.num_removed == budget
    if (fraction * experts).is_integer():
        assert set(plan.kept_per_layer) == {experts - int(fraction * experts)}


def test_fraction_under_a_group_limited_router_rounds_to_whole_groups():
    stats = _stats(2, 16, k=2, multiple=4, min_count=4)  # 32 experts in groups of 4
    assert budget_from_fraction(0.3, stats) == 8  # 9.6 experts = 2.4 groups -> 2 groups
    assert budget_from_fraction(0.32, stats) == 12  # 2.56 groups -> 3
    plan = make_plan(stats, method="ream", fraction=0.32)
    assert plan.num_removed == 12 and all(n % 4 == 0 for n in plan.kept_per_layer)


@pytest.mark.parametrize(
    ("fraction", "message"),
    [
        (0.0, "must be in (0, 1)"),
        (1.0, "must be in (0, 1)"),
        (-0.5, "must be in (0, 1)"),
        (float("nan"), "must be a number in (0, 1)"),
        ("half", "must be a number in (0, 1)"),
        (True, "must be a number in (0, 1)"),
        (0.01, "rounds to 0 removed; expected at least 0.02778"),
        (0.9, "removes 16 of 18 experts, more than the 12 removable above the per-layer floors"),
    ],
)
def test_fraction_errors_are_one_line_and_name_the_flag(fraction, message):
    stats = _stats(3, 6)
    with pytest.raises(PlanError) as e:
        make_plan(stats, method="frequency", fraction=fraction)
    assert "fraction (--fraction)" in str(e.value) and message in str(e.value)
    assert "\n" not in str(e.value)


def test_fraction_respects_min_experts_and_excludes_other_budgets():
    stats = _stats(3, 6)
    make_plan(stats, method="grape", fraction=0.5)  # 9 of 18, floors 2: fine
    with pytest.raises(PlanError, match="more than the 6 removable"):
        make_plan(stats, method="grape", fraction=0.5, min_experts=4)
    for kw in ({"per_layer": 1}, {"budget": 3}):
        with pytest.raises(PlanError, match="give exactly one of budget"):
            make_plan(stats, method="grape", fraction=0.5, **kw)


CFG = MoEConfig(
    family="mixtral",
    vocab_size=64,
    hidden_size=16,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=8,
    moe_intermediate_size=8,
    num_experts=(8, 8),
    top_k=2,
    max_position_embeddings=64,
)


def test_fraction_is_checked_from_the_config_before_loading():
    check_plan_request(CFG, method="ream", budget=None, per_layer=None, fraction=0.75, options={})
    with pytest.raises(PlanError, match=r"fraction \(--fraction\) 0.8 removes 13 of 16 experts"):
        check_plan_request(CFG, method="ream", budget=None, per_layer=None, fraction=0.8, options={})


def test_cli_plan_with_fraction(tmp_path, capsys):
    path = str(tmp_path / "s.npz")
    _stats(3, 8).save(path)
    assert grape(["plan", path, "--method", "ream", "--fraction", "0.5", "--show"]) == 0
    out = capsys.readouterr().out
    assert "total removed: 12" in out and out.count("      8      4       4") == 3
    assert grape(["plan", path, "--fraction", "1.5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("grape: error: fraction (--fraction) must be in (0, 1)") and err.count("\n") == 1
    with pytest.raises(SystemExit):  # argparse: mutually exclusive with --per-layer
        grape(["plan", path, "--fraction", "0.5", "--per-layer", "1"])
    assert "not allowed with argument" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ REAM


def reference_ream(ls: LayerStats, removed: int, group_size: int) -> list[tuple[list[int], list[float], int]]:
    """Float64 NumPy transcription of REAM's grouping (the paper's `pseudo_group` and merge weights), on
    the statistics the planner reads: [(members, weights aligned with members, centroid)] per group."""
    e = ls.num_experts
    s = np.array(ls.reap, np.float64)
    if (s == 0).any():
        s[s == 0] = min(0.5, s[s > 0].min())
    cos = np.array(ls.sim["cos_mean"], np.float64)
    rho = np.array(ls.sim["router"], np.float64)
    d_gate = np.sqrt(np.maximum(2 - 2 * rho, 0))
    sim = ((cos + 1) / 2 + (1 - d_gate / d_gate.max())) / 2
    d = 1 - sim
    k = e - removed
    centroids = sorted(range(e), key=lambda i: (-s[i], i))[:k]
    label = -np.ones(e, int)
    label[centroids] = np.arange(k)
    if group_size == 0:
        for j in range(e):
            if label[j] < 0:
                label[j] = min(range(k), key=lambda c: (d[centroids[c], j], centroids[c]))
    else:
        for c in centroids:
            group = [c]
            for j in sorted(range(e), key=lambda j: (d[c, j], j)):
                if len(group) >= group_size:
                    break
                if j != c and label[j] < 0:
                    group.append(j)
            label[group] = label[c]
            if (label >= 0).all():
                break
    out = []
    for c in range(k):
        members = sorted(np.flatnonzero(label == c).tolist())
        w = s[members] / s[members].sum()
        out.append((members, w.tolist(), centroids[c]))
    return sorted(out, key=lambda t: min(t[0]))


def _hand_layer():
    """6 experts; saliency order 0 > 4 > 2 > 5 > 1 > 3 (expert 3 never routed); similarities chosen so
    the nearest expert of each centroid is plain to see."""
    c = np.full((6, 6), 0.1)
    for (i, j), v in {(0, 5): 0.9, (0, 1): 0.7, (0, 3): 0.4, (4, 3): 0.8, (4, 1): 0.3, (2, 1): 0.6}.items():
        c[i, j] = c[j, i] = v
    np.fill_diagonal(c, 1.0)
    return _layer(0, 6, k=1, reap=[0.9, 0.1, 0.5, 0.0, 0.7, 0.2], cos=c, router=c)


@pytest.mark.parametrize(
    ("group_size", "groups", "weights"),
    [
        # C = 16 (default): the most salient centroid absorbs every removed expert ("pseudo-pruning")
        (16, [(0, 1, 3, 5), (2,), (4,)], [(0.9 / 1.3, 0.1 / 1.3, 0.1 / 1.3, 0.2 / 1.3), (1.0,), (1.0,)]),
        # C = 2: each centroid in saliency order takes its nearest free expert: 0<-5, 4<-3, 2<-1
        (2, [(0, 5), (1, 2), (3, 4)], [(0.9 / 1.1, 0.2 / 1.1), (0.1 / 0.6, 0.5 / 0.6), (0.1 / 0.8, 0.7 / 0.8)]),
        # C = 0 (MC-SMoE): every free expert to its nearest centroid: 1->0 (0.7 > 0.6), 3->4, 5->0
        (0, [(0, 1, 5), (2,), (3, 4)], [(0.9 / 1.2, 0.1 / 1.2, 0.2 / 1.2), (1.0,), (0.1 / 0.8, 0.7 / 0.8)]),
    ],
)
def test_ream_hand_case(group_size, groups, weights):
    stats = ModelStats((_hand_layer(),))
    plan = make_plan(stats, method="ream", budget=3, group_size=group_size)
    lp = plan.layers[0]
    assert plan.operator == "aligned" and plan.router_rule == "dominant"
    assert [tuple(g) for g in lp.groups] == groups
    np.testing.assert_allclose(np.concatenate(lp.weights), np.concatenate(weights), rtol=1e-12)
    assert list(lp.dominant) == [0, 2, 4]
    ref = reference_ream(stats.layers[0], 3, group_size)
    assert [(list(g), d) for g, d in zip(lp.groups, lp.dominant)] == [(m, c) for m, _, c in ref]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("group_size", [0, 2, 4, 16])
def test_ream_matches_the_numpy_reference_on_random_stats(seed, group_size):
    rng = np.random.default_rng(seed)
    e = int(rng.integers(5, 13))
    stats = ModelStats(
        tuple(_layer(l, e, reap=np.where(rng.random(e) < 0.2, 0.0, rng.random(e)), seed=seed) for l in range(3))
    )
    per_layer = int(rng.integers(1, e - 2))
    if group_size and (e - per_layer) * group_size < e:
        with pytest.raises(PlanError, match="group_size"):
            make_plan(stats, method="ream", per_layer=per_layer, group_size=group_size)
        return
    plan = make_plan(stats, method="ream", per_layer=per_layer, group_size=group_size)
    for ls, lp in zip(stats.layers, plan.layers, strict=True):
        ref = reference_ream(ls, per_layer, group_size)
        assert [list(g) for g in lp.groups] == [m for m, _, _ in ref]
        assert list(lp.dominant) == [c for _, _, c in ref]
        for w, (_, rw, _) in zip(lp.weights, ref, strict=True):
            np.testing.assert_allclose(w, rw, rtol=1e-12)


def test_ream_options_errors():
    stats = ModelStats((_hand_layer(),))
    with pytest.raises(PlanError, match="group_size must be an integer >= 0"):
        make_plan(stats, method="ream", budget=3, group_size=-1)
    with pytest.raises(PlanError, match="similarity 'l2' unknown"):
        make_plan(stats, method="ream", budget=3, similarity="l2")
    with pytest.raises(PlanError, match="group_size 1 too small: 3 centroids absorb at most 3 of 6 experts"):
        make_plan(stats, method="ream", budget=3, group_size=1)


REAM_CFG = MoEConfig(
    family="mixtral",
    vocab_size=64,
    hidden_size=16,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    head_dim=8,
    moe_intermediate_size=12,
    num_experts=(6,),
    top_k=1,
    max_position_embeddings=64,
)


@pytest.mark.parametrize("operator", ["freq", "aligned"])
def test_ream_merged_weights_match_numpy(operator):
    """The merged experts are the saliency-weighted averages (after neuron alignment to the centroid for
    'aligned'), and each keeps its centroid's router column."""
    model = model_from_arrays(REAM_CFG, init_params(REAM_CFG, seed=3, scale=0.3))
    stats = ModelStats((_hand_layer(),))
    plan = make_plan(stats, method="ream", budget=3, group_size=2, operator=operator)
    merged = merge_model(model, plan)
    before = {k: np.asarray(v, np.float64) for k, v in param_view(model).items()}
    after = param_view(merged)
    p = "layers.0.mlp."
    sal = {0: 0.9, 1: 0.1, 2: 0.5, 3: 0.1, 4: 0.7, 5: 0.2}
    for row, (members, centroid) in enumerate([((0, 5), 0), ((1, 2), 2), ((3, 4), 4)]):
        alpha = [sal[m] / sum(sal[x] for x in members) for m in members]
        if operator == "aligned":
            host = {k: before[p + k] for k in ("w_gate", "w_up", "w_down")}
            want = align_and_average(host, list(members), alpha, anchor=centroid)
        else:
            want = {k: sum(a * before[p + k][m] for m, a in zip(members, alpha)) for k in ("w_gate", "w_up", "w_down")}
        for k in ("w_gate", "w_up", "w_down"):
            np.testing.assert_allclose(np.asarray(after[p + k][row]), want[k], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(after[p + "router"])[:, row], before[p + "router"][:, centroid])
    assert math.isclose(sum(plan.layers[0].weights[0]), 1.0)
