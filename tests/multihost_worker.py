"""One process of the 2-process conversion test (tests/test_multihost.py starts two of these).

Each process gets 4 simulated CPU devices, joins the job with `jax.distributed.initialize`, builds the
global mesh over all 8 devices, converts the HF model with `load_hf` while recording every
`CheckpointIndex.read_slice`/`read_into`, then exports with process 0 as the only writer; on the first mesh it also
runs calibrate -> plan -> merge (neuron-aligned) -> export (`run_pipeline`). The report (JSON) lists the reads, the
experts this process's devices hold, how many slices needed a cross-process gather, and the plan.

    python -m tests.multihost_worker --coordinator localhost:PORT --num-processes 2 --process-id I \
        --model DIR --out DIR --report FILE --mesh expert=8 --mesh expert=4,fsdp=2
"""

from __future__ import annotations

import json
import os
import re
import sys

from tests.multiprocess import join, record_reads, worker_parser


def run_pipeline(loaded, mesh, out: str) -> dict:
    """calibrate -> plan -> merge -> export on the global mesh (the test repeats it in one process)."""
    import numpy as np

    from conversion.export import export_hf
    from grape_jax.calibration.calibrate import calibrate
    from grape_jax.calibration.options import CalibrationOptions
    from grape_jax.merge.state import merge_model
    from grape_jax.planners import make_plan

    blocks = pipeline_blocks(loaded.cfg.vocab_size)
    stats = calibrate(
        loaded, blocks, progress=False, options=CalibrationOptions(batch_size=8, token_chunk=32, cka="exact")
    )
    plan = make_plan(stats, method="grape", budget=3, operator="aligned", guard="none")  # aligned: collectives too
    merged = merge_model(loaded, plan)
    export_hf(merged, out)
    return {"kept": list(plan.kept_per_layer), "freq": [np.round(ls.freq, 9).tolist() for ls in stats.layers]}


def mid_export_failure(loaded, out: str) -> dict:
    """The writer fails in the middle of a shard (a simulated full disk on one of its gathers): every
    process must stop with an error, none may wait for the writer, and nothing is left behind."""
    import jax

    import conversion.export as export_module
    from conversion.distributed import shard_gathers
    from conversion.safetensors_write import plan_shards

    max_shard_bytes = 60_000
    from conversion.families import family_by_name
    from grape_jax.core.model import param_view

    entries, sources = export_module.hf_entries(
        export_module.bind(family_by_name(loaded.info.family), loaded.cfg), param_view(loaded)
    )
    shards = plan_shards(entries, max_shard_bytes=max_shard_bytes)
    sizes = [len(shard_gathers(s, sources)) for s in shards]
    fail_at = sizes[0] + sizes[1] // 2  # in the middle of the second shard
    original, calls = export_module.gather_slice, [0]

    def failing_gather(arr, index=()):
        if jax.process_index() == 0 and calls[0] == fail_at:
            raise OSError(28, "No space left on device (simulated)")
        calls[0] += 1
        return original(arr, index)

    export_module.gather_slice = failing_gather
    try:
        export_module.export_hf(loaded, out, max_shard_bytes=max_shard_bytes)
        error = None
    except Exception as e:  # noqa: BLE001 - the report carries the type and message
        error = f"{type(e).__name__}: {e}"
    finally:
        export_module.gather_slice = original
    parent = os.path.dirname(out)
    return {
        "error": error,
        "shards": len(shards),
        "gathers": calls[0],
        "fail_at": fail_at,
        "left": sorted(f for f in os.listdir(parent) if "failed" in f) if os.path.isdir(parent) else [],
    }


def pipeline_blocks(vocab_size: int):
    import numpy as np

    return np.random.default_rng(0).integers(0, vocab_size, size=(8, 16), dtype=np.int32)


def main(argv=None) -> int:
    ap = worker_parser(__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="exports go to OUT/<mesh index>")
    ap.add_argument("--mesh", action="append", required=True)
    args = ap.parse_args(argv)
    join(args)
    import jax

    import grape_jax.base.multihost as dist
    from conversion.load import load_hf
    from conversion.safetensors_io import CheckpointIndex
    from grape_jax.core.model import param_view
    from grape_jax.core.sharding import make_mesh

    reads = record_reads()
    prefetched: list[str] = []
    original_prefetch = CheckpointIndex.prefetch

    def recording_prefetch(self, keys):  # page-cache hints must not pull in other processes' experts
        prefetched.extend(keys)
        return original_prefetch(self, keys)

    CheckpointIndex.prefetch = recording_prefetch

    gathers = {"remote": 0}
    original_held_by = dist.held_by

    def counting_held_by(arr, process, box):
        held = original_held_by(arr, process, box)
        gathers["remote"] += not held
        return held

    dist.held_by = counting_held_by
    from conversion.export import export_hf

    expert_key = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")
    names = {"w1": "w_gate", "w2": "w_down", "w3": "w_up"}

    report = {"process": jax.process_index(), "meshes": []}
    for i, spec in enumerate(args.mesh):
        mesh = make_mesh(spec)
        reads.clear()
        prefetched.clear()
        gathers["remote"] = 0
        loaded = load_hf(args.model, mesh=mesh)
        jax.block_until_ready(param_view(loaded))
        load_reads = list(reads)
        # Experts held by this process's devices and by the others, per stacked parameter.
        own: dict[str, set[int]] = {}
        other: dict[str, set[int]] = {}
        for name, arr in param_view(loaded).items():
            if not re.fullmatch(r"layers\.\d+\.mlp\.w_(gate|up|down)", name):
                continue
            for dev, idx in arr.sharding.devices_indices_map(arr.shape).items():
                lo, hi, _ = idx[0].indices(arr.shape[0])
                side = own if dev.process_index == jax.process_index() else other
                side.setdefault(name, set()).update(range(lo, hi))
        violations, experts_read = [], {}
        for key in prefetched:
            m = expert_key.fullmatch(key)
            if m and int(m[2]) not in own.get(f"layers.{m[1]}.mlp.{names[m[3]]}", set()):
                violations.append(f"{key}: prefetched by process {jax.process_index()}, which does not hold it")
        for key, _box in load_reads:
            m = expert_key.fullmatch(key)
            if not m:
                continue
            param = f"layers.{m[1]}.mlp.{names[m[3]]}"
            expert = int(m[2])
            experts_read.setdefault(param, set()).add(expert)
            if expert not in own.get(param, set()):
                violations.append(
                    f"{key}: expert {expert} of {param} is held only by other processes' "
                    f"devices ({sorted(other.get(param, set()))}), read by process "
                    f"{jax.process_index()}"
                )
        out = os.path.join(args.out, str(i))
        returned = export_hf(loaded, out)
        pipeline = run_pipeline(loaded, mesh, os.path.join(args.out, f"pipeline{i}")) if i == 0 else None
        refused = None
        if i == 0:  # the writer refuses an existing output: every process must stop, none may hang
            try:
                export_hf(loaded, out)
            except Exception as e:  # noqa: BLE001 - the report carries the type and message
                refused = f"{type(e).__name__}: {e}"
        failed = mid_export_failure(loaded, os.path.join(args.out, "failed")) if i == 0 else None
        report["meshes"].append(
            {
                "pipeline": pipeline,
                "failed": failed,
                "mesh": spec,
                "reads": load_reads,
                "read_elements": sum(_volume(b) for _, b in load_reads),
                "own_experts": {k: sorted(v) for k, v in own.items()},
                "experts_read": {k: sorted(v) for k, v in experts_read.items()},
                "violations": violations,
                "prefetched_experts": sum(bool(expert_key.fullmatch(k)) for k in prefetched),
                "remote_gathers": gathers["remote"],
                "wrote": os.path.isdir(out),
                "returned": returned,
                "refused": refused,
            }
        )
    with open(args.report, "w") as f:
        json.dump(report, f)
    jax.distributed.shutdown()
    return 0


def _volume(box) -> int:
    n = 1
    for lo, hi in box:
        n *= hi - lo
    return n


if __name__ == "__main__":
    sys.exit(main())
