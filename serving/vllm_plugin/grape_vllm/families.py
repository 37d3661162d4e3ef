"""Which grape exports the plugin serves, and the checks on their `num_experts_per_layer`.

Pure Python (no vLLM, no torch), so the table and the checks are importable anywhere.

A grape export with per-layer expert counts keeps its family's `model_type` in config.json (so the
stock config class reads it), adds `num_experts_per_layer` (one count per decoder layer, 0 for dense
layers) and `base_model_type`, sets the family's expert-count field to the largest count, and names
the architecture `Pruned<stock class>` (resolved by transformers through `auto_map`, by vLLM through
this plugin). Each entry below maps that architecture to vLLM's own class for the family.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any


class GrapeServeError(ValueError):
    """A grape export (or a vLLM setting) this plugin cannot serve; the message is one line."""


@dataclasses.dataclass(frozen=True)
class ServedFamily:
    """One family: grape's architecture name, vLLM's stock architecture, and the expert-count field."""

    base_model_type: str
    architecture: str
    vllm_architecture: str
    count_field: str
    # sigmoid + correction bias, group-limited top-k over `n_group` groups (DeepSeek-V3 / GLM-4.5 style)
    group_limited: bool = False


_FAMILIES = (
    ServedFamily("mixtral", "PrunedMixtralForCausalLM", "MixtralForCausalLM", "num_local_experts"),
    ServedFamily("qwen2_moe", "PrunedQwen2MoeForCausalLM", "Qwen2MoeForCausalLM", "num_experts"),
    ServedFamily("qwen3_moe", "PrunedQwen3MoeForCausalLM", "Qwen3MoeForCausalLM", "num_experts"),
    ServedFamily("olmoe", "PrunedOlmoeForCausalLM", "OlmoeForCausalLM", "num_experts"),
    ServedFamily("deepseek_v2", "PrunedDeepseekV2ForCausalLM", "DeepseekV2ForCausalLM", "n_routed_experts"),
    ServedFamily("deepseek_v3", "PrunedDeepseekV3ForCausalLM", "DeepseekV3ForCausalLM", "n_routed_experts", True),
    ServedFamily("glm4_moe", "PrunedGlm4MoeForCausalLM", "Glm4MoeForCausalLM", "n_routed_experts", True),
    ServedFamily("ernie4_5_moe", "PrunedErnie4_5_MoeForCausalLM", "Ernie4_5_MoeForCausalLM", "moe_num_experts"),
    ServedFamily("minimax_m2", "PrunedMiniMaxM2ForCausalLM", "MiniMaxM2ForCausalLM", "num_local_experts"),
    ServedFamily("phimoe", "PrunedPhimoeForCausalLM", "PhiMoEForCausalLM", "num_local_experts"),
    ServedFamily("gpt_oss", "PrunedGptOssForCausalLM", "GptOssForCausalLM", "num_local_experts"),
    ServedFamily("llama4_text", "PrunedLlama4ForCausalLM", "Llama4ForCausalLM", "num_local_experts"),
)

# grape architecture name -> family
SERVED: dict[str, ServedFamily] = {f.architecture: f for f in _FAMILIES}
# grape architectures this plugin knows and refuses, with the reason (one line each)
REFUSED: dict[str, str] = {}


def _field(config: Mapping[str, Any] | object, name: str, default: Any = None) -> Any:
    if isinstance(config, Mapping):
        return config.get(name, default)
    return getattr(config, name, default)


def _top_k(config: Mapping[str, Any] | object, family: ServedFamily) -> int:
    key = "moe_k" if family.base_model_type == "ernie4_5_moe" else "num_experts_per_tok"
    return int(_field(config, key, None) or _field(config, "num_experts_per_tok", 1) or 1)


def layer_counts(config: Mapping[str, Any] | object, family: ServedFamily) -> list[int]:
    """`num_experts_per_layer` of an export's config (a dict or a config object), checked.

    Raises `GrapeServeError` with a one-line message naming the field when the list is missing, not a
    list of non-negative integers, of the wrong length, above the family's expert-count field, below
    the routing's top-k, or incompatible with group-limited routing.
    """
    where = f"config.json num_experts_per_layer ({family.architecture})"
    raw = _field(config, "num_experts_per_layer")
    if raw is None:
        raise GrapeServeError(f"{where}: missing; a grape export with per-layer counts needs one per decoder layer")
    if isinstance(raw, (str, bytes)) or not hasattr(raw, "__iter__"):
        raise GrapeServeError(f"{where}: expected a list of integers, got {type(raw).__name__} {raw!r}")
    raw = list(raw)
    if any(isinstance(c, bool) or not isinstance(c, int) for c in raw):
        bad = next(c for c in raw if isinstance(c, bool) or not isinstance(c, int))
        raise GrapeServeError(f"{where}: expected integers, found {bad!r}")
    counts = [int(c) for c in raw]
    layers = _field(config, "num_hidden_layers")
    if layers is not None and len(counts) != int(layers):
        raise GrapeServeError(f"{where}: {len(counts)} entries for num_hidden_layers={layers}")
    if any(c < 0 for c in counts) or not any(c > 0 for c in counts):
        raise GrapeServeError(f"{where}: counts must be >= 0 with at least one MoE layer, got {counts}")
    full = _field(config, family.count_field)
    if full is not None and max(counts) > int(full):
        raise GrapeServeError(f"{where}: {max(counts)} experts in a layer but {family.count_field}={full}")
    top_k = _top_k(config, family)
    for layer, count in enumerate(counts):
        if count and count < top_k:
            raise GrapeServeError(f"{where}: layer {layer} keeps {count} experts, fewer than top-k={top_k}")
        if count and family.group_limited:
            n_group = int(_field(config, "n_group", 1) or 1)
            if count % n_group or count // n_group < 2:
                raise GrapeServeError(
                    f"{where}: layer {layer} keeps {count} experts; group-limited routing needs a multiple "
                    f"of n_group={n_group} with at least 2 per group"
                )
    return counts


def is_uniform(counts: list[int]) -> bool:
    """Whether every MoE layer keeps the same number of experts."""
    return len({c for c in counts if c > 0}) <= 1
