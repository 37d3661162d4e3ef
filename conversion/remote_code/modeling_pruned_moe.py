"""Pruned Mixture-of-Experts models whose decoder layers keep different numbers of experts.

Written by grape-jax and copied next to a pruned checkpoint: config.json names one config class and
one causal-LM class of this file in `auto_map`, so

    AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True)

loads the export offline. Each class reuses the family's stock transformers model unchanged except
for the expert count: config.json's `num_experts_per_layer` (one entry per decoder layer, 0 for
dense layers) gives every MoE layer a block built from a copy of the config with that layer's count,
so weight shapes match the checkpoint (Llama-4's block is `feed_forward`). The checkpoint keeps
the family's on-disk key layout (per-expert keys where the family has them); the family's own
load/save key conversion is registered for the custom model type, so loading fuses and
`save_pretrained` splits exactly as the stock model does.

DeepSeek-MoE (`deepseek`) has no class in transformers (its checkpoints ship their own remote code),
so this file implements it: `PrunedDeepseekForCausalLM` is transformers' Llama model (attention,
norms, embeddings and lm_head are Llama's, with the same keys) whose MoE layers get a
`PrunedDeepseekMoE` block in the published key layout (`mlp.gate`, `mlp.experts.{e}.*`,
`mlp.shared_experts.*`).

Imports only torch, transformers and the standard library. Written for transformers 5.23.
"""

import copy

import torch
import transformers
from torch import nn
from transformers.activations import ACT2FN
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
    "glm4_moe": ("Glm4MoeConfig", "Glm4MoeForCausalLM", "n_routed_experts"),
    "ernie4_5_moe": ("Ernie4_5_MoeConfig", "Ernie4_5_MoeForCausalLM", "moe_num_experts"),
    "minimax_m2": ("MiniMaxM2Config", "MiniMaxM2ForCausalLM", "num_local_experts"),
    "phimoe": ("PhimoeConfig", "PhimoeForCausalLM", "num_local_experts"),
    "llama4_text": ("Llama4TextConfig", "Llama4ForCausalLM", "num_local_experts"),
}
# Families whose router splits the experts into `n_group` groups (sigmoid + correction bias, DeepSeek-V3 style).
SIGMOID_GROUP_FAMILIES = ("deepseek_v3", "glm4_moe")
# base model_type -> (published config class, published causal-LM class, count field) for families whose
# modeling code is not in transformers: this file implements them (see PrunedDeepseekForCausalLM).
OWN_FAMILIES = {
    "deepseek": ("DeepseekConfig", "DeepseekForCausalLM", "n_routed_experts"),
}
ALL_FAMILIES = {**FAMILIES, **OWN_FAMILIES}


def class_names(family):
    """Names of this file's (config, causal-LM) classes for a base family, as `auto_map` cites them."""
    if family not in ALL_FAMILIES:
        raise ValueError(f"unsupported MoE family {family!r}; expected one of {sorted(ALL_FAMILIES)}")
    config_name, lm_name, _ = ALL_FAMILIES[family]
    return "Pruned" + config_name, "Pruned" + lm_name


def count_field(family: str) -> str:
    """The config field holding a family's (full-model) routed-expert count."""
    class_names(family)  # validates the family
    return ALL_FAMILIES[family][2]


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
        if count and family in SIGMOID_GROUP_FAMILIES:
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


def feed_forward_name(layer):
    """The decoder layer's MLP/MoE attribute: `mlp`, or `feed_forward` (Llama-4)."""
    return "feed_forward" if hasattr(layer, "feed_forward") else "mlp"


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

        @classmethod
        def get_config_dict(cls, *args, **kwargs):
            # config.json names the family's own model_type (so the tokenizer and AutoConfig load without
            # remote code); read through this class, it is this class's type.
            config_dict, kwargs = super().get_config_dict(*args, **kwargs)
            if config_dict.get("model_type") == family:
                config_dict = {**config_dict, "model_type": cls.model_type}
            return config_dict, kwargs

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
                mlp_name = feed_forward_name(layer)
                mlp = getattr(layer, mlp_name)
                is_moe = hasattr(mlp, "experts")
                if is_moe != (counts[index] > 0):
                    kind = "an MoE" if is_moe else "a dense"
                    raise ValueError(
                        f"layer {index} is {kind} layer in {family} "
                        f"but num_experts_per_layer[{index}] = {counts[index]}"
                    )
                if is_moe and counts[index] != smallest:
                    layer_config = copy.deepcopy(config)
                    setattr(layer_config, count_field, counts[index])
                    setattr(layer, mlp_name, type(mlp)(layer_config))
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
PrunedGlm4MoeConfig, PrunedGlm4MoeForCausalLM = _make_classes("glm4_moe")
PrunedErnie4_5_MoeConfig, PrunedErnie4_5_MoeForCausalLM = _make_classes("ernie4_5_moe")
PrunedMiniMaxM2Config, PrunedMiniMaxM2ForCausalLM = _make_classes("minimax_m2")
PrunedPhimoeConfig, PrunedPhimoeForCausalLM = _make_classes("phimoe")
PrunedLlama4TextConfig, PrunedLlama4ForCausalLM = _make_classes("llama4_text")


def deepseek_moe_layers(
    num_hidden_layers: int, first_k_dense_replace: int | None, moe_layer_freq: int | None
) -> list[bool]:
    """Which DeepSeek-MoE decoder layers are MoE: `l >= first_k_dense_replace and l % moe_layer_freq == 0`."""
    first, freq = int(first_k_dense_replace or 0), int(moe_layer_freq or 1)
    return [layer >= first and layer % freq == 0 for layer in range(int(num_hidden_layers))]


def _check_deepseek_layout(config: "PrunedDeepseekConfig", counts: list[int]) -> None:
    """Refuse counts whose MoE layers differ from the layout set by first_k_dense_replace/moe_layer_freq."""
    is_moe = deepseek_moe_layers(config.num_hidden_layers, config.first_k_dense_replace, config.moe_layer_freq)
    for layer, (moe, count) in enumerate(zip(is_moe, counts)):
        if moe != (count > 0):
            kind = "an MoE" if moe else "a dense"
            raise ValueError(
                f"layer {layer} is {kind} layer in deepseek (first_k_dense_replace={config.first_k_dense_replace}, "
                f"moe_layer_freq={config.moe_layer_freq}) but num_experts_per_layer[{layer}] = {count}"
            )


class PrunedDeepseekConfig(transformers.LlamaConfig):
    """DeepSeek-MoE config (the published `DeepseekConfig` fields) with one routed-expert count per layer.

    The attention/norm/RoPE fields are Llama's (legacy `rope_theta`/`rope_scaling` are converted to
    `rope_parameters` as for Llama); `n_routed_experts` is informational (the largest layer count).
    """

    model_type = MODEL_TYPE_PREFIX + "deepseek"
    moe_intermediate_size: int = 1407
    n_routed_experts: int | None = None
    n_shared_experts: int | None = None
    num_experts_per_tok: int | None = None
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    norm_topk_prob: bool = False
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.001
    seq_aux: bool = True
    num_experts_per_layer: list[int] | None = None
    base_model_type: str = "deepseek"

    @classmethod
    def get_config_dict(cls, *args, **kwargs):
        config_dict, kwargs = super().get_config_dict(*args, **kwargs)  # see _make_classes
        if config_dict.get("model_type") == "deepseek":
            config_dict = {**config_dict, "model_type": cls.model_type}
        return config_dict, kwargs

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.base_model_type != "deepseek":
            raise ValueError(f"PrunedDeepseekConfig is for base_model_type 'deepseek', got {self.base_model_type!r}")
        if self.scoring_func != "softmax":
            raise ValueError(f"deepseek: scoring_func={self.scoring_func!r} is not supported (only 'softmax')")
        if not self.num_experts_per_tok or self.num_experts_per_tok < 1:
            raise ValueError(f"deepseek: num_experts_per_tok must be >= 1, got {self.num_experts_per_tok!r}")
        if self.num_experts_per_layer is not None:
            self.num_experts_per_layer = check_layer_counts(self, "deepseek")
            _check_deepseek_layout(self, self.num_experts_per_layer)


class PrunedDeepseekMLP(nn.Module):
    """SwiGLU MLP `down(act(gate(x)) * up(x))` of a given width (routed and shared experts)."""

    def __init__(self, config: "PrunedDeepseekConfig", intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, config.hidden_size, bias=False)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class PrunedDeepseekMoE(nn.Module):
    """DeepSeek-MoE block with `num_experts` routed experts (published `DeepseekMoE` semantics).

    Router: softmax over the layer's experts, top-k, weights renormalised (+1e-20) only if
    `norm_topk_prob` and k > 1. Logits and softmax run in float32 whatever the model dtype (the
    published code uses the activation dtype; identical in fp32, more accurate in bf16, and what
    grape-jax calibrates with). The shared experts (one ungated MLP `n_shared_experts *
    moe_intermediate_size` wide) are added to the routed output. No auxiliary balance loss.
    """

    def __init__(self, config: "PrunedDeepseekConfig", num_experts: int):
        super().__init__()
        self.num_experts = int(num_experts)
        self.top_k = int(config.num_experts_per_tok)
        self.norm_topk_prob = bool(config.norm_topk_prob)
        self.gate = nn.Linear(config.hidden_size, self.num_experts, bias=False)
        self.experts = nn.ModuleList(
            PrunedDeepseekMLP(config, config.moe_intermediate_size) for _ in range(self.num_experts)
        )
        shared = int(config.n_shared_experts or 0)
        self.shared_experts = PrunedDeepseekMLP(config, shared * config.moe_intermediate_size) if shared else None

    def route(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k] in float32, expert indices [T, k]) for flat `hidden_states` [T, hidden]."""
        logits = nn.functional.linear(hidden_states.float(), self.gate.weight.float())
        weights, indices = torch.topk(logits.softmax(dim=-1), self.top_k, dim=-1)
        if self.top_k > 1 and self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights, indices

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        flat = hidden_states.reshape(-1, shape[-1])
        weights, indices = self.route(flat)
        weights = weights.to(flat.dtype)
        out = torch.zeros_like(flat)
        for expert_index, expert in enumerate(self.experts):
            token, slot = torch.where(indices == expert_index)
            if token.numel():
                out.index_add_(0, token, expert(flat[token]) * weights[token, slot, None])
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.reshape(shape)


class PrunedDeepseekForCausalLM(transformers.LlamaForCausalLM):
    """DeepSeek-MoE causal LM: Llama with a `PrunedDeepseekMoE` block of `num_experts_per_layer[l]`
    routed experts in every MoE layer and Llama's dense MLP (`intermediate_size`) elsewhere."""

    config_class = PrunedDeepseekConfig

    def __init__(self, config: PrunedDeepseekConfig):
        counts = check_layer_counts(config, "deepseek")
        _check_deepseek_layout(config, counts)
        # Llama builds a dense MLP in every layer; MoE layers swap theirs for the MoE block below
        # (from_pretrained builds on the meta device, so the dropped MLPs cost nothing there).
        super().__init__(config)
        for layer, count in zip(self.model.layers, counts):
            if count:
                layer.mlp = PrunedDeepseekMoE(config, count)
        self.post_init()  # initialises only the new blocks (the rest is flagged initialised)
