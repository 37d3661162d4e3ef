"""Host transposes (conversion.transpose) against NumPy's own `.T`, bit for bit."""

import ml_dtypes
import numpy as np
import pytest

from conversion.transpose import copy_transposed, rows_per_chunk, transposed

DTYPES = [
    np.uint8,
    np.bool_,
    ml_dtypes.bfloat16,
    np.float16,
    np.float32,
    np.int64,
    np.float64,
    ml_dtypes.float8_e4m3fn,
    np.complex128,
]


def random_bits(rng, dtype, shape):
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    return rng.integers(0, 256, size=(*shape, dtype.itemsize), dtype=np.uint8).view(dtype).reshape(shape)


def same_bits(a, b):
    return (
        a.shape == b.shape
        and a.dtype == b.dtype
        and np.ascontiguousarray(a).tobytes() == np.ascontiguousarray(b).tobytes()
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0, 5), (1, 1), (7, 3), (16, 9), (37, 21), (130, 66)])
def test_transposed_equals_numpy(dtype, shape):
    x = random_bits(np.random.default_rng(sum(shape)), dtype, shape)
    got = transposed(x)
    assert got.flags.c_contiguous and same_bits(got, x.T)


def test_transposed_of_other_ranks_and_views():
    rng = np.random.default_rng(0)
    x = random_bits(rng, ml_dtypes.bfloat16, (4, 5, 6))
    assert same_bits(transposed(x), x.T)
    view = random_bits(rng, np.float32, (40, 30))[3:35:1, 2:29]  # non-contiguous rows
    assert same_bits(transposed(view), view.T)


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float32])
def test_copy_transposed_into_a_column_block(dtype):
    """Into a column block of a bigger array (as the reader fills its output chunk by chunk)."""
    rng = np.random.default_rng(1)
    src = random_bits(rng, dtype, (24, 10))
    dst = np.zeros((10, 50), dtype)
    copy_transposed(src, dst[:, 13:37])
    assert same_bits(dst[:, 13:37], src.T)
    assert not dst[:, :13].any() and not dst[:, 37:].any()
    with pytest.raises(ValueError, match=r"cannot put \(24, 10\)"):
        copy_transposed(src, dst[:, :20])


@pytest.mark.parametrize(
    "row_bytes, chunk, want",
    [(8192, 2 << 20, 256), (18432, 2 << 20, 112), (100, 250, 2), (1, 40, 32), (10**9, 2 << 20, 1)],
)
def test_rows_per_chunk_takes_whole_packs(row_bytes, chunk, want):
    assert rows_per_chunk(row_bytes, chunk) == want


@pytest.mark.parametrize("threads", [1, 3])
def test_transposed_in_bands_of_rows_on_threads(threads):
    """Above PARALLEL_MIN_BYTES the rows are split in bands over threads (and chunked, with leftover rows)."""
    x = random_bits(np.random.default_rng(2), np.float16, (1203, 4000))
    assert x.nbytes > 8 << 20
    assert same_bits(transposed(x, threads=threads), x.T)
