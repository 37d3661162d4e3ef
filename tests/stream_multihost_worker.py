"""One process of the 2-process layer-streaming test (tests/test_stream_multihost.py starts two of these).

Each process gets 4 simulated CPU devices, joins the job with `jax.distributed.initialize` and runs, on
the global mesh over all 8 devices, while recording every checkpoint read (`CheckpointIndex.read_slice`
/ `read_into`): `prune(..., stream_layers="on")` (the default planner: gradients, operator 'fit'),
stopped after its calibration's forward sweep (Ctrl-C on both processes) and run again. The report
(JSON) lists the reads, the layer steps, the prune's log and plan, and decisions all processes must share.

    python -m tests.stream_multihost_worker --coordinator localhost:PORT --num-processes 2 --process-id I \
        --model DIR --out DIR --report FILE --mesh expert=4,fsdp=2
"""

from __future__ import annotations

import json
import os
import sys

from tests.multiprocess import join, record_reads, worker_parser

PRUNE = dict(per_layer=2, seq_len=16, num_samples=6, batch_size=4, token_chunk=32)


def prune_streamed(model: str, out: str, mesh, stream_layers: str, log=print):
    """`prune` with the test's request (the test repeats it in one process, streamed and resident)."""
    from grape_jax.calibration.options import CalibrationOptions
    from grape_jax.data.text import DataSpec
    from grape_jax.pipeline import prune

    return prune(
        model,
        out,
        per_layer=PRUNE["per_layer"],
        data=DataSpec(seq_len=PRUNE["seq_len"], num_samples=PRUNE["num_samples"]),
        calibration_options=CalibrationOptions(batch_size=PRUNE["batch_size"], token_chunk=PRUNE["token_chunk"]),
        mesh=mesh,
        keep_work=True,
        progress=False,
        log=log,
        stream_layers=stream_layers,
    )


def interrupted_then_resumed(model: str, out: str, mesh) -> dict:
    """The streamed prune stopped (Ctrl-C on every process) after its calibration's forward sweep, then run
    again: it resumes the calibration at the reverse sweep and finishes."""
    import grape_jax.streamed as streamed
    from grape_jax.base.multihost import barrier
    from grape_jax.pipeline import Interrupted

    original, steps, logs = streamed.calibrate_streamed, [], []
    last = json.load(open(os.path.join(model, "config.json")))["num_hidden_layers"] - 1

    def record(phase: str, layer: int) -> None:
        steps.append([phase, layer])
        if len(steps) == last + 1:
            raise KeyboardInterrupt

    streamed.calibrate_streamed = lambda *a, **kw: original(*a, on_layer=record, **kw)
    try:
        try:
            prune_streamed(model, out, mesh, "on", log=logs.append)
            raise AssertionError("the first run was not interrupted")
        except Interrupted as e:
            hint = e.hint
        barrier("interrupted")  # both stopped before the listing
        saved = sorted(os.listdir(out + ".work/calibration.stream"))
        result = prune_streamed(model, out, mesh, "on", log=logs.append)
    finally:
        streamed.calibrate_streamed = original
    return {"hint": hint, "saved": saved, "steps": steps, "logs": logs, "kept": list(result.plan.kept_per_layer)}


def agreements(model: str, mesh) -> dict:
    """Decisions every process must take alike: `auto`, and resuming when only one process saved progress."""
    import jax

    from grape_jax.source import ModelSource
    from grape_jax.stream.run import _agreed
    from grape_jax.streamed import stream_choice

    saved = {"fingerprint": "x", "phase": "forward", "next": 1, "done": 1}
    return {
        "auto": list(stream_choice("auto", ModelSource.open(model), mesh)),
        "resume_one_saved": _agreed(saved if jax.process_index() == 0 else None, "work", None),
        "resume_both_saved": _agreed(saved, "work", None),
    }


def main(argv=None) -> int:
    ap = worker_parser(__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--mesh", required=True)
    args = ap.parse_args(argv)
    join(args)
    import jax

    from grape_jax.core.sharding import make_mesh

    reads = record_reads()
    mesh = make_mesh(args.mesh)
    report = {"process": jax.process_index(), **agreements(args.model, mesh)}
    report.update(interrupted_then_resumed(args.model, os.path.join(args.out, "pruned"), mesh), reads=reads)
    with open(args.report, "w") as f:
        json.dump(report, f)
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
