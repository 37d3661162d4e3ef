"""Llama-4 text decoder (`Llama4ForCausalLM`, model_type `llama4_text`; and the language model of the
multimodal `llama4` checkpoints, keys under `language_model.`).

MoE layers (`moe_layers`, default every `interleave_moe_layer_step`-th) route top-k by logit with weight
sigmoid(logit) that scales the expert's *input*, plus an always-on shared expert; the experts are stored
stacked, `feed_forward.experts.gate_up_proj [E, d, 2f]` (x @ W layout, gate then up) and `down_proj
[E, f, d]`; dense layers are `feed_forward.{gate,up,down}_proj` of `intermediate_size_mlp`. Attention:
RoPE on interleaved pairs except on NoPE layers (`no_rope_layers[l] == 0`), weightless L2 q/k norm after
RoPE (`use_qk_norm`, RoPE layers only), query temperature tuning on NoPE layers
(`attn_temperature_tuning`, `floor_scale`, `attn_scale`), chunked attention on `chunked_attention`
layers (`attention_chunk_size`), q/k/v/o biases with `attention_bias`.

A multimodal checkpoint is read for its language model and exported as its text model (`llama4_text`,
`Llama4ForCausalLM`): the vision tower and projector are not carried over.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from conversion.families.base import (
    IDENTITY,
    TRANSPOSE,
    Concatenated,
    ConversionError,
    Family,
    KeyRule,
    require,
)
from conversion.families.common import (
    attention_rules,
    expert_counts,
    llama_fields,
    swiglu_rules,
    update_counts,
)
from grape_jax.core.config import MoEConfig

TEXT_ARCH, TEXT_TYPE = "Llama4ForCausalLM", "llama4_text"


def config_from_hf(hf: Mapping[str, Any]) -> MoEConfig:
    base = llama_fields(hf, eps=1e-5, theta=500000.0)
    layers, count = base["num_layers"], int(require(hf, "num_local_experts"))
    step = int(hf.get("interleave_moe_layer_step") or 1)
    moe = hf.get("moe_layers")
    moe = set(range(step - 1, layers, step) if moe is None else moe)
    interval = int(hf.get("no_rope_layer_interval") or 4)
    no_rope = hf.get("no_rope_layers") or [int((layer + 1) % interval != 0) for layer in range(layers)]
    types = hf.get("layer_types") or ["chunked_attention" if r else "full_attention" for r in no_rope]
    chunk = hf.get("attention_chunk_size")
    if "chunked_attention" in types and not chunk:
        raise ConversionError("config.json: attention_chunk_size is required by chunked_attention layers")
    f = int(require(hf, "intermediate_size"))
    bias = bool(hf.get("attention_bias", False))
    return MoEConfig(
        family=TEXT_TYPE,
        **base,
        moe_intermediate_size=f,
        num_experts=expert_counts(hf, layers, lambda layer: layer in moe, count),
        dense_intermediate_size=int(hf.get("intermediate_size_mlp") or 0),
        router="topk_sigmoid",
        norm_topk_prob=False,
        router_scales_input=True,
        shared_expert_intermediate_size=f,
        attention_bias=bias,
        attention_out_bias=bias,
        rope_interleave=True,
        rope_layers=tuple(bool(r) for r in no_rope),
        qk_l2_norm=bool(hf.get("use_qk_norm", True)),
        attn_temperature_tuning=bool(hf.get("attn_temperature_tuning", True)),
        attn_floor_scale=float(hf.get("floor_scale", 8192)),
        attn_scale=float(hf.get("attn_scale", 0.1)),
        attention_chunk_size=int(chunk) if chunk else None,
        layer_types=tuple(types),
    )


def text_config(hf: Mapping[str, Any]) -> dict[str, Any]:
    """The text decoder's config of a multimodal `llama4` config.json."""
    text = dict(require(hf, "text_config"))
    for key in ("dtype", "torch_dtype"):
        if key in hf and key not in text:
            text[key] = hf[key]
    return text


def config_to_hf(cfg: MoEConfig, base: Mapping[str, Any]) -> dict[str, Any]:
    if "text_config" in base:  # a multimodal source exports its text model
        base = {**text_config(base), "model_type": TEXT_TYPE, "architectures": [TEXT_ARCH]}
    return update_counts(cfg, base, "num_local_experts")


def _rules(cfg: MoEConfig, prefix: str) -> list[KeyRule]:
    hp, out = prefix + "model.layers.{l}.", []
    out += [
        KeyRule("embed", prefix + "model.embed_tokens.weight"),
        KeyRule("final_norm", prefix + "model.norm.weight"),
        KeyRule("lm_head", prefix + "lm_head.weight", TRANSPOSE),
        KeyRule("layers.{l}.attn_norm", hp + "input_layernorm.weight"),
        KeyRule("layers.{l}.mlp_norm", hp + "post_attention_layernorm.weight"),
    ]
    out += [KeyRule(r.ours, r.hf.replace("model.layers.{l}.", hp), r.transform) for r in attention_rules(cfg)]
    for layer, e in enumerate(cfg.num_experts):
        ours, ff = f"layers.{layer}.mlp.", f"{prefix}model.layers.{layer}.feed_forward."
        if not e:
            out += swiglu_rules(ours, ff)
            continue
        f = cfg.moe_intermediate_size
        out += [
            KeyRule(ours + "router", ff + "router.weight", TRANSPOSE),
            KeyRule(ours + "w_gate", ff + "experts.gate_up_proj", Concatenated(0, f)),
            KeyRule(ours + "w_up", ff + "experts.gate_up_proj", Concatenated(1, f)),
            KeyRule(ours + "w_down", ff + "experts.down_proj", IDENTITY),
            *swiglu_rules(ours + "shared.", ff + "shared_expert."),
        ]
    return out


ROUTING = "top-k by logit, weight sigmoid(logit) scaling the expert input; + shared expert"

FAMILY = Family(
    name=TEXT_TYPE,
    model_types=(TEXT_TYPE,),
    architectures=(TEXT_ARCH,),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    rules=lambda cfg: _rules(cfg, ""),
    experts_config_key="num_local_experts",
    routing=ROUTING,
)

MULTIMODAL = Family(
    name="llama4",
    model_types=("llama4",),
    architectures=("Llama4ForConditionalGeneration",),
    config_from_hf=lambda hf: config_from_hf(text_config(hf)),
    config_to_hf=config_to_hf,
    rules=lambda cfg: _rules(cfg, "language_model."),
    experts_config_key="num_local_experts",
    routing=ROUTING,
    export_as=TEXT_TYPE,
)
