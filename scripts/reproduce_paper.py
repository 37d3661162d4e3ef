"""Reproduce the paper's comparisons: every method at 2 and 4 experts removed per layer (on average).

Each model preset names its expected architecture; the budget scales with the expert count (r x E / 8
for models with more than 8 experts, e.g. 16 and 32 of 64 for DeepSeek-MoE-16B, as the paper scales
its 64-expert runs). One calibration pass per model serves every method; perplexity on held-out text
and, when task files are given, zero-shot accuracy are written to OUT/report.md and OUT/results.csv
(zero-shot: OUT/zero_shot.json).

    python scripts/reproduce_paper.py --preset mixtral-8x7b --hf-dir /ckpt/Mixtral-8x7B-v0.1 \
        --mesh-preset h100x8 --calib data/c4_sample.jsonl --text-field text --out runs/mixtral
    python scripts/reproduce_paper.py --preset tiny --hf-dir DIR --out runs/tiny   # tests use this
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from conversion.hf_dir import family_of, read_hf_config
from conversion.load import load_hf
from grape_jax.base.atomic import atomic_write_json
from grape_jax.calibration.calibrate import calibrate
from grape_jax.calibration.options import CalibrationOptions
from grape_jax.cli.demo import default_variants
from grape_jax.core.sharding import make_mesh
from grape_jax.data.text import DataSpec, load_tokenizer
from grape_jax.evaluation.scoring import multiple_choice
from grape_jax.evaluation.tasks import load_task
from grape_jax.pipeline import apply_plan, blocks_for
from grape_jax.planners import DEFAULT_METHOD, make_plan
from grape_jax.report.compare import Variant, run_comparison, write_report
from grape_jax.source import ModelSource

PRESETS = {
    # name: (model_type, MoE layers, experts, top_k, per-layer budgets)
    "mixtral-8x7b": ("mixtral", 32, 8, 2, (2, 4)),
    "mixtral-8x22b": ("mixtral", 56, 8, 2, (2, 4)),
    "deepseek-moe-16b": ("deepseek", 27, 64, 6, (16, 32)),
    "qwen1.5-moe-a2.7b": ("qwen2_moe", 24, 60, 4, (15, 30)),
    "gpt-oss-20b": ("gpt_oss", 24, 32, 4, (8, 16)),
    "gpt-oss-120b": ("gpt_oss", 36, 128, 4, (32, 64)),
    "tiny": (None, None, None, None, (1, 2)),
}
MESH_PRESETS = {
    "h100x8": "expert=8",  # one host, 8 GPUs: experts spread, everything else replicated
    "h100x8-fsdp": "expert=4,fsdp=2",
    "tpu-v5p-64": "expert=8,fsdp=4",  # 32 chips (64 cores) of a v5p slice
    "tpu-v5p-128": "expert=8,fsdp=8",
    "cpu": None,
}
METHODS = ("grape", "grape-r", "local", "frequency", "reap", "hc-smoe", "m-smoe")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    preset: str
    hf_dir: str
    out: str
    mesh: str | None
    calib: tuple[str, ...] | None
    text_field: str | None
    num_samples: int
    seq_len: int
    eval_samples: int
    tasks: dict


def run(rc: RunConfig) -> str:
    model_type, layers, experts, top_k, budgets = PRESETS[rc.preset]
    mesh = make_mesh(rc.mesh) if rc.mesh else None
    cfg = ModelSource.open(rc.hf_dir).config  # checks before the weights are loaded
    if model_type is not None:
        family = family_of(read_hf_config(rc.hf_dir), source=rc.hf_dir).name
        got = (len(cfg.moe_layers), max(cfg.num_experts), cfg.top_k)
        if family != model_type or got != (layers, experts, top_k):
            raise SystemExit(
                f"{rc.hf_dir}: preset {rc.preset} expects {model_type} {layers}x{experts} top-{top_k}, "
                f"found {family} {got[0]}x{got[1]} top-{got[2]}"
            )
    calib = DataSpec(rc.calib, rc.text_field, rc.seq_len, rc.num_samples, 0)
    cal = blocks_for(rc.hf_dir, calib)
    held = blocks_for(rc.hf_dir, DataSpec(None, None, rc.seq_len, rc.eval_samples, 1), heldout=True)
    tasks = {t: load_task(t, p) for t, p in rc.tasks.items()}
    model = load_hf(rc.hf_dir, mesh=mesh)
    stats = calibrate(model, cal, options=CalibrationOptions(), meta={"preset": rc.preset, "data": calib.record()})
    os.makedirs(rc.out, exist_ok=True)
    stats.save(os.path.join(rc.out, "stats.npz"))
    variants = default_variants(METHODS, budgets, operators=("dominant",))
    variants += [Variant(DEFAULT_METHOD, r, {}, f"{DEFAULT_METHOD} (fit, default)") for r in budgets]
    original, rows = run_comparison(model, stats, variants, held, calibration_blocks=cal)
    notes = f"Preset `{rc.preset}`, model `{rc.hf_dir}`, mesh `{rc.mesh}`, calibration {cal.size} tokens."
    if tasks:
        tok = load_tokenizer(rc.hf_dir)
        acc = {"original": {t: multiple_choice(model, tok, ex) for t, ex in tasks.items()}}
        for v in variants:
            plan = make_plan(stats, method=v.method, per_layer=v.per_layer, **dict(v.options))
            merged = apply_plan(model, plan, blocks=cal)
            acc[f"{v.name} r={v.per_layer}"] = {t: multiple_choice(merged, tok, ex) for t, ex in tasks.items()}
        atomic_write_json(os.path.join(rc.out, "zero_shot.json"), acc)
        notes += "\n\nZero-shot accuracies: `zero_shot.json`."
    return write_report(rc.out, original, rows, title=f"Reproduction: {rc.preset}", notes=notes)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", required=True, choices=sorted(PRESETS))
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--mesh-preset", default="cpu", choices=sorted(MESH_PRESETS))
    p.add_argument("--calib", nargs="*", default=None, help="calibration text (default: the shipped sample)")
    p.add_argument("--text-field", default=None)
    p.add_argument("--num-samples", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--eval-samples", type=int, default=64)
    p.add_argument("--task", action="append", default=[], metavar="NAME=PATH", help="zero-shot task JSONL")
    args = p.parse_args(argv)
    tasks = dict(t.split("=", 1) for t in args.task)
    rc = RunConfig(
        args.preset,
        args.hf_dir,
        args.out,
        MESH_PRESETS[args.mesh_preset],
        tuple(args.calib) if args.calib else None,
        args.text_field,
        args.num_samples,
        args.seq_len,
        args.eval_samples,
        tasks,
    )
    print(run(rc))


if __name__ == "__main__":
    main()
