"""One declaration per parameter: name, shape, logical axes and initialiser, derived from `MoEConfig`.

Everything else is derived from this table: the NNX module tree, abstract arrays, shardings, random
initialisation, the HF key tables' shape checks, merge (every leaf with an `experts` axis follows the
plan) and export. Parameters are a flat dict `{dotted.name: jax.Array}`; its keys are exactly the
dotted paths of the NNX model's state.

Layouts (x @ W convention, so HF's `[out, in]` linear weights are transposed on load):
  embed [vocab, embed]; lm_head [embed, vocab]; attention q_proj [embed, heads*head_dim], ...;
  routed experts w_gate/w_up [experts, embed, mlp], w_down [experts, mlp, embed]; router [embed, experts].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from grape_jax.config import MoEConfig

# Logical axis names used on parameters and activations.
EXPERTS, EMBED, MLP, HEADS, KV_HEADS, VOCAB, NORM = (
    "experts", "embed", "mlp", "heads", "kv_heads", "vocab", "norm",
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


def _attention_specs(cfg: MoEConfig, p: str) -> Iterator[tuple[str, ParamSpec]]:
    if cfg.attention == "mla":
        from grape_jax.mla import mla_specs  # mla builds on this module's ParamSpec

        yield from mla_specs(cfg, p)
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


def abstract_params(
    cfg: MoEConfig, *, dtype: jnp.dtype = jnp.float32, shardings: Mapping | None = None
) -> dict[str, jax.ShapeDtypeStruct]:
    """Shape/dtype(/sharding) of every parameter, without allocating anything."""
    return {
        name: jax.ShapeDtypeStruct(
            spec.shape, dtype, sharding=None if shardings is None else shardings[name]
        )
        for name, spec in param_specs(cfg).items()
    }


def init_params(
    cfg: MoEConfig,
    key: jax.Array,
    *,
    dtype: jnp.dtype = jnp.float32,
    scale: float = 0.02,
    shardings: Mapping | None = None,
) -> dict[str, jax.Array]:
    """Random parameters (normal(0, scale) weights, unit norms, zero biases), optionally sharded.

    Values come from NumPy's generator seeded with the key's bits, made on the host and placed with
    `shardings`: no compile at all (a jitted initialiser compiled for seconds per tiny test model)."""
    specs = param_specs(cfg)
    bits = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    rng = np.random.default_rng(np.asarray(bits, np.uint32).ravel().tolist())
    out = {}
    for name, spec in specs.items():
        if spec.init == "ones":
            value = np.ones(spec.shape, np.float32)
        elif spec.init == "zeros":
            value = np.zeros(spec.shape, np.float32)
        else:
            value = scale * rng.standard_normal(spec.shape, np.float32)
        value = value.astype(np.dtype(dtype))
        out[name] = jax.device_put(value, None if shardings is None else shardings[name])
    return out


def count_params(cfg: MoEConfig) -> int:
    return int(sum(np.prod(s.shape) for s in param_specs(cfg).values()))
