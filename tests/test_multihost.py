"""Two local JAX processes (4 CPU devices each) convert and export one model together.

Checks: each process reads only the checkpoint slices its own devices hold (no expert that only the
other process's devices hold is read), process 0 alone writes the export, and the 2-process export is
byte-identical to the single-process export of the same mesh; and the whole chain convert -> calibrate
-> plan -> merge -> export on 2 processes gives the same statistics, plan and bytes as on one.
"""

from __future__ import annotations

import filecmp
import json
import os

import pytest

from tests.multiprocess import run_workers

pytestmark = pytest.mark.multiprocess


MESHES = ("expert=8", "expert=4,fsdp=2")  # experts split across processes; fsdp across processes
TIMEOUT_S = 120


def _run_workers(model: str, out: str, reports: list[str]) -> None:
    meshes = [arg for spec in MESHES for arg in ("--mesh", spec)]
    run_workers(
        "tests.multihost_worker",
        [["--model", model, "--out", out, "--report", report, *meshes] for report in reports],
        timeout_s=TIMEOUT_S,
    )


def _volume(box) -> int:
    n = 1
    for lo, hi in box:
        n *= hi - lo
    return n


def _same_dirs(a: str, b: str) -> list[str]:
    """Names of files that differ (or exist on one side only)."""
    names_a, names_b = sorted(os.listdir(a)), sorted(os.listdir(b))
    if names_a != names_b:
        return [f"listing {names_a} != {names_b}"]
    _, mismatch, errors = filecmp.cmpfiles(a, b, names_a, shallow=False)
    return mismatch + errors


def test_two_processes_load_own_slices_and_export_like_one(tmp_path):
    import jax
    import torch
    from flax import nnx

    from conversion.export import export_hf
    from conversion.load import load_hf
    from grape_jax.core.sharding import make_mesh
    from tests.hf_models import build_model, save_model, tiny_mixtral_config

    model = build_model(tiny_mixtral_config(num_local_experts=8), seed=3, dtype=torch.bfloat16)
    src = save_model(model, tmp_path / "hf")

    from tests.multihost_worker import run_pipeline

    for i, spec in enumerate(MESHES):  # single-process references on this process's 8 devices
        ref = load_hf(src, mesh=make_mesh(spec))
        jax.block_until_ready(jax.tree.leaves(nnx.state(ref)))
        export_hf(ref, tmp_path / "ref" / str(i))
        if i == 0:
            ref_pipeline = run_pipeline(ref, make_mesh(spec), str(tmp_path / "ref" / "pipeline0"))

    reports = [str(tmp_path / f"report{i}.json") for i in range(2)]
    _run_workers(src, str(tmp_path / "multi"), reports)
    rep = []
    for path in reports:
        with open(path) as f:
            rep.append(json.load(f))

    assert sorted(os.listdir(tmp_path / "multi")) == sorted([str(i) for i in range(len(MESHES))] + ["pipeline0"]), (
        "only the finished exports may be left (no temp dirs from a second writer)"
    )
    # calibrate -> plan -> merge -> export on 2 processes equals the same chain in one process
    for r in rep:
        assert r["meshes"][0]["pipeline"]["kept"] == ref_pipeline["kept"] != [8, 8]
        assert r["meshes"][0]["pipeline"]["freq"] == ref_pipeline["freq"]
    # exporting again into the finished dir: the writer refuses, the other process stops too (no hang)
    assert "OutputExistsError" in rep[0]["meshes"][0]["refused"] and "already exists" in rep[0]["meshes"][0]["refused"]
    assert "failed on the writer process" in rep[1]["meshes"][0]["refused"]
    # the writer fails in the middle of its second shard: both stop with an error, nothing is left
    writer, follower = (r["meshes"][0]["failed"] for r in rep)
    assert writer["shards"] >= 3 and writer["gathers"] == writer["fail_at"], writer
    assert writer["error"].startswith("OSError") and "No space left" in writer["error"], writer
    assert "failed on the writer process (process 0) while writing model-00002-of-" in follower["error"], follower
    assert writer["left"] == [] and follower["left"] == [], (writer, follower)
    diff = _same_dirs(str(tmp_path / "ref" / "pipeline0"), str(tmp_path / "multi" / "pipeline0"))
    assert not diff, f"2-process pruned export differs from the 1-process one: {diff}"
    for i, spec in enumerate(MESHES):
        diff = _same_dirs(str(tmp_path / "ref" / str(i)), str(tmp_path / "multi" / str(i)))
        assert not diff, f"mesh {spec}: 2-process export differs from the 1-process one: {diff}"
        per_proc = [r["meshes"][i] for r in rep]
        for p, m in enumerate(per_proc):
            assert m["mesh"] == spec
            assert not m["violations"], "\n".join(m["violations"])
            assert m["prefetched_experts"] > 0, f"process {p} prefetched no expert tensor"
            assert m["reads"], f"process {p} read nothing"
        # Both processes together read each expert once per weight; neither read the whole model.
        total = sum(m["read_elements"] for m in per_proc)
        for m in per_proc:
            assert m["read_elements"] < total
        # Expert tensors are never replicated across the two processes on these meshes: each HF
        # expert tensor is read once in all, split between the processes without overlap.
        boxes = [{} for _ in per_proc]
        for p, m in enumerate(per_proc):
            for key, box in m["reads"]:
                if ".experts." in key:
                    boxes[p].setdefault(key, []).append(box)
        for key in set(boxes[0]) & set(boxes[1]):
            for a in boxes[0][key]:
                for b in boxes[1][key]:
                    assert any(max(x0, y0) >= min(x1, y1) for (x0, x1), (y0, y1) in zip(a, b)), (
                        f"mesh {spec}: both processes read {key} {a} / {b}"
                    )
        expert_elements = [sum(_volume(b) for bs in bx.values() for b in bs) for bx in boxes]
        assert expert_elements[0] == expert_elements[1] > 0, expert_elements
        for param in per_proc[0]["own_experts"]:
            if spec == "expert=8":  # each process owns (and read) 4 of the 8 experts, disjoint
                a, b = (set(m["experts_read"][param]) for m in per_proc)
                assert len(a) == len(b) == 4 and not a & b, (param, a, b)
        # Process 0 could not assemble every tensor alone: the cross-process gather was exercised.
        assert per_proc[0]["remote_gathers"] > 0
        assert per_proc[0]["remote_gathers"] == per_proc[1]["remote_gathers"]
