"""Planners: pure functions (stats, budget, options) -> Plan, and the registry the CLI uses."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from grape_jax.plan import Plan, PlanError
from grape_jax.planners.clustering import hc_smoe, m_smoe
from grape_jax.planners.grape import grape, local
from grape_jax.planners.grape_r import grape_r
from grape_jax.planners.scores import frequency, random, reap
from grape_jax.stats import ModelStats

PLANNERS: dict[str, Callable[..., Plan]] = {
    "grape": grape,
    "grape-r": grape_r,
    "local": local,
    "frequency": frequency,
    "reap": reap,
    "random": random,
    "hc-smoe": hc_smoe,
    "m-smoe": m_smoe,
}


def budget_from_per_layer(per_layer: int, stats: ModelStats) -> int:
    """`--per-layer r` means B = r · L (L = number of MoE layers)."""
    if per_layer < 0:
        raise PlanError(f"--per-layer must be >= 0, got {per_layer}")
    return per_layer * len(stats.layers)


def make_plan(method: str, stats: ModelStats, *, budget: int, **options) -> Plan:
    """Run planner `method`; unknown methods or options are errors, never silently ignored."""
    if method not in PLANNERS:
        raise PlanError(f"method {method!r} unknown; expected one of {sorted(PLANNERS)}")
    fn = PLANNERS[method]
    accepted = set(inspect.signature(fn).parameters) - {"stats", "budget"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise PlanError(f"{method}: unknown option(s) {unknown}; accepted: {sorted(accepted)}")
    stats.validate()
    return fn(stats, budget=budget, **options)
