"""One declaration per parameter: name, shape, logical axes and initialiser, derived from `MoEConfig`.

Everything else is derived from this table: the NNX module tree (`grape_jax.core.model`: each entry is an
`nnx.Param` at the same dotted path, carrying its logical axes and merge role), abstract arrays,
shardings, random initialisation, the HF key tables' shape checks, merge (every leaf with an `experts`
axis follows the plan) and export.

Layouts (x @ W convention, so HF's `[out, in]` linear weights are transposed on load):
  embed [vocab, embed]; lm_head [embed, vocab]; attention q_proj [embed, heads*head_dim], ...;
  routed experts w_gate/w_up [experts, embed, mlp], w_down [experts, mlp, embed]; router [embed, experts].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np

from grape_jax.core.config import MoEConfig

# Logical axis names used on parameters and activations.
EXPERTS, EMBED, MLP, HEADS, KV_HEADS, VOCAB, NORM = (
    "experts",
    "embed",
    "mlp",
    "heads",
    "kv_heads",
    "vocab",
    "norm",
)


@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """Shape, logical axes and initialiser of one parameter.

    `role` tells merge how an `experts`-indexed leaf follows a plan: 'expert' leaves are α-averaged
    over a group, 'router' leaves take the router rule (dominant member or mean).
    """

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    init: str = "normal"  # normal | ones | zeros
    role: str = "dense"  # dense | expert | router

    def __post_init__(self) -> None:
        if len(self.shape) != len(self.axes):
            raise ValueError(f"shape {self.shape} and axes {self.axes} differ in rank")

    @property
    def expert_axis(self) -> int | None:
        return self.axes.index(EXPERTS) if EXPERTS in self.axes else None


def _mla_specs(cfg: MoEConfig, p: str) -> Iterator[tuple[str, ParamSpec]]:
    """Multi-head latent attention (DeepSeek-V2/V3; layouts in `grape_jax.core.mla`)."""
    d, h = cfg.hidden_size, cfg.num_heads
    q_out = h * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    if cfg.q_lora_rank:
        yield p + "q_a_proj", ParamSpec((d, cfg.q_lora_rank), (EMBED, None))
        if cfg.attention_bias:
            yield p + "q_a_bias", ParamSpec((cfg.q_lora_rank,), (None,), "zeros")
        yield p + "q_a_norm", ParamSpec((cfg.q_lora_rank,), (NORM,), "ones")
        yield p + "q_b_proj", ParamSpec((cfg.q_lora_rank, q_out), (None, HEADS))
    else:
        yield p + "q_proj", ParamSpec((d, q_out), (EMBED, HEADS))
    latent = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    yield p + "kv_a_proj", ParamSpec((d, latent), (EMBED, None))
    if cfg.attention_bias:
        yield p + "kv_a_bias", ParamSpec((latent,), (None,), "zeros")
    yield p + "kv_a_norm", ParamSpec((cfg.kv_lora_rank,), (NORM,), "ones")
    kv_out = h * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    yield p + "kv_b_proj", ParamSpec((cfg.kv_lora_rank, kv_out), (None, HEADS))
    yield p + "o_proj", ParamSpec((h * cfg.v_head_dim, d), (HEADS, EMBED))
    if cfg.attention_bias:
        yield p + "o_bias", ParamSpec((d,), (EMBED,), "zeros")


def _attention_specs(cfg: MoEConfig, p: str) -> Iterator[tuple[str, ParamSpec]]:
    if cfg.attention == "mla":
        yield from _mla_specs(cfg, p)
        return
    d, hd = cfg.hidden_size, cfg.head_dim
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    yield p + "q_proj", ParamSpec((d, q), (EMBED, HEADS))
    yield p + "k_proj", ParamSpec((d, kv), (EMBED, KV_HEADS))
    yield p + "v_proj", ParamSpec((d, kv), (EMBED, KV_HEADS))
    yield p + "o_proj", ParamSpec((q, d), (HEADS, EMBED))
    if cfg.attention_bias:
        yield p + "q_bias", ParamSpec((q,), (HEADS,), "zeros")
        yield p + "k_bias", ParamSpec((kv,), (KV_HEADS,), "zeros")
        yield p + "v_bias", ParamSpec((kv,), (KV_HEADS,), "zeros")
    if cfg.attention_out_bias:
        yield p + "o_bias", ParamSpec((d,), (EMBED,), "zeros")
    if cfg.qk_norm:  # per head (Qwen3) or over the whole projection (OLMoE)
        yield p + "q_norm", ParamSpec((q if cfg.qk_norm_full else hd,), (NORM,), "ones")
        yield p + "k_norm", ParamSpec((kv if cfg.qk_norm_full else hd,), (NORM,), "ones")
    if cfg.attention_sinks:
        yield p + "sinks", ParamSpec((cfg.num_heads,), (HEADS,), "zeros")


def _dense_mlp_specs(d: int, f: int, p: str) -> Iterator[tuple[str, ParamSpec]]:
    yield p + "w_gate", ParamSpec((d, f), (EMBED, MLP))
    yield p + "w_up", ParamSpec((d, f), (EMBED, MLP))
    yield p + "w_down", ParamSpec((f, d), (MLP, EMBED))


def _moe_specs(cfg: MoEConfig, e: int, p: str) -> Iterator[tuple[str, ParamSpec]]:
    d, f = cfg.hidden_size, cfg.moe_intermediate_size
    yield p + "router", ParamSpec((d, e), (EMBED, EXPERTS), role="router")
    if cfg.has_router_bias:
        # GPT-OSS: bias added to logits; DeepSeek-V3, ERNIE: e_score_correction_bias (selection only).
        yield p + "router_bias", ParamSpec((e,), (EXPERTS,), "zeros", role="router")
    yield p + "w_gate", ParamSpec((e, d, f), (EXPERTS, EMBED, MLP), role="expert")
    yield p + "w_up", ParamSpec((e, d, f), (EXPERTS, EMBED, MLP), role="expert")
    yield p + "w_down", ParamSpec((e, f, d), (EXPERTS, MLP, EMBED), role="expert")
    if cfg.expert_bias:
        yield p + "b_gate", ParamSpec((e, f), (EXPERTS, MLP), "zeros", role="expert")
        yield p + "b_up", ParamSpec((e, f), (EXPERTS, MLP), "zeros", role="expert")
        yield p + "b_down", ParamSpec((e, d), (EXPERTS, EMBED), "zeros", role="expert")
    if cfg.shared_expert_intermediate_size:
        yield from _dense_mlp_specs(d, cfg.shared_expert_intermediate_size, p + "shared.")
        if cfg.shared_expert_gate:
            yield p + "shared_gate", ParamSpec((d, 1), (EMBED, None))


def param_specs(cfg: MoEConfig) -> dict[str, ParamSpec]:
    """The complete parameter table of a model, in a stable order."""
    d = cfg.hidden_size
    specs: dict[str, ParamSpec] = {"embed": ParamSpec((cfg.vocab_size, d), (VOCAB, EMBED))}
    for layer, e in enumerate(cfg.num_experts):
        p = f"layers.{layer}."
        specs.update(_norm_specs(cfg, p + "attn_norm"))
        specs.update(_attention_specs(cfg, p + "attn."))
        specs.update(_norm_specs(cfg, p + "mlp_norm"))
        if e > 0:
            specs.update(_moe_specs(cfg, e, p + "mlp."))
        else:
            specs.update(_dense_mlp_specs(d, cfg.dense_intermediate_size, p + "mlp."))
    specs.update(_norm_specs(cfg, "final_norm"))
    if not cfg.tie_word_embeddings:
        specs["lm_head"] = ParamSpec((d, cfg.vocab_size), (EMBED, VOCAB))
    if cfg.lm_head_bias:
        specs["lm_head_bias"] = ParamSpec((cfg.vocab_size,), (VOCAB,), "zeros")
    return specs


def _norm_specs(cfg: MoEConfig, name: str) -> Iterator[tuple[str, ParamSpec]]:
    """A norm's weight, and its bias for LayerNorm (`cfg.norm == "layer"`)."""
    yield name, ParamSpec((cfg.hidden_size,), (NORM,), "ones")
    if cfg.norm == "layer":
        yield name + "_bias", ParamSpec((cfg.hidden_size,), (NORM,), "zeros")


def layer_of(name: str) -> int | None:
    """Decoder layer index of a parameter name, or None for embeddings/final norm/head."""
    parts = name.split(".")
    return int(parts[1]) if parts[0] == "layers" else None


def init_params(
    cfg: MoEConfig, *, seed: int = 0, dtype: Any = np.float32, scale: float = 0.02
) -> dict[str, np.ndarray]:
    """Random host values of every parameter: normal(0, scale) weights, unit norms, zero biases.

    NumPy's generator seeded with `seed`: no compile at all (a jitted initialiser compiled for seconds
    per tiny test model)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, spec in param_specs(cfg).items():
        if spec.init == "ones":
            value = np.ones(spec.shape, np.float32)
        elif spec.init == "zeros":
            value = np.zeros(spec.shape, np.float32)
        else:
            value = scale * rng.standard_normal(spec.shape, np.float32)
        out[name] = value.astype(np.dtype(dtype))
    return out


def count_params(cfg: MoEConfig) -> int:
    return int(sum(np.prod(s.shape) for s in param_specs(cfg).values()))
