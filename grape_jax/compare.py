"""Compare planners (and merge operators) at equal budgets from one calibration pass.

For each (method, operator, experts removed per layer): plan -> merge -> held-out perplexity, parameter
count and per-layer allocation. Used by `grape demo` (the embedded default) and `grape compare`.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from grape_jax.config import MoEConfig
from grape_jax.evaluate import jax_logits_fn, perplexity
from grape_jax.params import count_params
from grape_jax.stats import ModelStats


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of a comparison: a planner with its options, at a per-layer budget."""

    method: str
    per_layer: int
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    label: str | None = None

    @property
    def name(self) -> str:
        return self.label or self.method


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    method: str
    per_layer: int
    ppl: float
    params: int
    kept: tuple[int, ...]
    seconds: float


def run_comparison(
    params: Mapping[str, jax.Array],
    cfg: MoEConfig,
    stats: ModelStats,
    variants: Sequence[Variant],
    eval_blocks: np.ndarray,
    *,
    batch_size: int = 8,
    log=print,
) -> tuple[Row, list[Row]]:
    """The original model's row and one row per variant."""
    from grape_jax.pipeline import apply_plan
    from grape_jax.planners import budget_from_per_layer, make_plan

    t0 = time.perf_counter()
    base = perplexity(jax_logits_fn(dict(params), cfg), eval_blocks, batch_size=batch_size).ppl
    moe = tuple(cfg.num_experts[layer] for layer in cfg.moe_layers)
    original = Row("original", "-", 0, base, count_params(cfg), moe, time.perf_counter() - t0)
    log(f"{'original':28s} r=0  ppl {base:9.3f}")
    rows = []
    for v in variants:
        t0 = time.perf_counter()
        plan = make_plan(v.method, stats, budget=budget_from_per_layer(v.per_layer, stats), **dict(v.options))
        merged, new_cfg = apply_plan(params, cfg, plan)
        ppl = perplexity(jax_logits_fn(merged, new_cfg), eval_blocks, batch_size=batch_size).ppl
        rows.append(Row(v.name, v.method, v.per_layer, ppl, count_params(new_cfg), plan.kept_per_layer,
                        time.perf_counter() - t0))
        log(f"{v.name:28s} r={v.per_layer}  ppl {ppl:9.3f}  kept {list(plan.kept_per_layer)}")
    return original, rows


def markdown_table(original: Row, rows: Sequence[Row]) -> str:
    lines = ["| method | removed / layer | held-out ppl | params | experts kept per layer |",
             "|---|---|---|---|---|",
             f"| original | 0 | {original.ppl:.3f} | {original.params:,} | {list(original.kept)} |"]
    for r in sorted(rows, key=lambda r: (r.per_layer, r.ppl)):
        lines.append(f"| {r.name} | {r.per_layer} | {r.ppl:.3f} | {r.params:,} | {list(r.kept)} |")
    return "\n".join(lines)


def write_report(directory: str, original: Row, rows: Sequence[Row], *, title: str, notes: str = "") -> str:
    """report.md + results.csv + perplexity.png + allocation PNGs in `directory`; returns report path."""
    from grape_jax.plots import plot_perplexity

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "results.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["name", "method", "per_layer", "ppl", "params", "kept_per_layer", "seconds"])
        w.writerow(["original", "-", 0, f"{original.ppl:.6f}", original.params, " ".join(map(str, original.kept)), ""])
        for r in rows:
            w.writerow([r.name, r.method, r.per_layer, f"{r.ppl:.6f}", r.params, " ".join(map(str, r.kept)),
                        f"{r.seconds:.2f}"])
    table: dict[str, dict[int, float]] = {}
    for r in rows:
        table.setdefault(r.name, {})[r.per_layer] = r.ppl
    plot_perplexity(table, original.ppl, os.path.join(directory, "perplexity.png"))
    _plot_allocations(directory, rows)
    text = f"# {title}\n\n{notes}\n\n{markdown_table(original, rows)}\n\n![perplexity](perplexity.png)\n"
    for per_layer in sorted({r.per_layer for r in rows}):
        text += f"\n![allocation, {per_layer} removed per layer](allocation_r{per_layer}.png)\n"
    path = os.path.join(directory, "report.md")
    with open(path, "w") as f:
        f.write(text)
    return path


def _plot_allocations(directory: str, rows: Sequence[Row]) -> None:
    from grape_jax.plots import _pyplot

    plt = _pyplot()
    for per_layer in sorted({r.per_layer for r in rows}):
        sel = [r for r in rows if r.per_layer == per_layer]
        fig, ax = plt.subplots(figsize=(6, 3.2))
        width = 0.8 / len(sel)
        n = len(sel[0].kept)
        for i, r in enumerate(sel):
            ax.bar(np.arange(n) + i * width, r.kept, width, label=r.name)
        ax.set_xlabel("MoE layer")
        ax.set_ylabel("experts kept")
        ax.set_title(f"{per_layer} experts removed per layer on average")
        ax.legend(fontsize="x-small", ncol=2)
        fig.tight_layout()
        fig.savefig(os.path.join(directory, f"allocation_r{per_layer}.png"), dpi=80)
        plt.close(fig)
