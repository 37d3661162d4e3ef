"""`grape families | convert | export | eval`: models in and out, and their quality."""

from __future__ import annotations

import argparse
import os

from conversion.checkpoint import restore_checkpoint, save_checkpoint
from conversion.families import FAMILIES, export_family
from grape_jax.base.atomic import atomic_write_json
from grape_jax.cli.args import UsageError, data_spec, mesh_from_args, parse_tasks
from grape_jax.core.dispatch import check_dispatch
from grape_jax.data.text import load_tokenizer
from grape_jax.evaluation.scoring import perplexity
from grape_jax.evaluation.tasks import evaluate_tasks, load_task
from grape_jax.pipeline import Interrupted, blocks_for, check_output, load_model, save_hf
from grape_jax.source import ModelSource


def run_families(args: argparse.Namespace) -> int:
    for line in family_lines(FAMILIES):
        print(line)
    return 0


# Families whose per-layer-count exports vLLM serves through the grape_vllm plugin (serving/vllm_plugin;
# tests/test_serve_plugin.py keeps this in step with the plugin's own table).
_PLUGIN = "with the grape_vllm plugin (scripts/setup_vllm.sh)"
VLLM_PER_LAYER = {
    **dict.fromkeys(
        "mixtral qwen2_moe qwen3_moe olmoe deepseek_v2 deepseek_v3 glm4_moe ernie4_5_moe phimoe gpt_oss "
        "llama4_text".split(),
        _PLUGIN,
    ),
    "minimax_m2": _PLUGIN + " on GPU (vLLM's CPU router lacks ungrouped sigmoid routing)",
}


def family_lines(families) -> list[str]:
    """One block per model_type: its class, routing rule and what an export writes."""
    lines = []
    for model_type in sorted(families):
        f = families[model_type]
        out = export_family(f)
        stock = f"stock {out.architectures[0]}" if out.in_transformers else "the checkpoint's own remote code"
        vllm = VLLM_PER_LAYER.get(out.name, "not served (transformers only)")
        lines += [
            f"{model_type:14s} {', '.join(f.architectures)}",
            f"{'':14s}   routing: {f.routing}",
            f"{'':14s}   export:  uniform counts -> {stock}; per-layer counts -> remote code "
            f"(modeling_pruned_moe.py)" + ("" if out is f else f"; written as {out.name} (text model only)"),
            f"{'':14s}   serve:   uniform counts -> vLLM/transformers as the stock model; per-layer counts -> "
            f"transformers (trust_remote_code), vLLM {vllm}",
        ]
    lines.append(
        "Checkpoints with an FP8 block-quantised quantization_config are read for every family (export: "
        "bf16, or --quantize fp8); GPT-OSS's MXFP4 is read and exported bf16."
    )
    return lines


def run_convert(args: argparse.Namespace) -> int:
    check_output(args.out, overwrite=args.overwrite, flag="out")
    source = ModelSource.open(args.hf_dir)
    if source.is_checkpoint:
        raise UsageError(f"{source.path} is a grape checkpoint already; convert reads Hugging Face directories")
    model = source.load(mesh=mesh_from_args(args), dtype=args.dtype)
    save_checkpoint(args.out, model, overwrite=args.overwrite)
    print(f"converted {args.hf_dir} ({model.info.family}, {model.num_params:,} parameters) -> {args.out}")
    return 0


def run_export(args: argparse.Namespace) -> int:
    check_output(args.out, overwrite=args.overwrite, flag="out")
    if not args.max_shard_gb > 0:
        raise ValueError(f"--max-shard-gb must be > 0, got {args.max_shard_gb}")
    model = restore_checkpoint(args.ckpt, mesh=mesh_from_args(args))
    try:
        save_hf(
            model,
            args.out,
            overwrite=args.overwrite,
            max_shard_bytes=int(args.max_shard_gb * 1e9),
            quantize=args.quantize,
            log=print,
        )
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted during export; the shards written so far are kept next to {args.out} "
            f"(.{os.path.basename(os.path.abspath(args.out))}.partial): run the same command again "
            f"to resume"
        ) from None
    print(f"exported {args.ckpt} -> {args.out}")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    """Held-out perplexity (default: the shipped held-out text) and, with --task, multiple-choice
    accuracy; a table on stdout and JSON with --out."""
    if args.out:
        check_output(args.out, overwrite=args.overwrite)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_dispatch(args.dispatch)
    tasks = parse_tasks(args.task)
    for name, path in tasks.items():
        load_task(name, path)  # every task file checked before the model is loaded
    spec = data_spec(args)
    blocks = blocks_for(args.model, spec, heldout=True)
    model = load_model(args.model, mesh=mesh_from_args(args), dtype=args.dtype)

    def forward(tokens, mask):
        return model(tokens, mask, dispatch=args.dispatch)

    ppl = perplexity(forward, blocks, batch_size=args.batch_size, progress=True)
    results = {
        "model": os.path.abspath(args.model),
        "fingerprint": model.info.fingerprint,
        "num_experts": list(model.cfg.num_experts),
        "params": model.num_params,
        "perplexity": {
            "ppl": ppl.ppl,
            "nll_sum": ppl.nll_sum,
            "num_tokens": ppl.num_tokens,
            "data": spec.record(heldout=True),
        },
    }
    rows = [("perplexity", f"{ppl.ppl:.4f}", f"{ppl.num_tokens} tokens")]
    if tasks:
        tokenizer = load_tokenizer(ModelSource.open(args.model).tokenizer_dir)
        scores = evaluate_tasks(
            forward, tokenizer, tasks, batch_size=args.batch_size, max_length=model.cfg.max_position_embeddings
        )
        results["tasks"] = scores
        rows += [
            (name, f"acc {s['acc']:.4f} acc_norm {s['acc_norm']:.4f}", f"{s['n']} examples")
            for name, s in scores.items()
        ]
    width = max(len(r[0]) for r in rows)
    for name, value, note in rows:
        print(f"{name:{width}s}  {value}  ({note})")
    if args.out:
        atomic_write_json(args.out, results)
        print(f"results -> {args.out}")
    return 0
