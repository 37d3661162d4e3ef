"""The Plan ("recipe"): for every MoE layer, which original experts become which output expert.

Per layer, `groups` are tuples of ORIGINAL expert ids; each group becomes one output expert, in canonical
order (members ascending, groups sorted by their smallest member), so a plan fixes the output layout
deterministically. `weights` are each group's merge weights α (>= 0, sum 1) and `dominant` its router
representative (the member whose router column the 'dominant' router rule keeps). Pruning planners list
removed experts in `dropped` and keep the rest as singletons. Invariant: groups and dropped partition
range(num_experts_before).

How a group becomes one expert (the operator, chosen independently of the grouping):
  'freq'      α ∝ routing frequency (uniform when every member has frequency 0)
  'uniform'   α = 1/|G|
  'dominant'  α = 1 on the most frequently routed member (ties -> lowest id): pruning inside the group
  'aligned'   α ∝ routing frequency, after permuting each member's intermediate neurons to match the
              group's dominant member (`grape_jax.merge.alignment`; applied by merge)
  'fit'       the dominant member's gate/up (and router column), and every output expert's down projection
              solved by ridge least squares to reproduce the original layer's routed output on calibration
              tokens (`grape_jax.fit.operator`; needs the calibration data at merge time); weights as 'dominant'
  'drop'      pruning planners only: every group is a singleton, removed experts are in `dropped`
Router rule: 'dominant' (the dominant member's router column; default) or 'mean' (α-weighted mean).

The plan also records the recipe: method, budget (experts removed in total), options, seed, what it was
made from (`made_from`: the statistics' fingerprint, the model's and the calibration data) and
diagnostics. `kept_per_layer` is written to JSON for readers; it is derived from the
groups, so it is recomputed (not trusted) on load.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from jaxtyping import Float

from grape_jax.base import jsonio
from grape_jax.base.atomic import atomic_write_text
from grape_jax.calibration.stats import LayerStats, ModelStats

OPERATORS = ("freq", "uniform", "dominant", "aligned", "fit")
DOMINANT_WEIGHTS = ("dominant", "fit")  # operators whose weights are 1 on the dominant member
PLAN_OPERATORS = OPERATORS + ("drop",)
ROUTER_RULES = ("dominant", "mean")
WEIGHT_TOL = 1e-6


class PlanError(ValueError):
    """A plan that is malformed or does not fit the model."""


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    """One MoE layer's grouping: output expert k is `groups[k]` merged with `weights[k]`."""

    layer: int
    num_experts_before: int
    groups: tuple[tuple[int, ...], ...]
    weights: tuple[tuple[float, ...], ...]
    dominant: tuple[int, ...]
    dropped: tuple[int, ...] = ()

    @property
    def num_kept(self) -> int:
        return len(self.groups)

    def validate(self, where: str = "layer", *, operator: str | None = None) -> None:
        """Check the partition, canonical order, weights and representatives; errors name the field."""
        e = self.num_experts_before
        if e < 1:
            raise PlanError(f"{where}.num_experts_before: expected >= 1, got {e}")
        members = [x for g in self.groups for x in g] + list(self.dropped)
        if sorted(members) != list(range(e)):
            missing = sorted(set(range(e)) - set(members))
            repeated = sorted({x for x in members if members.count(x) > 1})
            extra = sorted(set(members) - set(range(e)))
            raise PlanError(
                f"{where}.groups + dropped must partition range({e}) exactly "
                f"(missing {missing}, repeated {repeated}, out of range {extra})"
            )
        if not self.groups:
            raise PlanError(f"{where}.groups: a layer must keep at least one expert")
        for k, g in enumerate(self.groups):
            if not g:
                raise PlanError(f"{where}.groups[{k}]: empty group")
        if len(self.weights) != len(self.groups):
            raise PlanError(f"{where}.weights: {len(self.weights)} entries for {len(self.groups)} groups")
        if len(self.dominant) != len(self.groups):
            raise PlanError(f"{where}.dominant: {len(self.dominant)} entries for {len(self.groups)} groups")
        canonical = sorted((tuple(sorted(g)) for g in self.groups), key=min)
        if list(self.groups) != canonical:
            raise PlanError(f"{where}.groups: not canonical (members ascending, groups sorted by smallest id)")
        if list(self.dropped) != sorted(self.dropped):
            raise PlanError(f"{where}.dropped: expected ascending ids, got {list(self.dropped)}")
        for k, (g, w, d) in enumerate(zip(self.groups, self.weights, self.dominant, strict=True)):
            if len(w) != len(g):
                raise PlanError(f"{where}.weights[{k}]: {len(w)} weights for group {list(g)}")
            if not all(math.isfinite(a) and a >= 0 for a in w) or abs(sum(w) - 1.0) > WEIGHT_TOL:
                raise PlanError(f"{where}.weights[{k}]: {list(w)} must be finite, >= 0 and sum to 1")
            if d not in g:
                raise PlanError(f"{where}.dominant[{k}]: {d} is not a member of group {list(g)}")
            if operator in DOMINANT_WEIGHTS and w[g.index(d)] != 1.0:
                raise PlanError(f"{where}.weights[{k}]: operator {operator!r} needs weight 1 on member {d}")
            if operator == "drop" and len(g) != 1:
                raise PlanError(f"{where}.groups[{k}]: operator 'drop' keeps singletons, got {list(g)}")


@dataclasses.dataclass(frozen=True)
class Plan:
    """Per-layer groupings of one model plus the recipe that produced them."""

    layers: tuple[LayerPlan, ...]
    method: str
    budget: int
    operator: str = "freq"
    router_rule: str = "dominant"
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    seed: int | None = None
    made_from: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    diagnostics: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_removed(self) -> int:
        return sum(lp.num_experts_before - lp.num_kept for lp in self.layers)

    @property
    def fingerprint(self) -> str:
        """sha256 of what the plan does (method, operator, groups, weights, made_from), not its diagnostics."""
        d = self.to_dict()
        d.pop("diagnostics")
        if isinstance(run := d["made_from"].get("calibration"), dict):  # streamed or not: the same statistics
            d["made_from"]["calibration"] = {k: v for k, v in run.items() if k != "stream_layers"}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()

    @property
    def kept_per_layer(self) -> tuple[int, ...]:
        """The allocation: experts kept in each MoE layer, in layer order."""
        return tuple(lp.num_kept for lp in self.layers)

    def validate(self) -> None:
        if self.operator not in PLAN_OPERATORS:
            raise PlanError(f"operator: {self.operator!r} unknown; expected one of {PLAN_OPERATORS}")
        if self.router_rule not in ROUTER_RULES:
            raise PlanError(f"router_rule: {self.router_rule!r} unknown; expected one of {ROUTER_RULES}")
        if not self.layers:
            raise PlanError("layers: a plan needs at least one MoE layer")
        for n, lp in enumerate(self.layers):
            lp.validate(f"layers[{n}] (layer {lp.layer})", operator=self.operator)
        ids = [lp.layer for lp in self.layers]
        if ids != sorted(set(ids)):
            raise PlanError(f"layers: layer ids must be strictly increasing, got {ids}")
        if self.num_removed != self.budget:
            raise PlanError(f"budget: plan removes {self.num_removed} experts but its budget is {self.budget}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "budget": self.budget,
            "operator": self.operator,
            "router_rule": self.router_rule,
            "options": jsonio.native(self.options),
            "seed": self.seed,
            "made_from": jsonio.native(self.made_from),
            "diagnostics": jsonio.native(self.diagnostics),
            "kept_per_layer": list(self.kept_per_layer),
            "layers": [
                {
                    "layer": lp.layer,
                    "num_experts_before": lp.num_experts_before,
                    "groups": [list(g) for g in lp.groups],
                    "weights": [list(w) for w in lp.weights],
                    "dominant": list(lp.dominant),
                    "dropped": list(lp.dropped),
                }
                for lp in self.layers
            ],
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "plan") -> Plan:
        """Parse and validate; every error names `source` and the offending field."""
        try:
            plan = _parse_plan(d)
            plan.validate()
        except PlanError as e:
            raise PlanError(f"{source}: {e}") from None
        return plan

    def to_json(self) -> str:
        return jsonio.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, *, source: str = "plan") -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise PlanError(f"{source}: invalid JSON ({e})") from None
        return cls.from_dict(data, source=source)

    def save(self, path: str | os.PathLike) -> None:
        """Write the JSON atomically (never half-written)."""
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise PlanError(f"{path}: plan file not found")
        with open(path) as f:
            return cls.from_json(f.read(), source=path)

    def expert_origins(self) -> dict[int, list[int | None]]:
        """Per MoE layer, for each output expert the original expert it is an unchanged copy of (a
        singleton group), or None for a merged one (export reuses an unchanged expert's FP8 scales)."""
        return {lp.layer: [g[0] if len(g) == 1 else None for g in lp.groups] for lp in self.layers}

    @classmethod
    def identity(cls, stats: ModelStats) -> Plan:
        """Budget 0: every expert kept as itself."""
        return build_plan(
            stats,
            [[[e] for e in range(ls.num_experts)] for ls in stats.layers],
            method="identity",
            budget=0,
            operator="drop",
        )


# --------------------------------------------------------------------------------------- parsing


def _field(d: Any, key: str, where: str) -> Any:
    if not isinstance(d, Mapping):
        raise PlanError(f"{where}: expected a JSON object, got {type(d).__name__}")
    if key not in d:
        raise PlanError(f"{where}.{key}: missing")
    return d[key]


def _int(x: Any, where: str) -> int:
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
        raise PlanError(f"{where}: expected an integer, got {x!r}")
    return int(x)


def _float(x: Any, where: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float, np.number)):
        raise PlanError(f"{where}: expected a number, got {x!r}")
    return float(x)


def _list(x: Any, where: str) -> list:
    if not isinstance(x, (list, tuple)):
        raise PlanError(f"{where}: expected a list, got {type(x).__name__}")
    return list(x)


def _str(x: Any, where: str) -> str:
    if not isinstance(x, str):
        raise PlanError(f"{where}: expected a string, got {x!r}")
    return x


def _parse_layer(x: Any, where: str) -> LayerPlan:
    groups = _list(_field(x, "groups", where), f"{where}.groups")
    weights = _list(_field(x, "weights", where), f"{where}.weights")
    return LayerPlan(
        layer=_int(_field(x, "layer", where), f"{where}.layer"),
        num_experts_before=_int(_field(x, "num_experts_before", where), f"{where}.num_experts_before"),
        groups=tuple(
            tuple(_int(e, f"{where}.groups[{k}]") for e in _list(g, f"{where}.groups[{k}]"))
            for k, g in enumerate(groups)
        ),
        weights=tuple(
            tuple(_float(a, f"{where}.weights[{k}]") for a in _list(w, f"{where}.weights[{k}]"))
            for k, w in enumerate(weights)
        ),
        dominant=tuple(_int(e, f"{where}.dominant") for e in _list(_field(x, "dominant", where), f"{where}.dominant")),
        dropped=tuple(_int(e, f"{where}.dropped") for e in _list(x.get("dropped", []), f"{where}.dropped")),
    )


def _parse_plan(d: Any) -> Plan:
    layers = _list(_field(d, "layers", "plan"), "layers")
    seed = d.get("seed")
    options, diagnostics, made_from = d.get("options", {}), d.get("diagnostics", {}), d.get("made_from", {})
    for name, value in (("options", options), ("diagnostics", diagnostics), ("made_from", made_from)):
        if not isinstance(value, Mapping):
            raise PlanError(f"{name}: expected a JSON object, got {type(value).__name__}")
    return Plan(
        layers=tuple(_parse_layer(x, f"layers[{n}]") for n, x in enumerate(layers)),
        method=_str(_field(d, "method", "plan"), "method"),
        budget=_int(_field(d, "budget", "plan"), "budget"),
        operator=_str(d.get("operator", "freq"), "operator"),
        router_rule=_str(d.get("router_rule", "dominant"), "router_rule"),
        options=dict(options),
        seed=None if seed is None else _int(seed, "seed"),
        made_from=dict(made_from),
        diagnostics=dict(diagnostics),
    )


# -------------------------------------------------------------------------------------- building


def group_weights(
    members: Sequence[int], freq: Float[np.ndarray, " experts"], operator: str
) -> tuple[tuple[float, ...], int]:
    """(α per member, most frequent member) of one group (members in the given order) under `operator`."""
    members = [int(e) for e in members]
    if len(members) == 1:
        if operator not in PLAN_OPERATORS:
            raise PlanError(f"operator {operator!r} unknown; expected one of {PLAN_OPERATORS}")
        return (1.0,), members[0]
    f = np.asarray([freq[e] for e in members], np.float64)
    best = np.flatnonzero(f == f.max())
    dominant = min(members[int(k)] for k in best)  # ties -> lowest id
    if operator in DOMINANT_WEIGHTS:
        alphas = [1.0 if e == dominant else 0.0 for e in members]
    elif operator == "uniform" or (operator in ("freq", "aligned") and f.sum() <= 0):
        alphas = [1.0 / len(members)] * len(members)
    elif operator in ("freq", "aligned"):
        alphas = list(f / f.sum())
    elif operator == "drop":
        raise PlanError(f"operator 'drop' keeps singletons; got group {sorted(members)}")
    else:
        raise PlanError(f"operator {operator!r} unknown; expected one of {PLAN_OPERATORS}")
    return tuple(float(a) for a in alphas), dominant


def layer_plan(
    ls: LayerStats,
    groups: Sequence[Sequence[int]],
    operator: str,
    dropped: Sequence[int] = (),
    dominant: Sequence[int] | None = None,
) -> LayerPlan:
    """Canonical LayerPlan from groups. `dominant[k]` (aligned with `groups`) overrides the most
    frequent member as group k's representative; with operator 'dominant' it also gets α = 1."""
    gs, ws, ds = [], [], []
    for k in sorted(range(len(groups)), key=lambda k: min(groups[k])):
        g = tuple(sorted(int(e) for e in groups[k]))
        w, d = group_weights(g, ls.freq, operator)
        if dominant is not None:
            d = int(dominant[k])
            if operator in DOMINANT_WEIGHTS:
                w = tuple(1.0 if e == d else 0.0 for e in g)
        gs.append(g)
        ws.append(w)
        ds.append(d)
    return LayerPlan(ls.layer, ls.num_experts, tuple(gs), tuple(ws), tuple(ds), tuple(sorted(int(e) for e in dropped)))


def build_plan(
    stats: ModelStats,
    groups_per_layer: Sequence[Sequence[Sequence[int]]],
    *,
    method: str,
    budget: int,
    operator: str = "freq",
    router_rule: str = "dominant",
    dropped_per_layer: Sequence[Sequence[int]] | None = None,
    dominant_per_layer: Sequence[Sequence[int] | None] | None = None,
    options: Mapping[str, Any] | None = None,
    seed: int | None = None,
    diagnostics: Mapping[str, Any] | None = None,
) -> Plan:
    """The one way planners make a Plan: canonical groups, operator weights, validated."""
    if operator not in PLAN_OPERATORS:
        raise PlanError(f"operator {operator!r} unknown; expected one of {PLAN_OPERATORS}")
    if router_rule not in ROUTER_RULES:
        raise PlanError(f"router_rule {router_rule!r} unknown; expected one of {ROUTER_RULES}")
    n = len(stats.layers)
    dropped_per_layer = dropped_per_layer or [()] * n
    dominant_per_layer = dominant_per_layer or [None] * n
    layers = tuple(
        layer_plan(ls, g, operator, d, dom)
        for ls, g, d, dom in zip(stats.layers, groups_per_layer, dropped_per_layer, dominant_per_layer, strict=True)
    )
    plan = Plan(
        layers=layers,
        method=method,
        budget=int(budget),
        operator=operator,
        router_rule=router_rule,
        options=jsonio.native(dict(options or {})),
        seed=seed,
        diagnostics=jsonio.native(dict(diagnostics or {})),
    )
    plan.validate()
    for ls, groups in zip(stats.layers, groups_per_layer, strict=True):
        wanted = min(int(plan.options.get("min_experts", 0)), ls.num_experts)  # a smaller layer stays as it is
        problem = ls.expert_rule.problem(len(groups), min_experts=wanted)
        if problem:
            raise PlanError(f"{method}: layer {ls.layer} {problem}")
    return plan
