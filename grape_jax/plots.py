"""PNG figures: similarity heatmaps, routing frequencies, per-layer allocations (matplotlib, Agg)."""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np

from grape_jax.stats import ModelStats


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_stats(stats: ModelStats, directory: str, *, metric: str = "cka") -> list[str]:
    """One PNG per MoE layer: similarity heatmap + routing-frequency bars."""
    plt = _pyplot()
    os.makedirs(directory, exist_ok=True)
    paths = []
    for ls in stats.layers:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 4))
        im = ax1.imshow(ls.similarity(metric), vmin=0, vmax=1, cmap="viridis")
        ax1.set_title(f"layer {ls.layer}: {metric} similarity")
        ax1.set_xlabel("expert")
        ax1.set_ylabel("expert")
        fig.colorbar(im, ax=ax1, fraction=0.046)
        ax2.bar(np.arange(ls.num_experts), ls.freq / max(ls.top_k, 1))
        ax2.set_title("routing frequency (share of top-k slots)")
        ax2.set_xlabel("expert")
        fig.tight_layout()
        path = os.path.join(directory, f"layer{ls.layer:03d}.png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_allocation(plans: Mapping[str, object], path: str) -> str:
    """Grouped bars: experts removed per layer for each named plan."""
    plt = _pyplot()
    names = list(plans)
    layers = [lp.layer for lp in plans[names[0]].layers]
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(max(6, len(layers) * 0.5), 3.5))
    for i, name in enumerate(names):
        removed = [lp.num_experts_before - len(lp.groups) for lp in plans[name].layers]
        ax.bar(np.arange(len(layers)) + i * width, removed, width, label=name)
    ax.set_xticks(np.arange(len(layers)) + width * (len(names) - 1) / 2, [str(x) for x in layers])
    ax.set_xlabel("MoE layer")
    ax.set_ylabel("experts removed")
    ax.legend(fontsize="small")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_perplexity(table: Mapping[str, Mapping[int, float]], baseline: float, path: str) -> str:
    """Perplexity vs experts removed per layer, one line per method."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    for name, points in table.items():
        xs = sorted(points)
        ax.plot(xs, [points[x] for x in xs], marker="o", label=name)
    ax.axhline(baseline, color="k", linestyle="--", linewidth=1, label="original")
    ax.set_xlabel("experts removed per layer (average)")
    ax.set_ylabel("held-out perplexity")
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
