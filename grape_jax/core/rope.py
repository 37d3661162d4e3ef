"""Rotary position embeddings as transformers computes them: default RoPE, YaRN and Phi-3.5-MoE's
LongRoPE, rotate-half or interleaved pairs, over the whole head or its first `rotary_dim` dims.

The inverse frequencies depend only on the (static) config, so they are computed once in NumPy fp32
the way `transformers.modeling_rope_utils` does and enter the traced function as constants.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from grape_jax.core.config import MoEConfig


def inv_freq(cfg: MoEConfig, dim: int) -> np.ndarray:
    """`[dim // 2]` fp32 inverse frequencies (HF `_compute_default/yarn_rope_parameters`)."""
    pos_freqs = np.float32(cfg.rope_theta) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    extrapolation = (1.0 / pos_freqs).astype(np.float32)
    if cfg.rope_type == "default":
        return extrapolation
    if cfg.rope_type == "llama3":
        return _llama3(cfg, extrapolation)
    if cfg.rope_type == "longrope":
        factors = np.asarray(cfg.rope_ext_factors, np.float32)
        if factors.shape != pos_freqs.shape:
            raise ValueError(f"longrope needs {dim // 2} factors, got {factors.shape[0]}")
        return (1.0 / (factors * pos_freqs)).astype(np.float32)
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
    return (interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor).astype(np.float32)


def _llama3(cfg: MoEConfig, freqs: np.ndarray) -> np.ndarray:
    """Llama-3 scaling: long wavelengths divided by `rope_factor`, short ones kept, a smooth ramp between
    (transformers' `_compute_llama3_parameters`, in fp32)."""
    factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    old = cfg.rope_original_max_position
    wavelen = (2 * math.pi / freqs).astype(np.float32)
    scaled = np.where(wavelen > old / low, freqs / factor, freqs).astype(np.float32)
    smooth = ((old / wavelen - low) / (high - low)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / factor + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < old / high) & ~(wavelen > old / low)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction `0.1 * mscale * ln(scale) + 1` (1 for scale <= 1)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def apply_rope(x: Float[Array, "b t h d"], positions: Int[Array, "b t"], cfg: MoEConfig) -> Float[Array, "b t h d"]:
    """Rotate the whole last axis of `x` (rotate-half; interleaved pairs are de-interleaved first,
    which is what transformers' `apply_rotary_pos_emb_interleave` returns)."""
    dim = x.shape[-1]
    half = dim // 2
    freqs = jnp.asarray(inv_freq(cfg, dim))
    angles = positions.astype(jnp.float32)[..., None] * freqs  # [b, t, half]
    factor = cfg.rope_attention_factor
    if cfg.rope_type == "longrope" and positions.shape[-1] > cfg.rope_original_max_position:
        factor = cfg.rope_long_mscale  # transformers: max(position) + 1 > original; positions are 0..t-1
    cos = (jnp.cos(angles) * factor)[:, :, None, :]
    sin = (jnp.sin(angles) * factor)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    if cfg.rope_interleave:
        x1, x2 = x32[..., 0::2], x32[..., 1::2]
    else:
        x1, x2 = x32[..., :half], x32[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def apply_partial_rope(
    x: Float[Array, "b t h d"], positions: Int[Array, "b t"], cfg: MoEConfig
) -> Float[Array, "b t h d"]:
    """RoPE on the first `cfg.rotary_dim` dims of each head, the rest passed through (the whole head
    when `rotary_dim` is 0), as transformers' partial-rotary models (GLM-4.5, MiniMax-M2) do."""
    rot = cfg.rotary_dim or x.shape[-1]
    if rot == x.shape[-1]:
        return apply_rope(x, positions, cfg)
    return jnp.concatenate([apply_rope(x[..., :rot], positions, cfg), x[..., rot:]], axis=-1)
