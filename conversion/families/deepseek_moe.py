"""DeepSeek-MoE 16B (HF `model_type: deepseek`, `DeepseekForCausalLM`, remote code, not in
transformers): Llama attention, fine-grained routed experts (`moe_intermediate_size`) with softmax
top-k, renormalised only if `norm_topk_prob` (False in the released models); `n_shared_experts`
shared experts as one ungated MLP `n_shared_experts * moe_intermediate_size` wide; layer `l` is MoE
iff `l >= first_k_dense_replace and l % moe_layer_freq == 0`, otherwise a dense `intermediate_size`
MLP. Key layout of the published checkpoint: `mlp.gate.weight`, `mlp.experts.{e}.{gate,up,down}_proj`,
`mlp.shared_experts.*`; export writes the same keys and config fields."""

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
from grape_jax.core.config import MoEConfig


def config_from_hf(hf: Mapping[str, Any]) -> MoEConfig:
    if hf.get("scoring_func", "softmax") != "softmax":
        raise ConversionError(f"config.json: scoring_func={hf['scoring_func']!r} is not supported")
    base = llama_fields(hf, eps=1e-6)
    count = int(require(hf, "n_routed_experts"))
    first_dense, freq = int(hf.get("first_k_dense_replace") or 0), int(hf.get("moe_layer_freq") or 1)
    moe_f = int(require(hf, "moe_intermediate_size"))
    return MoEConfig(
        family="deepseek",
        **base,
        moe_intermediate_size=moe_f,
        num_experts=expert_counts(
            hf, base["num_layers"], lambda layer: layer >= first_dense and layer % freq == 0, count
        ),
        dense_intermediate_size=int(hf.get("intermediate_size") or 0),
        router="softmax_topk",
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=int(hf.get("n_shared_experts") or 0) * moe_f,
        attention_bias=bool(hf.get("attention_bias", False)),
        attention_out_bias=bool(hf.get("attention_bias", False)),
    )


def config_to_hf(cfg: MoEConfig, base: Mapping[str, Any]) -> dict[str, Any]:
    return update_counts(cfg, base, "n_routed_experts")


def moe_rules(ours: str, hf: str) -> list[KeyRule]:
    return [
        KeyRule(ours + "router", hf + "gate.weight", TRANSPOSE),
        *swiglu_rules(ours, hf + "experts.{e}."),
        *swiglu_rules(ours + "shared.", hf + "shared_experts."),
    ]


def rules(cfg: MoEConfig) -> list[KeyRule]:
    return [*top_rules(), *attention_rules(cfg), *per_layer_mlp_rules(cfg, moe_rules)]


FAMILY = Family(
    name="deepseek",
    model_types=("deepseek",),
    architectures=("DeepseekForCausalLM",),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    rules=rules,
    experts_config_key="n_routed_experts",
    in_transformers=False,  # DeepSeek-MoE checkpoints carry their own modeling code
    routing="softmax, top-k (renormalised iff norm_topk_prob); + shared experts",
)
