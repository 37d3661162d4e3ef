"""The end-to-end jobs and the pieces they share, as library functions the API, CLI and scripts call.

`prune` = check the request -> load (streamed, sharded) -> calibrate -> plan -> merge -> export (the merge
refits down projections on the same calibration blocks when the plan's operator is 'fit', the default
planner's; `apply_plan` here computes whatever inputs a plan's operator needs). Every
check that needs no weights (output path, method, option names and values, budget against the
per-layer floors from config.json, data files, tokenizer) runs before anything expensive. Statistics
saved in the work directory are reused only when their fingerprint (model weights, token blocks,
options) matches the request; otherwise they are recomputed, and the run says so. Calibration resumes
inside itself from its last saved accumulators, export from its last complete shard; the work directory
is removed once the export is in place (unless kept on request).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from jax.sharding import Mesh

from conversion.export import export_hf
from grape_jax import streamed as streamed_stages
from grape_jax.base import jsonio
from grape_jax.base.atomic import OutputExistsError
from grape_jax.base.multihost import barrier, every_process
from grape_jax.calibration.calibrate import CalibrationInterrupted, calibrate
from grape_jax.calibration.options import CalibrationOptions, calibration_fingerprint
from grape_jax.calibration.stats import ModelStats, StatsError, neutral_stats
from grape_jax.core.config import MoEConfig
from grape_jax.core.model import MoEModel, check_param_shapes, param_view
from grape_jax.core.sharding import DEFAULT_RULES, ShardingRules
from grape_jax.data.text import DataSpec, load_tokenizer
from grape_jax.fit.operator import FitOptions, plan_inputs
from grape_jax.fit.operator import check_supported as check_fit_supported
from grape_jax.merge import state as merge
from grape_jax.merge.state import MergeInputs
from grape_jax.passes.resume import Progress, ResumeError
from grape_jax.planners import DEFAULT_METHOD, make_plan
from grape_jax.planners.grape_l import NoSensitivitiesError
from grape_jax.planners.plan import Plan, PlanError
from grape_jax.report import recipe as rc
from grape_jax.source import ModelSource
from grape_jax.stream.run import StreamInterrupted

Log = Callable[[str], None]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C in a job; `hint` says in one line what was saved and how to resume."""

    def __init__(self, hint: str):
        super().__init__(hint)
        self.hint = hint


def load_model(
    path: str | os.PathLike, *, mesh: Mesh | None = None, rules: ShardingRules = DEFAULT_RULES, dtype: Any = None
) -> MoEModel:
    """An HF directory (streamed, sharded) or a grape checkpoint as a model on `mesh` (`gj.load_hf` is the
    same for HF directories)."""
    return ModelSource.open(path).load(mesh=mesh, rules=rules, dtype=dtype)


def check_output(out: str | os.PathLike, *, overwrite: bool, flag: str | None = "--out") -> str:
    """An output path that may be written: refused when it exists (unless `overwrite`) or when its parent
    is not a writable directory. `flag` names the command-line argument in the messages; None (a Python
    caller) names the `overwrite=True` keyword instead."""
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and not overwrite:
        how = "pass overwrite=True" if flag is None else f"pass --overwrite ({flag})"
        raise OutputExistsError(f"{out} already exists; {how} to replace it")
    parent = os.path.dirname(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise OSError(f"{flag or 'output'} {out}: {parent} is not a writable directory")
    return out


def check_plan_request(
    cfg: MoEConfig,
    *,
    method: str,
    budget: int | None,
    per_layer: int | None,
    options: Mapping[str, Any],
    fraction: float | None = None,
    gradients: bool = True,
) -> None:
    """Run the planner on statistics with the model's shapes and rules (`neutral_stats`): method, option
    names, types and values, the budget against the per-layer floors, and whether the planner can work
    from a calibration with or without `gradients` are checked by the planners' own code, and whether
    the plan's operator suits the architecture, from config.json alone, before any weight is loaded."""
    refuse_empty_budget(budget, per_layer)
    stats = neutral_stats(cfg, gradients=gradients)
    try:
        plan = make_plan(stats, method=method, budget=budget, per_layer=per_layer, fraction=fraction, **dict(options))
    except NoSensitivitiesError:
        raise PlanError(
            f"--no-gradients (gradients=False): {method} plans from the gradient sensitivities that calibration "
            f"computes by default; drop --no-gradients, or choose a planner that needs none (e.g. --method grape-r)"
        ) from None
    if plan.operator == "fit":
        check_fit_supported(cfg)


def refuse_empty_budget(budget: int | None, per_layer: int | None) -> None:
    """A budget of 0 removes no expert: the job would calibrate and write out the unchanged model, so it
    is refused before any work."""
    if per_layer == 0 or budget == 0:
        flag = "--per-layer 0 (per_layer=0)" if per_layer == 0 else "--budget 0 (budget=0)"
        raise PlanError(
            f"{flag} removes no expert: the output would be the unchanged model; ask for at least 1 "
            f"(nothing was loaded)"
        )


def apply_plan(
    model: MoEModel,
    plan: Plan,
    *,
    inputs: MergeInputs | None = None,
    blocks: np.ndarray | None = None,
    fit_options: FitOptions = FitOptions(),
    progress: bool = False,
) -> MoEModel:
    """`merge.merge_model` with the inputs the plan's operator needs computed when not given
    (`fit.plan_inputs`): operator 'fit' refits the merged down projections on the calibration `blocks`."""
    if inputs is None:
        inputs = plan_inputs(model, plan, blocks=blocks, options=fit_options, progress=progress)
    return merge.merge_model(model, plan, inputs=inputs)


def save_hf(
    model: MoEModel,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    max_shard_bytes: int | None = None,
    quantize: str | None = None,
    log: Log | None = None,
    extra_files: Mapping[str, str | bytes] | None = None,
    params: Mapping[str, Any] | None = None,
    digest: str | None = None,
) -> str:
    """Export `model` as an HF directory with `recipe.json` and a README model card built from its
    provenance (any model: original, merged, healed), plus `extra_files` (name -> text or bytes); the
    directory appears only when all of it is written. `quantize="fp8"` requantises what an FP8 source
    stored as FP8 (unmerged experts keep their scales; see `conversion.export.export_hf`, which also
    says what `params` and `digest` are: a layer-streamed merge exports through them)."""
    if params is None:  # layer-streamed: the lazy merged layers are made from the merged config itself
        check_param_shapes(model.cfg, param_view(model))
    recipe = rc.build_recipe(model)
    files = {**dict(extra_files or {}), "recipe.json": jsonio.dumps(recipe, indent=1, sort_keys=True, default=str)}
    if recipe["method"] is not None:
        files["README.md"] = rc.model_card(recipe, uniform=model.cfg.is_uniform)
    kw = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
    kw.update(params=params, digest=digest)
    return export_hf(model, out, overwrite=overwrite, extra_files=files, log=log, quantize=quantize, **kw)


@dataclasses.dataclass(frozen=True)
class PruneResult:
    out: str
    plan: Plan
    stats: ModelStats
    cfg_before: MoEConfig
    cfg_after: MoEConfig


def _reusable_stats(path: str, fingerprint: str, log: Log) -> ModelStats | None:
    """Saved statistics when they were made from exactly this request, else None (saying why)."""
    if not os.path.isfile(path):
        return None
    try:
        stats = ModelStats.load(path)
    except StatsError:
        log(f"{path}: unreadable; calibrating again")
        return None
    if stats.fingerprint != fingerprint:
        log(f"{path} was made from another model, other data or other options; calibrating again")
        return None
    log(f"reusing the statistics in {path} (same model, data and options)")
    return stats


def prune(
    hf_dir: str,
    out: str,
    *,
    method: str = DEFAULT_METHOD,
    budget: int | None = None,
    per_layer: int | None = None,
    fraction: float | None = None,
    data: DataSpec = DataSpec(),
    planner_options: Mapping[str, Any] | None = None,
    calibration_options: CalibrationOptions = CalibrationOptions(),
    work_dir: str | None = None,
    mesh: Mesh | None = None,
    overwrite: bool = False,
    keep_work: bool = False,
    progress: bool = True,
    log: Log = print,
    quantize: str | None = None,
    stream_layers: str = "auto",
) -> PruneResult:
    """check -> load -> calibrate -> plan -> merge -> export (module docstring). `stream_layers`
    'auto' | 'on' | 'off': with the whole model on the mesh, or one decoder layer at a time
    (`grape_jax.streamed`); 'auto' streams when the model does not fit (the choice is logged and kept in
    the statistics' calibration record, so the recipe shows it)."""
    options = dict(planner_options or {})
    out = check_output(out, overwrite=overwrite, flag=None)
    work_dir = os.path.abspath(work_dir or out.rstrip("/") + ".work")
    if os.path.abspath(work_dir) == out:
        raise ValueError(f"--work-dir {work_dir} must differ from --out")
    source = ModelSource.open(hf_dir)
    cfg = source.config
    check_plan_request(
        cfg,
        method=method,
        budget=budget,
        per_layer=per_layer,
        fraction=fraction,
        options=options,
        gradients=calibration_options.gradients,
    )
    data.check()
    blocks = data.blocks(load_tokenizer(source.tokenizer_dir), max_positions=cfg.max_position_embeddings)
    fingerprint = calibration_fingerprint(source.fingerprint(), cfg, blocks, calibration_options)

    streamed, why = streamed_stages.stream_choice(stream_layers, source, mesh)
    log(f"layer streaming: {'on' if streamed else 'off'} ({why})")
    os.makedirs(work_dir, exist_ok=True)
    stats_path = os.path.join(work_dir, "stats.npz")
    stats = _reusable_stats(stats_path, fingerprint, log)
    if not all(every_process(stats is not None)):  # several processes: reuse only when all of them can
        stats = None
    model = None if streamed else source.load(mesh=mesh)
    if stats is None:
        progress_dir = os.path.join(work_dir, "calibration.stream" if streamed else "calibration")
        meta = {"data": data.record()}
        try:
            if streamed:
                stats = streamed_stages.calibrate_stage(
                    source, blocks, mesh=mesh, options=calibration_options, meta=meta,
                    work_dir=progress_dir, progress=progress, log=log,
                )  # fmt: skip
            else:
                _drop_stale_progress(progress_dir, fingerprint, log)
                stats = calibrate(
                    model, blocks, options=calibration_options, meta=meta,
                    resume_dir=progress_dir, progress=progress, log=log,
                )  # fmt: skip
        except StreamInterrupted as e:
            raise Interrupted(
                f"interrupted during the streamed calibration; {e.done} of {e.total} layer steps are saved in "
                f"{progress_dir}: run the same command again to resume"
            ) from None
        except CalibrationInterrupted as e:
            raise Interrupted(
                f"interrupted during calibration; statistics of {e.saved} of {e.total} blocks are "
                f"saved in {progress_dir}: run the same command again to resume"
            ) from None
        stats = _with_stream_record(stats, streamed, why)
        stats.save(stats_path)
        barrier("calibrated")  # several processes on one host: none may still be saving progress there
        shutil.rmtree(progress_dir, ignore_errors=True)
    plan = make_plan(stats, method=method, budget=budget, per_layer=per_layer, fraction=fraction, **options)
    plan.save(os.path.join(work_dir, "plan.json"))
    fit_options = FitOptions.like(calibration_options)
    save = functools.partial(save_hf, overwrite=overwrite, quantize=quantize, log=log if progress else None)
    try:
        if streamed:
            cfg_after = streamed_stages.merge_and_export(
                source, plan, blocks, out, mesh=mesh, fit_options=fit_options, work_dir=work_dir, save=save
            )
        else:
            merged = apply_plan(model, plan, blocks=blocks, fit_options=fit_options, progress=progress)
            cfg_after = merged.cfg
            save(merged, out)
    except KeyboardInterrupt:
        partial = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.partial")
        raise Interrupted(
            f"interrupted during export; the shards written so far are kept in {partial}: run the "
            f"same command again to resume"
        ) from None
    if not keep_work:
        shutil.rmtree(work_dir, ignore_errors=True)
    return PruneResult(out=out, plan=plan, stats=stats, cfg_before=cfg, cfg_after=cfg_after)


def _with_stream_record(stats: ModelStats, streamed: bool, why: str) -> ModelStats:
    """Streamed statistics with that fact and why in their calibration record, which plans and recipes
    keep (resident ones, as every stage command makes them, unchanged: their recipes stay equal)."""
    if not streamed:
        return stats
    run = {**dict(stats.meta.get("calibration") or {}), "stream_layers": {"streamed": True, "why": why}}
    return dataclasses.replace(stats, meta={**dict(stats.meta), "calibration": run})


def _drop_stale_progress(directory: str, fingerprint: str, log: Log) -> None:
    """Remove saved calibration progress that belongs to another request (it can never be resumed)."""
    if not os.path.isdir(directory):
        return
    try:
        with Progress(directory, fingerprint=fingerprint) as saved:
            saved.meta()
    except ResumeError:
        log(f"{directory}: saved calibration progress is for another model, data or options; starting afresh")
        shutil.rmtree(directory, ignore_errors=True)


def blocks_for(path: str | ModelSource, spec: DataSpec, *, heldout: bool = False) -> np.ndarray:
    """Token blocks of `spec` with the tokenizer of the model at `path` (HF dir or checkpoint)."""
    spec.check()
    source = path if isinstance(path, ModelSource) else ModelSource.open(path)
    return spec.blocks(
        load_tokenizer(source.tokenizer_dir), max_positions=source.config.max_position_embeddings, heldout=heldout
    )
