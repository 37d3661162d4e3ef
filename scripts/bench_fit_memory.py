"""Peak host memory of calibration (with gradient sensitivities) and of the fit operator's pass, on N and
8N calibration tokens, each in its own child process: both must stay flat in the number of tokens.

    python scripts/bench_fit_memory.py [MODEL_DIR] [--tokens 1024] [--per-layer 2]
    python scripts/bench_fit_memory.py [MODEL_DIR] --gradient-cost 8192   # calibrate time without/with gradients

MODEL_DIR defaults to the shipped demo model; blocks are random token ids of 128 tokens. Each child loads
the model, calibrates (`CalibrationOptions()`, gradients on), plans with the default planner and merges
(with operator 'fit': the fit pass and its loss check), then reports its peak RSS (ru_maxrss from
wait4). The last line is the ratio of the peaks, 8N over N (1.0: flat).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import jax
import numpy as np

from grape_jax.calibration.calibrate import calibrate
from grape_jax.calibration.options import CalibrationOptions
from grape_jax.core.model import param_view
from grape_jax.demo.model import shipped_path
from grape_jax.pipeline import apply_plan, load_model
from grape_jax.planners import make_plan


def _blocks(vocab: int, num_tokens: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab, size=(num_tokens // 128, 128), dtype=np.int32)


def child(model_dir: str, num_tokens: int, per_layer: int) -> None:
    model = load_model(model_dir)
    blocks = _blocks(model.cfg.vocab_size, num_tokens)
    t0 = time.perf_counter()
    stats = calibrate(model, blocks, options=CalibrationOptions(), progress=False)
    t1 = time.perf_counter()
    merged = apply_plan(model, make_plan(stats, per_layer=per_layer), blocks=blocks)
    jax.block_until_ready(param_view(merged))
    t2 = time.perf_counter()
    params_bytes = sum(int(v.nbytes) for v in param_view(model).values())
    print(
        json.dumps({"tokens": int(blocks.size), "calibrate_s": t1 - t0, "fit_s": t2 - t1, "param_bytes": params_bytes})
    )


def gradient_cost(model_dir: str, num_tokens: int) -> None:
    """Warm calibration time without and with gradient sensitivities (each compiled by a first call)."""
    model = load_model(model_dir)
    blocks = _blocks(model.cfg.vocab_size, num_tokens)
    times = {}
    for gradients in (False, True):
        options = CalibrationOptions(gradients=gradients)
        calibrate(model, blocks, options=options, progress=False)
        t0 = time.perf_counter()
        calibrate(model, blocks, options=options, progress=False)
        times[gradients] = time.perf_counter() - t0
        print(f"calibrate {blocks.size} tokens, gradients={gradients}: {times[gradients]:.1f} s (warm)")
    print(f"ratio with / without gradients: {times[True] / times[False]:.2f}")


def measure(model_dir: str, num_tokens: int, per_layer: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), model_dir, "--child", str(num_tokens)]
    proc = subprocess.Popen([*cmd, "--per-layer", str(per_layer)], stdout=subprocess.PIPE, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"child for {num_tokens} tokens failed")
    info = json.loads(out.strip().splitlines()[-1])
    info["maxrss_gib"] = usage.ru_maxrss / 2**20  # Linux: KiB
    return info


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=shipped_path())
    p.add_argument("--tokens", type=int, default=1024, help="N (runs N and 8N)")
    p.add_argument("--per-layer", type=int, default=2)
    p.add_argument("--gradient-cost", type=int, default=None, metavar="TOKENS")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.gradient_cost:
        gradient_cost(args.model, args.gradient_cost)
        return
    if args.child is not None:
        child(args.model, args.child, args.per_layer)
        return
    print("| tokens | peak RSS | params | calibrate s | plan + fit + merge s |")
    print("|---|---|---|---|---|")
    peaks = []
    for n in (args.tokens, 8 * args.tokens):
        m = measure(args.model, n, args.per_layer)
        peaks.append(m["maxrss_gib"])
        print(
            f"| {m['tokens']:,} | {m['maxrss_gib']:.2f} GiB | {m['param_bytes'] / 2**20:.1f} MiB | "
            f"{m['calibrate_s']:.1f} | {m['fit_s']:.1f} |"
        )
    print(f"peak RSS ratio, {8 * args.tokens} / {args.tokens} tokens: {peaks[1] / peaks[0]:.3f}")


if __name__ == "__main__":
    main()
