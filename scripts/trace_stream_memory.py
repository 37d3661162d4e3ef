"""Where a layer-streamed `grape prune` holds host memory: the largest anonymous RSS (heap, not the
memory-mapped files) of each stage, read after every layer of every sweep.

    python scripts/trace_stream_memory.py (MODEL | --build L,D,F) [--per-layer 2] [--num-samples 8]
        [--seq-len 64] [--every]

Runs `grape_jax.pipeline.prune(MODEL, stream_layers="on")` (the default method) in this process with
`stream.layers.sweep` and `stream.merge.MergedLayers.layer` wrapped to read /proc/self/status. Stages:
calibration (the forward and reverse sweeps), fit accumulation (the fit's forward sweep), fit loss check
(the sweeps of merged layers) and export (the merged layers the export reads). `--build L,D,F` prunes
a random fp32 Mixtral of L layers, hidden size D, experts of size F (8, top-2), built as
`scripts/bench_stream.py` builds its models, in a temporary directory. Compare two depths of the same
width to see which stage grows with depth. Linux only.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile


def rss_anon_gb() -> float:
    with open("/proc/self/status") as f:
        return int(re.search(r"RssAnon:\s+(\d+)", f.read()).group(1)) / 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--build", metavar="L,D,F", help="prune a random Mixtral of this shape instead of MODEL")
    ap.add_argument("--per-layer", type=int, default=2)
    ap.add_argument("--num-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--every", action="store_true", help="print every reading, not only each stage's peak")
    args = ap.parse_args()
    if (args.model is None) == (args.build is None):
        ap.error("give MODEL or --build L,D,F")
    if args.build and not re.fullmatch(r"[1-9]\d*(,[1-9]\d*){2}", args.build):
        ap.error(f"--build {args.build!r}: expected three positive integers L,D,F (layers, hidden, ffn)")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    from grape_jax.base.memory import limit_malloc_arenas

    limit_malloc_arenas()  # first thing, as the `grape` command does
    import grape_jax.stream.calibrate as stream_calibrate
    import grape_jax.stream.fit as stream_fit
    import grape_jax.stream.layers as stream_layers
    import grape_jax.stream.merge as stream_merge
    from grape_jax import pipeline
    from grape_jax.data.text import DataSpec

    peaks: dict[str, float] = {}
    stage = ["calibration"]

    def note(what: str) -> None:
        value = rss_anon_gb()
        peaks[stage[0]] = max(peaks.get(stage[0], 0.0), value)
        if args.every:
            print(f"{value:.3f} GB  {stage[0]}: {what}", flush=True)

    sweep = stream_layers.sweep

    def traced(stage_of):
        def traced_sweep(source, layers, names=None):
            stage[0] = stage_of(source)
            for layer, params in sweep(source, layers, names):
                note(f"layer {layer}")
                yield layer, params

        return traced_sweep

    stream_calibrate.sweep = traced(lambda source: "calibration")
    stream_fit.sweep = traced(
        lambda source: "fit loss check" if isinstance(source, stream_merge.MergedLayers) else "fit accumulation"
    )
    merged_layer = stream_merge.MergedLayers.layer

    def traced_layer(self, layer):
        out = merged_layer(self, layer)
        note(f"merged layer {layer}")
        return out

    stream_merge.MergedLayers.layer = traced_layer
    save_hf = pipeline.save_hf

    def traced_save(*a, **kw):
        stage[0] = "export"
        return save_hf(*a, **kw)

    pipeline.save_hf = traced_save
    with tempfile.TemporaryDirectory(prefix="trace_stream_") as tmp:
        if args.build:
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            from bench_stream import build

            layers, hidden, ffn = (int(x) for x in args.build.split(","))
            args.model = os.path.join(tmp, "model")
            build(args.model, layers, argparse.Namespace(hidden=hidden, ffn=ffn, experts=8))
        data = DataSpec(num_samples=args.num_samples, seq_len=args.seq_len)
        pipeline.prune(
            args.model, os.path.join(tmp, "out"), per_layer=args.per_layer, data=data, progress=False,
            stream_layers="on", log=lambda line: None,
        )  # fmt: skip
    print("| stage | peak RssAnon GB |")
    print("|---|---|")
    for name, value in peaks.items():
        print(f"| {name} | {value:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
