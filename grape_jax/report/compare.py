"""Compare planners (and merge operators) at equal budgets from one calibration pass.

For each (method, operator, experts removed per layer): plan -> merge -> held-out perplexity, parameter
count and per-layer allocation. Variants with operator 'fit' refit their merged down projections on the
calibration blocks the statistics were made from. Used by `grape demo` (the embedded default) and `grape compare`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from grape_jax.base.atomic import atomic_write_text
from grape_jax.calibration.stats import ModelStats
from grape_jax.core.model import MoEModel
from grape_jax.core.params import count_params
from grape_jax.evaluation.scoring import perplexity
from grape_jax.fit.operator import FitOptions
from grape_jax.pipeline import apply_plan
from grape_jax.planners import make_plan
from grape_jax.report.plots import plot_allocation, plot_perplexity


@dataclasses.dataclass(frozen=True)
class Variant:
    """One row of a comparison: a planner with its options, at a per-layer budget (`per_layer` experts
    removed per MoE layer, or with `fraction` set, that fraction of the routed experts; `per_layer` is
    then ignored)."""

    method: str
    per_layer: int
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    label: str | None = None
    fraction: float | None = None

    @property
    def name(self) -> str:
        return self.label or self.method

    @property
    def amount(self) -> float:
        """The budget as the table shows it: experts removed per layer, or the fraction removed."""
        return self.per_layer if self.fraction is None else self.fraction

    @property
    def budget(self) -> dict[str, float]:
        """`make_plan`'s budget keyword."""
        return {"per_layer": self.per_layer} if self.fraction is None else {"fraction": self.fraction}


def amount_text(amount: float) -> str:
    """A budget for tables: '2' experts per layer, or '25%' for a fraction (0 < amount < 1)."""
    return f"{amount:.0%}" if 0 < amount < 1 else str(int(amount))


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    method: str
    per_layer: float  # experts removed per layer, or the fraction removed (0 < per_layer < 1)
    ppl: float
    params: int
    kept: tuple[int, ...]
    seconds: float


def run_comparison(
    model: MoEModel,
    stats: ModelStats,
    variants: Sequence[Variant],
    eval_blocks: np.ndarray,
    *,
    calibration_blocks: np.ndarray | None = None,
    fit_options: FitOptions = FitOptions(),
    batch_size: int = 8,
    log=print,
) -> tuple[Row, list[Row]]:
    """The original model's row and one row per variant (every plan from the same statistics; variants
    with operator 'fit' fit on `calibration_blocks`)."""
    cfg = model.cfg
    t0 = time.perf_counter()
    base = perplexity(model, eval_blocks, batch_size=batch_size).ppl
    moe = tuple(cfg.num_experts[layer] for layer in cfg.moe_layers)
    original = Row("original", "-", 0, base, count_params(cfg), moe, time.perf_counter() - t0)
    log(f"{'original':28s} r=0  ppl {base:9.3f}")
    rows = []
    for v in variants:
        t0 = time.perf_counter()
        plan = make_plan(stats, method=v.method, **v.budget, **dict(v.options))
        merged = apply_plan(model, plan, blocks=calibration_blocks, fit_options=fit_options)
        ppl = perplexity(merged, eval_blocks, batch_size=batch_size).ppl
        rows.append(
            Row(
                v.name,
                v.method,
                v.amount,
                ppl,
                count_params(merged.cfg),
                plan.kept_per_layer,
                time.perf_counter() - t0,
            )
        )
        log(f"{v.name:28s} r={amount_text(v.amount)}  ppl {ppl:9.3f}  kept {list(plan.kept_per_layer)}")
    return original, rows


def markdown_table(original: Row, rows: Sequence[Row]) -> str:
    lines = [
        "| method | removed / layer | held-out ppl | params | experts kept per layer |",
        "|---|---|---|---|---|",
        f"| original | 0 | {original.ppl:.3f} | {original.params:,} | {list(original.kept)} |",
    ]
    for r in sorted(rows, key=lambda r: (r.per_layer, r.ppl)):
        lines.append(f"| {r.name} | {amount_text(r.per_layer)} | {r.ppl:.3f} | {r.params:,} | {list(r.kept)} |")
    return "\n".join(lines)


def write_report(directory: str, original: Row, rows: Sequence[Row], *, title: str, notes: str = "") -> str:
    """report.md + results.csv + perplexity.png + allocation PNGs in `directory`; returns report path."""
    os.makedirs(directory, exist_ok=True)
    lines = [
        ["name", "method", "per_layer", "ppl", "params", "kept_per_layer", "seconds"],
        ["original", "-", 0, f"{original.ppl:.6f}", original.params, " ".join(map(str, original.kept)), ""],
    ]
    lines += [
        [r.name, r.method, r.per_layer, f"{r.ppl:.6f}", r.params, " ".join(map(str, r.kept)), f"{r.seconds:.2f}"]
        for r in rows
    ]
    buffer = io.StringIO()
    csv.writer(buffer).writerows(lines)
    atomic_write_text(os.path.join(directory, "results.csv"), buffer.getvalue())
    table: dict[str, dict[float, float]] = {}
    for r in rows:
        table.setdefault(r.name, {})[r.per_layer] = r.ppl
    plot_perplexity(table, original.ppl, os.path.join(directory, "perplexity.png"), title=f"{title}: perplexity")
    text = f"# {title}\n\n{notes}\n\n{markdown_table(original, rows)}\n\n![perplexity](perplexity.png)\n"
    layers = list(range(len(original.kept)))
    for per_layer in sorted({r.per_layer for r in rows}):
        kept = {r.name: list(r.kept) for r in rows if r.per_layer == per_layer}
        plot_allocation(
            kept,
            layers,
            os.path.join(directory, f"allocation_r{amount_text(per_layer).rstrip('%')}.png"),
            ylabel="experts kept",
            title=f"experts kept per MoE layer, {amount_text(per_layer)} removed per layer on average",
        )
        name = f"allocation_r{amount_text(per_layer).rstrip('%')}.png"
        text += f"\n![allocation, {amount_text(per_layer)} removed per layer]({name})\n"
    path = os.path.join(directory, "report.md")
    atomic_write_text(path, text)
    return path
