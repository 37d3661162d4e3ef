"""grape-jax: shrink Hugging Face Mixture-of-Experts LLMs by merging and pruning experts chosen globally
across layers (GRAPE), in JAX/Flax NNX on a device mesh. The public API is `grape_jax.api`; its names
are importable from here (`import grape_jax as gj; gj.load_hf(...)`).

The names resolve on first use: importing a submodule (`grape_jax.core.config`, as every process of a
multi-host job does) must not import the whole stack (transformers, Orbax) through this file."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_API = "grape_jax.api"
# The names of `grape_jax.api.__all__` (a test keeps the two lists equal). Listed here so that
# `from grape_jax.core import config` (a submodule) never triggers the API import.
PUBLIC = (
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
)


def __getattr__(name: str) -> Any:
    if name in PUBLIC:
        return getattr(importlib.import_module(_API), name)
    raise AttributeError(f"module 'grape_jax' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *PUBLIC])
