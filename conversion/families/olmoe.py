"""OLMoE (`OlmoeForCausalLM`): 64 experts top-8, softmax top-k (renormalised iff `norm_topk_prob`,
False in OLMoE-1B-7B), q/k RMSNorm over the whole projected q ([heads*head_dim]) and k
([kv_heads*head_dim]) before the head split, optional `clip_qkv`."""

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


def config_from_hf(hf: Mapping[str, Any]) -> MoEConfig:
    base = llama_fields(hf, eps=1e-5)
    count = int(require(hf, "num_experts"))
    clip = hf.get("clip_qkv")
    return MoEConfig(
        family="olmoe",
        **base,
        moe_intermediate_size=int(require(hf, "intermediate_size")),
        num_experts=expert_counts(hf, base["num_layers"], lambda layer: True, count),
        router="softmax_topk",
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
        attention_out_bias=bool(hf.get("attention_bias", False)),
        qk_norm=True,
        qk_norm_full=True,
        clip_qkv=None if clip is None else float(clip),
    )


def config_to_hf(cfg: MoEConfig, base: Mapping[str, Any]) -> dict[str, Any]:
    return update_counts(cfg, base, "num_experts")


def moe_rules(ours: str, hf: str) -> list[KeyRule]:
    return [KeyRule(ours + "router", hf + "gate.weight", TRANSPOSE), *swiglu_rules(ours, hf + "experts.{e}.")]


def rules(cfg: MoEConfig) -> list[KeyRule]:
    return [*top_rules(), *attention_rules(cfg), *per_layer_mlp_rules(cfg, moe_rules)]


FAMILY = Family(
    name="olmoe",
    model_types=("olmoe",),
    architectures=("OlmoeForCausalLM",),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    rules=rules,
    experts_config_key="num_experts",
    routing="softmax, top-k, renormalised iff norm_topk_prob",
)
