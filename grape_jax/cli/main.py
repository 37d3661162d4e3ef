"""The `grape` command line: a thin layer over the Python API (`grape_jax.api`).

Commands are listed in one table (`COMMANDS`); their arguments are in `grape_jax.cli.parsers`, which
imports nothing heavy, and a command's module is imported only when it runs (help is instant). Errors
the user can fix (bad paths, files, flags, options) print one line `grape: error: ...` and exit 2;
Ctrl-C prints one line saying what was saved and how to resume, and exits 130. Set GRAPE_DEBUG=1 for tracebacks.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
from collections.abc import Callable, Sequence

from grape_jax.cli import parsers


@dataclasses.dataclass(frozen=True)
class Command:
    """One sub-command: its help line, its arguments, what it runs ("module:function", imported only when
    the command runs, so help never imports JAX), and whether it can span hosts."""

    help: str
    configure: Callable[[argparse.ArgumentParser], None]
    run: str
    multihost: bool = False

    def runner(self) -> Callable[[argparse.Namespace], int]:
        module, _, name = self.run.partition(":")
        return getattr(importlib.import_module(module), name)


DESCRIPTION = (
    "Shrink a Hugging Face Mixture-of-Experts LLM by merging and pruning experts chosen globally across "
    "layers (GRAPE), in JAX on a device mesh."
)

COMMANDS: dict[str, Command] = {
    "families": Command(
        "list the supported model families", parsers.configure_families, "grape_jax.cli.models:run_families"
    ),
    "convert": Command(
        "Hugging Face directory -> grape checkpoint (streamed, sharded, Orbax)",
        parsers.configure_convert,
        "grape_jax.cli.models:run_convert",
        multihost=True,
    ),
    "calibrate": Command(
        "routing statistics and expert similarities over calibration text",
        parsers.configure_calibrate,
        "grape_jax.cli.methods:run_calibrate",
        multihost=True,
    ),
    "stats": Command("summarise (and plot) a stats file", parsers.configure_stats, "grape_jax.cli.methods:run_stats"),
    "plan": Command(
        "statistics + budget -> merge plan (the recipe)", parsers.configure_plan, "grape_jax.cli.methods:run_plan"
    ),
    "merge": Command(
        "apply a plan to a grape checkpoint", parsers.configure_merge, "grape_jax.cli.methods:run_merge", multihost=True
    ),
    "export": Command(
        "grape checkpoint -> Hugging Face directory with recipe.json and a model card",
        parsers.configure_export,
        "grape_jax.cli.models:run_export",
        multihost=True,
    ),
    "prune": Command(
        "load -> calibrate -> plan -> merge -> export in one go (resumable)",
        parsers.configure_prune,
        "grape_jax.cli.methods:run_prune",
        multihost=True,
    ),
    "heal": Command(
        "distil the original model into a pruned one (optax fine-tune on the mesh; resumable)",
        parsers.configure_heal,
        "grape_jax.cli.heal:run_heal",
    ),
    "eval": Command(
        "held-out perplexity and multiple-choice accuracy of a model",
        parsers.configure_eval,
        "grape_jax.cli.models:run_eval",
        multihost=True,
    ),
    "compare": Command(
        "every planner and operator at equal budgets from one calibration",
        parsers.configure_compare,
        "grape_jax.cli.demo:run_compare",
        multihost=True,
    ),
    "demo": Command(
        "prune the embedded demo MoE with several methods and report",
        parsers.configure_demo,
        "grape_jax.cli.demo:run_demo",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grape", description=DESCRIPTION, formatter_class=parsers.HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.help, formatter_class=parsers.HelpFormatter)
        command.configure(p)
        if command.multihost:
            parsers.add_distributed_args(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from grape_jax.base.memory import limit_malloc_arenas  # noqa: PLC0415  (deferred: the parser stays light)

    limit_malloc_arenas()  # before JAX starts its threads (base.memory: host memory of streamed runs)
    from grape_jax.cli.args import init_distributed  # noqa: PLC0415  (deferred: imports JAX; help must not)
    from grape_jax.pipeline import Interrupted  # noqa: PLC0415  (deferred: imports JAX; help must not)

    try:
        init_distributed(args)
        return int(COMMANDS[args.command].runner()(args) or 0)
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
