"""Runs killed with SIGKILL: nothing that looks complete is left, and calibration resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from grape_jax.stats import ModelStats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = ["--num-samples", "24", "--seq-len", "32", "--batch-size", "8", "--token-chunk", "64", "--cka", "exact"]


def _grape(*args, env_extra=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", PYTHONPATH=ROOT,
               XLA_FLAGS="--xla_force_host_platform_device_count=1")
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, "-m", "grape_jax.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(path, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            pytest.fail(f"process ended before {path} appeared:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path} did not appear in {timeout} s")
        time.sleep(0.05)


@pytest.mark.slow
def test_killed_calibration_resumes_and_matches(tiny_mixtral_tok, tmp_path):
    out = str(tmp_path / "stats.npz")
    proc = _grape("calibrate", tiny_mixtral_tok.path, "--out", out, "--checkpoint-every", "1", *DATA)
    _wait_for(os.path.join(out + ".progress", "progress.json"), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(out), "a killed calibration must not leave a stats file"
    resumed = _grape("calibrate", tiny_mixtral_tok.path, "--out", out, "--checkpoint-every", "1", *DATA)
    assert resumed.wait(timeout=300) == 0, resumed.stdout.read()
    full = _grape("calibrate", tiny_mixtral_tok.path, "--out", str(tmp_path / "full.npz"), *DATA)
    assert full.wait(timeout=300) == 0, full.stdout.read()
    a, b = ModelStats.load(out), ModelStats.load(tmp_path / "full.npz")
    for x, y in zip(a.layers, b.layers):
        np.testing.assert_allclose(x.freq, y.freq, atol=1e-12)
        np.testing.assert_allclose(x.sim["cka"], y.sim["cka"], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_killed_export_never_looks_complete(tiny_mixtral_tok, tmp_path):
    """Kill exports at increasing delays: OUT is either absent or a complete, loadable checkpoint."""
    import json

    from conversion.safetensors_io import CheckpointIndex

    ckpt = str(tmp_path / "ckpt")
    assert _grape("convert", tiny_mixtral_tok.path, ckpt).wait(timeout=300) == 0
    outcomes = []
    for i, delay in enumerate((0.5, 2.5, 3.5, 4.0, 4.5, 5.5)):
        out = str(tmp_path / f"hf{i}")
        proc = _grape("export", ckpt, out, "--max-shard-gb", "0.0001")
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if os.path.exists(out):
            outcomes.append("complete")
            json.load(open(os.path.join(out, "config.json")))
            assert sorted(CheckpointIndex.open(out).keys()) == sorted(CheckpointIndex.open(tiny_mixtral_tok.path).keys())
        else:
            outcomes.append("absent")
        leftovers = [n for n in os.listdir(tmp_path) if n.startswith(f".hf{i}.tmp-")]
        assert all(n.startswith(".") for n in leftovers)  # only hidden temp dirs may remain
    assert "absent" in outcomes, outcomes  # at least one kill landed before the rename
