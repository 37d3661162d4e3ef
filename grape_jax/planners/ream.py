"""REAM (Router-weighted Expert Activation Merging; Jha et al., 2026, "REAM: Merging Improves Pruning of
Experts in LLMs"), as a baseline planner, read from the paper's public code (`ream/ream.py`,
`ream/merger.py`, `ream/saliency.py`).

Per MoE layer, at a uniform budget (every layer keeps N - r experts, r = B // L, the remainder as in
`uniform_allocation`, ties to the layers with the lowest total saliency, like `reap`):
  1. Saliency s_i = REAP score (mean over tokens routed to i of gate_i * ||y_i||; `LayerStats.reap`);
     a zero score (never routed) becomes min(0.5, the smallest positive score), so unused experts can be
     merged, as the paper's code does.
  2. Centroids: the N - r most salient experts (ties -> lowest id).
  3. Pseudo-grouping (the paper's hyperparameter C = `group_size`, default 16): centroids in order of
     decreasing saliency each take the C - 1 nearest experts that are neither centroids nor already taken
     (nearest by distance 1 - similarity, ties -> lowest id), until every expert has a group. Most groups
     stay singletons and the most salient centroids absorb the rest ("pseudo-pruning"). `group_size=0` is
     the paper's MC-SMoE variant: each non-centroid joins its nearest centroid. A layer where the
     centroids cannot absorb everything (k * C < N) is an error naming `group_size`.
  4. Similarity `similarity='gated'` (the paper's gated similarity): the mean of (a) the cosine of the
     experts' mean outputs mapped to [0, 1], (1 + cos) / 2, and (b) 1 - D_ij / max D with D_ij the
     distance between the experts' normalised router-logit columns. Any `LayerStats` metric name
     ('cka', 'cos_mean', 'router', 'weight') may be used instead.
  5. Merge: each group is averaged with weights alpha_i = s_i / sum_group s (saliency, not frequency),
     after aligning the members' neurons to the centroid (operator 'aligned', the default; `grape_jax.
     alignment`), and the merged expert keeps the centroid's router column (router rule 'dominant').
     Operators 'freq' and 'uniform' average without alignment (with saliency and 1/|G| weights);
     'dominant' and 'fit' keep the centroid's weights (the fit refits the down projections).

Where this differs from the paper's code, because the planner works from one calibration pass of
statistics: (a) no sequential re-calibration (the paper re-forwards the calibration data through each
merged layer before grouping the next); (b) the output term uses the cosine of the experts' plain mean
outputs over all tokens (`cos_mean`) where the paper weights each token's output by its softmax router
probability first; (c) the router term uses the centred correlation of the logit columns (`router`),
D_ij = sqrt(2 - 2 rho_ij), where the paper normalises the uncentred columns; (d) alignment matches neurons
by weights (`grape_jax.merge.alignment`), where the paper's cost adds hidden-activation distances.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from jaxtyping import Float

from grape_jax.calibration.stats import SIMILARITY_METRICS, LayerStats, ModelStats
from grape_jax.planners.common import check_choice, floors, uniform_allocation
from grape_jax.planners.plan import OPERATORS, LayerPlan, Plan, PlanError, build_plan

SIMILARITIES = ("gated",) + SIMILARITY_METRICS
SALIENCY_WEIGHTED = ("freq", "aligned")  # operators whose α REAM sets from saliency


def saliency(ls: LayerStats) -> Float[np.ndarray, " experts"]:
    """REAP scores with zeros raised to min(0.5, smallest positive score) (all zero: all 1)."""
    s = np.asarray(ls.reap, np.float64).copy()
    positive = s[s > 0]
    s[s <= 0] = min(0.5, float(positive.min())) if positive.size else 1.0
    return s


def gated_similarity(ls: LayerStats) -> Float[np.ndarray, "experts experts"]:
    """(a + b) / 2 with a = (1 + cos of mean outputs) / 2 and b = 1 - D / max D, D_ij = sqrt(2 - 2 rho_ij)
    for rho the router-logit correlation (module docstring, step 4); diagonal 1."""
    out = (1.0 + np.asarray(ls.similarity("cos_mean"), np.float64)) / 2.0
    d = np.sqrt(np.clip(2.0 - 2.0 * np.asarray(ls.similarity("router"), np.float64), 0.0, None))
    gate = 1.0 - d / d.max() if d.max() > 0 else np.ones_like(d)
    sim = (out + gate) / 2.0
    np.fill_diagonal(sim, 1.0)
    return sim


def pseudo_groups(
    sal: Float[np.ndarray, " experts"], sim: Float[np.ndarray, "experts experts"], keep: int, group_size: int
) -> tuple[list[list[int]], list[int]]:
    """(groups, centroid of each group) of one layer (module docstring, steps 2-3)."""
    e = len(sal)
    ids = np.arange(e)
    order = [int(c) for c in np.lexsort((ids, -sal))[:keep]]  # most salient first, ties -> lowest id
    centroids = set(order)
    dist = 1.0 - sim
    members: dict[int, list[int]] = {c: [c] for c in order}
    taken = set(order)
    if group_size == 0:
        for x in range(e):
            if x not in taken:
                members[min(order, key=lambda c: (dist[x, c], c))].append(x)
    else:
        for c in order:
            if len(taken) == e:
                break
            for x in (int(x) for x in np.lexsort((ids, dist[c]))):
                if len(members[c]) >= group_size:
                    break
                if x not in taken and x not in centroids:
                    members[c].append(x)
                    taken.add(x)
        if len(taken) < e:
            raise PlanError(
                f"ream: group_size {group_size} too small: {keep} centroids absorb at most {keep * group_size} "
                f"of {e} experts; expected group_size >= {-(-e // keep)} (or 0: each expert to its nearest centroid)"
            )
    return [members[c] for c in order], order


def ream(
    stats: ModelStats,
    *,
    budget: int,
    group_size: int = 16,
    similarity: str = "gated",
    operator: str = "aligned",
    router_rule: str = "dominant",
    min_experts: int = 0,
) -> Plan:
    """REAP-salient centroids absorb their nearest experts, merged with saliency weights (module docstring)."""
    check_choice("operator", operator, OPERATORS)
    check_choice("similarity", similarity, SIMILARITIES)
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 0:
        raise PlanError(f"ream: group_size must be an integer >= 0 (the paper's C; 0: MC-SMoE), got {group_size!r}")
    floor = floors(stats, min_experts)
    sal = [saliency(ls) for ls in stats.layers]
    alloc = uniform_allocation(stats, budget, floor, [-float(s.sum()) for s in sal])
    groups, dominant = [], []
    for ls, s, r in zip(stats.layers, sal, alloc, strict=True):
        sim = gated_similarity(ls) if similarity == "gated" else np.asarray(ls.similarity(similarity), np.float64)
        g, c = pseudo_groups(s, sim, ls.num_experts - r, group_size)
        groups.append(g)
        dominant.append(c)
    plan = build_plan(
        stats,
        groups,
        method="ream",
        budget=budget,
        operator=operator,
        router_rule=router_rule,
        dominant_per_layer=dominant,
        options=dict(group_size=group_size, similarity=similarity, min_experts=min_experts),
        diagnostics={
            "removed_per_layer": alloc,
            "largest_group_per_layer": [max(len(x) for x in g) for g in groups],
            "weights": "saliency" if operator in SALIENCY_WEIGHTED else operator,
        },
    )
    if operator not in SALIENCY_WEIGHTED:
        return plan
    out = dataclasses.replace(
        plan, layers=tuple(_saliency_weighted(lp, s) for lp, s in zip(plan.layers, sal, strict=True))
    )
    out.validate()
    return out


def _saliency_weighted(lp: LayerPlan, s: np.ndarray) -> LayerPlan:
    """`lp` with each group's α = s_i / Σ_group s (members in the plan's canonical order)."""
    weights = tuple(tuple(float(s[e] / s[list(g)].sum()) for e in g) for g in lp.groups)
    return dataclasses.replace(lp, weights=weights)
