"""Layer streaming on two local JAX processes (4 CPU devices each) gives the one-process answers.

`prune(..., stream_layers="on")` (the default planner: gradient sensitivities, operator 'fit' with its
loss check) on a mesh that splits both the batch and the weights' embed dimension across the processes:
the same statistics (within 1e-5 relative), plan and export as the same prune streamed in one process
and resident in one process on the same 8-device mesh; each process reads only its own half of each
weight matrix; a streamed calibration interrupted on both processes resumes where it stopped.
"""

from __future__ import annotations

import json
import os

import pytest

from tests.multiprocess import run_workers

pytestmark = [pytest.mark.multiprocess, pytest.mark.slow]  # about 100 s on 2 cores


MESH = "expert=4,fsdp=2"  # fsdp across the processes: batch rows and weight slices split between them
TIMEOUT_S = 240


def _run_workers(model: str, out: str, reports: list[str]) -> None:
    run_workers(
        "tests.stream_multihost_worker",
        [["--model", model, "--out", out, "--report", report, "--mesh", MESH] for report in reports],
        timeout_s=TIMEOUT_S,
    )


def _disjoint(a: list, b: list) -> bool:
    return any(max(a0, b0) >= min(a1, b1) for (a0, a1), (b0, b1) in zip(a, b, strict=True))


def test_two_processes_stream_like_one(tiny_mixtral_tok, tmp_path):
    from grape_jax.calibration.stats import ModelStats
    from grape_jax.core.sharding import make_mesh
    from tests.stream_multihost_worker import prune_streamed
    from tests.test_stream import assert_exports_close, assert_stats_close

    path = tiny_mixtral_tok.path
    reports = [str(tmp_path / f"report{i}.json") for i in range(2)]
    _run_workers(path, str(tmp_path / "multi"), reports)
    rep = [json.load(open(r)) for r in reports]
    one = {mode: prune_streamed(path, str(tmp_path / mode), make_mesh(MESH), mode, log=print) for mode in ("on", "off")}

    # the same statistics, plan and export as one process, streamed and resident, on the same mesh
    multi = ModelStats.load(str(tmp_path / "multi" / "pruned.work" / "stats.npz"))
    for mode, result in one.items():
        assert_stats_close(multi, result.stats)
        assert rep[0]["kept"] == rep[1]["kept"] == list(result.plan.kept_per_layer) != [8, 8, 8]
        assert_exports_close(str(tmp_path / mode), str(tmp_path / "multi" / "pruned"))
    plans = [
        json.load(open(tmp_path / d / "plan.json"))["layers"] for d in ("multi/pruned.work", "on.work", "off.work")
    ]
    assert plans[0] == plans[1] == plans[2]
    recipe = json.load(open(tmp_path / "multi" / "pruned" / "recipe.json"))
    assert recipe["calibration"]["run"]["stream_layers"] == {"streamed": True, "why": "--stream-layers on"}
    assert recipe["merge_inputs"]["layers"], "the plan's operator 'fit' refitted no layer"
    # the work directory: a subdirectory per process (they share this host's disk)
    assert sorted(os.listdir(tmp_path / "multi" / "pruned.work" / "fit")) == ["process0", "process1"]

    # stopped after the forward sweep on both processes; the rerun resumed at the reverse sweep
    layers = 3
    for r in rep:
        assert "3 of 6 layer steps are saved" in r["hint"] and r["saved"] == ["process0", "process1"]
        forward, reverse = [["forward", i] for i in range(layers)], [["reverse", i] for i in reversed(range(layers))]
        assert r["steps"] == forward + reverse
        assert any(f"resuming the streamed calibration at forward layer {layers}" in line for line in r["logs"])
        assert "layer streaming: on (--stream-layers on)" in r["logs"]
        # decisions all processes take alike: auto (from the least memory), resume only when all saved
        assert r["auto"] == rep[0]["auto"] and "(the least of 2 processes)" in r["auto"][1], r["auto"]
        assert r["resume_one_saved"] is None and r["resume_both_saved"] is not None

    # each process read only its own half (fsdp: the embed dimension) of every matrix of every layer, the
    # experts' included: the two never read the same elements (only the 1-D norms are read by both)
    boxes = [{} for _ in rep]
    for p, r in enumerate(rep):
        for key, box in r["reads"]:
            if len(box) > 1:
                boxes[p].setdefault(key, set()).add(tuple(map(tuple, box)))
    assert boxes[0].keys() == boxes[1].keys()
    assert sum(".experts." in key for key in boxes[0]) == layers * 8 * 3
    for key, mine in boxes[0].items():
        for a in mine:
            for b in boxes[1][key]:
                assert _disjoint(a, b), f"both processes read {key}: {a} / {b}"
