"""`grape families | convert | export | eval`: models in and out, and their quality."""

from __future__ import annotations

import argparse
import os

from conversion.checkpoint import restore_checkpoint, save_checkpoint
from conversion.families import FAMILIES, export_family
from conversion.load import load_hf
from grape_jax.atomic import atomic_write_json
from grape_jax.cli_args import add_data_args, add_mesh_args, add_quantize_arg, data_spec, mesh_from_args, parse_tasks
from grape_jax.data import load_tokenizer
from grape_jax.dispatch import DISPATCHES
from grape_jax.evaluate import perplexity
from grape_jax.pipeline import Interrupted, blocks_for, check_output, load_model, save_hf, tokenizer_dir
from grape_jax.tasks import evaluate_tasks, load_task


def configure_families(p: argparse.ArgumentParser) -> None:
    del p


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


def configure_convert(p: argparse.ArgumentParser) -> None:
    p.add_argument("hf_dir", help="Hugging Face model directory (config.json + *.safetensors)")
    p.add_argument("out", help="output grape checkpoint directory (Orbax, sharded)")
    p.add_argument("--dtype", default=None, help="cast parameters, e.g. float32 (default: keep stored dtypes)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    add_mesh_args(p)


def run_convert(args: argparse.Namespace) -> int:
    check_output(args.out, overwrite=args.overwrite, flag="out")
    model = load_hf(args.hf_dir, mesh=mesh_from_args(args), dtype=args.dtype)
    save_checkpoint(args.out, model, overwrite=args.overwrite)
    print(f"converted {args.hf_dir} ({model.info.family}, {model.num_params:,} parameters) -> {args.out}")
    return 0


def configure_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="grape checkpoint (from convert or merge)")
    p.add_argument("out", help="output Hugging Face directory (with recipe.json and a model card)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors file, in GB")
    add_quantize_arg(p)
    add_mesh_args(p)


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


def configure_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="Hugging Face directory or grape checkpoint")
    p.add_argument(
        "--task",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="multiple-choice task file (JSONL), e.g. piqa=piqa.jsonl; see grape_jax/assets/tasks/",
    )
    p.add_argument("--batch-size", type=int, default=8, help="rows per forward pass")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--dtype", default=None, help="cast an HF model's parameters, e.g. float32")
    p.add_argument(
        "--dispatch",
        default="auto",
        choices=list(DISPATCHES),
        help="MoE forward: routed (each expert on its own tokens) or dense (every expert on every token)",
    )
    add_data_args(p, num_samples=64)
    add_mesh_args(p)


def run_eval(args: argparse.Namespace) -> int:
    """Held-out perplexity (default: the shipped held-out text) and, with --task, multiple-choice
    accuracy; a table on stdout and JSON with --out."""
    if args.out:
        check_output(args.out, overwrite=args.overwrite)
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
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
        tokenizer = load_tokenizer(tokenizer_dir(args.model))
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
