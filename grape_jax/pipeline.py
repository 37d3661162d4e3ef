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
import os
import shutil
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from jax.sharding import Mesh

from conversion.checkpoint import checkpoint_config, read_checkpoint_meta, restore_checkpoint
from conversion.export import export_hf
from conversion.families.base import ConversionError
from conversion.load import family_of, load_hf, provenance_of, read_hf_config
from grape_jax import merge
from grape_jax import recipe as rc
from grape_jax.atomic import OutputExistsError
from grape_jax.calibration import CalibrationInterrupted, CalibrationOptions, calibrate, calibration_fingerprint
from grape_jax.config import MoEConfig
from grape_jax.data import DataSpec, load_tokenizer
from grape_jax.fit import FitOptions, plan_inputs
from grape_jax.fit import check_supported as check_fit_supported
from grape_jax.merge import MergeInputs
from grape_jax.model import ModelInfo, MoEModel
from grape_jax.plan import Plan
from grape_jax.planners import DEFAULT_METHOD, make_plan
from grape_jax.resume import Progress, ResumeError
from grape_jax.sharding import DEFAULT_RULES, ShardingRules
from grape_jax.stats import ModelStats, StatsError, neutral_stats

Log = Callable[[str], None]


class Interrupted(KeyboardInterrupt):
    """Ctrl-C in a job; `hint` says in one line what was saved and how to resume."""

    def __init__(self, hint: str):
        super().__init__(hint)
        self.hint = hint


def is_checkpoint(path: str | os.PathLike) -> bool:
    """A grape-jax (Orbax) checkpoint directory rather than a Hugging Face one."""
    return os.path.isfile(os.path.join(path, "grape.json"))


def model_config(path: str | os.PathLike) -> MoEConfig:
    """The architecture of an HF directory or grape checkpoint from its metadata alone (no weights)."""
    path = os.fspath(path)
    if is_checkpoint(path):
        return checkpoint_config(path)
    hf = read_hf_config(path)
    return family_of(hf, source=os.path.join(path, "config.json")).config_from_hf(hf)


def model_provenance(path: str | os.PathLike, *, dtype: Any = None) -> list[dict[str, Any]]:
    """The provenance `load_model(path, dtype=dtype).info` will have, without loading any weight."""
    path = os.fspath(path)
    if is_checkpoint(path):
        return list(read_checkpoint_meta(path).get("provenance") or [])
    return provenance_of(path, dtype)


def model_fingerprint(path: str | os.PathLike, *, dtype: Any = None) -> str:
    """The fingerprint `load_model(path, dtype=dtype).info.fingerprint` will have, without loading it."""
    return ModelInfo.create(provenance=model_provenance(path, dtype=dtype)).fingerprint


def load_model(
    path: str | os.PathLike, *, mesh: Mesh | None = None, rules: ShardingRules = DEFAULT_RULES, dtype: Any = None
) -> MoEModel:
    """An HF directory (streamed, sharded) or a grape checkpoint as a model on `mesh`."""
    if is_checkpoint(path):
        if dtype is not None:
            raise ConversionError(
                f"{path}: a grape checkpoint keeps its stored dtypes; --dtype applies to HF directories"
            )
        return restore_checkpoint(path, mesh=mesh, rules=rules)
    return load_hf(path, mesh=mesh, rules=rules, dtype=dtype)


def tokenizer_dir(path: str | os.PathLike) -> str:
    """Where a model's tokenizer lives: the HF directory itself, or a checkpoint's source directory."""
    path = os.fspath(path)
    if is_checkpoint(path):
        source = read_checkpoint_meta(path).get("source") or ""
        if not os.path.isdir(source):
            raise ConversionError(f"{path}: its source directory {source!r} (which holds the tokenizer) is gone")
        return source
    return path


def check_output(out: str | os.PathLike, *, overwrite: bool, flag: str = "--out") -> str:
    """An output path that may be written: refused when it exists (unless `overwrite`) or when its parent
    is not a writable directory."""
    out = os.path.abspath(os.fspath(out))
    if os.path.exists(out) and not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it ({flag})")
    parent = os.path.dirname(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise OSError(f"{flag} {out}: {parent} is not a writable directory")
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
    stats = neutral_stats(cfg, gradients=gradients)
    plan = make_plan(stats, method=method, budget=budget, per_layer=per_layer, fraction=fraction, **dict(options))
    if plan.operator == "fit":
        check_fit_supported(cfg)


def apply_plan(
    model: MoEModel,
    plan: Plan,
    *,
    inputs: MergeInputs | None = None,
    blocks: np.ndarray | None = None,
    fit_options: FitOptions = FitOptions(),
    progress: bool = False,
) -> MoEModel:
    """`merge.apply_plan` with the inputs the plan's operator needs computed when not given
    (`fit.plan_inputs`): operator 'fit' refits the merged down projections on the calibration `blocks`."""
    if inputs is None:
        inputs = plan_inputs(model, plan, blocks=blocks, options=fit_options, progress=progress)
    return merge.apply_plan(model, plan, inputs=inputs)


def save_hf(
    model: MoEModel,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    max_shard_bytes: int | None = None,
    quantize: str | None = None,
    log: Log | None = None,
    extra_files: Mapping[str, str | bytes] | None = None,
) -> str:
    """Export `model` as an HF directory with `recipe.json` and a README model card built from its
    provenance (any model: original, merged, healed), plus `extra_files` (name -> text or bytes); the
    directory appears only when all of it is written. `quantize="fp8"` requantises what an FP8 source
    stored as FP8 (unmerged experts keep their scales; see `conversion.export.export_hf`)."""
    recipe = rc.build_recipe(model)
    files = {**dict(extra_files or {}), "recipe.json": rc.dumps(recipe)}
    if recipe["method"] is not None:
        files["README.md"] = rc.model_card(recipe, uniform=model.cfg.is_uniform)
    kw = {} if max_shard_bytes is None else {"max_shard_bytes": max_shard_bytes}
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
) -> PruneResult:
    """check -> load -> calibrate -> plan -> merge -> export (module docstring)."""
    options = dict(planner_options or {})
    out = check_output(out, overwrite=overwrite)
    work_dir = os.path.abspath(work_dir or out.rstrip("/") + ".work")
    if os.path.abspath(work_dir) == out:
        raise ValueError(f"--work-dir {work_dir} must differ from --out")
    cfg = model_config(hf_dir)
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
    blocks = data.blocks(load_tokenizer(tokenizer_dir(hf_dir)), max_positions=cfg.max_position_embeddings)
    fingerprint = calibration_fingerprint(model_fingerprint(hf_dir), cfg, blocks, calibration_options)

    os.makedirs(work_dir, exist_ok=True)
    stats_path = os.path.join(work_dir, "stats.npz")
    stats = _reusable_stats(stats_path, fingerprint, log)
    model = load_model(hf_dir, mesh=mesh)
    if stats is None:
        progress_dir = os.path.join(work_dir, "calibration")
        _drop_stale_progress(progress_dir, fingerprint, log)
        try:
            stats = calibrate(
                model,
                blocks,
                options=calibration_options,
                meta={"data": data.record()},
                resume_dir=progress_dir,
                progress=progress,
                log=log,
            )
        except CalibrationInterrupted as e:
            raise Interrupted(
                f"interrupted during calibration; statistics of {e.saved} of {e.total} blocks are "
                f"saved in {progress_dir}: run the same command again to resume"
            ) from None
        stats.save(stats_path)
        shutil.rmtree(progress_dir, ignore_errors=True)
    plan = make_plan(stats, method=method, budget=budget, per_layer=per_layer, fraction=fraction, **options)
    plan.save(os.path.join(work_dir, "plan.json"))
    merged = apply_plan(model, plan, blocks=blocks, fit_options=FitOptions.like(calibration_options), progress=progress)
    try:
        save_hf(merged, out, overwrite=overwrite, quantize=quantize, log=log if progress else None)
    except KeyboardInterrupt:
        partial = os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.partial")
        raise Interrupted(
            f"interrupted during export; the shards written so far are kept in {partial}: run the "
            f"same command again to resume"
        ) from None
    if not keep_work:
        shutil.rmtree(work_dir, ignore_errors=True)
    return PruneResult(out=out, plan=plan, stats=stats, cfg_before=cfg, cfg_after=merged.cfg)


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


def blocks_for(path: str, spec: DataSpec, *, heldout: bool = False) -> np.ndarray:
    """Token blocks of `spec` with the tokenizer of the model at `path` (HF dir or checkpoint)."""
    spec.check()
    return spec.blocks(
        load_tokenizer(tokenizer_dir(path)), max_positions=model_config(path).max_position_embeddings, heldout=heldout
    )
