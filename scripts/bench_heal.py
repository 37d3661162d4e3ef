"""Benchmark: how much of the perplexity lost to pruning a short healing wins back.

For each model: calibrate on 64 blocks of 128 tokens of its calibration text, plan with the default
planner (or --method) at 4 experts removed per MoE layer, merge, then heal (distil the original into the pruned model)
for at most --max-minutes on the other blocks of the calibration text; perplexity of the original, the
pruned and the healed model on 200 held-out blocks of 128 tokens of its held-out text (never trained on).
Prints a table with the fraction of the gap recovered, (ppl_pruned - ppl_healed) / (ppl_pruned - ppl_orig).

    python scripts/bench_heal.py --model demo --model /work/shared/models/gcide-moe-22m --max-minutes 10

Models: `demo` (the shipped demo model, shipped KJV calibration/held-out text) or an HF directory with
`calib.txt` and `heldout.txt` beside its weights.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from grape_jax.api import DataSpec, HealOptions, apply_plan, calibrate, heal, load_hf, make_plan, token_blocks
from grape_jax.calibration.options import CalibrationOptions
from grape_jax.cli.heal import gap_recovered
from grape_jax.demo.model import ensure_demo_model
from grape_jax.evaluation.scoring import perplexity
from grape_jax.planners import DEFAULT_METHOD


def texts_of(model: str) -> tuple[str, list[str] | None, list[str] | None]:
    """(HF dir, calibration files, held-out files); None: the shipped KJV text."""
    if model == "demo":
        return ensure_demo_model(), None, None
    calib, held = os.path.join(model, "calib.txt"), os.path.join(model, "heldout.txt")
    for path in (calib, held):
        if not os.path.isfile(path):
            sys.exit(f"bench_heal: {path} is missing (a model needs calib.txt and heldout.txt beside it)")
    return model, [calib], [held]


def training_blocks(hf_dir: str, calib: list[str] | None, calibration: np.ndarray, seq_len: int) -> np.ndarray:
    """Every block of the calibration text except the ones calibration used (compared by content)."""
    every = token_blocks(hf_dir, calib, seq_len=seq_len, num_samples=None)
    used = {row.tobytes() for row in calibration}
    return every[[row.tobytes() not in used for row in every]]


def run(model: str, args: argparse.Namespace) -> dict:
    hf_dir, calib, held = texts_of(model)
    t0 = time.perf_counter()
    teacher = load_hf(hf_dir, dtype="float32")
    cal = token_blocks(hf_dir, calib, seq_len=128, num_samples=64, seed=0)
    heldout = token_blocks(hf_dir, held, seq_len=128, num_samples=200, seed=0, heldout=held is None)
    train = training_blocks(hf_dir, calib, cal, 128)
    stats = calibrate(
        teacher,
        cal,
        options=CalibrationOptions(batch_size=8, token_chunk=1024),
        progress=False,
        meta={"data": DataSpec(paths=tuple(calib) if calib else None, num_samples=64).record()},
    )
    plan = make_plan(stats, method=args.method, per_layer=args.per_layer)
    pruned = apply_plan(teacher, plan, blocks=cal)
    prep = time.perf_counter() - t0
    print(
        f"{model}: {teacher.cfg.num_layers} layers, experts {list(teacher.cfg.num_experts)} -> "
        f"{list(pruned.cfg.num_experts)} ({args.method}, operator {plan.operator}); {len(train)} training "
        f"blocks, {len(heldout)} held-out blocks; prepared in {prep:.0f} s",
        flush=True,
    )
    options = HealOptions(
        steps=args.steps,
        max_minutes=args.max_minutes,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        warmup=args.warmup,
        train=args.train,
        lm_weight=args.lm_weight,
        temperature=args.temperature,
        val_blocks=args.val_blocks,
        val_every=args.val_every,
        teacher_logits=args.teacher_logits,
    )
    result = heal(pruned, teacher, train, options=options, heldout=heldout, progress=args.progress, log=print)
    original = perplexity(teacher, heldout).ppl if result.ppl_teacher is None else result.ppl_teacher
    return {
        "model": model,
        "method": args.method,
        "operator": plan.operator,
        "per_layer": args.per_layer,
        "experts_after": list(pruned.cfg.num_experts),
        "ppl_original": original,
        "ppl_pruned": result.ppl_before,
        "ppl_healed": result.ppl_after,
        "recovered": gap_recovered(result.ppl_before, result.ppl_after, original),
        "steps": result.steps,
        "horizon": result.horizon,
        "best_step": result.best_step,
        "heal_seconds": result.seconds,
        "tokens_per_second": result.tokens_per_second,
        "trained_params": result.trained_params,
        "options": options.to_dict(),
        "val_losses": result.val_losses,
        "loss_first": result.losses[0],
        "loss_last": result.losses[-1],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", action="append", default=None, help="'demo' or an HF dir with calib.txt/heldout.txt")
    p.add_argument("--method", default=DEFAULT_METHOD, help="planner (with its default operator)")
    p.add_argument("--per-layer", type=int, default=4, help="experts removed per MoE layer")
    p.add_argument("--max-minutes", type=float, default=10.0, help="healing time budget per model")
    p.add_argument("--steps", type=int, default=None, help="fixed number of steps instead of the time budget")
    d = HealOptions()
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--learning-rate", type=float, default=d.learning_rate)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--train", default=d.train)
    p.add_argument("--lm-weight", type=float, default=d.lm_weight)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--val-blocks", type=int, default=d.val_blocks)
    p.add_argument("--val-every", type=int, default=d.val_every)
    p.add_argument("--teacher-logits", default=d.teacher_logits)
    p.add_argument("--progress", action="store_true", help="show the progress bar")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    args = p.parse_args()
    if args.steps is not None:
        args.max_minutes = None
    rows = [run(m, args) for m in args.model or ["demo"]]
    print()
    print("| model | experts after | original | pruned | healed | gap recovered | steps | heal s | tok/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rec = "n/a" if r["recovered"] is None else f"{100 * r['recovered']:.1f}%"
        print(
            f"| {os.path.basename(r['model'].rstrip('/'))} | {r['experts_after']} | {r['ppl_original']:.3f} | "
            f"{r['ppl_pruned']:.3f} | {r['ppl_healed']:.3f} | {rec} | {r['steps']} | {r['heal_seconds']:.0f} | "
            f"{r['tokens_per_second']:.0f} |"
        )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
