"""Fast host transposes of checkpoint tensors (any dtype, bits kept).

NumPy copies a transposed view one element at a time, so `np.ascontiguousarray(x.T)` of 2-byte
values runs at ~0.2-1 GB/s on the CPUs measured here. `copy_transposed` first packs each run of
16 bytes' worth of consecutive rows into one 16-byte element (a few strided copies with long inner
loops), so the transposing copy moves 16 bytes per element: about 1.7x faster than the best plain
blocking on bfloat16 (BENCHMARKS.md, conversion). Used where the host transposes: reads of HF
`[out, in]` weights into our `[in, out]` layout on CPU devices, and export back.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

PACK_BYTES = 16
PACKS_PER_COPY = 16  # packs transposed per NumPy copy (measured best of 4/8/16)
CHUNK_BYTES = 2 << 20  # source rows transposed at a time by `transposed`, so they stay in cache
TRANSPOSE_THREADS = min(4, os.cpu_count() or 1)
PARALLEL_MIN_BYTES = 8 << 20  # smaller tensors are transposed on the calling thread


def copy_transposed(src: np.ndarray, dst: np.ndarray, scratch: np.ndarray | None = None) -> None:
    """`dst[...] = src.T` for a 2-D block `src` [n, c] and `dst` [c, n] whose last axis is contiguous.

    `scratch` (bytes, >= src.nbytes) holds the packed rows; rows left after whole packs are copied
    one at a time."""
    n, c = src.shape
    if dst.shape != (c, n) or dst.dtype.itemsize != src.itemsize:
        raise ValueError(f"copy_transposed: cannot put {src.shape} {src.dtype} transposed into {dst.shape} {dst.dtype}")
    if src.itemsize in (1, 2, 4, 8):  # copy bits: NumPy's loops for ml_dtypes' types are slower
        src, dst = src.view(f"u{src.itemsize}"), dst.view(f"u{src.itemsize}")
    g = PACK_BYTES // src.itemsize if PACK_BYTES % src.itemsize == 0 else 0
    whole = n - n % g if g else 0
    if whole:
        nbytes = whole * c * src.itemsize
        scratch = np.empty(nbytes, np.uint8) if scratch is None else scratch[:nbytes]
        packed = scratch.view(src.dtype).reshape(whole // g, c, g)
        for k in range(g):
            packed[:, :, k] = src[k:whole:g]
        wide = packed.view(f"V{PACK_BYTES}").reshape(whole // g, c)
        wide_dst = dst[:, :whole].view(f"V{PACK_BYTES}")
        for s0 in range(0, whole // g, PACKS_PER_COPY):
            np.copyto(wide_dst[:, s0 : s0 + PACKS_PER_COPY], wide[s0 : s0 + PACKS_PER_COPY].T)
    for r in range(whole, n):
        dst[:, r] = src[r]


def rows_per_chunk(row_bytes: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows of `row_bytes` to transpose at a time: about `chunk_bytes`, in whole packs when possible."""
    step = max(1, chunk_bytes // max(row_bytes, 1))
    return step - step % PACK_BYTES if step > PACK_BYTES else step


def transposed(x: np.ndarray, threads: int = TRANSPOSE_THREADS) -> np.ndarray:
    """Contiguous `x.T` with the same bits (2-D: packed and chunked as above, bands of rows on up to
    `threads` threads, NumPy's copies release the GIL; other ranks: NumPy)."""
    if x.ndim != 2:
        if x.itemsize in (1, 2, 4, 8):
            return np.ascontiguousarray(x.view(f"u{x.itemsize}").T).view(x.dtype)
        return np.ascontiguousarray(x.T)
    out = np.empty(x.shape[::-1], x.dtype)
    step = rows_per_chunk(x.shape[1] * x.itemsize)
    starts = range(0, x.shape[0], step)
    bands = [starts[i::threads] for i in range(min(threads, len(starts)))]

    def band(chunks: range) -> None:
        scratch = np.empty(min(step, x.shape[0]) * x.shape[1] * x.itemsize, np.uint8)
        for r0 in chunks:
            copy_transposed(x[r0 : r0 + step], out[:, r0 : r0 + step], scratch)

    if len(bands) <= 1 or x.nbytes < PARALLEL_MIN_BYTES:
        for chunks in bands:
            band(chunks)
    else:
        with ThreadPoolExecutor(len(bands)) as pool:
            list(pool.map(band, bands))
    return out
