"""Planner speed at real model shapes: grape / grape-r vs a naive full-matrix GRAPE, same run.

The naive reference recomputes, at every step, the masked argmax of the chosen layer's full E x E
similarity (pairs already in one cluster masked out) instead of walking a presorted pair list. Both
must produce the same plan; the script checks that and prints times and the speed-up.

    python scripts/bench_planner.py
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from grape_jax.planners import make_plan
from grape_jax.planners.common import EntropyGuard
from grape_jax.stats import LayerStats, ModelStats

SHAPES = {"Qwen3-235B (94 x 128, top-8)": (94, 128, 8), "DeepSeek-V3 (58 x 256, top-8)": (58, 256, 8)}


def random_stats(num_layers: int, num_experts: int, k: int, seed: int = 0) -> ModelStats:
    rng = np.random.default_rng(seed)
    layers = []
    for l in range(num_layers):
        x = rng.random((num_experts, num_experts)) ** (1 + l % 3)
        s = (x + x.T) / 2
        np.fill_diagonal(s, 1.0)
        f = rng.dirichlet(np.ones(num_experts)) * k
        y = rng.normal(size=(num_experts, 16))
        m, n = f[:, None] * (y @ y.T), f[:, None] * (y ** 2).sum(1)[None]
        layers.append(LayerStats(l, 1000, k, f, f / k, rng.random(num_experts),
                                 {"cka": s, "cos_mean": s, "router": s, "weight": s}, m, n))
    return ModelStats(tuple(layers))


def naive_grape(stats: ModelStats, budget: int, gamma: float = 0.01) -> list[list[list[int]]]:
    sims, labels, red = [], [], []
    for ls in stats.layers:
        d = ls.sim["cka"].copy()
        np.fill_diagonal(d, 0.0)
        sims.append(d)
        labels.append(np.arange(ls.num_experts))
        red.append(d.sum())
    guard = EntropyGuard([ls.num_experts for ls in stats.layers], gamma, "entropy", budget)
    floor = [ls.top_k for ls in stats.layers]
    for _ in range(budget):
        counts = [len(set(lab.tolist())) for lab in labels]
        allowed = guard.allowed([c > f for c, f in zip(counts, floor)])
        layer = int(np.argmax([r if ok else -np.inf for r, ok in zip(red, allowed)]))
        d, lab = sims[layer], labels[layer]
        masked = np.where(lab[:, None] == lab[None, :], -np.inf, d)
        iu = np.triu_indices(len(lab), 1)
        vals = masked[iu]
        best = np.flatnonzero(vals == vals.max())[0]  # first in row-major order = lowest (i, j)
        i, j = iu[0][best], iu[1][best]
        a, b = lab[i], lab[j]
        red[layer] -= 2.0 * d[np.ix_(lab == a, lab == b)].sum()
        lab[lab == max(a, b)] = min(a, b)
        guard.merged(layer)
    out = []
    for lab in labels:
        groups = {}
        for e, c in enumerate(lab.tolist()):
            groups.setdefault(c, []).append(e)
        out.append(sorted(groups.values(), key=min))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fraction", type=float, default=0.25, help="share of experts removed")
    args = p.parse_args()
    print(f"{'shape':32s} {'budget':>6} {'grape s':>8} {'grape-r s':>9} {'naive s':>8} {'speed-up':>8} same")
    for name, (layers, experts, k) in SHAPES.items():
        stats = random_stats(layers, experts, k)
        budget = int(args.fraction * layers * experts)
        t = time.perf_counter()
        plan = make_plan("grape", stats, budget=budget)
        t_grape = time.perf_counter() - t
        t = time.perf_counter()
        make_plan("grape-r", stats, budget=budget)
        t_r = time.perf_counter() - t
        t = time.perf_counter()
        naive = naive_grape(stats, budget)
        t_naive = time.perf_counter() - t
        same = [list(map(list, lp.groups)) for lp in plan.layers] == naive
        print(f"{name:32s} {budget:6d} {t_grape:8.3f} {t_r:9.3f} {t_naive:8.3f} {t_naive / t_grape:7.1f}x {same}")


if __name__ == "__main__":
    main()
