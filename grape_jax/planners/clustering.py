"""Clustering baselines, uniform per layer (B // L merges each; the remainder one each to the layers with the
largest total similarity, ties to the lowest layer; see `uniform_allocation`).

hc-smoe: average-linkage (UPGMA) agglomerative clustering on the similarity of the experts' mean outputs
  ('cos_mean' by default) down to N - r clusters per layer; ties -> lowest pair of cluster roots.
m-smoe: the N - r most frequently routed experts are centres (ties -> lowest id); every other expert joins
  the centre it is most similar to ('cka' by default; ties -> lowest centre id).
Both merge groups with `operator` (default 'freq', as the papers do: frequency-weighted averages).
"""

from __future__ import annotations

import numpy as np

from grape_jax.calibration.stats import ModelStats
from grape_jax.planners.common import check_choice, floors, uniform_allocation
from grape_jax.planners.grape import MERGE_OPERATORS, LayerClusters
from grape_jax.planners.plan import Plan, build_plan


def hc_smoe(
    stats: ModelStats,
    *,
    budget: int,
    metric: str = "cos_mean",
    operator: str = "freq",
    router_rule: str = "dominant",
    min_experts: int = 0,
) -> Plan:
    """Average-linkage hierarchical clustering per layer (module docstring)."""
    check_choice("operator", operator, MERGE_OPERATORS)
    floor = floors(stats, min_experts)
    sims = [ls.similarity(metric) for ls in stats.layers]
    alloc = uniform_allocation(stats, budget, floor, [float(s.sum()) for s in sims])
    groups = []
    for sim, r in zip(sims, alloc, strict=True):
        state = LayerClusters(sim, "average")
        for _ in range(r):
            state.merge(*state.best())
        groups.append(state.groups())
    return build_plan(
        stats,
        groups,
        method="hc-smoe",
        budget=budget,
        operator=operator,
        router_rule=router_rule,
        options=dict(metric=metric, min_experts=min_experts),
        diagnostics={"removed_per_layer": alloc},
    )


def m_smoe(
    stats: ModelStats,
    *,
    budget: int,
    metric: str = "cka",
    operator: str = "freq",
    router_rule: str = "dominant",
    min_experts: int = 0,
) -> Plan:
    """Most-frequent experts as centres, the rest join their most similar centre (module docstring)."""
    check_choice("operator", operator, MERGE_OPERATORS)
    floor = floors(stats, min_experts)
    sims = [ls.similarity(metric) for ls in stats.layers]
    alloc = uniform_allocation(stats, budget, floor, [float(s.sum()) for s in sims])
    groups = []
    for ls, sim, r in zip(stats.layers, sims, alloc, strict=True):
        e = ls.num_experts
        centres = sorted(int(c) for c in np.lexsort((np.arange(e), -ls.freq))[: e - r])
        members = {c: [c] for c in centres}
        for x in range(e):
            if x not in members:
                members[max(centres, key=lambda c: (sim[x, c], -c))].append(x)
        groups.append([members[c] for c in centres])
    return build_plan(
        stats,
        groups,
        method="m-smoe",
        budget=budget,
        operator=operator,
        router_rule=router_rule,
        options=dict(metric=metric, min_experts=min_experts),
        diagnostics={"removed_per_layer": alloc},
    )
