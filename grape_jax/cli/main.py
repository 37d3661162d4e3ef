"""The `grape` command line: a thin layer over the Python API (`grape_jax.api`).

Commands are listed in one table (`COMMANDS`). Errors the user can fix (bad paths, files, flags,
options) print one line `grape: error: ...` and exit 2; Ctrl-C prints one line saying what was saved
and how to resume, and exits 130. Set GRAPE_DEBUG=1 for tracebacks.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Callable, Sequence

from grape_jax.cli import demo as cli_demo
from grape_jax.cli import heal as cli_heal
from grape_jax.cli import methods as cli_method
from grape_jax.cli import models as cli_model
from grape_jax.cli.args import add_distributed_args, init_distributed
from grape_jax.pipeline import Interrupted


@dataclasses.dataclass(frozen=True)
class Command:
    """One sub-command: its help line, its arguments, what it runs, and whether it can span hosts."""

    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    multihost: bool = False


DESCRIPTION = (
    "Shrink a Hugging Face Mixture-of-Experts LLM by merging and pruning experts chosen globally across "
    "layers (GRAPE), in JAX on a device mesh."
)

COMMANDS: dict[str, Command] = {
    "families": Command("list the supported model families", cli_model.configure_families, cli_model.run_families),
    "convert": Command(
        "Hugging Face directory -> grape checkpoint (streamed, sharded, Orbax)",
        cli_model.configure_convert,
        cli_model.run_convert,
        multihost=True,
    ),
    "calibrate": Command(
        "routing statistics and expert similarities over calibration text",
        cli_method.configure_calibrate,
        cli_method.run_calibrate,
        multihost=True,
    ),
    "stats": Command("summarise (and plot) a stats file", cli_method.configure_stats, cli_method.run_stats),
    "plan": Command("statistics + budget -> merge plan (the recipe)", cli_method.configure_plan, cli_method.run_plan),
    "merge": Command(
        "apply a plan to a grape checkpoint", cli_method.configure_merge, cli_method.run_merge, multihost=True
    ),
    "export": Command(
        "grape checkpoint -> Hugging Face directory with recipe.json and a model card",
        cli_model.configure_export,
        cli_model.run_export,
        multihost=True,
    ),
    "prune": Command(
        "load -> calibrate -> plan -> merge -> export in one go (resumable)",
        cli_method.configure_prune,
        cli_method.run_prune,
        multihost=True,
    ),
    "heal": Command(
        "distil the original model into a pruned one (optax fine-tune on the mesh; resumable)",
        cli_heal.configure_heal,
        cli_heal.run_heal,
    ),
    "eval": Command(
        "held-out perplexity and multiple-choice accuracy of a model",
        cli_model.configure_eval,
        cli_model.run_eval,
        multihost=True,
    ),
    "compare": Command(
        "every planner and operator at equal budgets from one calibration",
        cli_demo.configure_compare,
        cli_demo.run_compare,
        multihost=True,
    ),
    "demo": Command(
        "prune the embedded demo MoE with several methods and report", cli_demo.configure_demo, cli_demo.run_demo
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="grape", description=DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(
            name, help=command.help, description=command.help, formatter_class=argparse.ArgumentDefaultsHelpFormatter
        )
        command.configure(p)
        if command.multihost:
            add_distributed_args(p)
        p.set_defaults(command_run=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        init_distributed(args)
        return int(args.command_run(args) or 0)
    except Interrupted as e:
        print(f"grape: {e.hint}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("grape: interrupted; nothing of this command was saved", file=sys.stderr)
        return 130
    except (ValueError, OSError, KeyError) as e:
        if os.environ.get("GRAPE_DEBUG"):
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"grape: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
