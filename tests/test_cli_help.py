"""`grape --help` and every sub-command's help: instant (no JAX, transformers, torch or Orbax imported)
and each default said once."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from grape_jax.calibration.options import COMPUTE_DTYPES
from grape_jax.cli import parsers
from grape_jax.cli.main import COMMANDS, build_parser

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEAVY = ("jax", "transformers", "torch", "orbax", "flax", "matplotlib")

PROBE = """
import contextlib, io, json, sys, time
t0 = time.perf_counter()
from grape_jax.cli.main import COMMANDS, main
texts = {}
for command in ["", *COMMANDS]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        try:
            main([*command.split(), "--help"])
        except SystemExit as e:
            assert e.code == 0, (command, e.code)
    texts[command] = out.getvalue()
print(json.dumps({"seconds": time.perf_counter() - t0, "heavy": [m for m in %r if m in sys.modules], "texts": texts}))
"""


def test_help_imports_nothing_heavy():
    """Every help in one fresh process: no heavy package imported (that is what made `grape plan --help`
    take 9 s), and a generous time bound for a loaded 2-core machine (about 1 s when idle)."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", PROBE % (HEAVY,)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["heavy"] == [], f"help imported {result['heavy']}"
    assert wall < 15, f"every help took {wall:.1f} s"
    for command in COMMANDS:
        assert command in result["texts"][""]
        assert f"usage: grape {command}" in result["texts"][command]


def _actions(parser: argparse.ArgumentParser):
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, p in sub.choices.items():
        for action in p._actions:
            yield name, action


def test_each_default_said_once():
    formatter = parsers.HelpFormatter("grape")
    for command, action in _actions(build_parser()):
        text = formatter._get_help_string(action)
        where = f"grape {command} {'/'.join(action.option_strings) or action.dest}: {text!r}"
        assert text.count("default:") + text.count("(default ") <= 1, where
        assert "(default: None)" not in text and "(default: [])" not in text, where
        if action.required or action.nargs == 0:  # required values and switches show no default
            assert "(default:" not in text, where


def test_no_gradients_help_reads_right_and_dtypes_are_listed():
    p = argparse.ArgumentParser(formatter_class=parsers.HelpFormatter)
    parsers.add_calibration_args(p)
    text = " ".join(p.format_help().split())
    assert "--no-gradients skip the gradient sensitivities, which are computed by default" in text
    assert "(default: True)" not in text and "(default: False)" not in text
    for dtype in COMPUTE_DTYPES:
        assert dtype in text
