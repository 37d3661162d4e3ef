"""MXFP4 (OCP microscaling FP4) decoding of GPT-OSS expert weights, in NumPy.

GPT-OSS checkpoints store each expert matrix as two tensors:
- `*_blocks`: uint8 `[E, R, G, 16]`; each byte holds two FP4 E2M1 codes, the low nibble first
  (value `2k` of a 32-value block), the high nibble second (value `2k + 1`);
- `*_scales`: uint8 `[E, R, G]`; one E8M0 exponent per 32-value block, bias 127 (`2**(s - 127)`).
Decoding gives `[E, R, G * 32]`, which transformers then transposes to `[E, G * 32, R]` (the layout
of `GptOssExperts.gate_up_proj` `[E, d, 2f]` and `down_proj` `[E, f, d]`). We return that same
layout, computed like transformers does (the fp32 product `code * 2**exp`, rounded once to the
output dtype), so the result matches its dequantisation bit for bit for every scale byte but 255,
E8M0's NaN encoding (never written by real checkpoints): we decode that block to NaN throughout.

Exports write the dequantised (bf16) weights; the tests' encoder (`tests/mxfp4_encoder.py`) writes
MXFP4 checkpoints for the loader to read.
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
