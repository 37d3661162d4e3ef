"""One process of the 2-process conversion test (tests/test_multihost.py starts two of these).

Each process gets 4 simulated CPU devices, joins the job with `jax.distributed.initialize`, builds the
global mesh over all 8 devices, converts the HF model with `load_hf` while recording every
`CheckpointIndex.read_slice`, then exports with process 0 as the only writer. Until
`conversion/export.py` itself uses `conversion.distributed`, the export runs a copy of export.py with
EXPORT_PATCH applied in memory (the exact change proposed for export.py). The report (JSON) lists the
reads, the experts this process's devices hold, and how many slices needed a cross-process gather.

    python -m tests.multihost_worker --coordinator localhost:PORT --num-processes 2 --process-id I \
        --model DIR --out DIR --report FILE --mesh expert=8 --mesh expert=4,fsdp=2
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import types

# The proposed change to conversion/export.py, as (old, new) pairs applied in order.
EXPORT_PATCH = (
    (
        "from conversion.atomic import atomic_output_dir\n",
        "from conversion.atomic import atomic_output_dir\n"
        "from conversion.distributed import barrier, follow_export, gather_slice, is_writer\n",
    ),
    (
        "    entries, sources = hf_entries(bindings, params)\n",
        "    entries, sources = hf_entries(bindings, params)\n"
        "    if not is_writer():  # multi-host: take part in the writer's gathers, write nothing\n"
        "        follow_export(params, entries, sources, max_shard_bytes=max_shard_bytes)\n"
        "        barrier(\"export_hf\")\n"
        "        return os.fspath(out_dir)\n",
    ),
    (
        "            lambda name, e: host_slice(params[name], () if e is None else (e,))\n",
        "            lambda name, e: gather_slice(params[name], () if e is None else (e,))\n",
    ),
    (
        "                f.write(text)\n    return out_dir\n",
        "                f.write(text)\n    barrier(\"export_hf\")\n    return out_dir\n",
    ),
)


def patched_export_source(source: str) -> str:
    for old, new in EXPORT_PATCH:
        if source.count(old) != 1:
            raise RuntimeError(f"export.py changed; cannot apply the multi-host patch at {old!r}")
        source = source.replace(old, new)
    return source


def multihost_export_hf():
    """`export_hf` from export.py if it already gathers across processes, else the patched copy."""
    import conversion.export as export

    with open(export.__file__) as f:
        source = f.read()
    if "gather_slice" in source:
        return export.export_hf
    module = types.ModuleType("conversion._export_multihost")
    module.__file__ = export.__file__
    exec(compile(patched_export_source(source), export.__file__, "exec"), module.__dict__)
    return module.export_hf


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--coordinator", required=True)
    ap.add_argument("--num-processes", type=int, required=True)
    ap.add_argument("--process-id", type=int, required=True)
    ap.add_argument("--local-devices", type=int, default=4)
    ap.add_argument("--model", required=True)
    ap.add_argument("--out", required=True, help="exports go to OUT/<mesh index>")
    ap.add_argument("--report", required=True)
    ap.add_argument("--mesh", action="append", required=True)
    args = ap.parse_args(argv)

    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_num_cpu_devices", args.local_devices)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=args.coordinator, num_processes=args.num_processes,
        process_id=args.process_id, initialization_timeout=60,
    )
    assert jax.process_count() == args.num_processes and len(jax.devices()) == (
        args.num_processes * args.local_devices
    ), (jax.process_count(), jax.devices())

    import conversion.distributed as dist
    from conversion.load import load_hf
    from conversion.safetensors_io import CheckpointIndex
    from grape_jax.sharding import make_mesh

    reads: list[tuple[str, list[list[int]]]] = []
    original_read_slice = CheckpointIndex.read_slice

    def recording_read_slice(self, key, index):
        shape = self.info(key).shape
        full = tuple(index) + (slice(None),) * (len(shape) - len(index))
        reads.append((key, [list(s.indices(d)[:2]) for s, d in zip(full, shape, strict=True)]))
        return original_read_slice(self, key, index)

    CheckpointIndex.read_slice = recording_read_slice

    gathers = {"remote": 0}
    original_held_by = dist.held_by

    def counting_held_by(arr, process, box):
        held = original_held_by(arr, process, box)
        gathers["remote"] += not held
        return held

    dist.held_by = counting_held_by
    export_hf = multihost_export_hf()
    expert_key = re.compile(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight")
    names = {"w1": "w_gate", "w2": "w_down", "w3": "w_up"}

    report = {"process": jax.process_index(), "meshes": []}
    for i, spec in enumerate(args.mesh):
        mesh = make_mesh(spec)
        reads.clear()
        gathers["remote"] = 0
        loaded = load_hf(args.model, mesh=mesh)
        jax.block_until_ready(loaded.params)
        load_reads = list(reads)
        # Experts held by this process's devices and by the others, per stacked parameter.
        own: dict[str, set[int]] = {}
        other: dict[str, set[int]] = {}
        for name, arr in loaded.params.items():
            if not re.fullmatch(r"layers\.\d+\.mlp\.w_(gate|up|down)", name):
                continue
            for dev, idx in arr.sharding.devices_indices_map(arr.shape).items():
                lo, hi, _ = idx[0].indices(arr.shape[0])
                side = own if dev.process_index == jax.process_index() else other
                side.setdefault(name, set()).update(range(lo, hi))
        violations, experts_read = [], {}
        for key, box in load_reads:
            m = expert_key.fullmatch(key)
            if not m:
                continue
            param = f"layers.{m[1]}.mlp.{names[m[3]]}"
            expert = int(m[2])
            experts_read.setdefault(param, set()).add(expert)
            if expert not in own.get(param, set()):
                violations.append(f"{key}: expert {expert} of {param} is held only by other processes' "
                                  f"devices ({sorted(other.get(param, set()))}), read by process "
                                  f"{jax.process_index()}")
        out = os.path.join(args.out, str(i))
        returned = export_hf(loaded.params, loaded.cfg, loaded.family, out, base_config=loaded.hf_config,
                             source_dir=args.model)
        report["meshes"].append({
            "mesh": spec,
            "reads": load_reads,
            "read_elements": sum(_volume(b) for _, b in load_reads),
            "own_experts": {k: sorted(v) for k, v in own.items()},
            "experts_read": {k: sorted(v) for k, v in experts_read.items()},
            "violations": violations,
            "remote_gathers": gathers["remote"],
            "wrote": os.path.isdir(out),
            "returned": returned,
        })
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
