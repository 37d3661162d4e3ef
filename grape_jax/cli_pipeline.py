"""`grape calibrate | stats | plan | merge | prune`: the pipeline stages as sub-commands."""

from __future__ import annotations

import argparse
import os

from grape_jax.cli import add_mesh_args, add_quantize_arg, command, mesh_from_args


def add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration data")
    g.add_argument("--data", nargs="*", default=None,
                   help="text files (.txt), JSONL (with --text-field) or a saved datasets dir; "
                        "default: the shipped public-domain sample")
    g.add_argument("--text-field", default=None)
    g.add_argument("--seq-len", type=int, default=128)
    g.add_argument("--num-samples", type=int, default=64)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--batch-size", type=int, default=4)
    g.add_argument("--token-chunk", type=int, default=512, help="tokens per expert chunk (bounds memory)")
    g.add_argument("--cka", default="auto", choices=["auto", "exact", "minibatch"])


def data_spec(args: argparse.Namespace):
    from grape_jax.pipeline import DataSpec

    return DataSpec(paths=tuple(args.data) if args.data else None, text_field=args.text_field,
                    seq_len=args.seq_len, num_samples=args.num_samples, seed=args.seed)


def calibration_options(args: argparse.Namespace):
    from grape_jax.calibration import CalibrationOptions

    return CalibrationOptions(batch_size=args.batch_size, token_chunk=args.token_chunk, cka=args.cka,
                              checkpoint_every=getattr(args, "checkpoint_every", 0))


def add_planner_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("planning")
    g.add_argument("--method", default="grape", help="grape, grape-r, local, frequency, reap, random, hc-smoe, m-smoe")
    b = g.add_mutually_exclusive_group(required=True)
    b.add_argument("--per-layer", type=int, help="experts removed per MoE layer on average (B = r * L)")
    b.add_argument("--budget", type=int, help="total experts removed over all MoE layers")
    g.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="planner option, e.g. gamma=0.01, metric=cka, operator=dominant, global_rank=true")


def planner_options(args: argparse.Namespace) -> dict:
    out = {}
    for item in args.option:
        if "=" not in item:
            raise ValueError(f"--option {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        out[key.strip().replace("-", "_")] = _parse_value(value.strip())
    return out


def _parse_value(value: str):
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


# ------------------------------------------------------------------------------------- calibrate


def _calibrate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hugging Face model dir (its tokenizer is used)")
    p.add_argument("--out", required=True, help="stats file (.npz; a .json summary is written beside it)")
    p.add_argument("--checkpoint-every", type=int, default=8, help="batches between resumable saves")
    add_data_args(p)
    add_mesh_args(p)


@command("calibrate", _calibrate_args)
def cmd_calibrate(args: argparse.Namespace) -> int:
    """Accumulate routing statistics and expert similarities over calibration text."""
    from conversion.load import load_hf
    from grape_jax.calibration import calibrate
    from grape_jax.pipeline import load_tokenizer, token_blocks

    mesh = mesh_from_args(args)
    loaded = load_hf(args.model, mesh=mesh)
    spec = data_spec(args)
    blocks = token_blocks(spec, load_tokenizer(args.model), max_positions=loaded.cfg.max_position_embeddings)
    stats = calibrate(loaded.params, loaded.cfg, blocks, options=calibration_options(args), mesh=mesh,
                      meta={"model": os.path.abspath(args.model), "data": spec.describe()},
                      resume_dir=args.out + ".progress")
    stats.save(args.out)
    print(f"stats of {len(stats.layers)} MoE layers over {blocks.size} tokens -> {args.out}")
    return 0


# ----------------------------------------------------------------------------------------- stats


def _stats_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("stats")
    p.add_argument("--plot", default=None, help="directory for PNG heatmaps and frequency bars")


@command("stats", _stats_args)
def cmd_stats(args: argparse.Namespace) -> int:
    """Summarise a stats file; with --plot write per-layer heatmaps and routing bars."""
    from grape_jax.stats import ModelStats

    stats = ModelStats.load(args.stats)
    print(f"{'layer':>5} {'experts':>7} {'tokens':>8} {'min freq':>9} {'max freq':>9} {'mean CKA':>9}")
    for ls in stats.layers:
        e = ls.num_experts
        cka = ls.sim.get("cka")
        off = float((cka.sum() - cka.trace()) / (e * (e - 1))) if cka is not None and e > 1 else float("nan")
        print(f"{ls.layer:5d} {e:7d} {ls.num_tokens:8d} {ls.freq.min():9.4f} {ls.freq.max():9.4f} {off:9.4f}")
    if args.plot:
        from grape_jax.plots import plot_stats

        paths = plot_stats(stats, args.plot)
        print(f"wrote {len(paths)} plots to {args.plot}")
    return 0


# ------------------------------------------------------------------------------------------ plan


def _plan_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("stats")
    p.add_argument("--out", default=None, help="plan JSON (the recipe)")
    p.add_argument("--show", action="store_true", help="print the per-layer allocation")
    p.add_argument("--plot", default=None, help="PNG bar chart of the allocation")
    add_planner_args(p)


@command("plan", _plan_args)
def cmd_plan(args: argparse.Namespace) -> int:
    """Turn statistics and a budget into a merge plan."""
    from grape_jax.planners import budget_from_per_layer, make_plan
    from grape_jax.stats import ModelStats, file_sha256

    stats = ModelStats.load(args.stats)
    budget = args.budget if args.budget is not None else budget_from_per_layer(args.per_layer, stats)
    plan = make_plan(args.method, stats, budget=budget, stats_sha256=file_sha256(args.stats),
                     **planner_options(args))
    if args.out:
        plan.save(args.out)
        print(f"plan ({args.method}, {budget} experts removed) -> {args.out}")
    if args.show or not args.out:
        print(allocation_table(plan))
    if args.plot:
        from grape_jax.plots import plot_allocation

        plot_allocation({args.method: plan}, args.plot)
    return 0


def allocation_table(plan) -> str:
    rows = [f"{'layer':>5} {'before':>6} {'after':>6} {'removed':>7}"]
    for lp in plan.layers:
        kept = len(lp.groups)
        rows.append(f"{lp.layer:5d} {lp.num_experts_before:6d} {kept:6d} {lp.num_experts_before - kept:7d}")
    rows.append(f"total removed: {plan.num_removed}")
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------- merge


def _merge_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="grape-jax checkpoint (from `grape convert`)")
    p.add_argument("plan", help="plan JSON (from `grape plan`)")
    p.add_argument("--out", required=True, help="merged checkpoint directory")
    p.add_argument("--overwrite", action="store_true")
    add_mesh_args(p)


@command("merge", _merge_args)
def cmd_merge(args: argparse.Namespace) -> int:
    """Apply a plan to a converted checkpoint (pure merge, shardings kept)."""
    from conversion.checkpoint import restore_checkpoint, save_checkpoint
    from grape_jax.pipeline import apply_plan
    from grape_jax.plan import Plan

    ckpt = restore_checkpoint(args.ckpt, mesh=mesh_from_args(args))
    plan = Plan.load(args.plan)
    params, cfg = apply_plan(ckpt.params, ckpt.cfg, plan)
    extra = dict(ckpt.extra)
    extra["plan"] = plan.to_dict()
    extra["original_config"] = ckpt.cfg.to_dict()
    save_checkpoint(args.out, params, cfg, ckpt.family, hf_config=ckpt.hf_config,
                    source_dir=ckpt.source_dir, extra=extra, overwrite=args.overwrite)
    print(f"merged: experts per layer {list(ckpt.cfg.num_experts)} -> {list(cfg.num_experts)} -> {args.out}")
    return 0


# ----------------------------------------------------------------------------------------- prune


def _prune_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("hf_dir")
    p.add_argument("--out", required=True, help="output Hugging Face directory")
    p.add_argument("--work-dir", default=None, help="stage outputs for resuming (default OUT.work)")
    p.add_argument("--overwrite", action="store_true")
    add_quantize_arg(p)
    add_planner_args(p)
    add_data_args(p)
    add_mesh_args(p)


@command("prune", _prune_args)
def cmd_prune(args: argparse.Namespace) -> int:
    """convert -> calibrate -> plan -> merge -> export in one go (resumable)."""
    from grape_jax.pipeline import prune

    result = prune(args.hf_dir, args.out, method=args.method, budget=args.budget, per_layer=args.per_layer,
                   data=data_spec(args), planner_options=planner_options(args),
                   calibration_options=calibration_options(args), work_dir=args.work_dir,
                   mesh=mesh_from_args(args), overwrite=args.overwrite, quantize=args.quantize)
    print(allocation_table(result.plan))
    print(f"exported -> {result.out}")
    return 0
