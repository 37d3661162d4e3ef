"""Key-table pieces shared by the Llama-style families (Qwen2/3-MoE, OLMoE, DeepSeek, GPT-OSS).

Tables are written per layer (literal layer numbers) where dense and MoE layers coexist, so each of
our parameters matches exactly one rule.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from conversion.families.base import TRANSPOSE, ConversionError, KeyRule, require
from conversion.families.hf_rope import rope_fields
from grape_jax.core.config import MoEConfig

LP, HP = "layers.{l}.", "model.layers.{l}."


def top_rules() -> list[KeyRule]:
    return [
        KeyRule("embed", "model.embed_tokens.weight"),
        KeyRule("final_norm", "model.norm.weight"),
        KeyRule("lm_head", "lm_head.weight", TRANSPOSE),
        KeyRule(LP + "attn_norm", HP + "input_layernorm.weight"),
        KeyRule(LP + "mlp_norm", HP + "post_attention_layernorm.weight"),
    ]


def attention_rules(cfg: MoEConfig) -> list[KeyRule]:
    """q/k/v/o projections (+ biases, q/k norms, sinks) under `self_attn`."""
    a, h = LP + "attn.", HP + "self_attn."
    out = [KeyRule(a + f"{n}_proj", h + f"{n}_proj.weight", TRANSPOSE) for n in "qkvo"]
    if cfg.attention_bias:
        out += [KeyRule(a + f"{n}_bias", h + f"{n}_proj.bias") for n in "qkv"]
    if cfg.attention_out_bias:
        out.append(KeyRule(a + "o_bias", h + "o_proj.bias"))
    if cfg.qk_norm:
        out += [KeyRule(a + f"{n}_norm", h + f"{n}_norm.weight") for n in "qk"]
    if cfg.attention_sinks:
        out.append(KeyRule(a + "sinks", h + "sinks"))
    return out


def swiglu_rules(ours: str, hf: str) -> list[KeyRule]:
    """w_gate/w_up/w_down <- gate_proj/up_proj/down_proj (`hf` may hold `{e}`)."""
    return [
        KeyRule(ours + "w_gate", hf + "gate_proj.weight", TRANSPOSE),
        KeyRule(ours + "w_up", hf + "up_proj.weight", TRANSPOSE),
        KeyRule(ours + "w_down", hf + "down_proj.weight", TRANSPOSE),
    ]


def per_layer_mlp_rules(cfg: MoEConfig, moe: Callable[[str, str], list[KeyRule]]) -> list[KeyRule]:
    """MLP rules with literal layer numbers: `moe(ours_prefix, hf_prefix)` for MoE layers, a dense
    `mlp.{gate,up,down}_proj` for dense ones."""
    out = []
    for layer, e in enumerate(cfg.num_experts):
        ours, hf = f"layers.{layer}.mlp.", f"model.layers.{layer}.mlp."
        out += moe(ours, hf) if e else swiglu_rules(ours, hf)
    return out


def expert_counts(hf: Mapping[str, Any], num_layers: int, is_moe: Callable[[int], bool], count: int) -> tuple[int, ...]:
    """Per-layer expert counts: `num_experts_per_layer` (our pruned exports) or the family's rule."""
    per_layer = hf.get("num_experts_per_layer")
    if per_layer is not None:
        if len(per_layer) != num_layers:
            raise ConversionError(
                f"config.json: num_experts_per_layer has {len(per_layer)} entries for {num_layers} layers"
            )
        return tuple(int(e) for e in per_layer)
    return tuple(count if is_moe(layer) else 0 for layer in range(num_layers))


def update_counts(cfg: MoEConfig, base: Mapping[str, Any], *keys: str) -> dict[str, Any]:
    """config.json of an export: the expert-count field(s) present in `base` (the first of `keys`
    when none is) set to the largest layer count, `num_experts_per_tok`, no per-layer list (remote
    code export adds it back for uneven counts)."""
    out = dict(base)
    largest = max(e for e in cfg.num_experts if e > 0)
    present = [k for k in keys if k in out] or [keys[0]]
    for k in present:
        out[k] = largest
    out["num_experts_per_tok"] = cfg.top_k
    out.pop("num_experts_per_layer", None)
    return out


def llama_fields(
    hf: Mapping[str, Any], *, eps: float, theta: float = 10000.0, longrope: bool = False
) -> dict[str, Any]:
    """MoEConfig fields every family reads the same way (sizes, heads, norms, RoPE, tying)."""
    heads = int(require(hf, "num_attention_heads"))
    hidden = int(require(hf, "hidden_size"))
    return dict(
        vocab_size=int(require(hf, "vocab_size")),
        hidden_size=hidden,
        num_layers=int(require(hf, "num_hidden_layers")),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or hidden // heads),
        top_k=int(require(hf, "num_experts_per_tok")),
        rms_norm_eps=float(hf.get("rms_norm_eps", eps)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        **rope_fields(hf, theta, longrope=longrope),
    )
