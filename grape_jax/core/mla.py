"""Multi-head latent attention (DeepSeek-V2/V3) as transformers' `DeepseekV3Attention` computes it.

Queries come from `q_proj` or the low-rank `q_a_proj -> RMSNorm -> q_b_proj`; keys and values from one
compressed latent `kv_a_proj` (`kv_lora_rank` + one shared rotary key of `qk_rope_head_dim`), RMSNorm,
then `kv_b_proj` up to per-head `qk_nope_head_dim` keys and `v_head_dim` values. Only the rotary part
of q/k gets RoPE. Parameters (x @ W layout):

  q_proj [embed, heads*qk], or q_a_proj [embed, q_lora], q_a_norm [q_lora], q_b_proj [q_lora, heads*qk]
  kv_a_proj [embed, kv_lora + rope], kv_a_norm [kv_lora], kv_b_proj [kv_lora, heads*(nope + v)]
  o_proj [heads*v, embed]; with `attention_bias`: q_a_bias (q LoRA only), kv_a_bias, o_bias
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from grape_jax.core.config import MoEConfig
from grape_jax.core.rope import apply_rope

# transformers builds q_a_layernorm / kv_a_layernorm with RMSNorm's default eps, not rms_norm_eps.
LATENT_NORM_EPS = 1e-6


def _rms(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (w.astype(jnp.float32) * y).astype(x.dtype)


def mla_attention(
    params: Mapping[str, jax.Array],
    p: str,
    cfg: MoEConfig,
    x: Float[Array, "b t d"],
    positions: Int[Array, "b t"],
    mask: Bool[Array, "b 1 t t"],
) -> Float[Array, "b t d"]:
    b, t, _ = x.shape
    h, nope, rot, vd = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim

    def linear(inp: jax.Array, name: str) -> jax.Array:
        y = inp @ params[p + name + "_proj"]
        return y + params[p + name + "_bias"] if p + name + "_bias" in params else y

    if cfg.q_lora_rank:
        q = _rms(linear(x, "q_a"), params[p + "q_a_norm"], LATENT_NORM_EPS) @ params[p + "q_b_proj"]
    else:
        q = x @ params[p + "q_proj"]
    q = q.reshape(b, t, h, nope + rot)
    latent = linear(x, "kv_a")
    kv, k_rot = latent[..., : cfg.kv_lora_rank], latent[..., cfg.kv_lora_rank :]
    kv = _rms(kv, params[p + "kv_a_norm"], LATENT_NORM_EPS) @ params[p + "kv_b_proj"]
    kv = kv.reshape(b, t, h, nope + vd)
    k_nope, v = kv[..., :nope], kv[..., nope:]
    q_rot = apply_rope(q[..., nope:], positions, cfg)
    k_rot = apply_rope(k_rot.reshape(b, t, 1, rot), positions, cfg)
    q = jnp.concatenate([q[..., :nope], q_rot], axis=-1)
    k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rot, (b, t, h, rot))], axis=-1)
    scale = cfg.attention_scale if cfg.attention_scale is not None else (nope + rot) ** -0.5
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, t, h * vd)
    return linear(out, "o")
