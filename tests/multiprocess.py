"""Running a test's work on several local JAX processes: the launcher the tests call (`run_workers`) and
what every worker does first (`worker_parser`, `join`, `record_reads`)."""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_workers(module: str, worker_args: list[list[str]], *, timeout_s: float) -> None:
    """Run `python -m module` once per entry of `worker_args` (its own arguments after the coordinator,
    the process count and its index) on CPU; wait (`timeout_s` in all) and fail the test with every
    worker's output if any failed or hung."""
    import pytest

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    env.update(
        JAX_PLATFORMS="cpu",
        PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    procs = []
    for i, args in enumerate(worker_args):
        cmd = [sys.executable, "-m", module, "--coordinator", f"localhost:{port}"]
        cmd += ["--num-processes", str(len(worker_args)), "--process-id", str(i), *args]
        procs.append(
            subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        )
    deadline = time.monotonic() + timeout_s
    outputs, failed = [], False
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
        except subprocess.TimeoutExpired:
            failed = True
            for q in procs:  # one stuck worker usually waits on a collective: stop them all
                q.kill()
            outputs.append(p.communicate()[0] + f"\n[killed after {timeout_s} s]")
        failed |= p.returncode != 0
    if failed:
        for q in procs[len(outputs) :]:
            q.kill()
            outputs.append(q.communicate()[0])
        text = "\n".join(
            f"----- worker {i} (exit {p.returncode}) -----\n{o}" for i, (p, o) in enumerate(zip(procs, outputs))
        )
        pytest.fail(f"multi-process workers failed:\n{text}")


def worker_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every worker takes (`run_workers` passes the first three)."""
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--coordinator", required=True)
    ap.add_argument("--num-processes", type=int, required=True)
    ap.add_argument("--process-id", type=int, required=True)
    ap.add_argument("--local-devices", type=int, default=4)
    ap.add_argument("--model", required=True)
    ap.add_argument("--report", required=True)
    return ap


def join(args: argparse.Namespace) -> None:
    """Join the job: `args.local_devices` CPU devices here, gloo collectives, matmuls at full precision
    (as tests/conftest.py sets for the one-process references)."""
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_num_cpu_devices", args.local_devices)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.distributed.initialize(
        coordinator_address=args.coordinator,
        num_processes=args.num_processes,
        process_id=args.process_id,
        initialization_timeout=60,
    )
    assert jax.process_count() == args.num_processes and len(jax.devices()) == (
        args.num_processes * args.local_devices
    ), (jax.process_count(), jax.devices())


def record_reads() -> list[tuple[str, list[list[int]]]]:
    """From now on, every checkpoint slice this process reads, as (tensor, [[start, stop] per axis])."""
    from conversion.safetensors_io import CheckpointIndex

    reads: list[tuple[str, list[list[int]]]] = []

    def recording(method):
        def read(self, key, index, *rest, **kw):
            shape = self.info(key).shape
            full = tuple(index) + (slice(None),) * (len(shape) - len(index))
            reads.append((key, [list(s.indices(d)[:2]) for s, d in zip(full, shape, strict=True)]))
            return method(self, key, index, *rest, **kw)

        return read

    CheckpointIndex.read_slice = recording(CheckpointIndex.read_slice)
    CheckpointIndex.read_into = recording(CheckpointIndex.read_into)  # the path of leaves >= 4 MiB
    return reads
