"""PNG figures: similarity heatmaps, routing shares, per-layer allocations, perplexity vs budget
(matplotlib, Agg backend). Every axis that counts layers, experts or budgets has integer ticks placed on
the bars or points they label."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import numpy as np

from grape_jax.calibration.stats import ModelStats


def _pyplot():
    """matplotlib.pyplot on the Agg backend; deferred: importing matplotlib takes ~0.5 s and only the
    plotting commands need it."""
    import matplotlib  # noqa: PLC0415  (deferred: see the docstring)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415  (deferred: see the docstring)

    return plt


def _save(fig, plt, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=80, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_stats(stats: ModelStats, directory: str, *, metric: str = "cka") -> list[str]:
    """One PNG per MoE layer: similarity heatmap + routing shares (each expert's share of the routed
    top-k slots; they sum to 1, the same unit `grape stats` prints)."""
    plt = _pyplot()
    paths = []
    for ls in stats.layers:
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 4))
        ticks = np.arange(ls.num_experts)
        im = ax1.imshow(ls.similarity(metric), vmin=0, vmax=1, cmap="viridis")
        ax1.set_title(f"layer {ls.layer}: {metric} similarity")
        ax1.set_xlabel("expert")
        ax1.set_ylabel("expert")
        if ls.num_experts <= 32:
            ax1.set_xticks(ticks)
            ax1.set_yticks(ticks)
        fig.colorbar(im, ax=ax1, fraction=0.046)
        ax2.bar(ticks, ls.routing_share)
        ax2.set_title("routing share (share of top-k slots, sums to 1)")
        ax2.set_xlabel("expert")
        if ls.num_experts <= 32:
            ax2.set_xticks(ticks)
        paths.append(_save(fig, plt, os.path.join(directory, f"layer{ls.layer:03d}.png")))
    return paths


def plot_allocation(
    removed: Mapping[str, Sequence[int]],
    layers: Sequence[int],
    path: str,
    *,
    title: str = "experts removed per MoE layer",
    ylabel: str = "experts removed",
) -> str:
    """Grouped bars, one group per MoE layer (ticked under the group's centre), one bar per name."""
    plt = _pyplot()
    names = list(removed)
    width = 0.8 / max(len(names), 1)
    fig, ax = plt.subplots(figsize=(max(6, len(layers) * 0.5) + 2.5, 3.5))
    x = np.arange(len(layers))
    for i, name in enumerate(names):
        ax.bar(x + (i - (len(names) - 1) / 2) * width, removed[name], width, label=name)
    ax.set_xticks(x, [str(layer) for layer in layers])
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("MoE layer")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    _legend_outside(ax)
    return _save(fig, plt, path)


def plot_perplexity(
    table: Mapping[str, Mapping[int, float]],
    baseline: float,
    path: str,
    *,
    title: str = "held-out perplexity after pruning",
) -> str:
    """Perplexity relative to the original's (% above it) vs experts removed per layer, one line per
    method, on a symmetric-log axis (linear within ±1%, logarithmic beyond), so rows within a percent of
    the original and rows at twice its perplexity are both told apart; each point is labelled with its
    perplexity, and the legend sits outside the axes."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    budgets = sorted({x for points in table.values() for x in points})
    for name, points in table.items():
        xs = sorted(points)
        ys = [100.0 * (points[x] / baseline - 1.0) for x in xs]
        (line,) = ax.plot(xs, ys, marker="o", label=name)
        for x, y in zip(xs, ys, strict=True):
            label = f"{points[x]:.2f}"
            ax.annotate(label, (x, y), xytext=(4, 0), textcoords="offset points", fontsize=6, color=line.get_color())
    ax.axhline(0.0, color="k", linestyle="--", linewidth=1, label=f"original ({baseline:.2f})")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}%"))
    ax.set_xticks(budgets, [str(b) for b in budgets])
    ax.set_xlabel("experts removed per layer (average)")
    ax.set_ylabel("perplexity above the original (%, symlog)")
    ax.set_title(title)
    _legend_outside(ax)
    return _save(fig, plt, path)


def _legend_outside(ax) -> None:
    """The legend right of the axes, where it covers no bar or line."""
    ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def plot_loss(
    losses: Sequence[float],
    val_losses: Sequence[tuple[int, float]],
    path: str,
    *,
    title: str = "healing: distillation loss",
) -> str:
    """Training loss per step (thin line) and validation loss at the validated steps (points)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, linewidth=0.8, label="training batch")
    if val_losses:
        xs, ys = zip(*val_losses, strict=True)
        ax.plot(xs, ys, marker="o", label="validation")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend(fontsize="x-small")
    return _save(fig, plt, path)
