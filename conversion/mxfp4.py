"""MXFP4 (OCP microscaling FP4) decoding and encoding of GPT-OSS expert weights, in NumPy.

GPT-OSS checkpoints store each expert matrix as two tensors:
- `*_blocks`: uint8 `[E, R, G, 16]`; each byte holds two FP4 E2M1 codes, the low nibble first
  (value `2k` of a 32-value block), the high nibble second (value `2k + 1`);
- `*_scales`: uint8 `[E, R, G]`; one E8M0 exponent per 32-value block, bias 127 (`2**(s - 127)`).
Decoding gives `[E, R, G * 32]`, which transformers then transposes to `[E, G * 32, R]` (the layout
of `GptOssExperts.gate_up_proj` `[E, d, 2f]` and `down_proj` `[E, f, d]`). We return that same
layout, computed like transformers does (the fp32 product `code * 2**exp`, rounded once to the
output dtype), so the result matches its dequantisation bit for bit for every scale byte but 255,
E8M0's NaN encoding (never written by real checkpoints): we decode that block to NaN throughout.

`encode_mxfp4` is the inverse for requantisation: per block the smallest power-of-two scale with
`max|x| <= 6 * scale` (no saturation; the convention of the GPT-OSS reference downcast), then
round-to-nearest-even onto the E2M1 grid. For canonically encoded input (each block's largest
code is +-4 or +-6, or the block is all zeros with scale byte 0) `encode(decode(b, s)) == (b, s)`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from jaxtyping import Float, UInt8

BLOCK_SIZE = 32
SCALE_BIAS = 127

# E2M1 code -> value; bit 3 is the sign, bits 0-2 index the magnitudes below.
FP4_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
    dtype=np.float32,
)
_MAGNITUDES = FP4_VALUES[:8]


def _check_pair(blocks: np.ndarray, scales: np.ndarray) -> None:
    if blocks.dtype != np.uint8 or scales.dtype != np.uint8:
        raise TypeError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.ndim != 4 or blocks.shape[-1] != BLOCK_SIZE // 2:
        raise ValueError(f"MXFP4 blocks must have shape [E, R, G, 16], got {blocks.shape}")
    if scales.shape != blocks.shape[:-1]:
        raise ValueError(f"MXFP4 scales shape {scales.shape} does not match blocks {blocks.shape[:-1]}")


def decode_mxfp4(
    blocks: UInt8[np.ndarray, "experts rows groups 16"],
    scales: UInt8[np.ndarray, "experts rows groups"],
    *,
    dtype: Any = np.float32,
) -> Float[np.ndarray, "experts cols rows"]:
    """Dequantise MXFP4 `blocks`/`scales` to `[E, G * 32, R]`, transformers' layout and values."""
    blocks, scales = np.asarray(blocks), np.asarray(scales)
    _check_pair(blocks, scales)
    n_exp, rows, groups, half = blocks.shape
    values = np.empty((n_exp, rows, groups, 2 * half), dtype=np.float32)
    values[..., 0::2] = FP4_VALUES[blocks & 0x0F]
    values[..., 1::2] = FP4_VALUES[blocks >> 4]
    # code * 2**(s - 127), exact in fp32 (subnormals included); byte 255 is E8M0's NaN.
    exponent = scales.astype(np.int32) - SCALE_BIAS
    with np.errstate(over="ignore"):  # 6 * 2**127 overflows fp32 to inf, as in torch
        values = np.ldexp(values, exponent[..., None]).astype(np.float32)
    values[scales == 255] = np.nan
    with np.errstate(over="ignore"):  # narrower dtypes overflow to inf, as torch's cast does
        out = values.reshape(n_exp, rows, groups * 2 * half).astype(dtype)
    return np.ascontiguousarray(out.transpose(0, 2, 1))


def decode_mxfp4_experts(
    blocks: Any,
    scales: Any,
    *,
    start: int,
    stop: int,
    dtype: Any = np.float32,
) -> Float[np.ndarray, "experts cols rows"]:
    """Decode experts `[start, stop)` only, reading just that slice of `blocks`/`scales`.

    `blocks`/`scales` may be arrays or lazy slices (`safe_open(...).get_slice(key)`), so a
    streaming loader decodes one shard of experts without touching the others.
    """
    if not 0 <= start < stop:
        raise ValueError(f"expert range must satisfy 0 <= start < stop, got [{start}, {stop})")
    n_exp = _leading_dim(blocks)
    if stop > n_exp:
        raise ValueError(f"expert range [{start}, {stop}) exceeds the {n_exp} experts stored")
    return decode_mxfp4(np.asarray(blocks[start:stop]), np.asarray(scales[start:stop]), dtype=dtype)


def _leading_dim(array: Any) -> int:
    if hasattr(array, "get_shape"):
        return int(array.get_shape()[0])
    return int(np.shape(array)[0])


def _round_to_e2m1(magnitude: np.ndarray) -> np.ndarray:
    """Index (0..7) of the nearest E2M1 magnitude, ties to the even code; saturates at 6."""
    magnitude = np.minimum(magnitude, _MAGNITUDES[-1])
    upper = np.clip(np.searchsorted(_MAGNITUDES, magnitude, side="left"), 1, 7)
    lower = upper - 1
    d_low = magnitude - _MAGNITUDES[lower]
    d_up = _MAGNITUDES[upper] - magnitude
    pick_up = (d_up < d_low) | ((d_up == d_low) & (upper % 2 == 0))
    return np.where(pick_up, upper, lower).astype(np.uint8)


def encode_mxfp4(
    x: Float[np.ndarray, "experts cols rows"],
) -> tuple[UInt8[np.ndarray, "experts rows groups 16"], UInt8[np.ndarray, "experts rows groups"]]:
    """Quantise `[E, G * 32, R]` weights (transformers' layout) to MXFP4 `(blocks, scales)`.

    Scale per block: the smallest `2**k` with `max|x| <= 6 * 2**k` (k clamped to [-127, 127];
    all-zero blocks get byte 0); codes: round-to-nearest-even on the E2M1 grid, sign kept.
    """
    x = np.asarray(x)
    if x.ndim != 3 or x.shape[1] % BLOCK_SIZE:
        raise ValueError(f"encode_mxfp4 expects [E, K, R] with K a multiple of 32, got {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError("encode_mxfp4 got non-finite values")
    n_exp, cols, rows = x.shape
    groups = cols // BLOCK_SIZE
    v = np.ascontiguousarray(x.astype(np.float64).transpose(0, 2, 1)).reshape(n_exp, rows, groups, BLOCK_SIZE)
    amax = np.abs(v).max(axis=-1)
    mant, expo = np.frexp(amax / 6.0)  # amax / 6 = mant * 2**expo, mant in [0.5, 1)
    k = np.where(mant == 0.5, expo - 1, expo)
    k = np.where(amax == 0, -SCALE_BIAS, np.clip(k, -SCALE_BIAS, SCALE_BIAS))
    scaled = np.abs(v) / np.exp2(k.astype(np.float64))[..., None]
    codes = _round_to_e2m1(scaled) | (np.signbit(v).astype(np.uint8) << 3)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    scales = (k + SCALE_BIAS).astype(np.uint8)
    return blocks, scales
