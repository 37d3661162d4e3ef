"""Clustering baselines, uniform per layer: HC-SMoE (average-linkage hierarchical clustering of the
experts' mean outputs) and M-SMoE (the most-routed experts are centres; every other expert joins the
centre it is most similar to)."""

from __future__ import annotations

import numpy as np

from grape_jax.plan import Plan, build_plan
from grape_jax.planners.common import floors, uniform_allocation
from grape_jax.planners.grape import LayerClusters
from grape_jax.stats import ModelStats


def hc_smoe(stats: ModelStats, *, budget: int, metric: str = "cos_mean", operator: str = "freq",
            router_rule: str = "dominant", min_experts: int = 0, stats_sha256: str | None = None) -> Plan:
    floor = floors(stats, min_experts)
    alloc = uniform_allocation(stats, budget, floor, [float(ls.similarity(metric).sum()) for ls in stats.layers])
    groups = []
    for ls, r in zip(stats.layers, alloc, strict=True):
        state = LayerClusters(ls.similarity(metric), "average")
        for _ in range(r):
            state.merge(*state.best())
        groups.append(state.groups())
    return build_plan(stats, groups, method="hc-smoe", budget=budget, operator=operator, router_rule=router_rule,
                      options=dict(metric=metric, min_experts=min_experts), stats_sha256=stats_sha256,
                      diagnostics={"allocation": alloc})


def m_smoe(stats: ModelStats, *, budget: int, metric: str = "cka", operator: str = "freq",
           router_rule: str = "dominant", min_experts: int = 0, stats_sha256: str | None = None) -> Plan:
    floor = floors(stats, min_experts)
    alloc = uniform_allocation(stats, budget, floor, [float(ls.similarity(metric).sum()) for ls in stats.layers])
    groups = []
    for ls, r in zip(stats.layers, alloc, strict=True):
        e = ls.num_experts
        centres = sorted(int(c) for c in np.lexsort((np.arange(e), -ls.freq))[: e - r])
        sim = ls.similarity(metric)
        members = {c: [c] for c in centres}
        for x in range(e):
            if x not in members:
                best = max(centres, key=lambda c: (sim[x, c], -c))
                members[best].append(x)
        groups.append([members[c] for c in centres])
    return build_plan(stats, groups, method="m-smoe", budget=budget, operator=operator, router_rule=router_rule,
                      options=dict(metric=metric, min_experts=min_experts), stats_sha256=stats_sha256,
                      diagnostics={"allocation": alloc})
