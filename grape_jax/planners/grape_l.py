"""grape-l: the global cheapest-absorption greedy of grape-r, on costs in units of the model's loss.

grape-r's cost is the squared error a merge adds to the layer's own output; an error in an early layer
is then counted like the same error in the last one, although it passes through every later layer
before it reaches the logits. grape-l weighs each token's error by the loss gradient at that layer's
output instead (calibration option `gradients`, `grape_jax.calibration.similarity`): with u_j(t) = ∂L/∂out(t) · y_j(t),
serving expert i's routed tokens with expert j changes the loss by about g_i(t)(u_j(t) - u_i(t)) on
token t, so

    cost='fisher'  C[i, j] = Σ_t g_i(t)² (u_i(t) - u_j(t))²
                           = sens_n[i, i] + sens_n[i, j] - 2 sens_m[i, j]           (default)
    cost='taylor'  C[i, j] = |Σ_t g_i(t) (u_j(t) - u_i(t))| + ½ fisher C[i, j]

in nats (squared for 'fisher'), comparable across layers: the gradient has carried the error through
the rest of the network. 'fisher' is the empirical-Fisher (second-order) estimate of the loss increase;
the first-order sum is an option only, because signed per-token terms cancel and make it noisy. Groups,
representatives, the entropy-guard options and group-limited rounding are grape-r's
(`grape_r.cheapest_absorption`); the default operator is 'fit' (each merged layer's down projections
fitted on calibration data at merge time, `grape_jax.fit.operator`).
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Float

from grape_jax.calibration.stats import LayerStats, ModelStats
from grape_jax.planners.common import check_choice, floors
from grape_jax.planners.grape_r import cheapest_absorption
from grape_jax.planners.plan import OPERATORS, Plan, PlanError, build_plan

LOSS_COSTS = ("fisher", "taylor")


class NoSensitivitiesError(PlanError):
    """Statistics calibrated without gradients, for a planner that plans from them."""


def loss_cost(ls: LayerStats, cost: str = "fisher") -> Float[np.ndarray, "experts experts"]:
    """C[i, j] of the module docstring from the layer's gradient sensitivities."""
    check_choice("cost", cost, LOSS_COSTS)
    if ls.sens_m is None or ls.sens_n is None or ls.sens_g is None:
        raise NoSensitivitiesError(
            f"layer {ls.layer}: these statistics were calibrated without gradients, which grape-l plans "
            "from: calibrate with gradients (the default; gradients=True, no --no-gradients)"
        )
    m, n = np.asarray(ls.sens_m, np.float64), np.asarray(ls.sens_n, np.float64)
    fisher = np.maximum(np.diag(n)[:, None] + n - 2.0 * m, 0.0)
    if cost == "fisher":
        return fisher
    g = np.asarray(ls.sens_g, np.float64)
    return np.abs(g - np.diag(g)[:, None]) + 0.5 * fisher


def grape_l(
    stats: ModelStats,
    *,
    budget: int,
    cost: str = "fisher",
    gamma: float = 0.01,
    guard: str = "none",
    cap_gamma: float = 1.0,
    operator: str = "fit",
    router_rule: str = "dominant",
    min_experts: int = 0,
) -> Plan:
    """Global cheapest-absorption greedy on loss-unit costs (module docstring)."""
    check_choice("operator", operator, OPERATORS)
    floor = floors(stats, min_experts)
    costs = [loss_cost(ls, cost) for ls in stats.layers]
    states, diagnostics = cheapest_absorption(
        stats, costs, budget=budget, floor=floor, guard=guard, gamma=gamma, cap_gamma=cap_gamma
    )
    groups, reps = zip(*(s.groups_and_reps() for s in states), strict=True)
    options = {"cost": cost, "gamma": gamma, "guard": guard, "cap_gamma": cap_gamma, "min_experts": min_experts}
    return build_plan(
        stats,
        list(groups),
        method="grape-l",
        budget=budget,
        operator=operator,
        router_rule=router_rule,
        dominant_per_layer=list(reps),
        options=options,
        diagnostics=diagnostics,
    )
