"""Pieces every planner shares: floors, uniform allocations, union-find, the layer-entropy guard."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from grape_jax.plan import PlanError
from grape_jax.stats import ModelStats


def floors(stats: ModelStats, min_experts: int = 0) -> list[int]:
    """Experts each layer must keep: max(top_k, min_experts)."""
    return [max(ls.top_k, min_experts, 1) for ls in stats.layers]


def check_budget(stats: ModelStats, budget: int, floor: Sequence[int]) -> None:
    room = sum(ls.num_experts - f for ls, f in zip(stats.layers, floor, strict=True))
    if budget < 0:
        raise PlanError(f"budget must be >= 0, got {budget}")
    if budget > room:
        raise PlanError(f"budget {budget} exceeds the {room} experts removable above the per-layer floors")


def uniform_allocation(stats: ModelStats, budget: int, floor: Sequence[int], tie_break: Sequence[float]) -> list[int]:
    """Removals per layer for local planners: B // L each, the remainder one more to the layers that rank
    highest in `tie_break` (e.g. redundancy); layers at their floor pass their share on."""
    check_budget(stats, budget, floor)
    n = len(stats.layers)
    room = [ls.num_experts - f for ls, f in zip(stats.layers, floor, strict=True)]
    alloc = [min(budget // n, r) for r in room]
    order = sorted(range(n), key=lambda i: (-tie_break[i], i))
    left = budget - sum(alloc)
    while left > 0:
        for i in order:
            if left and alloc[i] < room[i]:
                alloc[i] += 1
                left -= 1
    return alloc


def layer_entropy(counts: Sequence[int]) -> float:
    """Entropy of the retained-cluster fractions p_l = |C^l| / Σ|C|."""
    c = np.asarray(counts, np.float64)
    p = c / c.sum()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def normalised_entropy(counts: Sequence[int]) -> float:
    return layer_entropy(counts) / math.log(len(counts)) if len(counts) > 1 else 1.0


class UnionFind:
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

    def groups(self) -> list[list[int]]:
        out: dict[int, list[int]] = {}
        for x in range(len(self.parent)):
            out.setdefault(self.find(x), []).append(x)
        return sorted(out.values(), key=min)


class EntropyGuard:
    """GRAPE's guard: freeze a layer when merging in it drops the entropy below Ê = E_init (1 - γ);
    when every layer that can still merge is frozen, unfreeze all (a restart) and go on."""

    def __init__(self, counts: Sequence[int], gamma: float, mode: str, budget: int, cap_gamma: float = 1.0):
        if mode not in ("entropy", "none", "cap"):
            raise PlanError(f"guard {mode!r} unknown; expected 'entropy', 'none' or 'cap'")
        self.mode = mode
        self.counts = list(counts)
        self.initial = layer_entropy(self.counts)
        self.threshold = self.initial * (1.0 - gamma)
        self.frozen: set[int] = set()
        self.restarts = 0
        self.removed = [0] * len(self.counts)
        self.cap = math.ceil(cap_gamma * budget / len(self.counts)) if mode == "cap" else None

    def allowed(self, eligible: Sequence[bool]) -> list[bool]:
        """Layers the next merge may use (restarts when needed)."""
        if self.mode == "cap":
            ok = [e and self.removed[i] < self.cap for i, e in enumerate(eligible)]
            return ok if any(ok) else list(eligible)
        ok = [e and i not in self.frozen for i, e in enumerate(eligible)]
        if not any(ok) and any(eligible):
            self.frozen.clear()
            self.restarts += 1
            ok = list(eligible)
        return ok

    def merged(self, layer: int) -> None:
        self.counts[layer] -= 1
        self.removed[layer] += 1
        if self.mode == "entropy" and layer_entropy(self.counts) < self.threshold:
            self.frozen.add(layer)

    def diagnostics(self) -> dict:
        return {
            "guard": self.mode,
            "restarts": self.restarts,
            "entropy_initial": self.initial,
            "entropy_threshold": self.threshold,
            "entropy_final": layer_entropy(self.counts),
            "entropy_final_normalised": normalised_entropy(self.counts),
        }
