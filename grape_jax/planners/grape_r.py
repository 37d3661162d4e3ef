"""grape-r: GRAPE's global greedy, driven by the routed substitution cost instead of similarity.

From the calibration moments M[i, j] = Σ_t g_i(t) <y_i(t), y_j(t)> and N[i, j] = Σ_t g_i(t) ‖y_j(t)‖²,
serving expert i's routed tokens with expert j's output costs
    C[i, j] = N[i, i] + N[i, j] - 2 M[i, j] = Σ_t g_i(t) ‖y_i(t) - y_j(t)‖²,
the gate-weighted squared error added to the layer output. A never-routed expert costs 0 to remove and
identical experts cost 0 to merge, which similarity-only planners cannot see. With `normalise='energy'`
each layer's C is divided by its routed output energy Σ_i N[i, i] so layers compare on a relative scale.

Each cluster is served by one representative (initially itself). Absorbing cluster A into cluster B
(B's representative then serves A's tokens) costs Δ(A→B) = Σ_{i∈A} C[i, rep_B] - Σ_{i∈A} C[i, rep_A];
the running row sums CA[A, :] = Σ_{i∈A} C[i, :] are updated after each merge, so costs of groups come
from the moments without a second calibration pass. Each step takes the cheapest absorption anywhere in
the model among layers the guard allows and above their floor (ties -> lowest layer, then lowest (A, B)).
Per layer the Δ matrix and its row minima are kept and only the touched row/column is recomputed, so a
step costs O(E) instead of O(E²). Under a group-limited router the removals per layer are rounded to
whole groups and each layer replays its own cheapest-absorption order, as in `grape`.

Operators: with 'dominant' (default) the representative is kept as is, so the modelled cost is exact for
the calibration tokens' outputs (the pruned router may still send tokens elsewhere). For averaging
operators ('freq', 'uniform') the same grouping is used and the merged expert is approximated by its
representative: the exact cost of an average needs third-order moments. The representative is recorded
as the group's `dominant` (router rule 'dominant' keeps its router column).

Defaults (measured on the demo model, BENCHMARKS.md): absolute costs (`normalise='none'`, the squared error
the next layer sees) and no entropy guard (`guard='none'`): on that model both the energy normalisation
and the guard moved removals to layers where they hurt held-out perplexity. Both remain options
(`normalise='energy'`, `guard='entropy'|'cap'`, with `gamma`/`cap_gamma` as in grape).
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Float

from grape_jax.calibration.stats import LayerStats, ModelStats
from grape_jax.planners.common import EntropyGuard, check_budget, check_choice, floors, snap_allocation
from grape_jax.planners.plan import OPERATORS, Plan, PlanError, build_plan

NORMALISATIONS = ("energy", "none")
MERGE_OPERATORS = OPERATORS  # every way a group becomes one expert (see grape_jax.planners.plan)


def substitution_cost(ls: LayerStats, normalise: str = "energy") -> Float[np.ndarray, "experts experts"]:
    """C[i, j] (module docstring), clipped at 0 against round-off; / Σ_i N[i, i] if normalise='energy'."""
    check_choice("normalise", normalise, NORMALISATIONS)
    if ls.routed_m is None or ls.routed_n is None:
        raise PlanError(
            f"layer {ls.layer}: stats have no routed moments (routed_m/routed_n); grape-r needs them: "
            "recalibrate with routed moments collected"
        )
    m, n = np.asarray(ls.routed_m, np.float64), np.asarray(ls.routed_n, np.float64)
    cost = np.maximum(np.diag(n)[:, None] + n - 2.0 * m, 0.0)
    energy = float(np.trace(n))
    return cost / energy if normalise == "energy" and energy > 0 else cost


class CostClusters:
    """One layer's clusters with the Δ(A→B) absorption costs over cluster roots and their row minima."""

    def __init__(self, cost: Float[np.ndarray, "experts experts"]):
        e = cost.shape[0]
        self.rows = np.array(cost, np.float64)  # CA[root, :] = Σ_{i∈A} C[i, :]
        self.rep = np.arange(e)
        self.alive = np.ones(e, bool)
        self.members: dict[int, list[int]] = {i: [i] for i in range(e)}
        self.delta = self.rows - np.diag(self.rows)[:, None]
        np.fill_diagonal(self.delta, np.inf)
        self.row_min = self.delta.min(1)
        self.row_arg = self.delta.argmin(1)

    @property
    def num_clusters(self) -> int:
        return len(self.members)

    def best(self) -> tuple[float, int, int]:
        """(Δ, absorbed root A, absorbing root B) of the cheapest absorption in this layer."""
        a = int(np.argmin(self.row_min))
        return float(self.row_min[a]), a, int(self.row_arg[a])

    def _refresh_row(self, r: int) -> None:
        self.row_arg[r] = int(np.argmin(self.delta[r]))
        self.row_min[r] = self.delta[r, self.row_arg[r]]

    def merge(self, a: int, b: int) -> None:
        """Absorb cluster a into cluster b (b's representative serves both)."""
        self.rows[b] += self.rows[a]
        self.members[b] = sorted(self.members[b] + self.members.pop(a))
        self.alive[a] = False
        self.delta[a, :] = np.inf
        self.delta[:, a] = np.inf
        self.row_min[a] = np.inf
        new = self.rows[b, self.rep] - self.rows[b, self.rep[b]]
        self.delta[b] = np.where(self.alive, new, np.inf)
        self.delta[b, b] = np.inf
        self._refresh_row(b)
        for r in np.flatnonzero(self.alive & (self.row_arg == a)):
            self._refresh_row(int(r))

    def groups_and_reps(self) -> tuple[list[list[int]], list[int]]:
        roots = sorted(self.members, key=lambda r: min(self.members[r]))
        return [self.members[r] for r in roots], [int(self.rep[r]) for r in roots]


def cheapest_absorption(
    stats: ModelStats,
    costs: list[np.ndarray],
    *,
    budget: int,
    floor: np.ndarray,
    guard: str,
    gamma: float,
    cap_gamma: float,
) -> tuple[list[CostClusters], dict]:
    """The global greedy over per-layer cost matrices (module docstring): each step takes the cheapest
    absorption anywhere; shared by grape-r (output costs) and grape-l (loss costs)."""
    check_budget(stats, budget, floor)
    states = [CostClusters(c) for c in costs]
    guard_state = EntropyGuard(
        [s.num_clusters for s in states], floor, gamma=gamma, mode=guard, budget=budget, cap_gamma=cap_gamma
    )
    best = np.array([s.best()[0] for s in states])
    total, order = 0.0, []
    for _ in range(budget):
        layer = int(np.argmin(np.where(guard_state.allowed(), best, np.inf)))
        c, a, b = states[layer].best()
        states[layer].merge(a, b)
        best[layer] = states[layer].best()[0]
        guard_state.merged(layer)
        total += c
        order.append(stats.layers[layer].layer)
    greedy = guard_state.removed.tolist()
    removed = snap_allocation(stats, greedy)
    diagnostics = {
        **guard_state.diagnostics(),
        "estimated_cost": total,
        "merge_order": order,
        "removed_per_layer": removed,
    }
    if removed != greedy:  # group-limited router: whole groups per layer, each replays its own order
        states = [CostClusters(c) for c in costs]
        total = 0.0
        for state, r in zip(states, removed, strict=True):
            for _ in range(r):
                c, a, b = state.best()
                state.merge(a, b)
                total += c
        diagnostics.update(estimated_cost=total, removed_per_layer_greedy=greedy)
    return states, diagnostics


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
) -> Plan:
    """Global cheapest-absorption greedy on the routed substitution cost (module docstring)."""
    check_choice("operator", operator, MERGE_OPERATORS)
    floor = floors(stats, min_experts)
    check_budget(stats, budget, floor)
    costs = [substitution_cost(ls, normalise) for ls in stats.layers]
    states, diagnostics = cheapest_absorption(
        stats, costs, budget=budget, floor=floor, guard=guard, gamma=gamma, cap_gamma=cap_gamma
    )
    groups, reps = zip(*(s.groups_and_reps() for s in states), strict=True)
    options = dict(gamma=gamma, guard=guard, cap_gamma=cap_gamma, normalise=normalise, min_experts=min_experts)
    return build_plan(
        stats,
        list(groups),
        method="grape-r",
        budget=budget,
        operator=operator,
        router_rule=router_rule,
        dominant_per_layer=list(reps),
        options=options,
        diagnostics=diagnostics,
    )
