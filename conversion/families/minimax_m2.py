"""MiniMax-M2 (`MiniMaxM2ForCausalLM`): every layer MoE; router sigmoid scores, selection by scores +
`e_score_correction_bias` (top-k, no groups), weights the plain scores always renormalised (the
DeepSeek-V3 router with one group, `norm_topk_prob` on, scaling 1); q/k RMSNorm over the whole
projection before RoPE; partial RoPE on `rotary_dim` (or `partial_rotary_factor`) of each head; experts
`block_sparse_moe.experts.{e}.w1/w3/w2` (`intermediate_size` wide) as in Mixtral."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from conversion.families.base import TRANSPOSE, Family, KeyRule, require
from conversion.families.common import (
    HP,
    LP,
    attention_rules,
    expert_counts,
    llama_fields,
    top_rules,
    update_counts,
)
from conversion.families.hf_rope import partial_rotary_dim
from grape_jax.core.config import MoEConfig

HEAD_DIM = 128  # MiniMaxM2Config's default


def config_from_hf(hf: Mapping[str, Any]) -> MoEConfig:
    base = llama_fields(hf, eps=1e-6, theta=5e6)
    base["head_dim"] = head_dim = int(hf.get("head_dim") or HEAD_DIM)
    rotary = hf.get("rotary_dim")
    default_factor = float(rotary) / head_dim if rotary else 1.0  # transformers: rotary_dim / head_dim
    count = int(require(hf, "num_local_experts"))
    return MoEConfig(
        family="minimax_m2",
        **base,
        moe_intermediate_size=int(require(hf, "intermediate_size")),
        num_experts=expert_counts(hf, base["num_layers"], lambda layer: True, count),
        router="sigmoid_group_topk",
        norm_topk_prob=True,
        qk_norm=True,
        qk_norm_full=True,
        rotary_dim=partial_rotary_dim(hf, head_dim, default_factor=default_factor),
    )


def config_to_hf(cfg: MoEConfig, base: Mapping[str, Any]) -> dict[str, Any]:
    return update_counts(cfg, base, "num_local_experts")


def rules(cfg: MoEConfig) -> list[KeyRule]:
    m, h = LP + "mlp.", HP + "block_sparse_moe."
    return [
        *top_rules(),
        *attention_rules(cfg),
        KeyRule(m + "router", h + "gate.weight", TRANSPOSE),
        KeyRule(m + "router_bias", h + "e_score_correction_bias"),
        KeyRule(m + "w_gate", h + "experts.{e}.w1.weight", TRANSPOSE),
        KeyRule(m + "w_down", h + "experts.{e}.w2.weight", TRANSPOSE),
        KeyRule(m + "w_up", h + "experts.{e}.w3.weight", TRANSPOSE),
    ]


FAMILY = Family(
    name="minimax_m2",
    model_types=("minimax_m2",),
    architectures=("MiniMaxM2ForCausalLM",),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    rules=rules,
    experts_config_key="num_local_experts",
    routing="sigmoid + e_score_correction_bias, top-k, renormalised",
)
