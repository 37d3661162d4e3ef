"""Arguments the `grape` sub-commands share, and turning them into library objects.

Everything here is checked before a command does any work: a bad value is a one-line error naming the
flag and what was expected.
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
from jax.sharding import Mesh

from grape_jax.calibration import COMPUTE_DTYPES, CalibrationOptions
from grape_jax.data import DataSpec
from grape_jax.planners import DEFAULT_METHOD, PLANNERS
from grape_jax.sharding import describe_mesh, make_mesh


class UsageError(ValueError):
    """A flag with a value the command cannot use."""


def add_mesh_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--mesh",
        default=None,
        help="mesh axes data, fsdp, expert, tensor, e.g. 'expert=4,fsdp=2'; data takes the devices the "
        "others leave (default: every device on data)",
    )


def add_distributed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-host (else the environment jax.distributed.initialize reads on TPU pods/SLURM)")
    g.add_argument("--coordinator", default=None, help="host:port of process 0")
    g.add_argument("--num-processes", type=int, default=None, help="number of processes")
    g.add_argument("--process-id", type=int, default=None, help="this process's index")


def init_distributed(args: argparse.Namespace) -> None:
    """Start multi-host JAX when asked; must run before any other JAX call."""
    if getattr(args, "coordinator", None) or getattr(args, "num_processes", None):
        jax.distributed.initialize(
            coordinator_address=args.coordinator, num_processes=args.num_processes, process_id=args.process_id
        )


def mesh_from_args(args: argparse.Namespace, *, log=print) -> Mesh | None:
    """The mesh `--mesh` asks for (checked against the devices), announced in one line; None when the
    flag is absent and there is a single device."""
    if args.mesh is None and jax.device_count() == 1:
        mesh = None
    else:
        mesh = make_mesh(args.mesh)
    if jax.process_index() == 0:
        log(describe_mesh(mesh))
    return mesh


def add_data_args(p: argparse.ArgumentParser, *, num_samples: int = 64) -> None:
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        nargs="*",
        default=None,
        help="text files (.txt), JSONL (with --text-field) or a saved datasets dir (default: the "
        "shipped public-domain sample)",
    )
    g.add_argument("--text-field", default=None, help="the JSONL/dataset field holding the text")
    g.add_argument("--seq-len", type=int, default=128, help="tokens per block")
    g.add_argument("--num-samples", type=int, default=num_samples, help="blocks drawn from the text")
    g.add_argument("--seed", type=int, default=0, help="seed that draws the blocks")


def data_spec(args: argparse.Namespace) -> DataSpec:
    spec = DataSpec(
        paths=tuple(args.data) if args.data else None,
        text_field=args.text_field,
        seq_len=args.seq_len,
        num_samples=args.num_samples,
        seed=args.seed,
    )
    spec.check()
    return spec


def add_calibration_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("calibration")
    g.add_argument("--batch-size", type=int, default=4, help="blocks per calibration step")
    g.add_argument("--token-chunk", type=int, default=512, help="tokens per expert chunk (bounds memory)")
    g.add_argument("--cka", default="auto", choices=["auto", "exact", "minibatch"], help="CKA estimator")
    g.add_argument(
        "--checkpoint-seconds",
        type=float,
        default=60.0,
        help="save the calibration accumulators for resuming at most this often (0: never by time)",
    )
    g.add_argument(
        "--checkpoint-every", type=int, default=0, help="also save every this many batches (0: never by count)"
    )
    g.add_argument(
        "--compute-dtype",
        default=None,
        choices=list(COMPUTE_DTYPES),
        help="dtype of the experts' and statistics' matmuls (default: the checkpoint's on "
        "accelerators, float32 on CPU); statistics are fp32 sums either way",
    )
    g.add_argument(
        "--no-gradients",
        dest="gradients",
        action="store_false",
        help="skip the gradient sensitivities (one backward pass per batch; the grape-l planner needs them)",
    )


def calibration_options(args: argparse.Namespace) -> CalibrationOptions:
    return CalibrationOptions(
        batch_size=args.batch_size,
        token_chunk=args.token_chunk,
        cka=args.cka,
        checkpoint_seconds=args.checkpoint_seconds,
        checkpoint_every=args.checkpoint_every,
        compute_dtype=args.compute_dtype,
        gradients=args.gradients,
    )


def add_planner_args(p: argparse.ArgumentParser, *, required: bool = True) -> None:
    g = p.add_argument_group("planning")
    g.add_argument("--method", default=DEFAULT_METHOD, help=f"one of {', '.join(PLANNERS)}")
    b = g.add_mutually_exclusive_group(required=required)
    b.add_argument("--per-layer", type=int, help="experts removed per MoE layer on average (budget = r x layers)")
    b.add_argument("--budget", type=int, help="experts removed in total over all MoE layers")
    b.add_argument(
        "--fraction",
        type=float,
        help="fraction of the routed experts removed, 0 < F < 1 (as REAP/REAM state budgets; budget = the "
        "nearest whole number of experts, whole groups under group-limited routers)",
    )
    g.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="planner option, e.g. gamma=0.01, metric=cka, operator=dominant, global_rank=true",
    )


def planner_options(args: argparse.Namespace) -> dict[str, Any]:
    """`--option KEY=VALUE` pairs with values as JSON-like scalars (true/false, ints, floats, strings)."""
    out = {}
    for item in args.option:
        if "=" not in item:
            raise UsageError(f"--option {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        out[key.strip().replace("-", "_")] = parse_scalar(value.strip())
    return out


def parse_scalar(value: str) -> bool | int | float | str:
    low = value.lower()
    if low in ("true", "false"):
        return low == "true"
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return value


def parse_int_list(text: str, flag: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4] (non-negative integers)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated integers") from None
    if not values or min(values) < 0:
        raise UsageError(f"{flag} {text!r}: expected comma-separated integers >= 0")
    return values


def parse_fraction_list(text: str, flag: str) -> list[float]:
    """'0.25,0.5' -> [0.25, 0.5] (each strictly between 0 and 1)."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated fractions, e.g. 0.25,0.5") from None
    if not values or not all(0.0 < v < 1.0 for v in values):
        raise UsageError(f"{flag} {text!r}: expected comma-separated fractions strictly between 0 and 1")
    return values


def parse_tasks(items: list[str]) -> dict[str, str]:
    """`--task name=path` pairs."""
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--task {item!r}: expected NAME=PATH (e.g. piqa=piqa.jsonl)")
        out[name] = path
    return out


def add_quantize_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quantize",
        choices=["fp8"],
        default=None,
        help="fp8: requantise the weights an FP8 source stored as FP8, with its block size and "
        "quantization_config (unmerged experts keep their scales); default: bf16",
    )
