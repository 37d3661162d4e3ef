"""The stages of `pipeline.prune` with the model streamed layer by layer (`--stream-layers`): calibration
(`grape_jax.stream.run`), the fit's inputs (`grape_jax.stream.fit`) and the merge straight into the
export (`grape_jax.stream.merge`), each reading one decoder layer at a time from the HF directory."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from grape_jax.base import jsonio
from grape_jax.calibration.options import CalibrationOptions
from grape_jax.calibration.stats import ModelStats
from grape_jax.core.model import abstract_model
from grape_jax.fit.operator import FitOptions, fit_record
from grape_jax.merge.state import MergeInputs, plan_record
from grape_jax.planners.plan import Plan
from grape_jax.source import ModelSource
from grape_jax.stream import choose
from grape_jax.stream.fit import fit_overrides_streamed
from grape_jax.stream.merge import MergedLayers, MergedParams
from grape_jax.stream.run import calibrate_streamed

Log = Callable[[str], None]


def stream_choice(mode: str, source: ModelSource, mesh: Mesh | None) -> tuple[bool, str]:
    """Whether `grape prune` streams this model on `mesh`, and why (`stream.choose.stream_or_not`)."""
    devices = list(mesh.devices.flat) if mesh is not None else jax.local_devices()[:1]
    model_bytes = 0 if source.is_checkpoint else source.reader(mesh=mesh).nbytes()
    return choose.stream_or_not(
        mode, model_bytes=model_bytes, devices=devices, checkpoint=source.is_checkpoint, processes=jax.process_count()
    )


def calibrate_stage(
    source: ModelSource,
    blocks: np.ndarray,
    *,
    mesh: Mesh | None,
    options: CalibrationOptions,
    meta: Mapping[str, Any],
    work_dir: str,
    progress: bool,
    log: Log,
) -> ModelStats:
    """Streamed calibration of the HF directory `source` (resumes from `work_dir`)."""
    record = {"fingerprint": source.fingerprint(), "source": source.path}
    return calibrate_streamed(
        source.reader(mesh=mesh),
        blocks,
        model_record=record,
        options=options,
        meta=meta,
        work_dir=work_dir,
        progress=progress,
        log=log,
    )


def merge_and_export(
    source: ModelSource,
    plan: Plan,
    blocks: np.ndarray,
    out: str,
    *,
    mesh: Mesh | None,
    fit_options: FitOptions,
    work_dir: str,
    save: Callable[..., str],
):
    """The plan's merge inputs (the fit, streamed, for operator 'fit'), then the merged model exported a
    layer at a time through `save` (`pipeline.save_hf`). Returns the merged config."""
    plan.validate()
    reader = source.reader(mesh=mesh)
    inputs = MergeInputs()
    if plan.operator == "fit":
        overrides, diagnostics = fit_overrides_streamed(
            reader, plan, blocks, options=fit_options, work_dir=os.path.join(work_dir, "fit")
        )
        record = fit_record(blocks, fit_options, diagnostics)
        inputs = MergeInputs(overrides=overrides, made_by=jsonio.dumps(record, sort_keys=True))
    merged = MergedLayers(reader, plan, inputs)
    info = source.model_info().with_record(plan_record(plan, inputs))
    model = abstract_model(merged.cfg, ctx=reader.ctx, info=info)
    mesh_text = "none" if mesh is None else str(dict(mesh.shape))
    digest = hashlib.sha256(f"streamed {info.fingerprint} {mesh_text}".encode()).hexdigest()
    save(model, out, params=MergedParams(merged), digest=digest)
    return merged.cfg
