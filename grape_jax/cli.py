"""The `grape` command line: convert, calibrate, plan, merge, export, prune, evaluate, demo.

Each sub-command is a thin wrapper over library functions; errors the user can fix (bad paths, bad
files, bad options) print one line `grape: error: ...` and exit 2. Set GRAPE_DEBUG=1 for tracebacks.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]] = {}


def command(name: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Register `fn(args) -> exit code` as sub-command `name`."""

    def deco(fn: Callable[[argparse.Namespace], int]):
        COMMANDS[name] = (configure, fn)
        return fn

    return deco


def add_mesh_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--mesh", default=None, help="mesh axes, e.g. 'expert=4,fsdp=2' (default: all devices on data)")


def add_distributed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-host (or the environment jax.distributed.initialize reads)")
    g.add_argument("--coordinator", default=None, help="host:port of process 0")
    g.add_argument("--num-processes", type=int, default=None)
    g.add_argument("--process-id", type=int, default=None)


def add_quantize_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", choices=["fp8"], default=None,
                   help="fp8: requantise the weights an FP8 source stored as FP8, with its block size and "
                        "quantization_config (unmerged experts keep their scales); default: bf16")


def init_runtime(args: argparse.Namespace) -> None:
    """Start multi-host JAX when asked; must run before any other JAX call."""
    if getattr(args, "coordinator", None) or getattr(args, "num_processes", None):
        import jax

        jax.distributed.initialize(
            coordinator_address=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )


def mesh_from_args(args: argparse.Namespace):
    from grape_jax.sharding import make_mesh

    return make_mesh(args.mesh)


# --------------------------------------------------------------------------------------- convert


def _convert_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("hf_dir", help="Hugging Face model directory (config.json + *.safetensors)")
    p.add_argument("out", help="output Orbax checkpoint directory")
    p.add_argument("--dtype", default=None, help="cast parameters (default: keep stored dtypes)")
    p.add_argument("--overwrite", action="store_true")
    add_mesh_args(p)


@command("convert", _convert_args)
def cmd_convert(args: argparse.Namespace) -> int:
    from conversion.checkpoint import save_checkpoint
    from conversion.load import load_hf

    loaded = load_hf(args.hf_dir, mesh=mesh_from_args(args), dtype=args.dtype)
    save_checkpoint(
        args.out, loaded.params, loaded.cfg, loaded.family,
        hf_config=loaded.hf_config, source_dir=loaded.source_dir, overwrite=args.overwrite,
    )
    print(f"converted {args.hf_dir} ({loaded.family.name}, {len(loaded.params)} tensors) -> {args.out}")
    return 0


# ---------------------------------------------------------------------------------------- export


def _export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("ckpt", help="grape-jax Orbax checkpoint (from convert or merge)")
    p.add_argument("out", help="output Hugging Face directory")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--max-shard-gb", type=float, default=5.0)
    add_quantize_arg(p)
    add_mesh_args(p)


@command("export", _export_args)
def cmd_export(args: argparse.Namespace) -> int:
    from conversion.checkpoint import restore_checkpoint
    from conversion.export import export_hf
    from grape_jax.plan import Plan

    ckpt = restore_checkpoint(args.ckpt, mesh=mesh_from_args(args))
    plan = ckpt.extra.get("plan")  # a merged checkpoint: its unmerged experts keep their FP8 scales
    export_hf(
        ckpt.params, ckpt.cfg, ckpt.family, args.out,
        base_config=ckpt.hf_config, source_dir=ckpt.source_dir, overwrite=args.overwrite,
        max_shard_bytes=int(args.max_shard_gb * 1e9),
        extra_files=ckpt.extra.get("export_files"), log=print, quantize=args.quantize,
        expert_origins=None if plan is None else Plan.from_dict(plan).expert_origins(),
    )
    print(f"exported {args.ckpt} -> {args.out}")
    return 0


# -------------------------------------------------------------------------------------- families


@command("families", lambda p: None)
def cmd_families(args: argparse.Namespace) -> int:
    from conversion.families import FAMILIES

    for line in family_lines(FAMILIES):
        print(line)
    return 0


def family_lines(families) -> list[str]:
    """One block per model_type: its class, routing rule and what an export writes."""
    from conversion.families import export_family

    lines = []
    for model_type in sorted(families):
        f = families[model_type]
        out = export_family(f)
        stock = f"stock {out.architectures[0]}" if out.in_transformers else "the checkpoint's own remote code"
        lines += [
            f"{model_type:14s} {', '.join(f.architectures)}",
            f"{'':14s}   routing: {f.routing}",
            f"{'':14s}   export:  uniform counts -> {stock}; per-layer counts -> remote code "
            f"(modeling_pruned_moe.py)" + ("" if out is f else f"; written as {out.name} (text model only)"),
        ]
    lines.append("Checkpoints with an FP8 block-quantised quantization_config are read for every family (export: bf16, "
                 "or --quantize fp8); GPT-OSS's MXFP4 is read and exported bf16.")
    return lines


# ------------------------------------------------------------------------------------------ main


def build_parser() -> argparse.ArgumentParser:
    import grape_jax.cli_demo  # noqa: F401  (registers demo/compare)
    import grape_jax.cli_pipeline  # noqa: F401  (registers calibrate/stats/plan/merge/prune)

    parser = argparse.ArgumentParser(prog="grape", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (configure, fn) in COMMANDS.items():
        p = sub.add_parser(name, help=(fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else None)
        configure(p)
        add_distributed_args(p)
        p.set_defaults(func=fn)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        init_runtime(args)
        return int(args.func(args) or 0)
    except (ValueError, OSError, KeyError) as e:
        if os.environ.get("GRAPE_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"grape: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # `python -m grape_jax.cli`: run the imported module's main so sub-command modules register into
    # the same registry they import (not into this __main__ copy).
    from grape_jax.cli import main as _main

    sys.exit(_main())
