"""Held-out perplexity of planner x operator variants on one model, from one cached calibration pass.

Calibration statistics are cached in `--work` (`stats-<fingerprint>.npz`, keyed by the calibration's
fingerprint: model, token blocks and options) and every variant's result is appended to
`--work/results.jsonl`, so a rerun only computes what is missing. A variant is
`LABEL=METHOD[:KEY=VALUE,...]`; keys starting with `fit.` are `FitOptions` fields (the fit operator's),
the rest are planner options. Without `--variant` the `--rows` run (`standard`: the gcide table's). Example (the
gcide-moe-22m protocol of BENCHMARKS.md):

    M=/work/shared/models/gcide-moe-22m
    python scripts/bench_quality.py $M --work runs/gcide --data $M/calib.txt --eval-data $M/heldout.txt

the fine-grained models of BENCHMARKS.md (made by scripts/train_finegrained_moe.py), budgets by fraction:

    python scripts/bench_quality.py runs/models/qwen3-fg --work runs/bench-qwen3-fg --data $M/calib.txt \
        --eval-data $M/heldout.txt --rows finegrained --fraction 0.25,0.5,0.75 --table

and for the embedded demo model (its shipped calibration / held-out text):

    python scripts/bench_quality.py grape_jax/assets/demo_model --work runs/demo
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import time

import numpy as np

from grape_jax.calibration.calibrate import calibrate
from grape_jax.calibration.options import CalibrationOptions, calibration_fingerprint
from grape_jax.calibration.stats import ModelStats
from grape_jax.cli.args import parse_fraction_list, parse_int_list, parse_scalar
from grape_jax.data.text import DataSpec
from grape_jax.evaluation.scoring import perplexity
from grape_jax.fit.operator import FitOptions, fit_overrides
from grape_jax.merge.state import MergeInputs, merge_inputs, merge_model
from grape_jax.pipeline import blocks_for, load_model
from grape_jax.planners import DEFAULT_METHOD, make_plan

STANDARD = (  # label=method:options, the rows of BENCHMARKS.md's quality table
    f"default ({DEFAULT_METHOD})={DEFAULT_METHOD}",
    "grape-l (dominant)=grape-l:operator=dominant",
    "grape (fit)=grape:operator=fit",
    "grape (dominant)=grape:operator=dominant",
    "grape (freq, paper default)=grape:operator=freq",
    "grape-r (fit)=grape-r:operator=fit",
    "grape-r (dominant)=grape-r:operator=dominant",
    "local (fit)=local:operator=fit",
    "local (dominant)=local:operator=dominant",
    "frequency=frequency",
    "frequency (fit)=frequency:operator=fit",
    "frequency (global)=frequency:global_rank=true",
    "frequency (global) (fit)=frequency:global_rank=true,operator=fit",
    "reap=reap",
    "m-smoe (freq)=m-smoe",
    "hc-smoe (freq)=hc-smoe",
)
FINEGRAINED = (  # `--rows finegrained`: the rows of BENCHMARKS.md's fine-grained table
    f"default ({DEFAULT_METHOD})={DEFAULT_METHOD}",
    "reap=reap",
    "ream=ream",
    "frequency=frequency",
    "frequency (global)=frequency:global_rank=true",
    "grape (freq, paper default)=grape:operator=freq",
    "grape-r (dominant)=grape-r",
    "m-smoe (freq)=m-smoe",
    "hc-smoe (freq)=hc-smoe",
    "grape-l (dominant)=grape-l:operator=dominant",
    "frequency (global) (fit)=frequency:global_rank=true,operator=fit",
    "ream (fit)=ream:operator=fit",
    "reap (fit)=reap:operator=fit",
)
ROWS = {"standard": STANDARD, "finegrained": FINEGRAINED}


def parse_variant(text: str) -> tuple[str, str, dict, dict]:
    """'LABEL=METHOD:k=v,k=v' -> (label, method, planner options, fit options)."""
    label, _, rest = text.partition("=")
    method, _, opts = rest.partition(":")
    planner, fit = {}, {}
    for item in filter(None, opts.split(",")):
        key, _, value = item.partition("=")
        if key.startswith("fit."):
            fit[key[4:]] = parse_scalar(value)
        else:
            planner[key] = parse_scalar(value)
    return label.strip(), method.strip(), planner, fit


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="HF directory")
    p.add_argument("--work", required=True, help="cache directory (stats, results.jsonl)")
    p.add_argument("--data", nargs="*", default=None, help="calibration text (default: shipped sample)")
    p.add_argument("--eval-data", nargs="*", default=None, help="held-out text (default: shipped held-out)")
    p.add_argument("--num-samples", type=int, default=64, help="calibration blocks (seed 0)")
    p.add_argument("--eval-samples", type=int, default=200, help="held-out blocks (seed 1)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--dtype", default=None, help="cast the model (default: stored dtype)")
    p.add_argument("--per-layer", default="2,4", help="experts removed per layer, comma-separated")
    p.add_argument(
        "--fraction", default=None, help="fractions of the experts removed, e.g. 0.25,0.5,0.75 (instead of --per-layer)"
    )
    p.add_argument("--rows", choices=sorted(ROWS), default="standard", help="the built-in rows (without --variant)")
    p.add_argument("--variant", action="append", default=[], help="LABEL=METHOD[:K=V,...] (default: --rows)")
    p.add_argument("--table", action="store_true", help="print a markdown table of this model's results at the end")
    args = p.parse_args()
    if args.fraction:
        budgets = [("fraction", f) for f in parse_fraction_list(args.fraction, "--fraction")]
    else:
        budgets = [("per_layer", r) for r in parse_int_list(args.per_layer, "--per-layer")]

    cal = blocks_for(
        args.model,
        DataSpec(paths=tuple(args.data) if args.data else None, seq_len=args.seq_len, num_samples=args.num_samples),
    )
    held = blocks_for(
        args.model,
        DataSpec(
            paths=tuple(args.eval_data) if args.eval_data else None,
            seq_len=args.seq_len,
            num_samples=args.eval_samples,
            seed=1,
        ),
        heldout=not args.eval_data,
    )
    model = load_model(args.model, dtype=args.dtype)
    options = CalibrationOptions(batch_size=8, token_chunk=1024)
    fingerprint = calibration_fingerprint(model.info.fingerprint, model.cfg, cal, options)
    os.makedirs(args.work, exist_ok=True)
    stats_path = os.path.join(args.work, f"stats-{fingerprint[:16]}.npz")
    if os.path.isfile(stats_path):
        stats = ModelStats.load(stats_path)
    else:
        stats = calibrate(model, cal, options=options, progress=False)
        stats.save(stats_path)
        print(f"calibrated in {stats.meta['calibration']['seconds']} s -> {stats_path}", flush=True)
    key = fingerprint[:16] + hashlib.sha256(held.tobytes()).hexdigest()[:16]
    results_path = os.path.join(args.work, "results.jsonl")
    done = {}
    if os.path.isfile(results_path):
        with open(results_path) as f:
            for line in f:
                r = json.loads(line)
                done[(r["key"], r["label"], r["budget"] if "budget" in r else f"r{r['per_layer']}")] = r
    if (key, "original", "r0") not in done:
        row = {"key": key, "label": "original", "per_layer": 0, "ppl": perplexity(model, held).ppl, "kept": []}
        _append(results_path, row)
        done[(key, "original", "r0")] = row
    print(f"{'original':36s} r=0 ppl {done[(key, 'original', 'r0')]['ppl']:8.3f}", flush=True)
    for kind, amount in budgets:
        name = f"r{amount}" if kind == "per_layer" else f"f{amount:g}"
        for text in args.variant or ROWS[args.rows]:
            label, method, planner, fit = parse_variant(text)
            k = (key, label, name)
            if k not in done:
                t0 = time.perf_counter()
                plan = make_plan(stats, method=method, **{kind: amount}, **planner)
                merged, diag = merge_with_diagnostics(model, plan, cal, FitOptions.like(options, **fit))
                done[k] = {
                    "key": key,
                    "label": label,
                    "budget": name,
                    kind: amount,
                    "ppl": perplexity(merged, held).ppl,
                    "kept": list(plan.kept_per_layer),
                    "spec": text,
                    "seconds": round(time.perf_counter() - t0, 1),
                    "fit": diag,
                }
                _append(results_path, done[k])
            r = done[k]
            print(f"{label:36s} {name} ppl {r['ppl']:8.3f} kept {r['kept']} ({r.get('seconds')} s)", flush=True)
    if args.table:
        print(markdown_table(done, key, [f"r{a}" if k == "per_layer" else f"f{a:g}" for k, a in budgets]))


def markdown_table(done: dict, key: str, names: list[str]) -> str:
    """Rows = labels (in first-seen order), columns = budgets: perplexity, the best per column in bold and
    the default's gap to the best other row."""
    labels = list(dict.fromkeys(lab for (k, lab, _) in done if k == key and lab != "original"))
    best = {
        n: min((done[(key, lab, n)]["ppl"] for lab in labels if (key, lab, n) in done), default=None) for n in names
    }
    lines = ["| method | " + " | ".join(_pct(n) for n in names) + " |", "|---|" + "---|" * len(names)]
    lines.append("| original | " + " | ".join(f"{done[(key, 'original', 'r0')]['ppl']:.3f}" for _ in names) + " |")
    for lab in labels:
        cells = []
        for n in names:
            r = done.get((key, lab, n))
            text = "" if r is None else f"{r['ppl']:.3f}"
            cells.append(f"**{text}**" if r is not None and r["ppl"] == best[n] else text)
        lines.append(f"| {lab} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _pct(name: str) -> str:
    """'f0.25' -> '25% removed'; 'r2' -> 'r = 2'."""
    return f"{float(name[1:]):.0%} removed" if name.startswith("f") else f"r = {name[1:]}"


def merge_with_diagnostics(model, plan, blocks, fit_options):
    """The merged model, and for operator 'fit' the per-layer diagnostics (ridge chosen, residual before and
    after, step chosen by the calibration loss)."""
    if plan.operator != "fit":
        return merge_model(model, plan, inputs=merge_inputs(model, plan)), None
    overrides, diag = fit_overrides(model, plan, blocks, options=fit_options)
    for layer, d in diag.items():
        print(
            f"    fit layer {layer}: residual {d['relative_residual_before']:.3f} -> "
            f"{d['relative_residual_after']:.3f}, ridge {d['ridge']}, step {d.get('step')}",
            flush=True,
        )
    return merge_model(model, plan, inputs=MergeInputs(overrides=overrides)), {str(k): v for k, v in diag.items()}


def _append(path: str, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    main()
