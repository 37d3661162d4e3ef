"""Phi-3.5-MoE (`PhimoeForCausalLM`): every layer MoE with Mixtral's key layout
(`block_sparse_moe.gate`, `experts.{e}.w1/w3/w2`); the sparsemixer router, which at inference picks the
top-1 and then the top-1 of the other experts, each weighted by a softmax over the logits within
`2 * router_jitter_noise` (relative) of it (no renormalisation; always 2 experts); LayerNorm with bias
(eps `rms_norm_eps`) for every norm; q/k/v/o biases (`attention_bias`) and an `lm_head` bias
(`lm_head_bias`); a sliding window on every layer when `sliding_window` is set; RoPE default or
LongRoPE as transformers' `PhimoeRotaryEmbedding` computes it (short factors at every length)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from conversion.families.base import (
    TRANSPOSE,
    ConversionError,
    Family,
    KeyRule,
    require,
)
from conversion.families.common import (
    HP,
    LP,
    attention_rules,
    expert_counts,
    llama_fields,
    top_rules,
    update_counts,
)
from conversion.families.hf_rope import rope_params
from grape_jax.core.config import MoEConfig


def config_from_hf(hf: Mapping[str, Any]) -> MoEConfig:
    kind = rope_params(hf)["rope_type"] or "default"
    if kind not in ("default", "longrope"):  # PhimoeRotaryEmbedding reads long/short_mscale for any other
        raise ConversionError(
            f"config.json: rope_type {kind!r} is not supported for phimoe (supported: default, longrope)"
        )
    base = llama_fields(hf, eps=1e-5, theta=1e6, longrope=True)
    if base["top_k"] != 2:
        raise ConversionError(
            f"config.json: num_experts_per_tok={base['top_k']} is not supported for phimoe "
            f"(its sparsemixer router always routes to 2 experts)"
        )
    layers, count = base["num_layers"], int(require(hf, "num_local_experts"))
    window = hf.get("sliding_window")
    bias = bool(hf.get("attention_bias", False))
    return MoEConfig(
        family="phimoe",
        **base,
        moe_intermediate_size=int(require(hf, "intermediate_size")),
        num_experts=expert_counts(hf, layers, lambda layer: True, count),
        router="sparsemixer",
        norm_topk_prob=False,
        router_jitter_eps=float(hf.get("router_jitter_noise", 0.01)),
        norm="layer",
        lm_head_bias=bool(hf.get("lm_head_bias", False)),
        attention_bias=bias,
        attention_out_bias=bias,
        sliding_window=int(window) if window else None,
        layer_types=("sliding_attention",) * layers if window else None,
    )


def config_to_hf(cfg: MoEConfig, base: Mapping[str, Any]) -> dict[str, Any]:
    return update_counts(cfg, base, "num_local_experts")


def rules(cfg: MoEConfig) -> list[KeyRule]:
    m, h = LP + "mlp.", HP + "block_sparse_moe."
    return [
        *top_rules(),
        KeyRule("final_norm_bias", "model.norm.bias"),
        KeyRule("lm_head_bias", "lm_head.bias"),
        KeyRule(LP + "attn_norm_bias", HP + "input_layernorm.bias"),
        KeyRule(LP + "mlp_norm_bias", HP + "post_attention_layernorm.bias"),
        *attention_rules(cfg),
        KeyRule(m + "router", h + "gate.weight", TRANSPOSE),
        KeyRule(m + "w_gate", h + "experts.{e}.w1.weight", TRANSPOSE),
        KeyRule(m + "w_down", h + "experts.{e}.w2.weight", TRANSPOSE),
        KeyRule(m + "w_up", h + "experts.{e}.w3.weight", TRANSPOSE),
    ]


FAMILY = Family(
    name="phimoe",
    model_types=("phimoe",),
    architectures=("PhimoeForCausalLM",),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    rules=rules,
    experts_config_key="num_local_experts",
    routing="sparsemixer (eval): top-1, then top-1 of the rest, each a masked softmax weight; 2 experts",
)
