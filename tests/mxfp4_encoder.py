"""A NumPy MXFP4 encoder for the tests: writes GPT-OSS-style checkpoints whose decoding the loader must
reproduce (the inverse of `conversion.quant.mxfp4.decode_mxfp4`; grape-jax itself never writes MXFP4)."""

from __future__ import annotations

import numpy as np
from jaxtyping import Float, UInt8

from conversion.quant.mxfp4 import _MAGNITUDES, BLOCK_SIZE, SCALE_BIAS


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
    """Quantise `[E, G * 32, R]` weights (transformers' layout) to MXFP4 `(blocks, scales)`: per block the
    smallest power-of-two scale with `max|x| <= 6 * scale` (the GPT-OSS reference downcast's convention),
    then round-to-nearest-even onto the E2M1 grid. For canonically encoded input (each block's largest
    code is +-4 or +-6, or the block is all zeros with scale byte 0) `encode(decode(b, s)) == (b, s)`.

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
