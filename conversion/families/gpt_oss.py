"""GPT-OSS (`GptOssForCausalLM`): top-k of (logits + router bias) then softmax over the k; experts
stored stacked, `gate_up_proj [E, d, 2f]` with gate and up as interleaved columns (`[..., ::2]`,
`[..., 1::2]`, + bias `[E, 2f]`), `down_proj [E, f, d]` (+ bias); clamped SwiGLU
`(clamp(up, ±limit) + 1) * g * sigmoid(alpha * g)`, `g = min(gate, limit)`; attention with q/k/v/o
biases and per-head sinks, YaRN RoPE, alternating sliding-window layers (`layer_types`).

Released checkpoints are MXFP4 (`*_blocks`/`*_scales`, `quantization_config` in config.json): read
through `quantized_rules`, decoded per expert slice to bf16; exports are bf16/fp32 without
`quantization_config`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from conversion.families.base import (
    IDENTITY,
    TRANSPOSE,
    ConversionError,
    Family,
    Interleaved,
    KeyRule,
    Mxfp4,
    hf_layer_types,
    require,
)
from conversion.families.common import (
    HP,
    LP,
    attention_rules,
    expert_counts,
    llama_fields,
    top_rules,
    update_counts,
)
from grape_jax.core.config import MoEConfig


def config_from_hf(hf: Mapping[str, Any]) -> MoEConfig:
    base = llama_fields(hf, eps=1e-5)
    layers = base["num_layers"]
    count = int(require(hf, "num_local_experts"))
    types = hf_layer_types(hf, layers)
    return MoEConfig(
        family="gpt_oss",
        **base,
        moe_intermediate_size=int(require(hf, "intermediate_size")),
        num_experts=expert_counts(hf, layers, lambda layer: True, count),
        router="topk_softmax",
        router_bias=True,
        expert_bias=True,
        activation="gptoss_clamped_swiglu",
        swiglu_limit=float(hf.get("swiglu_limit", 7.0)),
        swiglu_alpha=float(hf.get("swiglu_alpha", 1.702)),
        attention_bias=bool(hf.get("attention_bias", True)),
        attention_out_bias=bool(hf.get("attention_bias", True)),
        attention_sinks=True,
        sliding_window=int(hf["sliding_window"]) if hf.get("sliding_window") else None,
        layer_types=types,
    )


def config_to_hf(cfg: MoEConfig, base: Mapping[str, Any]) -> dict[str, Any]:
    return update_counts(cfg, base, "num_local_experts")  # export drops quantization_config (dequantised)


def _experts(gate_up, down) -> list[KeyRule]:
    m, h = LP + "mlp.", HP + "mlp."
    return [
        KeyRule(m + "router", h + "router.weight", TRANSPOSE),
        KeyRule(m + "router_bias", h + "router.bias"),
        KeyRule(m + "w_gate", h + "experts.gate_up_proj", gate_up(0)),
        KeyRule(m + "w_up", h + "experts.gate_up_proj", gate_up(1)),
        KeyRule(m + "w_down", h + "experts.down_proj", down),
        KeyRule(m + "b_gate", h + "experts.gate_up_proj_bias", Interleaved(0)),
        KeyRule(m + "b_up", h + "experts.gate_up_proj_bias", Interleaved(1)),
        KeyRule(m + "b_down", h + "experts.down_proj_bias"),
    ]


def rules(cfg: MoEConfig) -> list[KeyRule]:
    return [*top_rules(), *attention_rules(cfg), *_experts(Interleaved, IDENTITY)]


def quantized_rules(cfg: MoEConfig, quant: Mapping[str, Any]) -> list[KeyRule]:
    if quant.get("quant_method") != "mxfp4":
        raise ConversionError(
            f"config.json: quant_method {quant.get('quant_method')!r} is not supported for gpt_oss (only 'mxfp4')"
        )
    return [
        *top_rules(),
        *attention_rules(cfg),
        *_experts(lambda part: Mxfp4(part, 2), Mxfp4(0, 1)),
    ]


FAMILY = Family(
    name="gpt_oss",
    model_types=("gpt_oss",),
    architectures=("GptOssForCausalLM",),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    rules=rules,
    experts_config_key="num_local_experts",
    quantized_rules=quantized_rules,
    routing="top-k of (logits + router bias), softmax over the k",
)
