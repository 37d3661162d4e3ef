"""GRAPE: global, entropy-guarded greedy merging over every layer's similarity; and its local twin.

Algorithm 1 of the paper, as DESIGN.md states it, with the choices it leaves open written down:
  * D^l is the chosen similarity (`metric`, default 'cka') with its diagonal ignored; clusters start as
    singletons. R^l = Σ_{i≠j} D^l_ij over pairs that are in DIFFERENT clusters (the redundancy left).
  * Each step takes l* = argmax R^l over layers the guard allows that are above their floor (ties -> the
    lowest layer), merges the most similar pair (i, j) of l* in different clusters (ties -> lowest (i, j)),
    and subtracts 2·D_ij — and, Kruskal-style, 2·D over every other pair the union puts inside one cluster,
    which are zeroed too ('single-zero' linkage, default), so a pair already together is never picked.
    With `linkage='average'` the pair to merge is the pair of clusters with the highest average
    similarity (UPGMA); R^l is updated the same way.
  * Entropy guard (`guard='entropy'`, see `EntropyGuard`): Ê = E_init (1 - γ) over the retained-cluster
    fractions; a layer whose merge takes E below Ê is frozen; when all layers above their floor are frozen,
    all are unfrozen (a restart, counted in diagnostics). γ must be small to bind: the default 0.01 lets
    the allocation drift by about 1% of the maximal entropy before balancing; γ -> 0 approaches the uniform
    allocation, γ = 1 - ε (or `guard='none'`) the unguarded greedy. `guard='cap'` caps each layer at
    ⌈γ'·B/L⌉ removals instead (γ' = `cap_gamma`).
  * Per-layer floor max(top_k, min_experts, the router's minimum) (the paper has none).
  * Group-limited routers (DeepSeek-V2/V3) need every count to stay a multiple of n_group: the budget must
    be a multiple of it, and the greedy's removals per layer are rounded to whole groups by largest
    remainder (`snap_allocation`); each layer then replays its own merge sequence (which depends only on
    that layer) up to its rounded count. Diagnostics keep both allocations.

Speed: R^l lives in one array (a step is one masked argmax over L layers), and each layer walks its pairs in
descending similarity from a lazily extended sorted queue (a partial sort of the next chunk), skipping pairs
already in one cluster; Qwen3-235B / DeepSeek-V3 shapes plan well under 1 s (scripts/bench_planner.py).

`local`: the same similarity, linkage and merge, with B/L merges per layer (`uniform_allocation`: the
remainder goes one each to the layers with the largest initial R, ties to the lowest layer).
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Float

from grape_jax.calibration.stats import ModelStats
from grape_jax.planners.common import (
    EntropyGuard,
    UnionFind,
    check_budget,
    check_choice,
    floors,
    snap_allocation,
    uniform_allocation,
)
from grape_jax.planners.plan import OPERATORS, Plan, build_plan

LINKAGES = ("single-zero", "average")
MERGE_OPERATORS = OPERATORS  # every way a group becomes one expert (see grape_jax.planners.plan)


class LayerClusters:
    """Agglomerative state of one layer: clusters, remaining redundancy R and the next pair to merge."""

    def __init__(self, sim: Float[np.ndarray, "experts experts"], linkage: str):
        check_choice("linkage", linkage, LINKAGES)
        e = sim.shape[0]
        self.d = np.array(sim, np.float64)
        np.fill_diagonal(self.d, 0.0)
        self.linkage = linkage
        self.uf = UnionFind(e)
        self.members: dict[int, list[int]] = {i: [i] for i in range(e)}
        self.redundancy = float(self.d.sum())
        if linkage == "single-zero":
            self._iu, self._ju = np.triu_indices(e, 1)  # row-major: index order == (i, j) order
            self._vals = self.d[self._iu, self._ju]
            self._rest = np.arange(len(self._vals))
            self._queue = np.empty(0, np.int64)
            self._ptr = 0
            self._chunk = max(64, 2 * e)
        else:
            self.cluster_sim = self.d.copy()
            np.fill_diagonal(self.cluster_sim, -np.inf)

    @property
    def num_clusters(self) -> int:
        return len(self.members)

    def _refill(self) -> bool:
        """Queue the next chunk of pairs: all pairs at or above the chunk's k-th value, sorted."""
        rest = self._rest
        if rest.size == 0:
            return False
        v = self._vals[rest]
        k = min(self._chunk, rest.size)
        cut = v[np.argpartition(-v, k - 1)[k - 1]] if k < rest.size else v.min()
        take = v >= cut
        chosen = rest[take]
        self._queue = chosen[np.lexsort((chosen, -self._vals[chosen]))]
        self._rest = rest[~take]
        self._ptr = 0
        return True

    def best(self) -> tuple[int, int] | None:
        """Most similar pair in different clusters (for 'average': the pair of cluster roots)."""
        if self.num_clusters < 2:
            return None
        if self.linkage == "single-zero":
            find = self.uf.find
            while True:
                if self._ptr >= self._queue.size and not self._refill():
                    return None
                p = self._queue[self._ptr]
                i, j = int(self._iu[p]), int(self._ju[p])
                if find(i) != find(j):
                    return i, j
                self._ptr += 1
        flat = int(np.argmax(self.cluster_sim))
        i, j = divmod(flat, self.cluster_sim.shape[0])
        return (i, j) if i < j else (j, i)

    def merge(self, i: int, j: int) -> None:
        a, b = self.uf.find(i), self.uf.find(j)
        ma, mb = self.members.pop(a), self.members.pop(b)
        self.redundancy -= 2.0 * float(self.d[np.ix_(ma, mb)].sum())
        root = self.uf.union(a, b)
        self.members[root] = sorted(ma + mb)
        if self.linkage == "average":
            other = b if root == a else a
            s = self.cluster_sim
            new = (len(ma) * s[a] + len(mb) * s[b]) / (len(ma) + len(mb))
            s[root, :], s[:, root] = new, new
            s[other, :], s[:, other] = -np.inf, -np.inf
            s[root, root] = -np.inf

    def groups(self) -> list[list[int]]:
        return sorted(self.members.values(), key=min)


def _states(stats: ModelStats, metric: str, linkage: str) -> list[LayerClusters]:
    return [LayerClusters(ls.similarity(metric), linkage) for ls in stats.layers]


def _merge_counts(states: list[LayerClusters], removed: list[int]) -> None:
    """`removed[l]` merges in layer l, each layer in its own greedy order (it depends on that layer only)."""
    for s, r in zip(states, removed, strict=True):
        for _ in range(r):
            s.merge(*s.best())


def grape(
    stats: ModelStats,
    *,
    budget: int,
    metric: str = "cka",
    gamma: float = 0.01,
    guard: str = "entropy",
    cap_gamma: float = 1.0,
    linkage: str = "single-zero",
    operator: str = "freq",
    router_rule: str = "dominant",
    min_experts: int = 0,
) -> Plan:
    """GRAPE's global greedy (module docstring). Default operator 'freq' (α ∝ routing frequency)."""
    check_choice("operator", operator, MERGE_OPERATORS)
    floor = floors(stats, min_experts)
    check_budget(stats, budget, floor)
    states = _states(stats, metric, linkage)
    guard_state = EntropyGuard(
        [s.num_clusters for s in states], floor, gamma=gamma, mode=guard, budget=budget, cap_gamma=cap_gamma
    )
    red = np.array([s.redundancy for s in states])
    order = []
    for _ in range(budget):
        layer = int(np.argmax(np.where(guard_state.allowed(), red, -np.inf)))
        state = states[layer]
        state.merge(*state.best())
        red[layer] = state.redundancy
        guard_state.merged(layer)
        order.append(stats.layers[layer].layer)
    greedy = guard_state.removed.tolist()
    removed = snap_allocation(stats, greedy)
    if removed != greedy:
        states = _states(stats, metric, linkage)
        _merge_counts(states, removed)
        red = np.array([s.redundancy for s in states])
    options = dict(
        metric=metric, gamma=gamma, guard=guard, cap_gamma=cap_gamma, linkage=linkage, min_experts=min_experts
    )
    diagnostics = {
        **guard_state.diagnostics(),
        "redundancy_final": red.tolist(),
        "merge_order": order,
        "removed_per_layer": removed,
    }
    if removed != greedy:
        diagnostics["removed_per_layer_greedy"] = greedy
    return build_plan(
        stats,
        [s.groups() for s in states],
        method="grape",
        budget=budget,
        operator=operator,
        router_rule=router_rule,
        options=options,
        diagnostics=diagnostics,
    )


def local(
    stats: ModelStats,
    *,
    budget: int,
    metric: str = "cka",
    linkage: str = "single-zero",
    operator: str = "freq",
    router_rule: str = "dominant",
    min_experts: int = 0,
) -> Plan:
    """B/L merges in every layer (remainder rule in the module docstring), same machinery as grape."""
    check_choice("operator", operator, MERGE_OPERATORS)
    floor = floors(stats, min_experts)
    states = _states(stats, metric, linkage)
    alloc = uniform_allocation(stats, budget, floor, [s.redundancy for s in states])
    _merge_counts(states, alloc)
    options = dict(metric=metric, linkage=linkage, min_experts=min_experts)
    return build_plan(
        stats,
        [s.groups() for s in states],
        method="local",
        budget=budget,
        operator=operator,
        router_rule=router_rule,
        options=options,
        diagnostics={"removed_per_layer": alloc},
    )
