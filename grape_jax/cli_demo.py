"""`grape demo` (the embedded default job) and `grape compare` (every planner at equal budget)."""

from __future__ import annotations

import argparse
import os
import time

from grape_jax.cli import add_mesh_args, command, mesh_from_args
from grape_jax.cli_pipeline import add_data_args, calibration_options, data_spec

DEMO_METHODS = ("grape", "grape-r", "local", "frequency", "reap")


def default_variants(methods, per_layer_list, *, operators=("freq",)):
    from grape_jax.compare import Variant

    merge_methods = {"grape", "local", "hc-smoe", "m-smoe", "grape-r"}
    out = []
    for r in per_layer_list:
        for m in methods:
            if m in merge_methods:
                for op in operators:
                    label = m if len(operators) == 1 else f"{m} ({op})"
                    out.append(Variant(m, r, {"operator": op}, label))
            else:
                out.append(Variant(m, r))
                if m == "frequency":
                    out.append(Variant(m, r, {"global_rank": True}, "frequency (global)"))
    return out


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="grape-demo", help="report directory (report.md, results.csv, PNGs)")
    p.add_argument("--per-layer", default="2,4", help="experts removed per layer, comma-separated")
    p.add_argument("--methods", default=",".join(DEMO_METHODS))
    p.add_argument("--operators", default="dominant", help="merge operators for merging planners")
    p.add_argument("--quick", action="store_true", help="fewer calibration/evaluation tokens (CI)")


@command("demo", _demo_args)
def cmd_demo(args: argparse.Namespace) -> int:
    """Prune the embedded demo MoE with several methods and print/write a comparison."""
    from conversion.load import load_hf
    from grape_jax.calibration import CalibrationOptions, calibrate
    from grape_jax.compare import markdown_table, run_comparison, write_report
    from grape_jax.demo_model import SEQ_LEN, ensure_demo_model
    from grape_jax.pipeline import DataSpec, load_tokenizer, token_blocks

    t0 = time.perf_counter()
    model_dir = ensure_demo_model()
    loaded = load_hf(model_dir, dtype="float32")
    tok = load_tokenizer(model_dir)
    n_cal, n_eval = (16, 16) if args.quick else (64, 96)
    cal = token_blocks(DataSpec(seq_len=SEQ_LEN, num_samples=n_cal, seed=0), tok, max_positions=512)
    held = token_blocks(DataSpec(seq_len=SEQ_LEN, num_samples=n_eval, seed=0), tok, max_positions=512, heldout=True)
    print(f"demo model {model_dir}: {loaded.cfg.num_layers} layers x {loaded.cfg.num_experts[0]} experts; "
          f"calibrating on {cal.size} tokens, evaluating on {held.size} held-out tokens")
    stats = calibrate(loaded.params, loaded.cfg, cal, options=CalibrationOptions(batch_size=8, token_chunk=1024),
                      meta={"model": "demo"}, progress=False)
    per_layer = [int(x) for x in args.per_layer.split(",")]
    variants = default_variants(args.methods.split(","), per_layer, operators=tuple(args.operators.split(",")))
    original, rows = run_comparison(loaded.params, loaded.cfg, stats, variants, held)
    notes = (f"Embedded demo model ({loaded.cfg.num_layers} MoE layers x {loaded.cfg.num_experts[0]} experts, top-"
             f"{loaded.cfg.top_k}, trained on the shipped KJV text); calibration {cal.size} tokens (Genesis/Exodus), "
             f"held-out perplexity on {held.size} tokens (Mark/Ruth). Merging planners use the "
             f"'{args.operators}' operator.")
    report = write_report(args.out, original, rows, title="grape-jax demo", notes=notes)
    print()
    print(markdown_table(original, rows))
    print(f"\nreport: {report}  ({time.perf_counter() - t0:.0f} s)")
    return 0


def _compare_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hugging Face model dir")
    p.add_argument("--out", required=True, help="results directory")
    p.add_argument("--per-layer", default="1,2,4")
    p.add_argument("--methods", default="grape,grape-r,local,frequency,reap,hc-smoe,m-smoe")
    p.add_argument("--operators", default="dominant,freq")
    p.add_argument("--eval-data", nargs="*", default=None, help="held-out text (default: shipped held-out text)")
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--stats", default=None, help="reuse a stats file instead of calibrating")
    add_data_args(p)
    add_mesh_args(p)


@command("compare", _compare_args)
def cmd_compare(args: argparse.Namespace) -> int:
    """Run every planner x operator at equal budgets from one calibration pass; write a results table."""
    from conversion.load import load_hf
    from grape_jax.calibration import calibrate
    from grape_jax.compare import markdown_table, run_comparison, write_report
    from grape_jax.pipeline import DataSpec, load_tokenizer, token_blocks
    from grape_jax.stats import ModelStats

    mesh = mesh_from_args(args)
    loaded = load_hf(args.model, mesh=mesh)
    tok = load_tokenizer(args.model)
    spec = data_spec(args)
    if args.stats:
        stats = ModelStats.load(args.stats)
    else:
        blocks = token_blocks(spec, tok, max_positions=loaded.cfg.max_position_embeddings)
        stats = calibrate(loaded.params, loaded.cfg, blocks, options=calibration_options(args), mesh=mesh,
                          meta={"model": os.path.abspath(args.model), "data": spec.describe()})
        os.makedirs(args.out, exist_ok=True)
        stats.save(os.path.join(args.out, "stats.npz"))
    held = token_blocks(DataSpec(paths=tuple(args.eval_data) if args.eval_data else None, text_field=args.text_field,
                                 seq_len=args.seq_len, num_samples=args.eval_samples, seed=args.seed + 1),
                        tok, max_positions=loaded.cfg.max_position_embeddings, heldout=not args.eval_data)
    variants = default_variants(args.methods.split(","), [int(x) for x in args.per_layer.split(",")],
                                operators=tuple(args.operators.split(",")))
    original, rows = run_comparison(loaded.params, loaded.cfg, stats, variants, held)
    report = write_report(args.out, original, rows, title=f"grape-jax comparison: {args.model}")
    print(markdown_table(original, rows))
    print(f"report: {report}")
    return 0
