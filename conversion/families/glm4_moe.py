"""GLM-4.5 / GLM-4.6 (`Glm4MoeForCausalLM`): DeepSeek-V3's router (sigmoid scores, selection by scores +
`e_score_correction_bias` within the best `topk_group` of `n_group` groups, weights the plain scores,
renormalised iff `norm_topk_prob`, times `routed_scaling_factor`) and key layout (`mlp.gate`,
`mlp.experts.{e}`, `mlp.shared_experts`; the first `first_k_dense_replace` layers dense), with plain
grouped-query attention: q/k/v bias (`attention_bias`, no o bias), per-head q/k RMSNorm (`use_qk_norm`)
before RoPE, and partial RoPE on the first `partial_rotary_factor` (default 0.5) of each head.

Released checkpoints append multi-token-prediction layers after `num_hidden_layers`; they are not read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from conversion.families.base import Family, KeyRule, require
from conversion.families.common import (
    attention_rules,
    expert_counts,
    llama_fields,
    per_layer_mlp_rules,
    top_rules,
    update_counts,
)
from conversion.families.deepseek_v3 import moe_rules
from conversion.families.hf_rope import partial_rotary_dim
from grape_jax.core.config import MoEConfig


def config_from_hf(hf: Mapping[str, Any]) -> MoEConfig:
    base = llama_fields(hf, eps=1e-5)
    layers = base["num_layers"]
    count, first_dense = int(require(hf, "n_routed_experts")), int(hf.get("first_k_dense_replace", 1) or 0)
    moe_f = int(require(hf, "moe_intermediate_size"))
    return MoEConfig(
        family="glm4_moe",
        **base,
        moe_intermediate_size=moe_f,
        num_experts=expert_counts(hf, layers, lambda layer: layer >= first_dense, count),
        dense_intermediate_size=int(hf.get("intermediate_size") or 0),
        router="sigmoid_group_topk",
        norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        n_group=int(hf.get("n_group") or 1),
        topk_group=int(hf.get("topk_group") or 1),
        shared_expert_intermediate_size=int(hf.get("n_shared_experts", 1) or 0) * moe_f,
        attention_bias=bool(hf.get("attention_bias", False)),
        qk_norm=bool(hf.get("use_qk_norm", False)),
        rotary_dim=partial_rotary_dim(hf, base["head_dim"], default_factor=0.5),
    )


def config_to_hf(cfg: MoEConfig, base: Mapping[str, Any]) -> dict[str, Any]:
    return update_counts(cfg, base, "n_routed_experts")


def rules(cfg: MoEConfig) -> list[KeyRule]:
    return [*top_rules(), *attention_rules(cfg), *per_layer_mlp_rules(cfg, moe_rules)]


FAMILY = Family(
    name="glm4_moe",
    model_types=("glm4_moe",),
    architectures=("Glm4MoeForCausalLM",),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    rules=rules,
    experts_config_key="n_routed_experts",
    routing="sigmoid + e_score_correction_bias, group-limited top-k, renormalised, x routed_scaling_factor",
)
