"""Qwen3-MoE (`Qwen3MoeForCausalLM`): Qwen2-MoE without shared expert or qkv bias, with per-head q/k
RMSNorm; softmax top-k renormalised iff `norm_topk_prob` (True in the released models)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from conversion.families.base import TRANSPOSE, ConversionError, Family, KeyRule, require
from conversion.families.common import (
    attention_rules,
    expert_counts,
    llama_fields,
    per_layer_mlp_rules,
    swiglu_rules,
    top_rules,
    update_counts,
)
from conversion.families.qwen2_moe import sparse_layers
from grape_jax.core.config import MoEConfig

COUNT_KEYS = ("num_experts", "num_local_experts")  # released configs / transformers 5's attribute


def config_from_hf(hf: Mapping[str, Any]) -> MoEConfig:
    base = llama_fields(hf, eps=1e-6)
    layers = base["num_layers"]
    counts = [hf[k] for k in COUNT_KEYS if hf.get(k) is not None]
    if not counts:
        raise ConversionError("config.json: required field 'num_experts' is missing")
    count = int(counts[0])
    window = int(hf["sliding_window"]) if hf.get("use_sliding_window") and hf.get("sliding_window") else None
    return MoEConfig(
        family="qwen3_moe",
        **base,
        moe_intermediate_size=int(require(hf, "moe_intermediate_size")),
        num_experts=expert_counts(hf, layers, sparse_layers(hf, count), count),
        dense_intermediate_size=int(hf.get("intermediate_size") or 0),
        router="softmax_topk",
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
        qk_norm=True,
        sliding_window=window,
        layer_types=("sliding_attention",) * layers if window else None,
    )


def config_to_hf(cfg: MoEConfig, base: Mapping[str, Any]) -> dict[str, Any]:
    return update_counts(cfg, base, *COUNT_KEYS)


def moe_rules(ours: str, hf: str) -> list[KeyRule]:
    return [KeyRule(ours + "router", hf + "gate.weight", TRANSPOSE), *swiglu_rules(ours, hf + "experts.{e}.")]


def rules(cfg: MoEConfig) -> list[KeyRule]:
    return [*top_rules(), *attention_rules(cfg), *per_layer_mlp_rules(cfg, moe_rules)]


FAMILY = Family(
    name="qwen3_moe",
    model_types=("qwen3_moe",),
    architectures=("Qwen3MoeForCausalLM",),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    rules=rules,
    experts_config_key="num_experts",
    routing="softmax, top-k, renormalised iff norm_topk_prob",
)
