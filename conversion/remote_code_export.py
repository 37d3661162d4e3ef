"""Config updates for exported pruned MoE checkpoints: stock config for uniform expert counts,
remote code (`remote_code/modeling_pruned_moe.py` + `auto_map`) for per-layer counts."""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from typing import Any

from conversion.remote_code import modeling_pruned_moe as pruned

MODELING_FILE = os.path.join(os.path.dirname(pruned.__file__), "modeling_pruned_moe.py")
MODULE_NAME = "modeling_pruned_moe"
_OWN_FIELDS = ("auto_map", "num_experts_per_layer", "base_model_type", "grape_remote_code_transformers_version")


def _base_family(config_dict: dict[str, Any], family: str) -> None:
    if family not in pruned.ALL_FAMILIES:
        raise ValueError(f"unsupported MoE family {family!r}; expected one of {sorted(pruned.ALL_FAMILIES)}")
    model_type = config_dict.get("model_type")
    if model_type not in (family, pruned.MODEL_TYPE_PREFIX + family):
        raise ValueError(f"config model_type {model_type!r} does not match family {family!r}")


def _checked_counts(config_dict: dict[str, Any], family: str, counts: Sequence[int]) -> list[int]:
    """Run the modeling file's own validation on a config carrying `counts`."""
    config_cls = getattr(pruned, pruned.class_names(family)[0])
    fields = {k: v for k, v in config_dict.items() if k not in ("model_type", *_OWN_FIELDS)}
    fields["num_experts_per_layer"] = [int(c) for c in counts]
    return list(config_cls(**fields).num_experts_per_layer)


def write_remote_code(
    export_dir: str | os.PathLike,
    config_dict: dict[str, Any],
    *,
    family: str,
    num_experts_per_layer: Sequence[int],
) -> dict[str, Any]:
    """Copy the pruned-MoE modeling file into `export_dir`; return `config_dict` updated to use it.

    The returned config keeps every field of `config_dict` and sets: `model_type` (the family's own, so
    `AutoConfig` and `AutoTokenizer` read the directory with the stock config class and no remote code;
    with `trust_remote_code=True`, `auto_map` picks our classes, whose type is `grape_pruned_<family>`),
    `base_model_type`, `num_experts_per_layer`, the family's expert-count
    field (the largest layer count, informational), `architectures`, `auto_map` (AutoConfig and
    AutoModelForCausalLM) and `grape_remote_code_transformers_version`.
    """
    _base_family(config_dict, family)
    counts = _checked_counts(config_dict, family, num_experts_per_layer)
    config_name, lm_name = pruned.class_names(family)
    count_field = pruned.count_field(family)
    os.makedirs(export_dir, exist_ok=True)
    shutil.copyfile(MODELING_FILE, os.path.join(export_dir, MODULE_NAME + ".py"))
    out = dict(config_dict)
    out.update(
        model_type=family,
        base_model_type=family,
        num_experts_per_layer=counts,
        architectures=[lm_name],
        auto_map={
            "AutoConfig": f"{MODULE_NAME}.{config_name}",
            "AutoModelForCausalLM": f"{MODULE_NAME}.{lm_name}",
        },
        grape_remote_code_transformers_version=pruned.TRANSFORMERS_VERSION,
    )
    out[count_field] = max(counts)
    return out
