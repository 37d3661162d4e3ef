"""The Python API (re-exported by `grape_jax`): load a model, calibrate, plan, merge, evaluate, export.

    import grape_jax as gj
    model = gj.load_hf(hf_dir, mesh=gj.make_mesh("expert=8"))   # a flax.nnx.Module, sharded
    blocks = gj.token_blocks(hf_dir, num_samples=64)             # int32 [n, seq_len] from the shipped text
    stats = gj.calibrate(model, blocks)
    plan = gj.make_plan(stats, per_layer=2)                       # the default planner, grape-l
    pruned = gj.apply_plan(model, plan, blocks=blocks)            # a new module with fewer experts
                                                                  # (operator 'fit' refits on `blocks`)
    logits = pruned(blocks[:2])
    gj.save_hf(pruned, out_dir)                                   # HF directory + recipe.json + card

The pure core: `graphdef, state = nnx.split(model)`; `gj.merge_state(state, plan, inputs)` under `jax.jit`
or `jax.eval_shape`, with `inputs = gj.fit_inputs(model, plan, blocks)` (operator 'fit') or
`gj.merge_inputs(model, plan)` (every other operator), and the module of the merged state is
`nnx.merge(gj.merged_graphdef(model, plan, inputs), new_state)`. The CLI (`grape ...`) is a thin
layer over these functions.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from jaxtyping import Int

from conversion.checkpoint import restore_checkpoint, save_checkpoint
from grape_jax.calibration.calibrate import calibrate
from grape_jax.calibration.options import CalibrationOptions
from grape_jax.calibration.stats import ModelStats
from grape_jax.core.config import MoEConfig
from grape_jax.core.model import ModelInfo, MoEModel, abstract_model, init_model, param_view
from grape_jax.core.sharding import RunContext, ShardingRules, make_mesh
from grape_jax.data.text import DataSpec
from grape_jax.demo.model import shipped_path as demo_model_path
from grape_jax.evaluation.scoring import PerplexityResult, perplexity
from grape_jax.fit.operator import FitOptions, fit_inputs
from grape_jax.healing.heal import (
    HealError,
    HealInterrupted,
    HealOptions,
    HealResult,
    TeacherLogits,
    cache_teacher_logits,
    heal,
)
from grape_jax.merge.state import MergeInputs, merge_inputs, merge_state, merged_graphdef
from grape_jax.pipeline import apply_plan, blocks_for, load_model, prune, save_hf
from grape_jax.planners import PLANNERS, make_plan
from grape_jax.planners.plan import Plan

load_hf = load_model  # the name the README's example uses: one loader for HF directories and grape checkpoints

__all__ = [
    "CalibrationOptions",
    "DataSpec",
    "FitOptions",
    "HealError",
    "HealInterrupted",
    "HealOptions",
    "HealResult",
    "MergeInputs",
    "ModelInfo",
    "ModelStats",
    "MoEConfig",
    "MoEModel",
    "PLANNERS",
    "PerplexityResult",
    "Plan",
    "RunContext",
    "ShardingRules",
    "TeacherLogits",
    "abstract_model",
    "apply_plan",
    "cache_teacher_logits",
    "calibrate",
    "demo_model_path",
    "describe",
    "fit_inputs",
    "heal",
    "init_model",
    "load_hf",
    "load_model",
    "make_mesh",
    "make_plan",
    "merge_inputs",
    "merge_state",
    "merged_graphdef",
    "param_view",
    "perplexity",
    "prune",
    "restore_checkpoint",
    "save_checkpoint",
    "save_hf",
    "token_blocks",
]


def token_blocks(
    model_dir: str | os.PathLike,
    paths: str | os.PathLike | list[str] | None = None,
    *,
    text_field: str | None = None,
    seq_len: int = 128,
    num_samples: int | None = 64,
    seed: int = 0,
    heldout: bool = False,
) -> Int[np.ndarray, "n seq_len"]:
    """[n, seq_len] int32 token blocks of text files (None: the shipped public-domain sample, or its
    held-out part with `heldout`), tokenised with the tokenizer of the model in `model_dir` (an HF
    directory or a grape checkpoint, whose source directory holds it)."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [os.fspath(paths)]
    spec = DataSpec(
        paths=tuple(paths) if paths else None,
        text_field=text_field,
        seq_len=seq_len,
        num_samples=num_samples,
        seed=seed,
    )
    return blocks_for(os.fspath(model_dir), spec, heldout=heldout)


def describe(model: MoEModel) -> dict[str, Any]:
    """A short summary of a model: family, source, experts per layer, parameters, fingerprint."""
    return {
        "family": model.info.family,
        "source": model.info.source,
        "num_experts": list(model.cfg.num_experts),
        "params": model.num_params,
        "fingerprint": model.info.fingerprint,
    }
