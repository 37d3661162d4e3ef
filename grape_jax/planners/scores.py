"""Score-based pruning baselines: drop the least-routed (`frequency`), lowest-REAP (`reap`) or random
(`random`, seeded) experts.

Allocation: uniform per layer by default (B // L each; the remainder one each to the layers with the
lowest total score, ties to the lowest layer; see `uniform_allocation`). With `global_rank=True` all experts
of all layers are ranked together by their score's share of its layer's total, s_i / Σ_j s_j (frequencies
sum to top_k in every layer, but REAP scores carry each layer's output scale, so raw scores would not
compare); the lowest shares go first (ties -> lowest layer, then lowest id), never below a layer's floor.
A layer whose scores are all 0 has shares 0. Under a group-limited router the global removals per layer
are rounded to whole groups (`snap_allocation`) and each layer drops its lowest scores.

Operator: 'drop' (default) removes the chosen experts (listed in `dropped`). 'freq', 'uniform' or
'dominant' instead fold each removed expert into the kept expert it is most similar to (`metric`, default
'cka'; ties -> lowest id) and merge every such group with that operator; the kept expert is the group's
router representative, so 'dominant' equals 'drop' in weights and differs only under router rule 'mean'.
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Float

from grape_jax.calibration.stats import ModelStats
from grape_jax.planners.common import check_budget, check_choice, floors, snap_allocation, uniform_allocation
from grape_jax.planners.plan import OPERATORS, Plan, build_plan

PRUNE_OPERATORS = ("drop",) + OPERATORS


def lowest(scores: Float[np.ndarray, " experts"], count: int) -> list[int]:
    """Ids of the `count` lowest scores (ties -> lowest id), ascending."""
    return sorted(int(e) for e in np.lexsort((np.arange(len(scores)), scores))[:count])


def choose_dropped(
    stats: ModelStats, scores: list[np.ndarray], *, budget: int, global_rank: bool, min_experts: int
) -> list[list[int]]:
    """Experts to remove per layer (module docstring)."""
    floor = floors(stats, min_experts)
    check_budget(stats, budget, floor)
    if not global_rank:
        alloc = uniform_allocation(stats, budget, floor, [-float(np.sum(s)) for s in scores])
        return [lowest(s, r) for s, r in zip(scores, alloc, strict=True)]
    keys = []
    for layer, s in enumerate(scores):
        total = float(np.sum(s))
        share = s / total if total > 0 else np.zeros_like(s)
        keys += [(float(share[e]), layer, e) for e in range(len(s))]
    keys.sort()
    room = [ls.num_experts - int(f) for ls, f in zip(stats.layers, floor, strict=True)]
    dropped: list[list[int]] = [[] for _ in stats.layers]
    left = budget
    for _, layer, e in keys:
        if left == 0:
            break
        if len(dropped[layer]) < room[layer]:
            dropped[layer].append(e)
            left -= 1
    removed = snap_allocation(stats, [len(d) for d in dropped])
    return [lowest(s, r) if r != len(d) else sorted(d) for s, d, r in zip(scores, dropped, removed, strict=True)]


def _plan(
    stats: ModelStats,
    method: str,
    scores: list[np.ndarray],
    *,
    budget: int,
    global_rank: bool,
    min_experts: int,
    operator: str,
    router_rule: str,
    metric: str,
    seed: int | None,
) -> Plan:
    check_choice("operator", operator, PRUNE_OPERATORS)
    dropped = choose_dropped(stats, scores, budget=budget, global_rank=global_rank, min_experts=min_experts)
    options = dict(global_rank=global_rank, min_experts=min_experts)
    groups, dominant = [], []
    for ls, d in zip(stats.layers, dropped, strict=True):
        gone = set(d)
        kept = [e for e in range(ls.num_experts) if e not in gone]
        members = {k: [k] for k in kept}
        if operator != "drop":
            sim = ls.similarity(metric)
            for x in d:
                members[max(kept, key=lambda k: (sim[x, k], -k))].append(x)
        groups.append([members[k] for k in kept])
        dominant.append(kept)
    if operator == "drop":
        return build_plan(
            stats,
            groups,
            method=method,
            budget=budget,
            operator="drop",
            router_rule=router_rule,
            dropped_per_layer=dropped,
            seed=seed,
            options=options,
        )
    return build_plan(
        stats,
        groups,
        method=method,
        budget=budget,
        operator=operator,
        router_rule=router_rule,
        dominant_per_layer=dominant,
        seed=seed,
        options={**options, "folded_by": metric},
    )


def frequency(
    stats: ModelStats,
    *,
    budget: int,
    global_rank: bool = False,
    operator: str = "drop",
    router_rule: str = "dominant",
    metric: str = "cka",
    min_experts: int = 0,
) -> Plan:
    """Drop the least-routed experts (routing frequency under the model's own router)."""
    return _plan(
        stats,
        "frequency",
        [ls.freq for ls in stats.layers],
        budget=budget,
        global_rank=global_rank,
        min_experts=min_experts,
        operator=operator,
        router_rule=router_rule,
        metric=metric,
        seed=None,
    )


def reap(
    stats: ModelStats,
    *,
    budget: int,
    global_rank: bool = False,
    operator: str = "drop",
    router_rule: str = "dominant",
    metric: str = "cka",
    min_experts: int = 0,
) -> Plan:
    """Drop the lowest REAP scores: mean over routed tokens of gate·‖y‖ (0 if never routed)."""
    return _plan(
        stats,
        "reap",
        [ls.reap for ls in stats.layers],
        budget=budget,
        global_rank=global_rank,
        min_experts=min_experts,
        operator=operator,
        router_rule=router_rule,
        metric=metric,
        seed=None,
    )


def random(
    stats: ModelStats,
    *,
    budget: int,
    seed: int = 0,
    global_rank: bool = False,
    operator: str = "drop",
    router_rule: str = "dominant",
    metric: str = "cka",
    min_experts: int = 0,
) -> Plan:
    """Drop experts chosen by uniform random scores from numpy's default_rng(seed) (one draw per layer)."""
    rng = np.random.default_rng(seed)
    scores = [rng.random(ls.num_experts) for ls in stats.layers]
    return _plan(
        stats,
        "random",
        scores,
        budget=budget,
        global_rank=global_rank,
        min_experts=min_experts,
        operator=operator,
        router_rule=router_rule,
        metric=metric,
        seed=seed,
    )
