"""Safetensors dtype names and their NumPy dtypes (bfloat16 and float8 from `ml_dtypes`), and the
reference writer's tensor order by dtype."""

from __future__ import annotations

from typing import Any

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "U16": np.dtype("<u2"),
    "U32": np.dtype("<u4"),
    "U64": np.dtype("<u8"),
}
_NAMES = {v: k for k, v in DTYPES.items()}
# The reference writer's tensor order: dtype descending in this (its enum) order, then name.
_DTYPE_RANK = {
    name: i
    for i, name in enumerate(
        [
            "BOOL",
            "U8",
            "I8",
            "F8_E5M2",
            "F8_E4M3",
            "I16",
            "U16",
            "F16",
            "BF16",
            "I32",
            "U32",
            "F32",
            "F64",
            "I64",
            "U64",
        ]
    )
}


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated or inconsistent, or a tensor that cannot be stored."""


def dtype_to_numpy(name: str) -> np.dtype:
    """NumPy dtype (little-endian) of a safetensors dtype string such as 'BF16'."""
    if name not in DTYPES:
        raise CheckpointError(f"unknown safetensors dtype {name!r}; known: {sorted(DTYPES)}")
    return DTYPES[name]


def _storable(dtype: np.dtype) -> str | None:
    return _NAMES.get(dtype.newbyteorder("<") if dtype.byteorder in "<>" else dtype)


def numpy_to_dtype(dtype: Any) -> str:
    """Safetensors dtype string of a NumPy dtype (either byte order)."""
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        raise CheckpointError(f"{dtype!r} is not a NumPy dtype") from None
    name = _storable(dtype)
    if name is None:
        raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors; storable: {sorted(DTYPES)}")
    return name
