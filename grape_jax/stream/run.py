"""`calibrate_streamed`: the streamed sweeps (`grape_jax.stream.calibrate`) with resuming from the last
finished layer.

The work directory holds the hidden-state files of the sweeps, `state.json` (the run's fingerprint, the
phase and the next layer) and `stats.npz` (the statistics of the layers finished so far). Each layer's
outputs are moved into place before the state names the next layer, and its inputs are dropped only
after, so a run killed at any point resumes at the first unfinished layer (a resumed run gives the same
statistics as an uninterrupted one, bit for bit: every layer's computation is the same). Progress of
another model, other blocks or other options is discarded (the fingerprint).

On several processes each keeps its own work directory (`base.multihost.own_dir`: a subdirectory per
process, so processes sharing a disk never write the same file, and each host of a pod has its own
copy) holding all of it: hidden states, state and statistics are the same on every process. A run
resumes only when every process saved the same point (else all start afresh), so all of them run the
same layers and meet in the same collectives.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from jaxtyping import Int

from grape_jax.base import jsonio
from grape_jax.base.atomic import atomic_write_text
from grape_jax.base.multihost import every_process, own_dir
from grape_jax.calibration.calibrate import check_blocks
from grape_jax.calibration.options import (
    CalibrationOptions,
    calibration_fingerprint,
    choose_cka_mode,
    resolve_compute_dtype,
    run_record,
)
from grape_jax.calibration.stats import LayerStats, ModelStats, StatsError
from grape_jax.passes.engine import Batches
from grape_jax.stream.calibrate import Sweeps
from grape_jax.stream.layers import HiddenStates, LayerSource, layer_names

Log = Callable[[str], None]


class StreamInterrupted(KeyboardInterrupt):
    """Ctrl-C during a streamed calibration: `done` layer steps of `total` are saved in `directory`."""

    def __init__(self, done: int, total: int, directory: str):
        super().__init__(done, total, directory)
        self.done, self.total, self.directory = done, total, directory


def _state(directory: str, fingerprint: str, log: Log | None) -> dict[str, Any] | None:
    path = os.path.join(directory, "state.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            state = json.load(f)
    except ValueError:
        state = {}
    if state.get("fingerprint") == fingerprint:
        return state
    if log is not None:
        log(f"{directory}: saved streamed calibration is for another model, data or options; starting afresh")
    shutil.rmtree(directory, ignore_errors=True)
    return None


def _agreed(state: dict[str, Any] | None, directory: str, log: Log | None) -> dict[str, Any] | None:
    """`state` when every process saved the same point (always on one process); else None on all of them
    (a run killed between two processes' saves: all start afresh rather than resume apart)."""
    point = -1 if state is None else 2 * int(state["done"]) + (state["phase"] == "reverse")
    points = every_process(point)
    if len(set(points)) == 1:
        return state
    if log is not None:
        log(f"{directory}: the processes saved different streamed calibration progress; starting afresh")
    return None


def calibrate_streamed(
    source: LayerSource,
    blocks: Int[np.ndarray, "n seq"],
    *,
    model_record: Mapping[str, str],
    options: CalibrationOptions = CalibrationOptions(),
    meta: Mapping[str, Any] | None = None,
    work_dir: str | os.PathLike | None = None,
    progress: bool = True,
    log: Log | None = None,
    on_layer: Callable[[str, int], None] | None = None,
) -> ModelStats:
    """Statistics of every MoE layer over `blocks`, as `calibration.calibrate` computes them, with one
    layer read at a time from `source` (module docstrings). `model_record`: {"fingerprint", "source"} of
    the model. With `work_dir` progress is kept there per finished layer and a later call with the same
    request resumes (else a temporary directory holds the hidden states)."""
    cfg, ctx = source.cfg, source.ctx
    blocks = check_blocks(blocks, cfg)
    cka = choose_cka_mode(cfg, options)
    batches = Batches.of(blocks, options.batch_size, data_parallel=ctx.data_parallel_size)
    chunk = min(options.token_chunk, batches.rows * blocks.shape[1])
    first = layer_names(cfg, cfg.moe_layers[0])
    compute_dtype = resolve_compute_dtype({n: source.abstract(n) for n in first}, options)
    fingerprint = calibration_fingerprint(model_record["fingerprint"], cfg, blocks, options)
    run_id = hashlib.sha256(f"{fingerprint} {batches.rows} {chunk} {compute_dtype}".encode()).hexdigest()
    temporary = tempfile.TemporaryDirectory(prefix="grape-stream-") if work_dir is None else None
    directory = own_dir(os.path.abspath(os.fspath(work_dir) if work_dir is not None else temporary.name))
    shape = (batches.count, batches.rows, blocks.shape[1], cfg.hidden_size)
    L = cfg.num_layers
    total = L * (2 if options.gradients else 1)
    try:
        state = _state(directory, run_id, log)
        store = HiddenStates(os.path.join(directory, "hidden"), shape)
        stats_path = os.path.join(directory, "stats.npz")
        stats: dict[int, LayerStats] = {}
        if state is not None and os.path.isfile(stats_path):
            try:
                stats = {ls.layer: ls for ls in ModelStats.load(stats_path).layers}
            except StatsError:
                state = None
        state = _agreed(state, directory, log)
        bar = _bar(total, progress)

        def save(phase: str, next_layer: int) -> None:
            if stats:
                ModelStats(layers=tuple(stats[k] for k in sorted(stats))).save(stats_path)
            atomic_write_text(
                os.path.join(directory, "state.json"),
                jsonio.dumps({"fingerprint": run_id, "phase": phase, "next": next_layer, "done": done[0]}),
            )

        done = [0 if state is None else int(state["done"])]

        def finished(phase: str, layer: int) -> None:
            done[0] += 1
            bar.update(1)
            save(phase, layer + 1 if phase == "forward" else layer - 1)
            if on_layer is not None:
                on_layer(phase, layer)

        sweeps = Sweeps(
            source,
            batches,
            store,
            cka=cka,
            chunk=chunk,
            compute_dtype=compute_dtype,
            gradients=options.gradients,
            on_layer=finished,
        )
        t0 = time.perf_counter()
        if state is None:
            stats = {}
            sweeps.embed()
            state = {"phase": "forward", "next": 0}
            save("forward", 0)
        elif log is not None:
            log(f"resuming the streamed calibration at {state['phase']} layer {state['next']} (saved in {directory})")
        bar.update(done[0])
        try:
            if state["phase"] == "forward":
                sweeps.forward(state["next"], stats)
                if options.gradients:
                    sweeps.head()
                    save("reverse", L - 1)
                    store.drop(f"x{L}")
                    state = {"phase": "reverse", "next": L - 1}
            if state["phase"] == "reverse":
                sweeps.reverse(state["next"], stats)
        except KeyboardInterrupt:
            raise StreamInterrupted(done[0], total, directory) from None
        finally:
            bar.close()
        elapsed = time.perf_counter() - t0
    finally:
        if temporary is not None:
            temporary.cleanup()
    info = run_record(
        blocks, cka=cka, token_chunk=chunk, compute_dtype=compute_dtype, gradients=options.gradients, seconds=elapsed
    )
    record = {"fingerprint": model_record["fingerprint"], "source": model_record.get("source", "")}
    out = ModelStats(
        layers=tuple(stats[k] for k in cfg.moe_layers),
        meta={**dict(meta or {}), "model": record, "calibration": info, "fingerprint": fingerprint},
    )
    out.validate()
    return out


def _bar(total: int, progress: bool):
    # deferred like the engine's: tqdm only when a bar is shown
    from tqdm.auto import tqdm  # noqa: PLC0415

    return tqdm(total=total, unit="layer", desc="calibrate (streamed)", disable=not progress)
