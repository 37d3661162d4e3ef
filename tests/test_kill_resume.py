"""Runs killed with SIGKILL: nothing that looks complete is left, and calibration resumes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from grape_jax.calibration.stats import ModelStats

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = ["--num-samples", "24", "--seq-len", "32", "--batch-size", "8", "--token-chunk", "64", "--cka", "exact"]


def _grape(*args, env_extra=None):
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=ROOT,
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
    )
    env.update(env_extra or {})
    return subprocess.Popen(
        [sys.executable, "-m", "grape_jax.cli.main", *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(ready, proc, what, timeout=120):
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"process ended before {what}:\n{proc.stdout.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} in {timeout} s")
        time.sleep(0.05)


def _saved_steps(progress: str) -> list[int]:
    """Completed Orbax steps in a calibration progress directory (in-progress ones carry a suffix)."""
    return sorted(int(n) for n in os.listdir(progress) if n.isdigit()) if os.path.isdir(progress) else []


@pytest.mark.slow
def test_killed_calibration_resumes_and_matches(tiny_mixtral_tok, tmp_path):
    """SIGKILL once the first batches are saved: the rerun starts from the saved position (not from 0)
    and its statistics equal an uninterrupted run's bit for bit."""
    out = str(tmp_path / "stats.npz")
    progress = out + ".progress"
    proc = _grape("calibrate", tiny_mixtral_tok.path, "--out", out, "--checkpoint-every", "1", *DATA)
    _wait_for(lambda: _saved_steps(progress), proc, "saved calibration step")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(out), "a killed calibration must not leave a stats file"
    saved = _saved_steps(progress)[-1]
    resumed = _grape("calibrate", tiny_mixtral_tok.path, "--out", out, "--checkpoint-every", "1", *DATA)
    assert resumed.wait(timeout=300) == 0
    assert f"resuming calibration after batch {saved} of 3" in resumed.stdout.read()
    assert not os.path.exists(progress), "progress is removed once the statistics are saved"
    full = _grape("calibrate", tiny_mixtral_tok.path, "--out", str(tmp_path / "full.npz"), *DATA)
    assert full.wait(timeout=300) == 0, full.stdout.read()
    a, b = ModelStats.load(out), ModelStats.load(tmp_path / "full.npz")
    assert a.fingerprint == b.fingerprint
    for x, y in zip(a.layers, b.layers):
        for field in ("freq", "gate_mass", "reap", "routed_m", "routed_n"):
            np.testing.assert_array_equal(getattr(x, field), getattr(y, field))
        for metric in x.sim:
            np.testing.assert_array_equal(x.sim[metric], y.sim[metric])


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
            assert sorted(CheckpointIndex.open(out).keys()) == sorted(
                CheckpointIndex.open(tiny_mixtral_tok.path).keys()
            )
        else:
            outcomes.append("absent")
        leftovers = [n for n in os.listdir(tmp_path) if n.startswith(f".hf{i}.tmp-")]
        assert all(n.startswith(".") for n in leftovers)  # only hidden temp dirs may remain
    assert "absent" in outcomes, outcomes  # at least one kill landed before the rename


@pytest.mark.slow
def test_killed_export_resumes_from_its_last_shard(tiny_mixtral_tok, tmp_path):
    """SIGKILL after two shards: the rerun keeps them, writes the rest, and equals an uninterrupted export."""
    ckpt = str(tmp_path / "ckpt")
    assert _grape("convert", tiny_mixtral_tok.path, ckpt).wait(timeout=300) == 0
    shard = ["--max-shard-gb", "0.0001"]
    clean = _grape("export", ckpt, str(tmp_path / "clean"), *shard)
    assert clean.wait(timeout=300) == 0, clean.stdout.read()
    out, partial = str(tmp_path / "hf"), str(tmp_path / ".hf.partial")
    proc = _grape("export", ckpt, out, *shard, env_extra={"GRAPE_EXPORT_SHARD_DELAY_S": "1"})
    deadline = time.monotonic() + 120
    while not (os.path.isdir(partial) and sum(f.endswith(".safetensors") for f in os.listdir(partial)) >= 2):
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(out)
    rerun = _grape("export", ckpt, out, *shard)
    assert rerun.wait(timeout=300) == 0
    log = rerun.stdout.read()
    assert "resuming the export" in log and "shards already written" in log, log
    for name in sorted(os.listdir(str(tmp_path / "clean"))):
        with open(os.path.join(out, name), "rb") as a, open(os.path.join(str(tmp_path / "clean"), name), "rb") as b:
            assert a.read() == b.read(), name
    assert sorted(os.listdir(out)) == sorted(os.listdir(str(tmp_path / "clean")))
    assert not os.path.exists(partial)
