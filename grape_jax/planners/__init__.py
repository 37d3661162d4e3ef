"""Planners: pure functions (stats, *, budget, **options) -> Plan, and the registry the CLI uses.

Budget B = experts removed in total over all MoE layers; every layer keeps at least
max(top_k, min_experts). Every planner takes `operator` and `router_rule` (see grape_jax.planners.plan); defaults:
  grape, local, hc-smoe, m-smoe   operator 'freq' (frequency-weighted average of each group)
  grape-r                         operator 'dominant' (its cost model serves a group by its representative)
  grape-l                         operator 'fit' (down projections fitted on calibration data at merge time)
  ream                            operator 'aligned' (REAP-saliency-weighted average of neuron-aligned members)
  frequency, reap, random         operator 'drop' (plain pruning; other operators fold removed experts
                                  into their most similar kept expert)
  all                             router_rule 'dominant'
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable

from grape_jax.calibration.stats import ModelStats
from grape_jax.planners.clustering import hc_smoe, m_smoe
from grape_jax.planners.common import budget_from_fraction, floors
from grape_jax.planners.grape import grape, local
from grape_jax.planners.grape_l import grape_l
from grape_jax.planners.grape_r import grape_r
from grape_jax.planners.plan import Plan, PlanError
from grape_jax.planners.ream import ream
from grape_jax.planners.scores import frequency, random, reap

PLANNERS: dict[str, Callable[..., Plan]] = {
    "grape": grape,
    "grape-r": grape_r,
    "grape-l": grape_l,
    "local": local,
    "frequency": frequency,
    "reap": reap,
    "random": random,
    "hc-smoe": hc_smoe,
    "m-smoe": m_smoe,
    "ream": ream,
}


DEFAULT_METHOD = "grape-l"  # with its default operator 'fit': the evidence is in README.md / BENCHMARKS.md


def budget_from_per_layer(per_layer: int, stats: ModelStats) -> int:
    """`per_layer=r` means B = r · L (L = number of MoE layers)."""
    if isinstance(per_layer, bool) or not isinstance(per_layer, int) or per_layer < 0:
        raise PlanError(f"per_layer (--per-layer) must be an integer >= 0, got {per_layer!r}")
    return per_layer * len(stats.layers)


def planner_options(method: str) -> list[str]:
    """Option names planner `method` accepts (besides stats and budget)."""
    if method not in PLANNERS:
        raise PlanError(f"method {method!r} unknown; expected one of {sorted(PLANNERS)}")
    return sorted(set(inspect.signature(PLANNERS[method]).parameters) - {"stats", "budget"})


def make_plan(
    stats: ModelStats,
    *,
    method: str = DEFAULT_METHOD,
    budget: int | None = None,
    per_layer: int | None = None,
    fraction: float | None = None,
    **options,
) -> Plan:
    """Run planner `method` on `stats` for a budget of `budget` experts removed in total, `per_layer`
    removed per MoE layer on average, or a `fraction` (0 < F < 1) of the routed experts removed
    (`budget_from_fraction`: nearest whole expert, or whole group under group-limited routers); options
    are the planner's keywords (unknown ones are errors)."""
    accepted = planner_options(method)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise PlanError(f"{method}: unknown option(s) {unknown}; accepted: {accepted}")
    given = [
        name for name, v in (("budget", budget), ("per_layer", per_layer), ("fraction", fraction)) if v is not None
    ]
    if len(given) != 1:
        raise PlanError(
            "give exactly one of budget (experts removed in total), per_layer (per MoE layer) or fraction "
            f"(of the routed experts); got {given or 'none'}"
        )
    check_option_types(method, options)
    stats.validate()
    if budget is not None:
        total = budget
    elif per_layer is not None:
        total = budget_from_per_layer(per_layer, stats)
    else:
        total = budget_from_fraction(fraction, stats, floors(stats, _min_experts(options)))
    plan = PLANNERS[method](stats, budget=total, **options)
    return dataclasses.replace(plan, made_from=stats.provenance())


def _min_experts(options: dict) -> int:
    """The planner's `min_experts` option when it is a valid integer (else 0: the planner reports it)."""
    m = options.get("min_experts", 0)
    return int(m) if isinstance(m, int) and not isinstance(m, bool) and m >= 0 else 0


_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}


def check_option_types(method: str, options: dict) -> None:
    """Each option's value has the type the planner declares (`gamma=abc` is an error naming the option,
    not a TypeError deep inside the planner)."""
    params = inspect.signature(PLANNERS[method]).parameters
    for name, value in options.items():
        declared = str(params[name].annotation).replace(" ", "").split("|")
        allowed = tuple(t for d in declared for t in _TYPES.get(d, ()))
        ok = (value is None and "None" in declared) or (
            isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)
        )
        if not ok:
            raise PlanError(f"{method}: option {name}={value!r}: expected {' or '.join(declared)}")
