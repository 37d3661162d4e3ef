"""Qwen2-MoE (`Qwen2MoeForCausalLM`): softmax top-k (renormalised iff `norm_topk_prob`), qkv bias, a
shared expert scaled by `sigmoid(x @ shared_expert_gate)`; layers in `mlp_only_layers` or off the
`decoder_sparse_step` grid are dense (`intermediate_size`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from conversion.families.base import TRANSPOSE, Family, KeyRule, require
from conversion.families.common import (
    attention_rules,
    expert_counts,
    llama_fields,
    per_layer_mlp_rules,
    swiglu_rules,
    top_rules,
    update_counts,
)
from grape_jax.core.config import MoEConfig


def sparse_layers(hf: Mapping[str, Any], count: int):
    """transformers' rule for which Qwen-MoE layers are sparse."""
    mlp_only = set(hf.get("mlp_only_layers") or [])
    step = int(hf.get("decoder_sparse_step") or 1)
    return lambda layer: layer not in mlp_only and count > 0 and (layer + 1) % step == 0


def sliding(hf: Mapping[str, Any], num_layers: int) -> dict[str, Any]:
    if not hf.get("use_sliding_window") or not hf.get("sliding_window"):
        return {}
    types = hf.get("layer_types") or ["sliding_attention"] * num_layers
    return dict(sliding_window=int(hf["sliding_window"]), layer_types=tuple(types))


def config_from_hf(hf: Mapping[str, Any]) -> MoEConfig:
    base = llama_fields(hf, eps=1e-6)
    layers, count = base["num_layers"], int(require(hf, "num_experts"))
    return MoEConfig(
        family="qwen2_moe",
        **base,
        moe_intermediate_size=int(require(hf, "moe_intermediate_size")),
        num_experts=expert_counts(hf, layers, sparse_layers(hf, count), count),
        dense_intermediate_size=int(hf.get("intermediate_size") or 0),
        router="softmax_topk",
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=int(require(hf, "shared_expert_intermediate_size")),
        shared_expert_gate=True,
        attention_bias=bool(hf.get("qkv_bias", True)),
        **sliding(hf, layers),
    )


def config_to_hf(cfg: MoEConfig, base: Mapping[str, Any]) -> dict[str, Any]:
    return update_counts(cfg, base, "num_experts")


def moe_rules(ours: str, hf: str) -> list[KeyRule]:
    return [
        KeyRule(ours + "router", hf + "gate.weight", TRANSPOSE),
        *swiglu_rules(ours, hf + "experts.{e}."),
        *swiglu_rules(ours + "shared.", hf + "shared_expert."),
        KeyRule(ours + "shared_gate", hf + "shared_expert_gate.weight", TRANSPOSE),
    ]


def rules(cfg: MoEConfig) -> list[KeyRule]:
    return [*top_rules(), *attention_rules(cfg), *per_layer_mlp_rules(cfg, moe_rules)]


FAMILY = Family(
    name="qwen2_moe",
    model_types=("qwen2_moe",),
    architectures=("Qwen2MoeForCausalLM",),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    rules=rules,
    experts_config_key="num_experts",
    routing="softmax, top-k (renormalised iff norm_topk_prob); + sigmoid-gated shared expert",
)
