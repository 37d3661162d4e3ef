"""grape-r: GRAPE's global greedy and entropy guard, driven by the routed substitution cost.

From the calibration moments M[i, j] = Σ_t g_i <y_i, y_j> and N[i, j] = Σ_t g_i ‖y_j‖², the cost of serving
expert i's routed tokens with expert j's output is C[i, j] = N[i, i] + N[i, j] - 2 M[i, j]
= Σ_t g_i ‖y_i - y_j‖² (the squared error added to the layer output), optionally divided by the layer's
routed output energy Σ_i N[i, i]. A never-routed expert costs 0 to remove and identical
experts cost 0 to merge, which similarity-only planners cannot see.

Each cluster is served by one representative expert. Absorbing cluster A into cluster B costs
Σ_{i∈A} C[i, rep_B] - Σ_{i∈A} C[i, rep_A]; it is computed from the running row sums
CA[A, :] = Σ_{i∈A} C[i, :], updated after each merge, so no second calibration pass is needed. The
cheapest absorption anywhere (among layers the entropy guard allows) is taken each step.

Defaults (measured on the demo model, BENCHMARKS.md): costs are absolute (`normalise='none'`: the squared
error added to the residual stream, which is what the next layer sees) and the entropy guard is off
(`guard='none'`): both the per-layer energy normalisation and the guard moved removals into layers where
they hurt held-out perplexity. Both remain options (`normalise=energy`, `guard=entropy|cap`).
The cost models a member's tokens as served by its group's representative (kept as is by the 'dominant'
operator). It is an estimate: the pruned router may send those tokens to another expert, and for
averaging operators the merged expert is approximated by its representative (the exact cost of an
average needs third-order moments).
"""

from __future__ import annotations

import numpy as np

from grape_jax.plan import Plan, PlanError, build_plan
from grape_jax.planners.common import EntropyGuard, check_budget, floors
from grape_jax.stats import LayerStats, ModelStats


NORMALISATIONS = ("energy", "none")


def substitution_cost(ls: LayerStats, normalise: str = "energy") -> np.ndarray:
    """C[i, j] (see module docstring), divided by the layer's routed output energy unless
    `normalise='none'`; rows of never-routed experts are 0."""
    if normalise not in NORMALISATIONS:
        raise PlanError(f"normalise {normalise!r} unknown; expected one of {NORMALISATIONS}")
    if ls.routed_m is None or ls.routed_n is None:
        raise PlanError(f"layer {ls.layer}: stats have no routed moments (routed_m/routed_n); recalibrate")
    m, n = ls.routed_m, ls.routed_n
    cost = np.diag(n)[:, None] + n - 2.0 * m
    energy = float(np.trace(n))
    cost = np.maximum(cost, 0.0)
    return cost / energy if energy > 0 and normalise == "energy" else cost


class CostClusters:
    def __init__(self, cost: np.ndarray):
        e = cost.shape[0]
        self.cost = cost
        self.rows = cost.copy()  # CA[cluster root, :]
        self.rep = {i: i for i in range(e)}
        self.members = {i: [i] for i in range(e)}
        self._best: tuple[float, int, int] | None = None

    @property
    def num_clusters(self) -> int:
        return len(self.members)

    def best(self) -> tuple[float, int, int]:
        """(cost, absorbed cluster A, absorbing cluster B) of the cheapest absorption in this layer."""
        if self._best is None:
            roots = np.array(sorted(self.members))
            reps = np.array([self.rep[r] for r in roots])
            sub = self.rows[np.ix_(roots, reps)]  # [A, B]: Σ_{i∈A} C[i, rep_B]
            delta = sub - np.diag(sub)[:, None]
            np.fill_diagonal(delta, np.inf)
            flat = int(np.argmin(delta))
            a, b = divmod(flat, len(roots))
            self._best = (float(delta[a, b]), int(roots[a]), int(roots[b]))
        return self._best

    def merge(self, a: int, b: int) -> None:
        self.rows[b] += self.rows[a]
        self.members[b] = sorted(self.members[b] + self.members.pop(a))
        self.rep.pop(a)
        self._best = None

    def groups_and_reps(self) -> tuple[list[list[int]], list[int]]:
        roots = sorted(self.members, key=lambda r: min(self.members[r]))
        return [self.members[r] for r in roots], [self.rep[r] for r in roots]


def grape_r(
    stats: ModelStats,
    *,
    budget: int,
    gamma: float = 0.01,
    guard: str = "none",
    cap_gamma: float = 1.0,
    operator: str = "dominant",
    router_rule: str = "dominant",
    normalise: str = "none",
    min_experts: int = 0,
    stats_sha256: str | None = None,
) -> Plan:
    floor = floors(stats, min_experts)
    check_budget(stats, budget, floor)
    states = [CostClusters(substitution_cost(ls, normalise)) for ls in stats.layers]
    g = EntropyGuard([s.num_clusters for s in states], gamma, guard, budget, cap_gamma)
    total_cost = 0.0
    for _ in range(budget):
        eligible = [s.num_clusters > f for s, f in zip(states, floor, strict=True)]
        allowed = g.allowed(eligible)
        costs = np.array([s.best()[0] if ok else np.inf for s, ok in zip(states, allowed, strict=True)])
        layer = int(np.argmin(costs))
        c, a, b = states[layer].best()
        states[layer].merge(a, b)
        g.merged(layer)
        total_cost += c
    groups, reps = zip(*(s.groups_and_reps() for s in states), strict=True)
    options = dict(gamma=gamma, guard=guard, cap_gamma=cap_gamma, normalise=normalise, min_experts=min_experts)
    return build_plan(stats, list(groups), method="grape-r", budget=budget, operator=operator,
                      router_rule=router_rule, dominant_per_layer=list(reps), options=options,
                      stats_sha256=stats_sha256, diagnostics={**g.diagnostics(), "estimated_cost": total_cost})
