"""Arguments the `grape` sub-commands share, and turning them into library objects.

Everything here is checked before a command does any work: a bad value is a one-line error naming the
flag and what was expected.
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
from jax.sharding import Mesh

from grape_jax.calibration.options import CalibrationOptions
from grape_jax.core.sharding import describe_mesh, make_mesh
from grape_jax.data.text import DataSpec


class UsageError(ValueError):
    """A flag with a value the command cannot use."""


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


def parsed_planner_options(args: argparse.Namespace) -> dict[str, Any]:
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


def parse_fraction_list(text: str, flag: str) -> list[float]:
    """'0.25,0.5' -> [0.25, 0.5] (each strictly between 0 and 1)."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated fractions, e.g. 0.25,0.5") from None
    if not values or not all(0.0 < v < 1.0 for v in values):
        raise UsageError(f"{flag} {text!r}: expected comma-separated fractions strictly between 0 and 1")
    return values


def parse_int_list(text: str, flag: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4] (non-negative integers)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated integers") from None
    if not values or min(values) < 0:
        raise UsageError(f"{flag} {text!r}: expected comma-separated integers >= 0")
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
