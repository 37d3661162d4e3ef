"""Pruned Mixture-of-Experts models whose decoder layers keep different numbers of experts.

Written by grape-jax and copied next to a pruned checkpoint: config.json names one config class and
one causal-LM class of this file in `auto_map`, so

    AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True)

loads the export offline. Each class reuses the family's stock transformers model unchanged except
for the expert count: config.json's `num_experts_per_layer` (one entry per decoder layer, 0 for
dense layers) gives every MoE layer a block built from a copy of the config with that layer's count,
so weight shapes match the checkpoint. The checkpoint keeps the family's on-disk key layout
(per-expert keys where the family has them); the family's own load/save key conversion is
registered for the custom model type, so loading fuses and `save_pretrained` splits exactly as the
stock model does.

Imports only transformers (and the standard library). Written for transformers 5.23.
"""

import copy

import transformers
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)

TRANSFORMERS_VERSION = "5.23.0"
MODEL_TYPE_PREFIX = "grape_pruned_"

# base model_type -> (stock config class, stock causal-LM class, config field holding the expert count)
FAMILIES = {
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", "num_local_experts"),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", "num_experts"),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", "num_experts"),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", "num_experts"),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", "n_routed_experts"),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", "n_routed_experts"),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", "num_local_experts"),
}


def class_names(family):
    """Names of this file's (config, causal-LM) classes for a base family, as `auto_map` cites them."""
    if family not in FAMILIES:
        raise ValueError(f"unsupported MoE family {family!r}; expected one of {sorted(FAMILIES)}")
    config_name, lm_name, _ = FAMILIES[family]
    return "Pruned" + config_name, "Pruned" + lm_name


def check_layer_counts(config, family):
    """Validate `config.num_experts_per_layer` against the config; returns it as a list of ints."""
    counts = getattr(config, "num_experts_per_layer", None)
    if counts is None:
        raise ValueError("config has no num_experts_per_layer; a pruned MoE needs one count per decoder layer")
    counts = [int(c) for c in counts]
    if len(counts) != config.num_hidden_layers:
        raise ValueError(
            f"num_experts_per_layer has {len(counts)} entries for {config.num_hidden_layers} decoder layers"
        )
    if not any(c > 0 for c in counts) or any(c < 0 for c in counts):
        raise ValueError(f"num_experts_per_layer must be >= 0 with at least one MoE layer, got {counts}")
    top_k = config.num_experts_per_tok
    for layer, count in enumerate(counts):
        if count and count < top_k:
            raise ValueError(f"layer {layer} keeps {count} experts, fewer than num_experts_per_tok={top_k}")
        if count and family == "deepseek_v3":
            n_group = config.n_group or 1
            topk_group = config.topk_group or 1
            if count % n_group or count // n_group < 2:
                raise ValueError(
                    f"layer {layer} keeps {count} experts: group-limited routing needs a multiple of "
                    f"n_group={n_group} with at least 2 experts per group"
                )
            if top_k > topk_group * (count // n_group):
                raise ValueError(
                    f"layer {layer}: top_k={top_k} exceeds topk_group={topk_group} groups of {count // n_group}"
                )
        if count and family == "deepseek_v2" and config.topk_method == "group_limited_greedy":
            n_group, topk_group = config.n_group or 1, config.topk_group or 1
            if count % n_group:
                raise ValueError(
                    f"layer {layer} keeps {count} experts: group-limited routing needs a multiple of n_group={n_group}"
                )
            if top_k > topk_group * (count // n_group):
                raise ValueError(
                    f"layer {layer}: top_k={top_k} exceeds topk_group={topk_group} groups of {count // n_group}"
                )
    return counts


def _make_classes(family):
    """Build the (config, causal-LM) subclasses of one family's stock classes."""
    stock_config_name, stock_lm_name, count_field = FAMILIES[family]
    config_name, lm_name = class_names(family)
    stock_config = getattr(transformers, stock_config_name)
    stock_lm = getattr(transformers, stock_lm_name)

    class PrunedConfig(stock_config):
        model_type = MODEL_TYPE_PREFIX + family
        num_experts_per_layer: list[int] | None = None
        base_model_type: str = family

        def __post_init__(self, **kwargs):
            super().__post_init__(**kwargs)
            if self.base_model_type != family:
                raise ValueError(f"{config_name} is for base_model_type {family!r}, got {self.base_model_type!r}")
            if self.num_experts_per_layer is not None:
                self.num_experts_per_layer = check_layer_counts(self, family)

    class PrunedForCausalLM(stock_lm):
        config_class = PrunedConfig

        def __init__(self, config):
            counts = check_layer_counts(config, family)
            full = getattr(config, count_field)
            smallest = min(c for c in counts if c > 0)
            # Build the stock model with the smallest count (cheap), then give every other MoE layer
            # a block built for its own count; the stock code sees one shared config throughout.
            setattr(config, count_field, smallest)
            try:
                super().__init__(config)
            finally:
                setattr(config, count_field, full)
                setattr(self.config, count_field, full)
            for index, layer in enumerate(self.model.layers):
                is_moe = hasattr(layer.mlp, "experts")
                if is_moe != (counts[index] > 0):
                    kind = "an MoE" if is_moe else "a dense"
                    raise ValueError(
                        f"layer {index} is {kind} layer in {family} "
                        f"but num_experts_per_layer[{index}] = {counts[index]}"
                    )
                if is_moe and counts[index] != smallest:
                    layer_config = copy.deepcopy(config)
                    setattr(layer_config, count_field, counts[index])
                    layer.mlp = type(layer.mlp)(layer_config)
            if hasattr(self, "num_experts"):
                self.num_experts = full
            self.post_init()  # initialises only the new blocks (the rest is flagged initialised)

    PrunedConfig.__name__ = PrunedConfig.__qualname__ = config_name
    PrunedForCausalLM.__name__ = PrunedForCausalLM.__qualname__ = lm_name
    mapping = get_checkpoint_conversion_mapping(family)
    if mapping:
        # Custom-code models get no key conversion unless their model_type is registered.
        register_checkpoint_conversion_mapping(PrunedConfig.model_type, mapping, overwrite=True)
    return PrunedConfig, PrunedForCausalLM


PrunedMixtralConfig, PrunedMixtralForCausalLM = _make_classes("mixtral")
PrunedQwen2MoeConfig, PrunedQwen2MoeForCausalLM = _make_classes("qwen2_moe")
PrunedQwen3MoeConfig, PrunedQwen3MoeForCausalLM = _make_classes("qwen3_moe")
PrunedOlmoeConfig, PrunedOlmoeForCausalLM = _make_classes("olmoe")
PrunedDeepseekV2Config, PrunedDeepseekV2ForCausalLM = _make_classes("deepseek_v2")
PrunedDeepseekV3Config, PrunedDeepseekV3ForCausalLM = _make_classes("deepseek_v3")
PrunedGptOssConfig, PrunedGptOssForCausalLM = _make_classes("gpt_oss")
