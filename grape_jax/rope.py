"""Rotary position embeddings as transformers computes them: default RoPE and YaRN, rotate-half or
interleaved pairs.

The inverse frequencies depend only on the (static) config, so they are computed once in NumPy fp32
the way `transformers.modeling_rope_utils` does and enter the traced function as constants.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from grape_jax.config import MoEConfig


def inv_freq(cfg: MoEConfig, dim: int) -> np.ndarray:
    """`[dim // 2]` fp32 inverse frequencies (HF `_compute_default/yarn_rope_parameters`)."""
    pos_freqs = np.float32(cfg.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    extrapolation = (1.0 / pos_freqs).astype(np.float32)
    if cfg.rope_type == "default":
        return extrapolation
    # YaRN: interpolate low frequencies by `factor`, keep high ones, linear ramp in between.
    factor = cfg.rope_factor
    interpolation = (1.0 / (np.float32(factor) * pos_freqs)).astype(np.float32)
    original = cfg.rope_original_max_position or cfg.max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

    low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation_factor = (1 - ramp).astype(np.float32)
    return (interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor).astype(
        np.float32
    )


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction `0.1 * mscale * ln(scale) + 1` (1 for scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def apply_rope(
    x: Float[Array, "b t h d"], positions: Int[Array, "b t"], cfg: MoEConfig
) -> Float[Array, "b t h d"]:
    """Rotate the whole last axis of `x` (rotate-half; interleaved pairs are de-interleaved first,
    which is what transformers' `apply_rotary_pos_emb_interleave` returns)."""
    dim = x.shape[-1]
    half = dim // 2
    freqs = jnp.asarray(inv_freq(cfg, dim))
    angles = positions.astype(jnp.float32)[..., None] * freqs  # [b, t, half]
    cos = (jnp.cos(angles) * cfg.rope_attention_factor)[:, :, None, :]
    sin = (jnp.sin(angles) * cfg.rope_attention_factor)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    if cfg.rope_interleave:
        x1, x2 = x32[..., 0::2], x32[..., 1::2]
    else:
        x1, x2 = x32[..., :half], x32[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)

