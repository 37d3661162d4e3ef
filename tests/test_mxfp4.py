"""MXFP4 decoding/encoding against transformers' own dequantisation (pure-torch path, CPU)."""

import ml_dtypes
import numpy as np
import pytest
import torch
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

from conversion.quant.mxfp4 import decode_mxfp4
from tests.mxfp4_encoder import encode_mxfp4


def _random_pair(rng, shape=(3, 10, 2), scale_range=(0, 255)):
    blocks = rng.integers(0, 256, size=(*shape, 16), dtype=np.uint8)
    scales = rng.integers(*scale_range, size=shape, dtype=np.uint8)
    return blocks, scales


def _bits(a: np.ndarray) -> np.ndarray:
    return a.view({2: np.uint16, 4: np.uint32}[a.dtype.itemsize])


@pytest.mark.parametrize(
    ("np_dtype", "torch_dtype"),
    [(np.float32, torch.float32), (ml_dtypes.bfloat16, torch.bfloat16), (np.float16, torch.float16)],
)
def test_decode_matches_transformers_bit_for_bit(np_dtype, torch_dtype):
    rng = np.random.default_rng(0)
    # every scale byte except 255 (E8M0 NaN) appears: over/underflow and subnormals included.
    blocks, scales = _random_pair(rng, shape=(4, 16, 4), scale_range=(0, 255))
    scales.reshape(-1)[:255] = np.arange(255, dtype=np.uint8)
    ours = decode_mxfp4(blocks, scales, dtype=np_dtype)
    ref = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch_dtype)
    ref = ref.view(torch.int16 if ref.element_size() == 2 else torch.int32).numpy()
    assert ours.shape == ref.shape == (4, 4 * 32, 16)
    assert ours.dtype == np.dtype(np_dtype)
    np.testing.assert_array_equal(_bits(ours), ref.view(_bits(ours).dtype))


def test_decode_layout_matches_gpt_oss_experts():
    """[E, 2f, d/32, 16] blocks decode to gate_up_proj's [E, d, 2f]; down's [E, d, f/32, 16] to [E, f, d]."""
    rng = np.random.default_rng(1)
    n_exp, d, f = 2, 64, 96
    gate_up = decode_mxfp4(*_random_pair(rng, shape=(n_exp, 2 * f, d // 32)))
    down = decode_mxfp4(*_random_pair(rng, shape=(n_exp, d, f // 32)))
    assert gate_up.shape == (n_exp, d, 2 * f) and down.shape == (n_exp, f, d)


def test_scale_255_is_nan():
    blocks = np.full((1, 1, 2, 16), 0x21, np.uint8)
    scales = np.array([[[255, 127]]], np.uint8)
    out = decode_mxfp4(blocks, scales)
    assert np.isnan(out[0, :32]).all() and np.isfinite(out[0, 32:]).all()


def test_nibble_order_low_first():
    blocks = np.zeros((1, 1, 1, 16), np.uint8)
    blocks[0, 0, 0, 0] = 0x7A  # low nibble 0xA = -1.0 (value 0), high 0x7 = 6.0 (value 1)
    scales = np.full((1, 1, 1), 128, np.uint8)  # 2**1
    out = decode_mxfp4(blocks, scales)
    assert out[0, 0, 0] == -2.0 and out[0, 1, 0] == 12.0 and not out[0, 2:, 0].any()


def _canonical_pair(rng, shape):
    """Random blocks whose largest code per block is +-4 or +-6 (or all-zero with scale byte 0)."""
    codes = rng.integers(0, 16, size=(*shape, 32), dtype=np.uint8)
    codes = np.where((codes & 7) > 5, codes & 0b1101, codes)  # magnitudes <= 3 ...
    top = rng.integers(0, 32, size=shape)
    top_code = rng.choice(np.array([6, 7, 14, 15], np.uint8), size=shape)
    np.put_along_axis(codes, top[..., None], top_code[..., None], axis=-1)  # ... but one of 4 or 6
    scales = rng.integers(1, 240, size=shape, dtype=np.uint8)
    zero = rng.random(shape) < 0.1
    codes[zero] = 0
    scales[zero] = 0
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    return blocks, scales


def test_encode_inverts_decode_on_canonical_input():
    rng = np.random.default_rng(3)
    blocks, scales = _canonical_pair(rng, (3, 12, 3))
    x = decode_mxfp4(blocks, scales)
    assert np.all(np.isfinite(x))
    b2, s2 = encode_mxfp4(x)
    np.testing.assert_array_equal(s2, scales)
    np.testing.assert_array_equal(b2, blocks)


def test_encode_rounds_to_nearest_even_without_saturation():
    # one block of 32: scale chosen from amax = 6 -> 2**0; then round-half-even on the grid.
    vals = np.array([6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.1, -5.5, 4.9, 0.3], np.float32)
    x = np.zeros((1, 32, 1), np.float32)
    x[0, : len(vals), 0] = vals
    blocks, scales = encode_mxfp4(x)
    assert scales.item() == 127
    back = decode_mxfp4(blocks, scales)[0, : len(vals), 0]
    expected = [6.0, 0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, -0.0, -6.0, 4.0, 0.5]
    np.testing.assert_array_equal(back, expected)
    assert np.signbit(back[8])
    # amax 7 > 6: the scale goes up to 2**1 instead of clipping 7 to 6.
    x[0, 0, 0] = 7.0
    blocks, scales = encode_mxfp4(x)
    assert scales.item() == 128 and decode_mxfp4(blocks, scales)[0, 0, 0] == 8.0


def test_encode_error_is_bounded_by_half_a_grid_step():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 64, 5)).astype(np.float32)
    back = decode_mxfp4(*encode_mxfp4(x))
    blocks_amax = np.abs(x.transpose(0, 2, 1).reshape(2, 5, 2, 32)).max(-1)
    # scale 2**k < amax / 3 and the widest grid gap is 2 * 2**k (4 -> 6): error <= 2**k < amax / 3.
    bound = np.repeat(blocks_amax / 3.0, 32, axis=-1).reshape(2, 5, 64).transpose(0, 2, 1)
    assert np.all(np.abs(back - x) <= bound)


def test_bad_input_raises():
    with pytest.raises(TypeError, match="uint8"):
        decode_mxfp4(np.zeros((1, 1, 1, 16), np.int8), np.zeros((1, 1, 1), np.uint8))
    with pytest.raises(ValueError, match="does not match"):
        decode_mxfp4(np.zeros((1, 2, 1, 16), np.uint8), np.zeros((1, 1, 1), np.uint8))
    with pytest.raises(ValueError, match="multiple of 32"):
        encode_mxfp4(np.zeros((1, 31, 2), np.float32))
