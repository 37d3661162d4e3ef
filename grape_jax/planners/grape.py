"""GRAPE (global, entropy-guarded greedy merging over the block-diagonal similarity) and its local twin.

Per layer l: similarity D^l (diagonal ignored), redundancy R^l = Σ_{i≠j} D^l_ij over pairs that are still
in different clusters. Each step takes the unfrozen layer with the largest R^l, merges its most similar
pair of clusters, and subtracts 2·Σ D over every pair the merge puts inside one cluster — with the
default 'single-zero' linkage those pairs are zeroed Kruskal-style, so a later step never picks a pair
that is already together. The entropy guard (`EntropyGuard`) freezes layers whose merge drops the
cluster-count entropy below E_init·(1-γ) and restarts when all are frozen.

Local: the same similarity, linkage and operator, with B/L merges in every layer.
Both keep each layer at or above its floor max(top_k, min_experts).
"""

from __future__ import annotations

import numpy as np

from grape_jax.plan import Plan, PlanError, build_plan
from grape_jax.planners.common import EntropyGuard, UnionFind, check_budget, floors, uniform_allocation
from grape_jax.stats import ModelStats

LINKAGES = ("single-zero", "average")


class LayerClusters:
    """Agglomerative state of one layer: clusters, remaining redundancy and the next best pair."""

    def __init__(self, sim: np.ndarray, linkage: str):
        if linkage not in LINKAGES:
            raise PlanError(f"linkage {linkage!r} unknown; expected one of {LINKAGES}")
        e = sim.shape[0]
        self.d = np.array(sim, np.float64)
        np.fill_diagonal(self.d, 0.0)
        self.linkage = linkage
        self.uf = UnionFind(e)
        self.members = {i: [i] for i in range(e)}
        self.redundancy = float(self.d.sum())
        if linkage == "single-zero":
            iu, ju = np.triu_indices(e, 1)
            order = np.lexsort((ju, iu, -self.d[iu, ju]))
            self.pairs = np.stack([iu[order], ju[order]], 1)
            self.ptr = 0
        else:
            self.cluster_sim = self.d.copy()
            np.fill_diagonal(self.cluster_sim, -np.inf)

    @property
    def num_clusters(self) -> int:
        return len(self.members)

    def best(self) -> tuple[int, int] | None:
        """Most similar pair of different clusters (cluster roots for 'average')."""
        if self.num_clusters < 2:
            return None
        if self.linkage == "single-zero":
            while self.ptr < len(self.pairs):
                i, j = self.pairs[self.ptr]
                if self.uf.find(int(i)) != self.uf.find(int(j)):
                    return int(i), int(j)
                self.ptr += 1
            return None
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
            na, nb = len(ma), len(mb)
            s = self.cluster_sim
            new = (na * s[a] + nb * s[b]) / (na + nb)
            s[root, :], s[:, root] = new, new
            s[root, root] = -np.inf
            s[other, :], s[:, other] = -np.inf, -np.inf

    def groups(self) -> list[list[int]]:
        return [self.members[r] for r in sorted(self.members, key=lambda r: min(self.members[r]))]


def _states(stats: ModelStats, metric: str, linkage: str) -> list[LayerClusters]:
    return [LayerClusters(ls.similarity(metric), linkage) for ls in stats.layers]


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
    stats_sha256: str | None = None,
) -> Plan:
    """GRAPE's global greedy (see module docstring)."""
    floor = floors(stats, min_experts)
    check_budget(stats, budget, floor)
    states = _states(stats, metric, linkage)
    g = EntropyGuard([s.num_clusters for s in states], gamma, guard, budget, cap_gamma)
    order = []
    for _ in range(budget):
        eligible = [s.num_clusters > f for s, f in zip(states, floor, strict=True)]
        allowed = g.allowed(eligible)
        red = np.array([s.redundancy if ok else -np.inf for s, ok in zip(states, allowed, strict=True)])
        layer = int(np.argmax(red))
        pair = states[layer].best()
        if pair is None:  # pragma: no cover - eligible layers always have a pair
            raise PlanError(f"layer {stats.layers[layer].layer}: no pair left to merge")
        states[layer].merge(*pair)
        g.merged(layer)
        order.append(stats.layers[layer].layer)
    options = dict(metric=metric, gamma=gamma, guard=guard, cap_gamma=cap_gamma, linkage=linkage,
                   min_experts=min_experts)
    diagnostics = {**g.diagnostics(), "merge_order": order}
    return build_plan(stats, [s.groups() for s in states], method="grape", budget=budget, operator=operator,
                      router_rule=router_rule, options=options, stats_sha256=stats_sha256,
                      diagnostics=diagnostics)


def local(
    stats: ModelStats,
    *,
    budget: int,
    metric: str = "cka",
    linkage: str = "single-zero",
    operator: str = "freq",
    router_rule: str = "dominant",
    min_experts: int = 0,
    stats_sha256: str | None = None,
) -> Plan:
    """Uniform B/L merges per layer (remainder to the most redundant layers), same machinery as grape."""
    floor = floors(stats, min_experts)
    states = _states(stats, metric, linkage)
    alloc = uniform_allocation(stats, budget, floor, [s.redundancy for s in states])
    for s, r in zip(states, alloc, strict=True):
        for _ in range(r):
            s.merge(*s.best())
    options = dict(metric=metric, linkage=linkage, min_experts=min_experts)
    return build_plan(stats, [s.groups() for s in states], method="local", budget=budget, operator=operator,
                      router_rule=router_rule, options=options, stats_sha256=stats_sha256,
                      diagnostics={"allocation": alloc})
