"""ERNIE-4.5 MoE (`Ernie4_5_MoeForCausalLM`): softmax router whose *selection* adds the per-expert
`moe_statics.e_score_correction_bias` ([1, E]) to the probabilities, weights the plain probabilities
renormalised by max(sum, `moe_norm_min`); shared experts (`moe_num_shared_experts` x
`moe_intermediate_size`, ungated) added; layers `moe_layer_start_index..moe_layer_end_index` on the
`moe_layer_interval` grid are MoE, the others dense (`intermediate_size`); RoPE on interleaved pairs
over the whole head; embeddings tied by default. `use_bias` checkpoints are refused."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from conversion.families.base import (
    TRANSPOSE,
    ConversionError,
    Family,
    KeyRule,
    LeadingUnitAxis,
    require,
)
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


def moe_layers(hf: Mapping[str, Any], num_layers: int):
    """transformers' rule: `(l + 1) % moe_layer_interval == 0` and start <= l <= end (end -1: last)."""
    fields = {
        k: hf.get(k, d)
        for k, d in (("moe_layer_start_index", 1), ("moe_layer_end_index", -1), ("moe_layer_interval", 1))
    }
    for key, value in fields.items():
        if not isinstance(value, int):
            raise ConversionError(f"config.json: {key}={value!r} is not supported (expected one integer)")
    start, interval = fields["moe_layer_start_index"], fields["moe_layer_interval"]
    end = num_layers - 1 if fields["moe_layer_end_index"] == -1 else fields["moe_layer_end_index"]
    return lambda layer: (layer + 1) % interval == 0 and start <= layer <= end


def config_from_hf(hf: Mapping[str, Any]) -> MoEConfig:
    if hf.get("use_bias"):
        raise ConversionError(
            "config.json: use_bias=true is not supported for ernie4_5_moe (no released model "
            "uses it, and its routed experts would drop the biases)"
        )
    base = llama_fields({**hf, "num_experts_per_tok": require(hf, "moe_k")}, eps=1e-5, theta=500000.0)
    base["tie_word_embeddings"] = bool(hf.get("tie_word_embeddings", True))
    layers, count = base["num_layers"], int(require(hf, "moe_num_experts"))
    moe_f = int(require(hf, "moe_intermediate_size"))
    return MoEConfig(
        family="ernie4_5_moe",
        **base,
        moe_intermediate_size=moe_f,
        num_experts=expert_counts(hf, layers, moe_layers(hf, layers), count),
        dense_intermediate_size=int(hf.get("intermediate_size") or 0),
        router="softmax_bias_topk",
        norm_topk_prob=True,
        router_norm_min=float(hf.get("moe_norm_min", 1e-12)),
        shared_expert_intermediate_size=int(hf.get("moe_num_shared_experts", 0) or 0) * moe_f,
        rope_interleave=True,
    )


def config_to_hf(cfg: MoEConfig, base: Mapping[str, Any]) -> dict[str, Any]:
    out = update_counts(cfg, base, "moe_num_experts")
    if "num_experts_per_tok" not in base:  # ERNIE's own name for it is moe_k
        del out["num_experts_per_tok"]
    out["moe_k"] = cfg.top_k
    return out


def moe_rules(ours: str, hf: str) -> list[KeyRule]:
    return [
        KeyRule(ours + "router", hf + "gate.weight", TRANSPOSE),
        KeyRule(ours + "router_bias", hf + "moe_statics.e_score_correction_bias", LeadingUnitAxis()),
        *swiglu_rules(ours, hf + "experts.{e}."),
        *swiglu_rules(ours + "shared.", hf + "shared_experts."),
    ]


def rules(cfg: MoEConfig) -> list[KeyRule]:
    return [*top_rules(), *attention_rules(cfg), *per_layer_mlp_rules(cfg, moe_rules)]


FAMILY = Family(
    name="ernie4_5_moe",
    model_types=("ernie4_5_moe",),
    architectures=("Ernie4_5_MoeForCausalLM",),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    rules=rules,
    experts_config_key="moe_num_experts",
    routing="softmax, top-k of probabilities + e_score_correction_bias, renormalised",
)
