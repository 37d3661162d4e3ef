"""Planner speed at real model shapes: grape, grape-r and grape-l vs naive references, in the same run.

The naive references are written here, independently of the library's bookkeeping:
  naive grape    at every step, recomputes the masked argmax over the chosen layer's full E x E similarity
                 (pairs already in one cluster masked out) and keeps its own frozen set for the guard;
  naive grape-r  after every merge, recomputes the merged layer's full absorption-cost matrix over all
                 cluster pairs (instead of one row and the row minima);
  naive grape-l  the same naive greedy on the loss-unit costs built from the gradient sensitivities.
Each must give the same plan as the library; the script checks that and prints times and speed-ups.

    python scripts/bench_planner.py [--fraction 0.25] [--repeat 3]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from grape_jax.calibration.stats import LayerStats, ModelStats
from grape_jax.planners import make_plan

SHAPES = {
    "Qwen3-235B (94 x 128, top-8)": (94, 128, 8),
    "DeepSeek-V3 (58 x 256, top-8)": (58, 256, 8),
    "GLM-4.5 (89 x 160, top-8)": (89, 160, 8),
    "MiniMax-M2 (62 x 256, top-8)": (62, 256, 8),
}


def random_stats(num_layers: int, num_experts: int, k: int, seed: int = 0) -> ModelStats:
    """Random symmetric similarities (layers differ in redundancy) and routed moments."""
    rng = np.random.default_rng(seed)
    layers = []
    for l in range(num_layers):
        x = rng.random((num_experts, num_experts)) ** (1 + l % 3)
        s = (x + x.T) / 2
        np.fill_diagonal(s, 1.0)
        f = rng.dirichlet(np.ones(num_experts)) * k
        y = rng.normal(size=(num_experts, 16)) * (1 + l % 5)
        m, n = f[:, None] * (y @ y.T), f[:, None] * (y**2).sum(1)[None]
        u, g2 = rng.normal(size=num_experts) * (1 + l % 4), (f / k) ** 2
        sens = {
            "sens_m": g2[:, None] * np.outer(u, u),
            "sens_n": g2[:, None] * (u**2)[None],
            "sens_g": (f / k)[:, None] * u,
        }
        layers.append(
            LayerStats(
                l,
                1000,
                k,
                f,
                f / k,
                rng.random(num_experts),
                {"cka": s, "cos_mean": s, "router": s, "weight": s},
                m,
                n,
                **sens,
            )
        )
    return ModelStats(tuple(layers))


def _entropy(counts: list[int]) -> float:
    total = sum(counts)
    return -sum(c / total * math.log(c / total) for c in counts if c)


def _groups(labels: list[np.ndarray]) -> list[list[list[int]]]:
    out = []
    for lab in labels:
        groups: dict[int, list[int]] = {}
        for e, c in enumerate(lab.tolist()):
            groups.setdefault(c, []).append(e)
        out.append(sorted(groups.values(), key=min))
    return out


def naive_grape(stats: ModelStats, budget: int, gamma: float = 0.01) -> list[list[list[int]]]:
    sims, labels, red = [], [], []
    for ls in stats.layers:
        d = ls.sim["cka"].copy()
        np.fill_diagonal(d, 0.0)
        sims.append(d)
        labels.append(np.arange(ls.num_experts))
        red.append(float(d.sum()))
    counts = [ls.num_experts for ls in stats.layers]
    floor = [ls.top_k for ls in stats.layers]
    threshold = _entropy(counts) * (1 - gamma)
    frozen: set[int] = set()
    iu = np.triu_indices(stats.layers[0].num_experts, 1)
    for _ in range(budget):
        open_ = [l for l in range(len(counts)) if counts[l] > floor[l]]
        if all(l in frozen for l in open_):
            frozen.clear()
        layer = max((l for l in open_ if l not in frozen), key=lambda l: (red[l], -l))
        d, lab = sims[layer], labels[layer]
        masked = np.where(lab[:, None] == lab[None, :], -np.inf, d)
        vals = masked[iu]
        best = np.flatnonzero(vals == vals.max())[0]  # first in row-major order = lowest (i, j)
        a, b = lab[iu[0][best]], lab[iu[1][best]]
        red[layer] -= 2.0 * float(d[np.ix_(np.flatnonzero(lab == a), np.flatnonzero(lab == b))].sum())
        lab[lab == max(a, b)] = min(a, b)
        counts[layer] -= 1
        if _entropy(counts) < threshold:
            frozen.add(layer)
    return _groups(labels)


def naive_grape_r(stats: ModelStats, budget: int, moments=("routed_m", "routed_n")) -> list[list[list[int]]]:
    """Unguarded, absolute costs (grape-r's defaults); `moments` ("sens_m", "sens_n"): grape-l's costs."""
    rows, reps, members, best = [], [], [], []

    def layer_best(l: int) -> tuple[float, int, int]:
        roots = np.array(sorted(members[l]))
        sub = rows[l][np.ix_(roots, np.array([reps[l][r] for r in roots]))]
        delta = sub - np.diag(sub)[:, None]
        np.fill_diagonal(delta, np.inf)
        a, b = divmod(int(np.argmin(delta)), len(roots))
        return float(delta[a, b]), int(roots[a]), int(roots[b])

    for l, ls in enumerate(stats.layers):
        m, n = getattr(ls, moments[0]), getattr(ls, moments[1])
        rows.append(np.maximum(np.diag(n)[:, None] + n - 2.0 * m, 0.0))
        reps.append({i: i for i in range(ls.num_experts)})
        members.append({i: [i] for i in range(ls.num_experts)})
        best.append(layer_best(l))
    for _ in range(budget):
        open_ = [l for l, ls in enumerate(stats.layers) if len(members[l]) > ls.top_k]
        layer = min(open_, key=lambda l: (best[l][0], l))
        _, a, b = best[layer]
        rows[layer][b] += rows[layer][a]
        members[layer][b] += members[layer].pop(a)
        reps[layer].pop(a)
        best[layer] = layer_best(layer)
    labels = []
    for mem in members:
        lab = np.zeros(sum(len(v) for v in mem.values()), np.int64)
        for root, v in mem.items():
            lab[v] = root
        labels.append(lab)
    return _groups(labels)


def _timed(fn, repeat: int):
    best, out = math.inf, None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fraction", type=float, default=0.25, help="share of experts removed")
    p.add_argument("--repeat", type=int, default=3, help="best of N timings for the library planners")
    args = p.parse_args()
    print(
        f"{'shape':31s} {'budget':>6} {'grape s':>8} {'naive s':>8} {'speed-up':>8} {'same':>5} "
        f"{'grape-r s':>9} {'naive-r s':>9} {'speed-up':>8} {'same':>5} "
        f"{'grape-l s':>9} {'naive-l s':>9} {'speed-up':>8} {'same':>5}"
    )
    for name, (layers, experts, k) in SHAPES.items():
        stats = random_stats(layers, experts, k)
        budget = int(args.fraction * layers * experts)
        t_g, plan = _timed(lambda s=stats, b=budget: make_plan(s, method="grape", budget=b), args.repeat)
        t_r, plan_r = _timed(lambda s=stats, b=budget: make_plan(s, method="grape-r", budget=b), args.repeat)
        t_l, plan_l = _timed(lambda s=stats, b=budget: make_plan(s, method="grape-l", budget=b), args.repeat)
        t_n, naive = _timed(lambda s=stats, b=budget: naive_grape(s, b), 1)
        t_nr, naive_r = _timed(lambda s=stats, b=budget: naive_grape_r(s, b), 1)
        t_nl, naive_l = _timed(lambda s=stats, b=budget: naive_grape_r(s, b, ("sens_m", "sens_n")), 1)
        same = [list(map(list, lp.groups)) for lp in plan.layers] == naive
        same_r = [list(map(list, lp.groups)) for lp in plan_r.layers] == naive_r
        same_l = [list(map(list, lp.groups)) for lp in plan_l.layers] == naive_l
        print(
            f"{name:31s} {budget:6d} {t_g:8.3f} {t_n:8.3f} {t_n / t_g:7.1f}x {same!s:>5} "
            f"{t_r:9.3f} {t_nr:9.3f} {t_nr / t_r:7.1f}x {same_r!s:>5} "
            f"{t_l:9.3f} {t_nl:9.3f} {t_nl / t_l:7.1f}x {same_l!s:>5}"
        )
        if not (same and same_r and same_l):
            raise SystemExit(f"{name}: the library and the naive reference disagree")


if __name__ == "__main__":
    main()
