"""Pieces every planner shares: option checks, floors, uniform allocations, union-find, the entropy guard."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from grape_jax.calibration.stats import ModelStats
from grape_jax.planners.plan import PlanError

GUARDS = ("entropy", "none", "cap")


def check_choice(name: str, value: object, allowed: Sequence[str]) -> None:
    """Unknown option strings are errors, never a silent default."""
    if value not in allowed:
        raise PlanError(f"{name} {value!r} unknown; expected one of {tuple(allowed)}")


def check_gamma(gamma: float, cap_gamma: float) -> None:
    if not 0.0 <= gamma < 1.0:
        raise PlanError(f"gamma must be in [0, 1), got {gamma}")
    if not cap_gamma > 0.0:
        raise PlanError(f"cap_gamma must be > 0, got {cap_gamma}")


def floors(stats: ModelStats, min_experts: int = 0) -> np.ndarray:
    """Experts each layer must keep: max(top_k, min_experts, the router's minimum, 1), rounded up to the
    layer's count multiple (group-limited routers keep whole groups)."""
    if isinstance(min_experts, bool) or not isinstance(min_experts, (int, np.integer)) or min_experts < 0:
        raise PlanError(f"min_experts must be an integer >= 0, got {min_experts!r}")
    return np.array([ls.expert_rule.floor(int(min_experts)) for ls in stats.layers], np.int64)


def granularity(stats: ModelStats) -> int:
    """The step every layer's expert count moves in (1, or n_group under group-limited routing)."""
    steps = {ls.count_multiple for ls in stats.layers}
    if len(steps) > 1:
        raise PlanError(f"MoE layers need different expert-count multiples {sorted(steps)}; not supported")
    return steps.pop()


def budget_from_fraction(fraction: float, stats: ModelStats, floor: Sequence[int] | None = None) -> int:
    """`fraction=F` (0 < F < 1): F of the routed experts removed, the way REAP and REAM state budgets.

    B = s * floor(F * N / s + 1/2), N the routed experts summed over the MoE layers and s the router's
    granularity (1, or n_group under group-limited routing): the nearest whole number of experts (of
    groups), halves rounded up. On a model with E experts in each of L layers this is F * E removed per
    layer whenever F * E is whole (0.25 of 32 experts: 8 per layer). Errors name `--fraction`: F outside
    (0, 1), a fraction so small that it removes nothing, or one that needs more experts than the per-layer
    floors (`floor`, default max(top_k, the router's minimum)) leave removable.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float, np.floating)) or not math.isfinite(fraction):
        raise PlanError(f"fraction (--fraction) must be a number in (0, 1), got {fraction!r}")
    if not 0.0 < float(fraction) < 1.0:
        raise PlanError(f"fraction (--fraction) must be in (0, 1) (experts removed per MoE layer), got {fraction}")
    step = granularity(stats)
    total = sum(ls.num_experts for ls in stats.layers)
    budget = step * math.floor(float(fraction) * total / step + 0.5)
    if budget == 0:
        unit = "experts" if step == 1 else f"groups of {step} experts"
        raise PlanError(
            f"fraction (--fraction) {fraction} of {total} {unit} rounds to 0 removed; expected at least "
            f"{0.5 * step / total:.4g}"
        )
    floor = floors(stats) if floor is None else floor
    room = sum(max(ls.num_experts - int(f), 0) for ls, f in zip(stats.layers, floor, strict=True))
    if budget > room:
        raise PlanError(
            f"fraction (--fraction) {fraction} removes {budget} of {total} experts, more than the {room} "
            f"removable above the per-layer floors (max(top_k, min_experts, the router's minimum) per layer; "
            f"at most {room / total:.4g})"
        )
    return budget


def check_budget(stats: ModelStats, budget: int, floor: Sequence[int]) -> None:
    """The budget (experts removed in total) must be reachable without crossing any floor, in whole
    multiples of the router's granularity."""
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)):
        raise PlanError(f"budget must be an integer, got {budget!r}")
    room = sum(max(ls.num_experts - int(f), 0) for ls, f in zip(stats.layers, floor, strict=True))
    if budget < 0:
        raise PlanError(f"budget must be >= 0, got {budget}")
    if budget > room:
        raise PlanError(
            f"budget {budget} exceeds the {room} experts removable above the per-layer floors "
            f"(floor = max(top_k, min_experts, the router's minimum) per layer)"
        )
    step = granularity(stats)
    if budget % step:
        low = budget // step * step  # rooms are whole groups, so low + step <= room too
        raise PlanError(
            f"budget {budget} is not a multiple of {step}: the group-limited router needs every layer's "
            f"expert count to stay a multiple of n_group={step} (nearest: {low} or {low + step})"
        )


def uniform_allocation(stats: ModelStats, budget: int, floor: Sequence[int], tie_break: Sequence[float]) -> list[int]:
    """Removals per layer for the uniform (local) planners.

    Every layer gets B // L (capped at its room above the floor). The remaining experts go one at a time,
    in rounds, to the layers ranked by `tie_break` (highest first, then lowest layer index) that still
    have room; so a layer at its floor passes its share on, and the result is deterministic. Under a
    group-limited router all of this counts whole groups of `granularity` experts.
    """
    check_budget(stats, budget, floor)
    step = granularity(stats)
    n = len(stats.layers)
    room = [max(ls.num_experts - int(f), 0) // step for ls, f in zip(stats.layers, floor, strict=True)]
    units = budget // step
    alloc = [min(units // n, r) for r in room]
    order = sorted(range(n), key=lambda i: (-float(tie_break[i]), i))
    left = units - sum(alloc)
    while left > 0:
        for i in order:
            if left and alloc[i] < room[i]:
                alloc[i] += 1
                left -= 1
    return [a * step for a in alloc]


def snap_allocation(stats: ModelStats, removed: Sequence[int]) -> list[int]:
    """Round a global planner's removals per layer to whole groups of `granularity` experts, same total.

    Largest remainder: each layer keeps its whole groups; the groups still owed go to the layers with
    the largest leftover removals (ties -> lowest layer). A layer with a leftover removed fewer than its
    room, and rooms are whole groups, so it can take one more group: the result respects the floors.
    Identity when the granularity is 1.
    """
    step = granularity(stats)
    removed = [int(r) for r in removed]
    if step == 1:
        return removed
    base = [r // step * step for r in removed]
    owed = (sum(removed) - sum(base)) // step
    for i in sorted(range(len(removed)), key=lambda i: (-(removed[i] % step), i))[:owed]:
        base[i] += step
    return base


def layer_entropy(counts: Sequence[int]) -> float:
    """E = -Σ p_l log p_l of the retained-cluster fractions p_l = |C^l| / Σ|C|."""
    c = np.asarray(counts, np.float64)
    p = c[c > 0] / c.sum()
    return float(-(p * np.log(p)).sum())


def normalised_entropy(counts: Sequence[int]) -> float:
    """E / log L (1 for a uniform allocation; 1 by convention when L = 1)."""
    return layer_entropy(counts) / math.log(len(counts)) if len(counts) > 1 else 1.0


class UnionFind:
    """Disjoint sets over 0..n-1; the root of a set is its smallest member."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def find(self, x: int) -> int:
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        root, child = min(ra, rb), max(ra, rb)
        self.parent[child] = root
        return root


class EntropyGuard:
    """Which layers the next global merge may use, and the bookkeeping behind it.

    mode 'entropy' (GRAPE): Ê = E_init (1 - γ). After a merge in layer l, if E < Ê, l is frozen. When every
      layer that is above its floor is frozen, the frozen set is cleared (a "restart"; clusters and Ê are
      kept). So once E is below Ê, each layer merges at most once per round: the allocation can only
      drift away from balance at the pace of whole rounds.
    mode 'cap': no freezing; each layer may lose at most ⌈γ'·B/L⌉ experts (γ' = cap_gamma); if the budget
      cannot be met under the cap, the cap is lifted for the remaining steps (counted in `cap_relaxed`).
    mode 'none': every layer above its floor may merge (the unguarded greedy).
    """

    def __init__(
        self,
        counts: Sequence[int],
        floor: Sequence[int],
        *,
        gamma: float,
        mode: str,
        budget: int,
        cap_gamma: float = 1.0,
    ):
        check_choice("guard", mode, GUARDS)
        check_gamma(gamma, cap_gamma)
        self.mode = mode
        self.gamma = float(gamma)
        self.counts = np.asarray(counts, np.int64).copy()
        self.floor = np.asarray(floor, np.int64)
        self.initial = layer_entropy(self.counts)
        self.threshold = self.initial * (1.0 - gamma)
        self.frozen = np.zeros(len(self.counts), bool)
        self.removed = np.zeros(len(self.counts), np.int64)
        self.restarts = 0
        self.cap_relaxed = 0
        self.cap = math.ceil(cap_gamma * budget / len(self.counts)) if mode == "cap" else None

    def allowed(self) -> np.ndarray:
        """Boolean mask of layers the next merge may use (restarting or relaxing when needed)."""
        eligible = self.counts > self.floor
        if self.mode == "none":
            return eligible
        if self.mode == "cap":
            ok = eligible & (self.removed < self.cap)
            if not ok.any():
                self.cap_relaxed += 1
                return eligible
            return ok
        ok = eligible & ~self.frozen
        if not ok.any() and eligible.any():
            self.frozen[:] = False
            self.restarts += 1
            ok = eligible
        return ok

    def merged(self, layer: int) -> None:
        self.counts[layer] -= 1
        self.removed[layer] += 1
        if self.mode == "entropy" and layer_entropy(self.counts) < self.threshold:
            self.frozen[layer] = True

    def diagnostics(self) -> dict:
        n = len(self.counts)
        out = {
            "guard": self.mode,
            "restarts": self.restarts,
            "entropy_initial": self.initial,
            "entropy_threshold": self.threshold,
            "entropy_threshold_normalised": self.threshold / math.log(n) if n > 1 else 1.0,
            "entropy_final": layer_entropy(self.counts),
            "entropy_final_normalised": normalised_entropy(self.counts),
        }
        if self.mode == "cap":
            out.update(cap=self.cap, cap_relaxed=self.cap_relaxed)
        return out
