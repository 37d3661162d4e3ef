"""`grape calibrate | stats | plan | merge | prune`: the pipeline stages as sub-commands."""

from __future__ import annotations

import argparse
import shlex
import shutil
from typing import Any

import numpy as np

from conversion.checkpoint import restore_checkpoint, save_checkpoint
from grape_jax.calibration.calibrate import CalibrationInterrupted, calibrate
from grape_jax.calibration.options import blocks_sha256
from grape_jax.calibration.stats import ModelStats
from grape_jax.cli.args import (
    UsageError,
    calibration_options,
    data_spec,
    mesh_from_args,
    parsed_planner_options,
)
from grape_jax.merge.state import MergeError, merged_config
from grape_jax.pipeline import (
    Interrupted,
    apply_plan,
    blocks_for,
    check_output,
    check_plan_request,
    load_model,
    prune,
    refuse_empty_budget,
)
from grape_jax.planners import make_plan
from grape_jax.planners.plan import Plan
from grape_jax.report.plots import plot_allocation, plot_stats
from grape_jax.source import ModelSource


def run_calibrate(args: argparse.Namespace) -> int:
    """Routing statistics and expert similarities over calibration text; resumable (OUT.progress)."""
    out = check_output(args.out, overwrite=args.overwrite)
    spec, options = data_spec(args), calibration_options(args)
    blocks = blocks_for(args.model, spec)
    model = load_model(args.model, mesh=mesh_from_args(args))
    progress_dir = out + ".progress"
    try:
        stats = calibrate(
            model, blocks, options=options, meta={"data": spec.record()}, resume_dir=progress_dir, log=print
        )
    except CalibrationInterrupted as e:
        raise Interrupted(
            f"interrupted; statistics of {e.saved} of {e.total} blocks are saved in {progress_dir}: "
            f"run the same command again to resume"
        ) from None
    stats.save(out)
    shutil.rmtree(progress_dir, ignore_errors=True)
    print(f"stats of {len(stats.layers)} MoE layers over {blocks.size} tokens -> {out}")
    return 0


def run_stats(args: argparse.Namespace) -> int:
    """Summarise a stats file: routing shares (each expert's share of the routed top-k slots, summing to
    1 per layer) and mean similarity."""
    stats = ModelStats.load(args.stats)
    print(f"{'layer':>5} {'experts':>7} {'tokens':>8} {'min share':>9} {'max share':>9} {'mean CKA':>9}")
    for ls in stats.layers:
        e, share = ls.num_experts, ls.routing_share
        cka = ls.sim.get("cka")
        off = float((cka.sum() - cka.trace()) / (e * (e - 1))) if cka is not None and e > 1 else float("nan")
        print(f"{ls.layer:5d} {e:7d} {ls.num_tokens:8d} {share.min():9.4f} {share.max():9.4f} {off:9.4f}")
    print("share: an expert's fraction of the layer's routed top-k slots (sums to 1 over the layer's experts)")
    if args.plot:
        paths = plot_stats(stats, args.plot)
        print(f"wrote {len(paths)} plots to {args.plot}")
    return 0


def run_plan(args: argparse.Namespace) -> int:
    """Turn statistics and a budget into a merge plan."""
    if args.out:
        check_output(args.out, overwrite=args.overwrite)
    refuse_empty_budget(args.budget, args.per_layer)
    stats = ModelStats.load(args.stats)
    plan = make_plan(
        stats,
        method=args.method,
        budget=args.budget,
        per_layer=args.per_layer,
        fraction=args.fraction,
        **parsed_planner_options(args),
    )
    if args.out:
        plan.save(args.out)
        print(f"plan ({plan.method}, operator {plan.operator}, {plan.budget} experts removed) -> {args.out}")
    if args.show or not args.out:
        print(allocation_table(plan))
    if args.plot:
        removed = [lp.num_experts_before - lp.num_kept for lp in plan.layers]
        plot_allocation({args.method: removed}, [lp.layer for lp in plan.layers], args.plot)
    return 0


def allocation_table(plan: Plan) -> str:
    rows = [f"{'layer':>5} {'before':>6} {'after':>6} {'removed':>7}"]
    for lp in plan.layers:
        rows.append(
            f"{lp.layer:5d} {lp.num_experts_before:6d} {lp.num_kept:6d} {lp.num_experts_before - lp.num_kept:7d}"
        )
    rows.append(f"total removed: {plan.num_removed}")
    return "\n".join(rows)


def run_merge(args: argparse.Namespace) -> int:
    """Apply a plan to a converted checkpoint (one jitted merge, shardings kept); the plan must come from
    statistics of this checkpoint's model."""
    check_output(args.out, overwrite=args.overwrite)
    plan = Plan.load(args.plan)
    cfg = ModelSource.open(args.ckpt).config
    try:
        merged_config(cfg, plan)
    except MergeError as e:
        raise MergeError(f"{args.plan}: {e}") from None
    blocks = None
    if plan.operator == "fit":
        blocks = blocks_for(args.ckpt, data_spec(args))
        check_merge_data(plan, blocks, args.plan)
    model = restore_checkpoint(args.ckpt, mesh=mesh_from_args(args))
    merged = apply_plan(model, plan, blocks=blocks, progress=True)
    save_checkpoint(args.out, merged, overwrite=args.overwrite)
    print(f"merged: experts per layer {list(model.cfg.num_experts)} -> {list(merged.cfg.num_experts)} -> {args.out}")
    return 0


def check_merge_data(plan: Plan, blocks: np.ndarray, plan_path: str) -> None:
    """A fit plan is merged on the calibration blocks its statistics were computed on; otherwise refused
    before any weight is loaded, naming the data flags that give those blocks."""
    want = str((plan.made_from.get("calibration") or {}).get("blocks_sha256") or "")
    if not want or want == blocks_sha256(blocks):
        return
    raise UsageError(
        f"{plan_path}: operator 'fit' refits on the calibration blocks the plan was made from, and these differ "
        f"(sha256 {blocks_sha256(blocks)[:12]}, the plan's {want[:12]}); pass {data_flags(plan.made_from.get('data'))}"
    )


def data_flags(record: Any) -> str:
    """The data flags (`--data ... --seq-len ...`) that give the blocks a data record describes."""
    if not isinstance(record, dict):
        return "the --data, --text-field, --seq-len, --num-samples and --seed given to `grape calibrate`"
    files = [str(f.get("path", "")) for f in record.get("files") or [] if isinstance(f, dict)]
    shipped = any(f.endswith("(shipped)") for f in files)
    flags = [] if shipped else ["--data " + " ".join(shlex.quote(f) for f in files)]
    if record.get("text_field"):
        flags.append(f"--text-field {shlex.quote(str(record['text_field']))}")
    for key in ("seq_len", "num_samples", "seed"):
        if record.get(key) is not None:
            flags.append(f"--{key.replace('_', '-')} {record[key]}")
    where = "no --data (the shipped sample) with " if shipped else ""
    return where + " ".join(flags)


def run_prune(args: argparse.Namespace) -> int:
    """convert -> calibrate -> plan -> merge -> export in one go; resumable, never reusing stale stages."""
    spec, options = data_spec(args), calibration_options(args)
    check_plan_request(
        ModelSource.open(args.hf_dir).config,
        method=args.method,
        budget=args.budget,
        per_layer=args.per_layer,
        fraction=args.fraction,
        options=parsed_planner_options(args),
        gradients=options.gradients,
    )
    check_output(args.out, overwrite=args.overwrite)
    result = prune(
        args.hf_dir,
        args.out,
        method=args.method,
        budget=args.budget,
        per_layer=args.per_layer,
        fraction=args.fraction,
        data=spec,
        planner_options=parsed_planner_options(args),
        calibration_options=options,
        work_dir=args.work_dir,
        keep_work=args.keep_work,
        mesh=mesh_from_args(args),
        overwrite=args.overwrite,
        quantize=args.quantize,
        stream_layers=args.stream_layers,
    )
    print(allocation_table(result.plan))
    print(f"exported -> {result.out}")
    return 0
