"""`grape demo` (the embedded default job) and `grape compare` (every planner at equal budget)."""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence

from conversion.load import load_hf
from grape_jax.calibration.calibrate import calibrate
from grape_jax.calibration.options import CalibrationOptions
from grape_jax.calibration.stats import ModelStats, StatsError
from grape_jax.cli.args import (
    UsageError,
    calibration_options,
    data_spec,
    mesh_from_args,
    parse_fraction_list,
    parse_int_list,
)
from grape_jax.core.model import MoEModel
from grape_jax.core.params import count_params
from grape_jax.data.text import DataSpec
from grape_jax.demo.model import SEQ_LEN, ensure_demo_model
from grape_jax.fit.operator import FitOptions
from grape_jax.healing.heal import HealOptions, heal
from grape_jax.pipeline import apply_plan, blocks_for, check_output, load_model
from grape_jax.planners import DEFAULT_METHOD, PLANNERS, make_plan
from grape_jax.planners.plan import OPERATORS
from grape_jax.report.compare import Row, Variant, markdown_table, run_comparison, write_report
from grape_jax.source import ModelSource

# The demo's rows (planner, options, label): the default, GRAPE with and without the fit operator, and
# the strongest baselines. `--methods` (with `--operators`) replaces them by every method x operator.
DEMO_VARIANTS = (
    (DEFAULT_METHOD, {}, f"{DEFAULT_METHOD} (fit, default)"),
    ("grape", {"operator": "fit"}, "grape (fit)"),
    ("grape", {"operator": "dominant"}, "grape (dominant)"),
    ("grape-r", {}, "grape-r (dominant)"),
    ("local", {"operator": "dominant"}, "local (dominant)"),
    ("frequency", {}, "frequency"),
    ("frequency", {"global_rank": True}, "frequency (global)"),
    ("reap", {}, "reap"),
)
MERGING = ("grape", "local", "hc-smoe", "m-smoe", "grape-r", "grape-l", "ream")


def default_variants(
    methods: Sequence[str],
    per_layer_list: Sequence[int],
    *,
    operators: Sequence[str] = ("freq",),
    fractions: Sequence[float] = (),
) -> list[Variant]:
    """One row per (method, operator, budget). Pruning planners (frequency, reap, random) drop experts,
    and also fold them with 'fit' when it is among the operators; frequency also with global ranking.
    Budgets: `per_layer_list` (experts removed per layer), or `fractions` (of the routed experts) when
    given."""
    unknown = sorted(set(methods) - set(PLANNERS))
    if unknown:
        raise UsageError(f"--methods: {unknown} unknown; expected some of {sorted(PLANNERS)}")
    bad = sorted(set(operators) - set(OPERATORS))
    if bad:
        raise UsageError(f"--operators: {bad} unknown; expected some of {list(OPERATORS)}")
    out = []
    budgets = [(0, f) for f in fractions] if fractions else [(r, None) for r in per_layer_list]
    for r, fraction in budgets:
        for m in methods:
            if m in MERGING:
                for op in operators:
                    label = m if len(operators) == 1 else f"{m} ({op})"
                    out.append(Variant(m, r, {"operator": op}, label, fraction))
                continue
            for global_rank in (False, True) if m == "frequency" else (False,):
                name = f"{m} (global)" if global_rank else m
                extra = {"global_rank": True} if global_rank else {}
                out.append(Variant(m, r, extra, name, fraction))
                if "fit" in operators:
                    out.append(Variant(m, r, {**extra, "operator": "fit"}, f"{name} (fit)", fraction))
    return out


def run_demo(args: argparse.Namespace) -> int:
    """Prune the embedded demo MoE with several methods; print a table and write a report."""
    t0 = time.perf_counter()
    out = check_output(args.out, overwrite=True)
    per_layer = parse_int_list(args.per_layer, "--per-layer")
    if args.methods:
        variants = default_variants(args.methods.split(","), per_layer, operators=tuple(args.operators.split(",")))
    else:
        variants = [Variant(m, r, options, label) for r in per_layer for m, options, label in DEMO_VARIANTS]
    model_dir = ensure_demo_model()
    n_cal, n_eval = (16, 16) if args.quick else (64, 96)
    cal = blocks_for(model_dir, DataSpec(seq_len=SEQ_LEN, num_samples=n_cal, seed=0))
    held = blocks_for(model_dir, DataSpec(seq_len=SEQ_LEN, num_samples=n_eval, seed=0), heldout=True)
    model = load_hf(model_dir, dtype="float32")
    print(
        f"demo model {model_dir}: {model.cfg.num_layers} layers x {model.cfg.num_experts[0]} experts; "
        f"calibrating on {cal.size} tokens, evaluating on {held.size} held-out tokens"
    )
    stats = calibrate(
        model,
        cal,
        options=CalibrationOptions(batch_size=8, token_chunk=1024),
        progress=False,
        meta={"data": DataSpec(seq_len=SEQ_LEN, num_samples=n_cal).record()},
    )
    original, rows = run_comparison(model, stats, variants, held, calibration_blocks=cal)
    if args.heal_steps > 0:
        steps = min(args.heal_steps, 4) if args.quick else args.heal_steps
        rows.append(healed_row(model, stats, variants, rows, cal, held, steps=steps))
    notes = (
        f"Embedded demo model ({model.cfg.num_layers} MoE layers x {model.cfg.num_experts[0]} experts, top-"
        f"{model.cfg.top_k}, trained on the shipped KJV text); calibration {cal.size} tokens (Genesis/Exodus), "
        f"held-out perplexity on {held.size} tokens (Mark/Ruth). The operator of each merging planner is in "
        f"its name ('fit': down projections refitted on the calibration tokens; 'dominant': each group keeps "
        f"its most-routed member)."
        + (
            " The '+ heal' row is the best variant at that budget after "
            "distillation from the original model (`grape heal`) on other blocks of the calibration text."
            if args.heal_steps > 0
            else ""
        )
    )
    report = write_report(out, original, rows, title="grape-jax demo", notes=notes)
    print()
    print(markdown_table(original, rows))
    print(f"\nreport: {report}  ({time.perf_counter() - t0:.0f} s)")
    return 0


def healed_row(
    model: MoEModel, stats: ModelStats, variants: Sequence[Variant], rows: Sequence[Row], cal, held, *, steps: int
) -> Row:
    """The best variant at the largest budget, healed for `steps` steps on the calibration text's other
    blocks (distillation from the original model; held-out text never trained on)."""
    budget = max(r.per_layer for r in rows)
    best = min((r for r in rows if r.per_layer == budget), key=lambda r: r.ppl)
    v = next(v for v in variants if v.name == best.name and v.amount == budget)
    t0 = time.perf_counter()
    plan = make_plan(stats, method=v.method, **v.budget, **dict(v.options))
    merged = apply_plan(model, plan, blocks=cal)
    every = blocks_for(ensure_demo_model(), DataSpec(seq_len=SEQ_LEN, num_samples=None))
    used = {row.tobytes() for row in cal}
    train = every[[row.tobytes() not in used for row in every]]
    options = HealOptions(steps=steps, warmup=min(3, steps - 1), val_every=max(steps // 3, 1))
    result = heal(merged, model, train, options=options, heldout=held, progress=False)
    name = f"{best.name} + heal ({steps} steps)"
    print(f"{name:28s} r={budget}  ppl {result.ppl_after:9.3f}  (before healing {result.ppl_before:.3f})")
    return Row(name, v.method, budget, result.ppl_after, count_params(merged.cfg), best.kept, time.perf_counter() - t0)


def run_compare(args: argparse.Namespace) -> int:
    """Every planner x operator at equal budgets from one calibration pass; a results table and report."""
    out = check_output(args.out, overwrite=args.overwrite)
    variants = default_variants(
        args.methods.split(","),
        parse_int_list(args.per_layer, "--per-layer"),
        operators=tuple(args.operators.split(",")),
        fractions=parse_fraction_list(args.fraction, "--fraction") if args.fraction else (),
    )
    spec = data_spec(args)
    eval_spec = DataSpec(
        paths=tuple(args.eval_data) if args.eval_data else None,
        text_field=args.text_field,
        seq_len=args.seq_len,
        num_samples=args.eval_samples,
        seed=args.seed + 1,
    )
    held = blocks_for(args.model, eval_spec, heldout=not args.eval_data)
    blocks = blocks_for(args.model, spec)  # calibration, and the fit operator's data
    stats = None
    if args.stats:
        stats = ModelStats.load(args.stats)
        have = ModelSource.open(args.model).fingerprint()
        if stats.model_fingerprint and stats.model_fingerprint != have:
            raise StatsError(
                f"{args.stats}: statistics of model {stats.model_fingerprint[:16]}, but {args.model} is "
                f"model {have[:16]}; calibrate this model (drop --stats)"
            )
    model = load_model(args.model, mesh=mesh_from_args(args))
    if stats is None:
        stats = calibrate(model, blocks, options=calibration_options(args), meta={"data": spec.record()})
        os.makedirs(out, exist_ok=True)
        stats.save(os.path.join(out, "stats.npz"))
    original, rows = run_comparison(
        model, stats, variants, held, calibration_blocks=blocks, fit_options=FitOptions.like(calibration_options(args))
    )
    report = write_report(out, original, rows, title=f"grape-jax comparison: {args.model}")
    print(markdown_table(original, rows))
    print(f"report: {report}")
    return 0
