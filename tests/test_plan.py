"""The Plan record: operator weights, canonical layout, validation errors naming fields, JSON and files."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from grape_jax.calibration.stats import LayerStats, ModelStats
from grape_jax.core.config import ExpertCountRule
from grape_jax.planners.plan import LayerPlan, Plan, PlanError, build_plan, group_weights, layer_plan


def stats_of(freqs, top_k=1):
    layers = []
    for l, f in enumerate(freqs):
        f = np.asarray(f, np.float64)
        e = len(f)
        layers.append(LayerStats(l, 10, top_k, f, f, f, {"cka": np.eye(e)}))
    return ModelStats(tuple(layers))


STATS = stats_of([[0.1, 0.4, 0.3, 0.2], [0.0, 0.0, 0.5, 0.5], [0.25, 0.25, 0.25, 0.25]])


def merge_plan(operator="freq", router_rule="dominant") -> Plan:
    groups = [[[2, 0], [1], [3]], [[3], [1, 0, 2]], [[0], [1], [2], [3]]]
    return build_plan(
        STATS,
        groups,
        method="test",
        budget=3,
        operator=operator,
        router_rule=router_rule,
        options={"gamma": 0.01, "pair": (1, 2)},
        seed=7,
        diagnostics={"restarts": 2, "entropy": np.float64(0.5), "order": np.array([1, 0])},
    )


# ---------------------------------------------------------------------------------- operators


def test_group_weights_by_hand():
    f = np.array([0.1, 0.4, 0.3, 0.2])
    w, d = group_weights([0, 2, 3], f, "freq")
    np.testing.assert_allclose(w, [0.1 / 0.6, 0.3 / 0.6, 0.2 / 0.6], rtol=1e-15)
    assert d == 2
    assert group_weights([0, 2, 3], f, "uniform") == ((1 / 3, 1 / 3, 1 / 3), 2)
    assert group_weights([0, 2, 3], f, "dominant") == ((0.0, 1.0, 0.0), 2)
    zero = np.zeros(4)
    assert group_weights([1, 3], zero, "freq") == ((0.5, 0.5), 1)  # all never routed -> uniform
    tie = np.array([0.3, 0.1, 0.3, 0.3])
    assert group_weights([3, 2, 0], tie, "dominant") == ((0.0, 0.0, 1.0), 0)  # tie -> lowest id
    assert group_weights([2], f, "drop") == ((1.0,), 2)
    with pytest.raises(PlanError, match="operator 'avg' unknown; expected one of"):
        group_weights([0, 1], f, "avg")
    with pytest.raises(PlanError, match="operator 'drop' keeps singletons"):
        group_weights([0, 1], f, "drop")


def test_layer_plan_is_canonical_and_dominant_override():
    ls = STATS.layers[0]
    lp = layer_plan(ls, [[3], [2, 0], [1]], "dominant", dominant=[3, 2, 1])
    assert lp.groups == ((0, 2), (1,), (3,))
    assert lp.dominant == (2, 1, 3)
    assert lp.weights == ((0.0, 1.0), (1.0,), (1.0,))
    lp = layer_plan(ls, [[3, 1], [0, 2]], "dominant", dominant=[3, 0])  # override a less frequent member
    assert lp.groups == ((0, 2), (1, 3)) and lp.dominant == (0, 3)
    assert lp.weights == ((1.0, 0.0), (0.0, 1.0))


def test_build_plan_counts_and_recipe():
    plan = merge_plan()
    assert plan.kept_per_layer == (3, 2, 4)
    assert plan.num_removed == 3 == plan.budget
    assert plan.layers[0].groups == ((0, 2), (1,), (3,))
    np.testing.assert_allclose(plan.layers[0].weights[0], [0.25, 0.75])
    assert plan.layers[1].groups == ((0, 1, 2), (3,))
    assert plan.layers[1].weights[0] == (0.0, 0.0, 1.0) and plan.layers[1].dominant[0] == 2
    assert plan.options == {"gamma": 0.01, "pair": [1, 2]}
    assert plan.diagnostics == {"restarts": 2, "entropy": 0.5, "order": [1, 0]}
    with pytest.raises(PlanError, match="router_rule 'avg' unknown"):
        build_plan(STATS, [[[0, 1, 2, 3]]] * 3, method="x", budget=9, router_rule="avg")
    with pytest.raises(PlanError, match="budget: plan removes 9 experts but its budget is 8"):
        build_plan(STATS, [[[0, 1, 2, 3]]] * 3, method="x", budget=8)


def test_identity():
    plan = Plan.identity(STATS)
    assert plan.budget == plan.num_removed == 0
    assert plan.kept_per_layer == (4, 4, 4)
    assert all(lp.groups == ((0,), (1,), (2,), (3,)) and lp.dropped == () for lp in plan.layers)


# ------------------------------------------------------------------------------ JSON and files


@pytest.mark.parametrize("operator,rule", [("freq", "dominant"), ("uniform", "mean"), ("dominant", "mean")])
def test_json_round_trip_equal(operator, rule):
    plan = merge_plan(operator, rule)
    again = Plan.from_json(plan.to_json())
    assert again == plan
    assert again.to_json() == plan.to_json()
    d = json.loads(plan.to_json())
    assert d["kept_per_layer"] == [3, 2, 4] and d["router_rule"] == rule and d["seed"] == 7


def test_pruning_plan_round_trip():
    groups = [[[0], [2]], [[1], [2], [3]], [[0], [1], [2], [3]]]
    plan = build_plan(STATS, groups, method="frequency", budget=3, operator="drop", dropped_per_layer=[[3, 1], [0], []])
    assert plan.layers[0].dropped == (1, 3)
    assert Plan.from_json(plan.to_json()) == plan


def test_save_load_atomic(tmp_path, monkeypatch):
    plan = merge_plan()
    path = tmp_path / "sub" / "plan.json"
    plan.save(path)
    assert Plan.load(path) == plan
    assert path.read_text() == plan.to_json()
    other = Plan.identity(STATS)
    other.save(path)  # overwrite
    assert Plan.load(path) == other
    assert sorted(os.listdir(path.parent)) == ["plan.json"]

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        plan.save(path)
    monkeypatch.undo()
    assert Plan.load(path) == other  # the old file is untouched, no temp file is left
    assert sorted(os.listdir(path.parent)) == ["plan.json"]
    with pytest.raises(PlanError, match="plan file not found"):
        Plan.load(tmp_path / "missing.json")


def test_stale_kept_per_layer_is_recomputed():
    d = json.loads(merge_plan().to_json())
    d["kept_per_layer"] = [1, 1, 1]
    assert Plan.from_dict(d).kept_per_layer == (3, 2, 4)


def _mutate(fn):
    d = json.loads(merge_plan().to_json())
    fn(d)
    return d


def _set(d, path, value):
    *head, last = path
    for k in head:
        d = d[k]
    d[last] = value


BAD = [
    (lambda d: d.pop("layers"), r"plan\.layers: missing"),
    (lambda d: d.pop("budget"), r"plan\.budget: missing"),
    (lambda d: _set(d, ["layers"], {}), r"layers: expected a list"),
    (lambda d: _set(d, ["layers", 0, "groups"], "abc"), r"layers\[0\]\.groups: expected a list"),
    (lambda d: _set(d, ["layers", 0, "layer"], "0"), r"layers\[0\]\.layer: expected an integer"),
    (lambda d: _set(d, ["layers", 1, "weights", 0, 2], "1"), r"layers\[1\]\.weights\[0\]: expected a number"),
    (lambda d: _set(d, ["budget"], 2.5), r"budget: expected an integer"),
    (lambda d: _set(d, ["options"], [1]), r"options: expected a JSON object"),
    (
        lambda d: _set(d, ["layers", 0, "groups", 1], [1, 2]),
        r"layers\[0\] \(layer 0\)\.groups \+ dropped must partition range\(4\) exactly \(missing \[\], repeated \[2\]",
    ),
    (
        lambda d: _set(d, ["layers", 0, "groups", 2], [4]),
        r"layers\[0\] \(layer 0\)\.groups \+ dropped must partition range\(4\) exactly \(missing \[3\], repeated \[\], "
        r"out of range \[4\]\)",
    ),
    (
        lambda d: _set(d, ["layers", 0, "weights", 0], [-0.25, 1.25]),
        r"layers\[0\] \(layer 0\)\.weights\[0\]: \[-0\.25, 1\.25\] must be finite, >= 0 and sum to 1",
    ),
    (lambda d: _set(d, ["layers", 0, "weights", 0], [0.25, 0.7]), r"weights\[0\]: .* sum to 1"),
    (lambda d: _set(d, ["layers", 0, "weights", 0], [1.0]), r"layers\[0\] \(layer 0\)\.weights\[0\]: 1 weights"),
    (lambda d: _set(d, ["layers", 0, "weights"], [[1.0]]), r"\.weights: 1 entries for 3 groups"),
    (lambda d: _set(d, ["layers", 0, "dominant", 0], 3), r"\.dominant\[0\]: 3 is not a member of group \[0, 2\]"),
    (lambda d: _set(d, ["layers", 0, "groups"], [[1], [0, 2], [3]]), r"\.groups: not canonical"),
    (lambda d: _set(d, ["layers", 0, "groups"], [[2, 0], [1], [3]]), r"\.groups: not canonical"),
    (lambda d: _set(d, ["layers", 0, "groups"], [[0, 2], [], [1], [3]]), r"\.groups\[1\]: empty group"),
    (lambda d: _set(d, ["layers", 2, "layer"], 0), r"layers: layer ids must be strictly increasing"),
    (lambda d: _set(d, ["budget"], 4), r"budget: plan removes 3 experts but its budget is 4"),
    (lambda d: _set(d, ["operator"], "avg"), r"operator: 'avg' unknown; expected one of"),
    (lambda d: _set(d, ["router_rule"], "max"), r"router_rule: 'max' unknown; expected one of"),
    (lambda d: _set(d, ["operator"], "dominant"), r"weights\[0\]: operator 'dominant' needs weight 1 on member 2"),
    (lambda d: _set(d, ["operator"], "drop"), r"groups\[0\]: operator 'drop' keeps singletons"),
    (lambda d: _set(d, ["layers", 0, "num_experts_before"], 0), r"num_experts_before: expected >= 1"),
]


@pytest.mark.parametrize("mutate,message", BAD)
def test_invalid_plans_name_the_field(mutate, message, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_mutate(mutate)))
    with pytest.raises(PlanError, match=message) as info:
        Plan.load(path)
    assert str(info.value).startswith(f"{path}: ")
    assert "\n" not in str(info.value)


def test_invalid_json():
    with pytest.raises(PlanError, match=r"^recipe: invalid JSON"):
        Plan.from_json("{not json", source="recipe")
    with pytest.raises(PlanError, match=r"^plan: plan: expected a JSON object, got list"):
        Plan.from_json("[1, 2]")


def test_expert_count_rule_is_one_statement():
    """The router's expert-count rule, as the config, the stats, the planners and merge all read it."""
    rule = ExpertCountRule(top_k=2, least=2)
    assert rule.floor() == 2 and rule.floor(min_experts=3) == 3
    assert rule.problem(2) is None and rule.problem(1) == (
        "keeps 1 experts; needs at least 2 (max(top_k=2, router minimum=2, min_experts=0))"
    )
    assert "needs at least 3" in rule.problem(2, min_experts=3)
    grouped = ExpertCountRule(top_k=3, least=4, multiple=4)
    assert grouped.floor() == 4 and grouped.floor(min_experts=5) == 8
    assert grouped.problem(8) is None and "and a multiple of 4 (n_group)" in grouped.problem(6)
    assert [ls.expert_rule for ls in STATS.layers] == [ExpertCountRule(1, 1, 1)] * 3


def test_layer_plan_validate_direct():
    lp = LayerPlan(0, 3, ((0, 1),), ((0.5, 0.5),), (0,), dropped=(2,))
    lp.validate()
    with pytest.raises(PlanError, match=r"dropped: expected ascending ids"):
        LayerPlan(0, 4, ((0, 1),), ((0.5, 0.5),), (0,), dropped=(3, 2)).validate()
    with pytest.raises(PlanError, match=r"groups: a layer must keep at least one expert"):
        LayerPlan(0, 2, (), (), (), dropped=(0, 1)).validate()
