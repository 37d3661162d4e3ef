"""FP8 block-quantised checkpoints (`quantization_config.quant_method: "fp8"`), in NumPy.

Releases such as DeepSeek-V3/R1, Kimi-K2, MiniMax-M2 and the Qwen3 FP8 models store a linear weight
`W [out, in]` as `<module>.weight` in `float8_e4m3fn` plus `<module>.weight_scale_inv`, one scale per
`weight_block_size = [bm, bn]` block, `[ceil(out / bm), ceil(in / bn)]` (blocks at the tensor's edge are
cut short). The value is `W[i, j] = fp8[i, j] * scale_inv[i // bm, j // bn]`, computed in fp32 and
rounded once to the model dtype (transformers' `Fp8Dequantize`). Which weights are quantised is read
from the checkpoint itself: a linear weight with a `weight_scale_inv` sibling (releases leave routers,
norms, embeddings and `lm_head` unquantised, with or without a `modules_to_not_convert` list).

Loading (`Fp8Block`, bound in place of `Transpose` by `fp8_bindings`) reads only the rows, columns and
scale blocks of the slice a device holds, so the sharded streaming loader keeps reading each host's own
bytes. Export requantises (`quantize_fp8`) with the release's block size and scale dtype, as
transformers' `Fp8Quantize` does (`scale = 448 / amax` per block, `scale_inv = 1 / scale`, values
`clip(W * scale, ±448)` rounded to e4m3), except that a block whose source scale still represents it
exactly (dequantising the requantised block gives back every value bit for bit) keeps that scale:
an unmerged expert or attention weight is written back with its original bytes, merged experts get
fresh scales.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Container, Mapping, Sequence
from typing import Any

import ml_dtypes
import numpy as np
from jaxtyping import Float

from conversion.families.base import (
    Binding,
    ConversionError,
    Index,
    SliceReader,
    Transpose,
)
from conversion.safetensors_io import CheckpointIndex
from conversion.safetensors_write import TensorEntry
from conversion.transpose import transposed
from grape_jax.core.params import layer_of

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
FP8_MAX = 448.0
SCALE_SUFFIX = "_scale_inv"
SCALE_DTYPES = ("F32", "BF16", "F16")  # stored scale dtypes we read and write back


def scale_key(key: str) -> str:
    """`x.weight` -> `x.weight_scale_inv` (transformers' naming)."""
    return key + SCALE_SUFFIX


def grid(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    """Scale-grid shape of a `[rows, cols]` weight: blocks at the edge are cut, not padded."""
    return -(-shape[0] // block[0]), -(-shape[1] // block[1])


def block_size(quant: Mapping[str, Any]) -> tuple[int, int]:
    """`weight_block_size` of an fp8 `quantization_config`, checking the fields we rely on."""
    size = quant.get("weight_block_size")
    if not (isinstance(size, list | tuple) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size)):
        raise ConversionError(
            f"config.json: quantization_config.weight_block_size {size!r} is not supported (expected two "
            f"positive integers, e.g. [128, 128]; per-tensor FP8 is not read)"
        )
    for key, allowed in (
        ("fmt", ("e4m3", "float8_e4m3fn")),
        ("scale_fmt", ("float",)),
        ("expert_dtype", ("fp8",)),
        ("activation_scheme", ("dynamic",)),
    ):
        if key in quant and quant[key] not in allowed:
            raise ConversionError(
                f"config.json: quantization_config.{key}={quant[key]!r} is not supported (supported: {list(allowed)})"
            )
    return int(size[0]), int(size[1])


def _row_blocks(rows: int, row0: int, bm: int):
    """(start, stop, block row relative to the first one) of the rows `[0, rows)` of a slice starting at
    row `row0` of the full tensor, one row of blocks at a time (bounds the fp32 temporaries)."""
    r = 0
    while r < rows:
        i = (row0 + r) // bm
        stop = min(rows, (i + 1) * bm - row0)
        yield r, stop, i - row0 // bm
        r = stop


def dequantize_fp8(
    weight: np.ndarray,
    scale_inv: np.ndarray,
    block: tuple[int, int],
    *,
    row0: int = 0,
    col0: int = 0,
    dtype: Any = ml_dtypes.bfloat16,
) -> Float[np.ndarray, "rows cols"]:
    """`weight[i, j] * scale_inv[...]` of a slice starting at (`row0`, `col0`) of the full tensor,
    `scale_inv` holding exactly the scale blocks the slice touches; fp32 product, one rounding."""
    rows, cols = weight.shape
    want = (-(-(row0 + rows) // block[0]) - row0 // block[0], -(-(col0 + cols) // block[1]) - col0 // block[1])
    if rows and cols and tuple(scale_inv.shape) != want:
        raise ConversionError(
            f"FP8 slice at ({row0}, {col0}) of shape {weight.shape} needs {want} scale blocks, "
            f"got {tuple(scale_inv.shape)}"
        )
    s = np.asarray(scale_inv).astype(np.float32)
    columns = np.arange(col0, col0 + cols) // block[1] - col0 // block[1]
    out = np.empty((rows, cols), dtype)
    for start, stop, i in _row_blocks(rows, row0, block[0]):
        out[start:stop] = (np.asarray(weight[start:stop]).astype(np.float32) * s[i, columns]).astype(dtype)
    return out


def quantize_fp8(
    weight: np.ndarray,
    block: tuple[int, int],
    *,
    scale_dtype: Any = np.float32,
    reuse: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`(fp8 [rows, cols], scale_inv [grid])` of a 2-D weight (see the module docstring).

    `reuse`: candidate scales (e.g. the source checkpoint's), kept for every block they represent
    exactly; the other blocks get fresh scales. Works one row of blocks at a time."""
    w = np.asarray(weight)
    if w.ndim != 2:
        raise ConversionError(f"FP8 quantisation needs a 2-D weight, got shape {w.shape}")
    g = grid(w.shape, block)
    if reuse is not None and tuple(reuse.shape) != g:
        raise ConversionError(f"FP8 scales to reuse have shape {tuple(reuse.shape)}, expected {g}")
    q = np.empty(w.shape, FP8)
    inv = np.empty(g, scale_dtype)
    for start, stop, i in _row_blocks(w.shape[0], 0, block[0]):
        q[start:stop], inv[i] = _quantize_block_row(
            w[start:stop], block[1], np.dtype(scale_dtype), None if reuse is None else np.asarray(reuse)[i]
        )
    return q, inv


def _quantize_block_row(
    w: np.ndarray, bn: int, scale_dtype: np.dtype, reuse: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """One row of blocks `[<= bm, cols]` -> (fp8, scale_inv per block)."""
    rows, cols = w.shape
    n = -(-cols // bn)
    padded = np.zeros((rows, n * bn), np.float32)
    padded[:, :cols] = w.astype(np.float32)
    tiles = padded.reshape(rows, n, bn)
    keep = np.zeros(n, bool)
    if reuse is not None:  # first the source's scales: usually every block keeps them
        candidate = reuse.astype(np.float32)
        with np.errstate(divide="ignore", invalid="ignore"):
            q_old = _to_fp8(tiles / candidate[None, :, None])
        back = (q_old.astype(np.float32) * candidate[None, :, None]).astype(w.dtype)
        same = back.view(_bits(w.dtype)) == tiles.astype(w.dtype).view(_bits(w.dtype))
        keep = same.all(axis=(0, 2)) & np.isfinite(candidate)
        if keep.all():
            return q_old.reshape(rows, n * bn)[:, :cols], reuse.astype(scale_dtype)
    amax = np.abs(tiles).max(axis=(0, 2))
    with np.errstate(divide="ignore"):
        scale = np.where(amax > 0, np.float32(FP8_MAX) / amax, np.float32(1.0)).astype(np.float32)
    inv = (np.float32(1.0) / scale).astype(scale_dtype)
    if scale_dtype != np.float32:  # quantise with the scale as stored, so dequantising inverts it
        scale = (np.float32(1.0) / inv.astype(np.float32)).astype(np.float32)
    q = _to_fp8(tiles * scale[None, :, None])
    if keep.any():
        q = np.where(keep[None, :, None], q_old, q)
        inv = np.where(keep, reuse, inv).astype(scale_dtype)
    return q.reshape(rows, n * bn)[:, :cols], inv


def _to_fp8(x: np.ndarray) -> np.ndarray:
    """Round to e4m3 (nearest even) after saturating at ±448, as torch's clamp-then-cast."""
    return np.clip(np.nan_to_num(x, nan=0.0), -FP8_MAX, FP8_MAX).astype(FP8)


def _bits(dtype: Any) -> np.dtype:
    return np.dtype(f"uint{8 * np.dtype(dtype).itemsize}")


@dataclasses.dataclass(frozen=True)
class Fp8Block:
    """Our `[in, out]` weight from an FP8 `<key>` `[out, in]` and `<key>_scale_inv` (see module
    docstring), dequantised to `dtype` for the requested slice only."""

    block: tuple[int, int]
    dtype: str = "bfloat16"

    def sources(self, key: str) -> tuple[str, ...]:
        return key, scale_key(key)

    def source_shapes(self, ours: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        d_in, d_out = ours
        return (d_out, d_in), grid((d_out, d_in), self.block)

    def source_dtypes(self) -> tuple[tuple[str, ...], ...]:
        return ("F8_E4M3",), SCALE_DTYPES

    def value_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    def hf_shape(self, ours: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(reversed(ours))

    def read_sources(self, srcs: Sequence[SliceReader], index: Index) -> np.ndarray:
        cols, rows = index  # ours is [in, out]: HF rows are our columns
        bm, bn = self.block
        weight = srcs[0]((rows, cols))
        scales = srcs[1]((slice(rows.start // bm, -(-rows.stop // bm)), slice(cols.start // bn, -(-cols.stop // bn))))
        dense = dequantize_fp8(weight, scales, self.block, row0=rows.start, col0=cols.start, dtype=self.value_dtype())
        return transposed(dense)

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        raise ConversionError("FP8 weights are exported through conversion.quant.fp8 (bind without hf_config)")


def fp8_bindings(
    bindings: Mapping[str, Binding],
    quant: Mapping[str, Any],
    stored: Container[str] | None,
    *,
    dtype: str = "bfloat16",
) -> dict[str, Binding]:
    """The bindings of an fp8 checkpoint: every linear weight (a transposed `.weight`) whose checkpoint
    has a `weight_scale_inv` sibling reads through `Fp8Block`; a scale anywhere else is refused."""
    if stored is None:
        raise ConversionError("reading an FP8 checkpoint needs its tensor index (bind(..., stored=checkpoint))")
    block = block_size(quant)
    out = {}
    for name, b in bindings.items():
        scaled = [k for k in b.hf_keys if scale_key(k) in stored]
        if not scaled:
            out[name] = b
            continue
        if type(b.transform) is not Transpose or not b.hf_keys[0].endswith(".weight"):
            raise ConversionError(
                f"tensor {scale_key(scaled[0])!r}: FP8 is read for linear weights only, not for {b.name}"
            )
        out[name] = dataclasses.replace(b, transform=Fp8Block(block, dtype))
    return out


@dataclasses.dataclass(frozen=True)
class Fp8Entry:
    """One half (`part` "weight" or "scale") of a requantised HF tensor, for `conversion.export`.

    Both halves gather the same parameter slices (so the other processes of a multi-host export
    replay the same collectives whichever half a resumed run writes first); the quantisation itself
    is computed once (`cache`)."""

    tensor: Any  # base.HFTensor
    part: str
    block: tuple[int, int]
    scale_dtype: np.dtype
    reuse: Callable[[], np.ndarray | None]
    cache: dict

    @property
    def parts(self):
        return self.tensor.parts

    def produce(self, read_ours: Callable[[str, int | None], np.ndarray]) -> np.ndarray:
        dense = self.tensor.produce(read_ours)
        if self.cache.get("key") != self.tensor.key:
            q, s = quantize_fp8(dense, self.block, scale_dtype=self.scale_dtype, reuse=self.reuse())
            self.cache.clear()
            self.cache.update(key=self.tensor.key, weight=q, scale=s)
        return self.cache[self.part]


def requantized_entries(
    entries: Sequence[TensorEntry],
    sources: Mapping[str, Any],
    *,
    source_bindings: Mapping[str, Binding],
    source: CheckpointIndex,
    block: tuple[int, int],
    expert_origins: Mapping[int, Sequence[int | None]] | None = None,
) -> tuple[list[TensorEntry], dict[str, Any]]:
    """An export's entries with every weight the source stored as FP8 requantised (weight + scales).

    A parameter is requantised when its source binding reads FP8. Scales to reuse come from the same
    tensor of the source: for a routed expert, the source expert it is an unchanged copy of
    (`expert_origins[layer][e]`, from the plan; None for merged experts), or the same index when no
    origins are given (a plain re-export); the reuse is verified block by block (`quantize_fp8`)."""
    out_entries: list[TensorEntry] = []
    out_sources = dict(sources)
    cache: dict = {}
    for entry in entries:
        tensor = sources[entry.name]
        (binding, expert), *more = tensor.parts
        src = source_bindings.get(binding.name)
        if more or src is None or not isinstance(src.transform, Fp8Block):
            out_entries.append(entry)
            continue
        if expert is None:
            candidate: int | None = 0
        elif expert_origins is not None:
            candidate = expert_origins[layer_of(binding.name)][expert]
        else:
            candidate = expert if expert < len(src.hf_keys) else None
        scales = None if candidate is None else scale_key(src.hf_keys[candidate])
        scale_dtype = source.info(scale_key(src.hf_keys[0])).dtype

        def reuse(scales: str | None = scales) -> np.ndarray | None:
            return None if scales is None else source.read_slice(scales, ())

        for part, name, shape, dtype in (
            ("weight", entry.name, entry.shape, FP8),
            ("scale", scale_key(entry.name), grid(entry.shape, block), scale_dtype),
        ):
            out_entries.append(TensorEntry(name, tuple(shape), np.dtype(dtype)))
            out_sources[name] = Fp8Entry(tensor, part, block, np.dtype(scale_dtype), reuse, cache)
    return out_entries, out_sources
