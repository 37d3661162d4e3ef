"""Mixtral (`MixtralForCausalLM`): softmax top-k with renormalisation, SwiGLU experts w1/w3/w2."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from conversion.families.base import TRANSPOSE, Family, KeyRule, require
from conversion.families.hf_rope import rope_theta
from grape_jax.core.config import MoEConfig


def config_from_hf(hf: Mapping[str, Any]) -> MoEConfig:
    layers = int(require(hf, "num_hidden_layers"))
    heads = int(require(hf, "num_attention_heads"))
    hidden = int(require(hf, "hidden_size"))
    per_layer = hf.get("num_experts_per_layer")
    experts = (
        tuple(int(e) for e in per_layer) if per_layer is not None else (int(require(hf, "num_local_experts")),) * layers
    )
    return MoEConfig(
        family="mixtral",
        vocab_size=int(require(hf, "vocab_size")),
        hidden_size=hidden,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        moe_intermediate_size=int(require(hf, "intermediate_size")),
        num_experts=experts,
        top_k=int(require(hf, "num_experts_per_tok")),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-5)),
        rope_theta=rope_theta(hf, 1e6),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096 * 32)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        router="softmax_topk",
        norm_topk_prob=True,
        sliding_window=hf.get("sliding_window"),
        layer_types=("sliding_attention",) * layers if hf.get("sliding_window") else None,
    )


def config_to_hf(cfg: MoEConfig, base: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    counts = sorted({e for e in cfg.num_experts if e > 0})
    out["num_local_experts"] = max(counts)
    out["num_experts_per_tok"] = cfg.top_k
    out.pop("num_experts_per_layer", None)
    return out


def rules(cfg: MoEConfig) -> list[KeyRule]:
    lp, hp = "layers.{l}.", "model.layers.{l}."
    moe = hp + "block_sparse_moe."
    return [
        KeyRule("embed", "model.embed_tokens.weight"),
        KeyRule("final_norm", "model.norm.weight"),
        KeyRule("lm_head", "lm_head.weight", TRANSPOSE),
        KeyRule(lp + "attn_norm", hp + "input_layernorm.weight"),
        KeyRule(lp + "mlp_norm", hp + "post_attention_layernorm.weight"),
        KeyRule(lp + "attn.q_proj", hp + "self_attn.q_proj.weight", TRANSPOSE),
        KeyRule(lp + "attn.k_proj", hp + "self_attn.k_proj.weight", TRANSPOSE),
        KeyRule(lp + "attn.v_proj", hp + "self_attn.v_proj.weight", TRANSPOSE),
        KeyRule(lp + "attn.o_proj", hp + "self_attn.o_proj.weight", TRANSPOSE),
        KeyRule(lp + "mlp.router", moe + "gate.weight", TRANSPOSE),
        KeyRule(lp + "mlp.w_gate", moe + "experts.{e}.w1.weight", TRANSPOSE),
        KeyRule(lp + "mlp.w_down", moe + "experts.{e}.w2.weight", TRANSPOSE),
        KeyRule(lp + "mlp.w_up", moe + "experts.{e}.w3.weight", TRANSPOSE),
    ]


FAMILY = Family(
    name="mixtral",
    model_types=("mixtral",),
    architectures=("MixtralForCausalLM",),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    rules=rules,
    experts_config_key="num_local_experts",
    routing="softmax over all experts, top-k, renormalised",
)
