"""The end-to-end jobs, as library functions the CLI and scripts call.

`prune` = load (streamed, sharded) -> calibrate -> plan -> merge -> export. Each stage writes its
result into a work directory (`stats.npz`, `plan.json`) before the next begins, so a rerun after a
crash resumes at the first missing stage (and calibration resumes inside itself from its last saved
accumulator, export from its last completed shard).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from grape_jax.config import MoEConfig
from grape_jax.stats import ModelStats, file_sha256


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Calibration (or evaluation) text: files, or the shipped public-domain sample when None."""

    paths: tuple[str, ...] | None = None
    text_field: str | None = None
    seq_len: int = 128
    num_samples: int | None = 64
    seed: int = 0

    def describe(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["paths"] = list(self.paths) if self.paths else "grape_jax/assets/kjv_calibration.txt (shipped)"
        return d


def token_blocks(spec: DataSpec, tokenizer, *, max_positions: int, heldout: bool = False) -> np.ndarray:
    """Tokenise and pack the spec's text into [n, seq_len] int32 blocks."""
    from grape_jax import data

    if spec.paths:
        texts = data.load_texts(list(spec.paths), text_field=spec.text_field)
    else:
        texts = data.default_heldout_texts() if heldout else data.default_calibration_texts()
    return data.tokenize_and_pack(
        texts, tokenizer, seq_len=spec.seq_len, num_samples=spec.num_samples, seed=spec.seed,
        max_positions=max_positions,
    )


def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{model_dir}: no usable tokenizer files ({str(e).splitlines()[0]})") from None


def apply_plan(
    params: Mapping[str, jax.Array], cfg: MoEConfig, plan
) -> tuple[dict[str, jax.Array], MoEConfig]:
    """Merge parameters by a Plan (validated against the model first)."""
    from grape_jax.merge import merge_params, mixes_from_plan

    moe_counts = [cfg.num_experts[layer] for layer in cfg.moe_layers]
    plan.validate_against(moe_counts, top_k=cfg.top_k, min_experts=cfg.min_experts)
    if [lp.layer for lp in plan.layers] != list(cfg.moe_layers):
        raise ValueError(
            f"plan covers layers {[lp.layer for lp in plan.layers]}, model's MoE layers are "
            f"{list(cfg.moe_layers)}"
        )
    return merge_params(params, cfg, mixes_from_plan(plan))


def export_pruned(
    params: Mapping[str, jax.Array],
    cfg: MoEConfig,
    *,
    original_cfg: MoEConfig,
    family,
    out: str,
    base_config: Mapping[str, Any],
    source_dir: str | None,
    plan,
    stats: ModelStats | None = None,
    calibration: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    log=None,
    quantize: str | None = None,
) -> str:
    """Export a merged model with `recipe.json` and a README model card (`log`, `quantize`: see
    `export_hf`; unmerged experts keep their FP8 scales)."""
    from conversion.export import export_hf
    from grape_jax import recipe as rc

    recipe = rc.build_recipe(
        plan=plan.to_dict() if hasattr(plan, "to_dict") else dict(plan),
        before=original_cfg, after=cfg, source=os.fspath(source_dir or "?"),
        stats_meta=None if stats is None else dict(stats.meta), calibration=calibration,
    )
    files = {"recipe.json": rc.dumps(recipe), "README.md": rc.model_card(recipe, uniform=cfg.is_uniform)}
    origins = plan.expert_origins() if hasattr(plan, "expert_origins") else None
    return export_hf(params, cfg, family, out, base_config=base_config, source_dir=source_dir,
                     overwrite=overwrite, extra_files=files, log=log, quantize=quantize, expert_origins=origins)


@dataclasses.dataclass(frozen=True)
class PruneResult:
    out: str
    plan: Any
    stats: ModelStats
    cfg_before: MoEConfig
    cfg_after: MoEConfig


def prune(
    hf_dir: str,
    out: str,
    *,
    method: str,
    budget: int | None = None,
    per_layer: int | None = None,
    data: DataSpec = DataSpec(),
    planner_options: Mapping[str, Any] | None = None,
    calibration_options=None,
    work_dir: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    overwrite: bool = False,
    progress: bool = True,
    quantize: str | None = None,
) -> PruneResult:
    """convert -> calibrate -> plan -> merge -> export, resumable at stage boundaries (and inside
    calibration and export)."""
    from conversion.atomic import OutputExistsError
    from conversion.load import load_hf
    from grape_jax.calibration import CalibrationOptions, calibrate
    from grape_jax.plan import Plan
    from grape_jax.planners import budget_from_per_layer, make_plan

    if os.path.exists(out) and not overwrite:
        raise OutputExistsError(f"{out} already exists; pass --overwrite to replace it")
    if (budget is None) == (per_layer is None):
        raise ValueError("give exactly one of budget (total experts removed) or per_layer")
    work_dir = work_dir or out.rstrip("/") + ".work"
    os.makedirs(work_dir, exist_ok=True)
    loaded = load_hf(hf_dir, mesh=mesh)
    cfg = loaded.cfg
    stats_path = os.path.join(work_dir, "stats.npz")
    if os.path.isfile(stats_path):
        stats = ModelStats.load(stats_path)
    else:
        tokenizer = load_tokenizer(hf_dir)
        blocks = token_blocks(data, tokenizer, max_positions=cfg.max_position_embeddings)
        stats = calibrate(
            loaded.params, cfg, blocks, options=calibration_options or CalibrationOptions(), mesh=mesh,
            meta={"model": os.path.abspath(hf_dir), "data": data.describe()},
            resume_dir=os.path.join(work_dir, "calibration"), progress=progress,
        )
        stats.save(stats_path)
    total = budget if budget is not None else budget_from_per_layer(per_layer, stats)
    plan_path = os.path.join(work_dir, f"plan-{method}-{total}.json")
    if os.path.isfile(plan_path):
        plan = Plan.load(plan_path)
    else:
        plan = make_plan(method, stats, budget=total, stats_sha256=file_sha256(stats_path),
                         **dict(planner_options or {}))
        plan.save(plan_path)
    params, new_cfg = apply_plan(loaded.params, cfg, plan)
    from conversion.export import check_expert_counts

    check_expert_counts(new_cfg, loaded.family)  # before any work is written
    export_pruned(params, new_cfg, original_cfg=cfg, family=loaded.family, out=out,
                  base_config=loaded.hf_config, source_dir=hf_dir, plan=plan, stats=stats,
                  calibration=data.describe(), overwrite=overwrite, log=print if progress else None,
                  quantize=quantize)
    return PruneResult(out=out, plan=plan, stats=stats, cfg_before=cfg, cfg_after=new_cfg)


def parse_per_layer_list(text: str) -> Sequence[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected a comma-separated list of integers, got {text!r}") from None
