"""The Plan ("recipe"): for every MoE layer, which original experts become which merged expert.

Per layer, `groups` are tuples of original expert ids; each group becomes one output expert, in
canonical order (groups sorted by their smallest member). `weights` are each group's merge weights α
(sum 1) and `dominant` its most frequently routed member (router rule 'dominant'). Pruning planners
list removed experts in `dropped` and keep the rest as singletons. Invariant: groups and dropped
partition range(num_experts_before).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from grape_jax.stats import LayerStats, ModelStats

OPERATORS = ("freq", "uniform", "dominant")
ROUTER_RULES = ("dominant", "mean")


class PlanError(ValueError):
    """A plan that is malformed or does not fit the model."""


@dataclasses.dataclass(frozen=True)
class LayerPlan:
    layer: int
    num_experts_before: int
    groups: tuple[tuple[int, ...], ...]
    weights: tuple[tuple[float, ...], ...]
    dominant: tuple[int, ...]
    dropped: tuple[int, ...] = ()

    @property
    def num_kept(self) -> int:
        return len(self.groups)

    def validate(self) -> None:
        where = f"layer {self.layer}"
        members = [e for g in self.groups for e in g] + list(self.dropped)
        if sorted(members) != list(range(self.num_experts_before)):
            raise PlanError(f"{where}: groups + dropped must partition range({self.num_experts_before}), got {sorted(members)}")
        if len(self.weights) != len(self.groups) or len(self.dominant) != len(self.groups):
            raise PlanError(f"{where}: weights/dominant need one entry per group")
        for g, w, d in zip(self.groups, self.weights, self.dominant, strict=True):
            if not g:
                raise PlanError(f"{where}: empty group")
            if len(w) != len(g) or min(w) < 0 or abs(sum(w) - 1.0) > 1e-6:
                raise PlanError(f"{where}: weights {w} of group {g} must be >= 0 and sum to 1")
            if d not in g:
                raise PlanError(f"{where}: dominant {d} is not a member of group {g}")


@dataclasses.dataclass(frozen=True)
class Plan:
    layers: tuple[LayerPlan, ...]
    method: str
    budget: int
    operator: str = "freq"
    router_rule: str = "dominant"
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    seed: int | None = None
    stats_sha256: str | None = None
    diagnostics: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def num_removed(self) -> int:
        return sum(lp.num_experts_before - lp.num_kept for lp in self.layers)

    @property
    def kept_per_layer(self) -> tuple[int, ...]:
        return tuple(lp.num_kept for lp in self.layers)

    def validate(self) -> None:
        if self.operator not in OPERATORS:
            raise PlanError(f"operator {self.operator!r} unknown; expected one of {OPERATORS}")
        if self.router_rule not in ROUTER_RULES:
            raise PlanError(f"router_rule {self.router_rule!r} unknown; expected one of {ROUTER_RULES}")
        for lp in self.layers:
            lp.validate()
        if self.num_removed != self.budget:
            raise PlanError(f"plan removes {self.num_removed} experts but its budget is {self.budget}")

    def validate_against(self, num_experts_per_layer: Sequence[int], *, top_k: int, min_experts: int = 0) -> None:
        """Refuse a plan made for another model, or one that breaks the per-layer floor."""
        if len(num_experts_per_layer) != len(self.layers):
            raise PlanError(f"plan has {len(self.layers)} MoE layers, the model has {len(num_experts_per_layer)}")
        floor = max(top_k, min_experts)
        for lp, n in zip(self.layers, num_experts_per_layer, strict=True):
            if lp.num_experts_before != n:
                raise PlanError(f"layer {lp.layer}: plan is for {lp.num_experts_before} experts, the model has {n}")
            if lp.num_kept < floor:
                raise PlanError(f"layer {lp.layer}: plan keeps {lp.num_kept} experts, below the floor {floor}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["layers"] = [
            {**dataclasses.asdict(lp), "groups": [list(g) for g in lp.groups],
             "weights": [list(w) for w in lp.weights], "dominant": list(lp.dominant), "dropped": list(lp.dropped)}
            for lp in self.layers
        ]
        d["kept_per_layer"] = list(self.kept_per_layer)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], *, source: str = "plan") -> Plan:
        try:
            layers = tuple(
                LayerPlan(
                    layer=int(x["layer"]), num_experts_before=int(x["num_experts_before"]),
                    groups=tuple(tuple(int(e) for e in g) for g in x["groups"]),
                    weights=tuple(tuple(float(a) for a in w) for w in x["weights"]),
                    dominant=tuple(int(e) for e in x["dominant"]),
                    dropped=tuple(int(e) for e in x.get("dropped", ())),
                )
                for x in d["layers"]
            )
            plan = cls(layers=layers, method=str(d["method"]), budget=int(d["budget"]),
                       operator=d.get("operator", "freq"), router_rule=d.get("router_rule", "dominant"),
                       options=dict(d.get("options", {})), seed=d.get("seed"),
                       stats_sha256=d.get("stats_sha256"), diagnostics=dict(d.get("diagnostics", {})))
        except (KeyError, TypeError, ValueError) as e:
            raise PlanError(f"{source}: malformed plan ({type(e).__name__}: {e})") from None
        try:
            plan.validate()
        except PlanError as e:
            raise PlanError(f"{source}: {e}") from None
        return plan

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True, default=_jsonable)

    @classmethod
    def from_json(cls, text: str, *, source: str = "plan") -> Plan:
        try:
            return cls.from_dict(json.loads(text), source=source)
        except json.JSONDecodeError as e:
            raise PlanError(f"{source}: invalid JSON ({e})") from None

    def save(self, path: str | os.PathLike) -> None:
        from conversion.atomic import atomic_write_text

        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise PlanError(f"{path}: plan file not found")
        with open(path) as f:
            return cls.from_json(f.read(), source=path)

    @classmethod
    def identity(cls, stats: ModelStats) -> Plan:
        return build_plan(stats, [[[e] for e in range(ls.num_experts)] for ls in stats.layers],
                          method="identity", budget=0)


def _jsonable(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def group_weights(members: Sequence[int], freq: np.ndarray, operator: str) -> tuple[tuple[float, ...], int]:
    """(α per member, dominant member) of one group under an operator."""
    members = list(members)
    f = np.asarray([freq[e] for e in members], np.float64)
    dominant = members[int(np.argmax(f))]  # argmax takes the first (lowest id) of ties
    if operator == "dominant":
        alphas = [1.0 if e == dominant else 0.0 for e in members]
    elif operator == "uniform" or f.sum() <= 0:
        alphas = [1.0 / len(members)] * len(members)
    elif operator == "freq":
        alphas = list(f / f.sum())
    else:
        raise PlanError(f"operator {operator!r} unknown; expected one of {OPERATORS}")
    return tuple(float(a) for a in alphas), dominant


def layer_plan(
    ls: LayerStats, groups: Sequence[Sequence[int]], operator: str, dropped: Sequence[int] = (),
    dominant: Sequence[int] | None = None,
) -> LayerPlan:
    """Canonical LayerPlan from groups; `dominant` overrides the most-frequent member per group."""
    order = sorted(range(len(groups)), key=lambda i: min(groups[i]))
    gs, ws, ds = [], [], []
    for i in order:
        g = tuple(sorted(int(e) for e in groups[i]))
        w, d = group_weights(g, ls.freq, operator)
        if dominant is not None:
            d = int(dominant[i])
            if operator == "dominant":
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
    stats_sha256: str | None = None,
    diagnostics: Mapping[str, Any] | None = None,
) -> Plan:
    dropped_per_layer = dropped_per_layer or [()] * len(stats.layers)
    dominant_per_layer = dominant_per_layer or [None] * len(stats.layers)
    layers = tuple(
        layer_plan(ls, g, operator, d, dom)
        for ls, g, d, dom in zip(stats.layers, groups_per_layer, dropped_per_layer, dominant_per_layer, strict=True)
    )
    plan = Plan(layers=layers, method=method, budget=budget, operator=operator, router_rule=router_rule,
                options=dict(options or {}), seed=seed, stats_sha256=stats_sha256,
                diagnostics=dict(diagnostics or {}))
    plan.validate()
    return plan
