"""Score-based pruning baselines: drop the least-routed (`frequency`), lowest-REAP (`reap`) or random
experts. Uniform per layer by default; `global_rank=True` ranks all experts across layers by their
score's share of its layer's total (so layers with different scales compare) and drops the lowest,
still respecting every layer's floor."""

from __future__ import annotations

import numpy as np

from grape_jax.plan import Plan, build_plan
from grape_jax.planners.common import check_budget, floors, uniform_allocation
from grape_jax.stats import ModelStats


def _drop(stats: ModelStats, scores: list[np.ndarray], *, budget: int, global_rank: bool, min_experts: int) -> list[list[int]]:
    floor = floors(stats, min_experts)
    check_budget(stats, budget, floor)
    dropped: list[list[int]] = [[] for _ in stats.layers]
    if not global_rank:
        alloc = uniform_allocation(stats, budget, floor, [-float(np.sum(s)) for s in scores])
        for layer, (s, r) in enumerate(zip(scores, alloc, strict=True)):
            dropped[layer] = sorted(int(e) for e in np.lexsort((np.arange(len(s)), s))[:r])
        return dropped
    keys = []
    for layer, s in enumerate(scores):
        total = float(np.sum(s))
        share = s / total if total > 0 else np.zeros_like(s)
        keys += [(float(share[e]), layer, e) for e in range(len(s))]
    keys.sort()
    room = [ls.num_experts - f for ls, f in zip(stats.layers, floor, strict=True)]
    left = budget
    for _, layer, e in keys:
        if left == 0:
            break
        if len(dropped[layer]) < room[layer]:
            dropped[layer].append(e)
            left -= 1
    return [sorted(d) for d in dropped]


def _plan(stats, method, scores, *, budget, global_rank, min_experts, seed, stats_sha256) -> Plan:
    dropped = _drop(stats, scores, budget=budget, global_rank=global_rank, min_experts=min_experts)
    groups = [[[e] for e in range(ls.num_experts) if e not in set(d)] for ls, d in zip(stats.layers, dropped, strict=True)]
    return build_plan(stats, groups, method=method, budget=budget, operator="dominant", router_rule="dominant",
                      dropped_per_layer=dropped, seed=seed, stats_sha256=stats_sha256,
                      options=dict(global_rank=global_rank, min_experts=min_experts))


def frequency(stats: ModelStats, *, budget: int, global_rank: bool = False, min_experts: int = 0,
              stats_sha256: str | None = None) -> Plan:
    return _plan(stats, "frequency", [ls.freq for ls in stats.layers], budget=budget, global_rank=global_rank,
                 min_experts=min_experts, seed=None, stats_sha256=stats_sha256)


def reap(stats: ModelStats, *, budget: int, global_rank: bool = False, min_experts: int = 0,
         stats_sha256: str | None = None) -> Plan:
    """REAP importance: mean over the tokens routed to an expert of gate·‖y‖ (0 if never routed)."""
    return _plan(stats, "reap", [ls.reap for ls in stats.layers], budget=budget,
                 global_rank=global_rank, min_experts=min_experts, seed=None, stats_sha256=stats_sha256)


def random(stats: ModelStats, *, budget: int, seed: int = 0, global_rank: bool = False, min_experts: int = 0,
           stats_sha256: str | None = None) -> Plan:
    rng = np.random.default_rng(seed)
    scores = [rng.random(ls.num_experts) for ls in stats.layers]
    return _plan(stats, "random", scores, budget=budget, global_rank=global_rank, min_experts=min_experts,
                 seed=seed, stats_sha256=stats_sha256)
