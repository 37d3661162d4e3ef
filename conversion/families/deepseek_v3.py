"""DeepSeek-V3 (`DeepseekV3ForCausalLM`, transformers-native; also V2-Lite-style configs with
`q_lora_rank: null`): multi-head latent attention (`grape_jax.core.mla`) with interleaved RoPE on the
rotary part, sigmoid router scores plus `e_score_correction_bias` for selection only, group-limited
top-k (`n_group`, `topk_group`), renormalisation iff `norm_topk_prob`, times `routed_scaling_factor`;
the first `first_k_dense_replace` layers are dense; `n_shared_experts` shared experts (one MLP).

Planners keep every MoE layer's expert count a multiple of `n_group`, with at least two experts per
group (the group score is the sum of each group's top two): `MoEConfig.expert_count_multiple` and
`min_routable_experts`, recorded in the statistics the planners read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from conversion.families.base import (
    IDENTITY,
    TRANSPOSE,
    ConversionError,
    Family,
    KeyRule,
    require,
)
from conversion.families.common import (
    HP,
    LP,
    expert_counts,
    llama_fields,
    per_layer_mlp_rules,
    swiglu_rules,
    top_rules,
    update_counts,
)
from conversion.families.hf_rope import rope_params
from grape_jax.core.config import MoEConfig
from grape_jax.core.rope import yarn_mscale


def _check_router(hf: Mapping[str, Any]) -> None:
    for key, want in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
        if hf.get(key, want) != want:
            raise ConversionError(f"config.json: {key}={hf[key]!r} is not supported (only {want!r})")


def config_from_hf(hf: Mapping[str, Any]) -> MoEConfig:
    _check_router(hf)
    rot, nope = int(require(hf, "qk_rope_head_dim")), int(require(hf, "qk_nope_head_dim"))
    base = llama_fields(hf, eps=1e-6)
    base["head_dim"] = nope + rot  # RoPE (and YaRN) runs over the qk_rope_head_dim part only
    base["num_kv_heads"] = base["num_heads"]  # MLA expands keys/values to every head
    scale = (nope + rot) ** -0.5
    params = rope_params(hf)
    if base.get("rope_type") == "yarn" and params.get("mscale_all_dim"):
        scale *= yarn_mscale(base["rope_factor"], params["mscale_all_dim"]) ** 2
    count, first_dense = int(require(hf, "n_routed_experts")), int(hf.get("first_k_dense_replace") or 0)
    layers = base["num_layers"]
    n_shared = int(hf.get("n_shared_experts") or 0)
    moe_f = int(require(hf, "moe_intermediate_size"))
    return MoEConfig(
        family="deepseek_v3",
        **base,
        moe_intermediate_size=moe_f,
        num_experts=expert_counts(hf, layers, lambda layer: layer >= first_dense, count),
        dense_intermediate_size=int(hf.get("intermediate_size") or 0),
        router="sigmoid_group_topk",
        norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        n_group=int(hf.get("n_group") or 1),
        topk_group=int(hf.get("topk_group") or 1),
        shared_expert_intermediate_size=n_shared * moe_f,
        attention_bias=bool(hf.get("attention_bias", False)),
        attention_scale=scale,
        attention="mla",
        q_lora_rank=int(hf.get("q_lora_rank") or 0),
        kv_lora_rank=int(require(hf, "kv_lora_rank")),
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rot,
        v_head_dim=int(require(hf, "v_head_dim")),
        rope_interleave=bool(hf.get("rope_interleave", True)),
    )


def config_to_hf(cfg: MoEConfig, base: Mapping[str, Any]) -> dict[str, Any]:
    return update_counts(cfg, base, "n_routed_experts")


def mla_rules(cfg: MoEConfig) -> list[KeyRule]:
    a, h = LP + "attn.", HP + "self_attn."
    out = [
        KeyRule(a + "kv_a_proj", h + "kv_a_proj_with_mqa.weight", TRANSPOSE),
        KeyRule(a + "kv_a_norm", h + "kv_a_layernorm.weight"),
        KeyRule(a + "kv_b_proj", h + "kv_b_proj.weight", TRANSPOSE),
        KeyRule(a + "o_proj", h + "o_proj.weight", TRANSPOSE),
    ]
    if cfg.q_lora_rank:
        out += [
            KeyRule(a + "q_a_proj", h + "q_a_proj.weight", TRANSPOSE),
            KeyRule(a + "q_a_norm", h + "q_a_layernorm.weight"),
            KeyRule(a + "q_b_proj", h + "q_b_proj.weight", TRANSPOSE),
        ]
    else:
        out.append(KeyRule(a + "q_proj", h + "q_proj.weight", TRANSPOSE))
    if cfg.attention_bias:
        out += [
            KeyRule(a + "kv_a_bias", h + "kv_a_proj_with_mqa.bias"),
            KeyRule(a + "o_bias", h + "o_proj.bias"),
        ]
        if cfg.q_lora_rank:
            out.append(KeyRule(a + "q_a_bias", h + "q_a_proj.bias"))
    return out


def moe_rules(ours: str, hf: str) -> list[KeyRule]:
    return [
        KeyRule(ours + "router", hf + "gate.weight", TRANSPOSE),
        KeyRule(ours + "router_bias", hf + "gate.e_score_correction_bias", IDENTITY),
        *swiglu_rules(ours, hf + "experts.{e}."),
        *swiglu_rules(ours + "shared.", hf + "shared_experts."),
    ]


def rules(cfg: MoEConfig) -> list[KeyRule]:
    return [*top_rules(), *mla_rules(cfg), *per_layer_mlp_rules(cfg, moe_rules)]


FAMILY = Family(
    name="deepseek_v3",
    model_types=("deepseek_v3",),
    architectures=("DeepseekV3ForCausalLM",),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    rules=rules,
    experts_config_key="n_routed_experts",
    routing="sigmoid + e_score_correction_bias, group-limited top-k, renormalised, x routed_scaling_factor",
)
