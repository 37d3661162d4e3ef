"""`grape calibrate | stats | plan | merge | prune`: the pipeline stages as sub-commands."""

from __future__ import annotations

import argparse
import shutil

from conversion.checkpoint import restore_checkpoint, save_checkpoint
from grape_jax.calibration import CalibrationInterrupted, calibrate
from grape_jax.cli_args import (
    add_calibration_args,
    add_data_args,
    add_mesh_args,
    add_planner_args,
    add_quantize_arg,
    calibration_options,
    data_spec,
    mesh_from_args,
    planner_options,
)
from grape_jax.merge import MergeError, merged_config
from grape_jax.pipeline import (
    Interrupted,
    apply_plan,
    blocks_for,
    check_output,
    check_plan_request,
    load_model,
    model_config,
    prune,
)
from grape_jax.plan import Plan
from grape_jax.planners import make_plan
from grape_jax.plots import plot_allocation, plot_stats
from grape_jax.stats import ModelStats


def configure_calibrate(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hugging Face directory or grape checkpoint (its tokenizer is used)")
    p.add_argument("--out", required=True, help="stats file (.npz; a .json summary is written beside it)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_data_args(p)
    add_calibration_args(p)
    add_mesh_args(p)


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


def configure_stats(p: argparse.ArgumentParser) -> None:
    p.add_argument("stats", help="stats file from `grape calibrate`")
    p.add_argument("--plot", default=None, help="directory for PNG similarity heatmaps and routing-share bars")


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


def configure_plan(p: argparse.ArgumentParser) -> None:
    p.add_argument("stats", help="stats file from `grape calibrate`")
    p.add_argument("--out", default=None, help="plan JSON (the recipe); without it the allocation is printed")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--show", action="store_true", help="print the per-layer allocation")
    p.add_argument("--plot", default=None, help="PNG bar chart of the allocation")
    add_planner_args(p)


def run_plan(args: argparse.Namespace) -> int:
    """Turn statistics and a budget into a merge plan."""
    if args.out:
        check_output(args.out, overwrite=args.overwrite)
    stats = ModelStats.load(args.stats)
    plan = make_plan(
        stats,
        method=args.method,
        budget=args.budget,
        per_layer=args.per_layer,
        fraction=args.fraction,
        **planner_options(args),
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


def configure_merge(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="grape checkpoint (from `grape convert`)")
    p.add_argument("plan", help="plan JSON (from `grape plan`)")
    p.add_argument("--out", required=True, help="merged checkpoint directory")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_data_args(p)  # operator 'fit' refits on calibration text: pass the data given to `grape calibrate`
    add_mesh_args(p)


def run_merge(args: argparse.Namespace) -> int:
    """Apply a plan to a converted checkpoint (one jitted merge, shardings kept); the plan must come from
    statistics of this checkpoint's model."""
    check_output(args.out, overwrite=args.overwrite)
    plan = Plan.load(args.plan)
    cfg = model_config(args.ckpt)
    try:
        merged_config(cfg, plan)
    except MergeError as e:
        raise MergeError(f"{args.plan}: {e}") from None
    blocks = blocks_for(args.ckpt, data_spec(args)) if plan.operator == "fit" else None
    model = restore_checkpoint(args.ckpt, mesh=mesh_from_args(args))
    merged = apply_plan(model, plan, blocks=blocks, progress=True)
    save_checkpoint(args.out, merged, overwrite=args.overwrite)
    print(f"merged: experts per layer {list(model.cfg.num_experts)} -> {list(merged.cfg.num_experts)} -> {args.out}")
    return 0


def configure_prune(p: argparse.ArgumentParser) -> None:
    p.add_argument("hf_dir", help="Hugging Face model directory (with its tokenizer)")
    p.add_argument("--out", required=True, help="output Hugging Face directory")
    p.add_argument("--work-dir", default=None, help="stage outputs for resuming (default: OUT.work)")
    p.add_argument("--keep-work", action="store_true", help="keep the work directory (statistics, plan) after success")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    add_quantize_arg(p)
    add_planner_args(p)
    add_data_args(p)
    add_calibration_args(p)
    add_mesh_args(p)


def run_prune(args: argparse.Namespace) -> int:
    """convert -> calibrate -> plan -> merge -> export in one go; resumable, never reusing stale stages."""
    spec, options = data_spec(args), calibration_options(args)
    check_plan_request(
        model_config(args.hf_dir),
        method=args.method,
        budget=args.budget,
        per_layer=args.per_layer,
        fraction=args.fraction,
        options=planner_options(args),
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
        planner_options=planner_options(args),
        calibration_options=options,
        work_dir=args.work_dir,
        keep_work=args.keep_work,
        mesh=mesh_from_args(args),
        overwrite=args.overwrite,
        quantize=args.quantize,
    )
    print(allocation_table(result.plan))
    print(f"exported -> {result.out}")
    return 0
