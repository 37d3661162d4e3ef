"""Multi-process primitives: one writer process, slices gathered to it, flags broadcast from it, decisions
all processes agree on (`every_process`), and a work directory of each process's own (`own_dir`).

`gather_slice(arr, index)` returns `np.asarray(arr[index])` on the writer (process 0) and None elsewhere:

- when the writer's own devices cover the slice (replicated parameters, experts it owns) it is copied
  from the writer's addressable shards, no communication, nothing launched;
- otherwise every process runs the same small `shard_map` program (compiled once per parameter
  shape and sharding, the expert number is a traced scalar): each device takes its local block of the
  requested expert (zeros if it does not own it) bit-cast to unsigned integers, a `psum` over the
  expert-dimension mesh axes leaves the owner's bits, and `all_gather` over the other sharded
  dimensions completes the tensor; the result is replicated, so the writer reads it locally. Only the
  slice travels (not the whole stacked parameter, which a jitted `a[e]` with a traced `e` would
  all-gather), and integer sums of one owner and zeros are exact, so the bits are the source's (a
  float collective would canonicalise NaN payloads; XLA:CPU also widens bf16 collectives to f32).

The decision between the two paths depends only on the sharding (global metadata), never on which
process asks, so all processes take the same path and enter collectives in the same order, as long as
they call `gather_slice` for the same tensors in the same order. Used by export (one HF tensor at a
time) and by the aligned merge (one group of experts at a time).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec


class MultihostError(ValueError):
    """A slice or collective request that the processes cannot serve."""


WRITER = 0
Box = tuple[tuple[int, int], ...]


def is_writer() -> bool:
    """True on the one process that writes export files (process 0; the only one on a single host)."""
    return jax.process_index() == WRITER


def barrier(name: str) -> None:
    """All processes wait here (no-op on one process); `name` must be the same on all of them."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def _normalise(arr: jax.Array, index: tuple) -> tuple[tuple[tuple[int, int], ...], tuple[int, ...]]:
    """((start, stop) per axis, axes to squeeze) of a basic index of ints and unit-step slices."""
    if len(index) > arr.ndim:
        raise MultihostError(f"gather_slice: index {index} has more axes than shape {arr.shape}")
    box, squeeze = [], []
    for axis, dim in enumerate(arr.shape):
        s = index[axis] if axis < len(index) else slice(None)
        if isinstance(s, int | np.integer):
            i = int(s) + (dim if s < 0 else 0)
            if not 0 <= i < dim:
                raise MultihostError(f"gather_slice: index {s} out of range for axis {axis} of {arr.shape}")
            box.append((i, i + 1))
            squeeze.append(axis)
        elif isinstance(s, slice):
            start, stop, step = s.indices(dim)
            if step != 1:
                raise MultihostError(f"gather_slice: strided index {s} is not supported")
            box.append((start, max(start, stop)))
        else:
            raise MultihostError(f"gather_slice: unsupported index {s!r}")
    return tuple(box), tuple(squeeze)


def _shard_box(index: tuple[slice, ...], shape: tuple[int, ...]) -> Box:
    return tuple(s.indices(d)[:2] for s, d in zip(index, shape, strict=True))


def _overlap(a: Box, b: Box) -> Box | None:
    out = tuple((max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in zip(a, b, strict=True))
    return None if any(lo >= hi for lo, hi in out) else out


def _volume(box: Box) -> int:
    return math.prod(hi - lo for lo, hi in box)


def held_by(arr: jax.Array, process: int, box: Box) -> bool:
    """Whether `process`'s devices together hold every element of `box` (from global metadata only)."""
    boxes = {
        _shard_box(idx, arr.shape)
        for dev, idx in arr.sharding.devices_indices_map(arr.shape).items()
        if dev.process_index == process
    }  # a NamedSharding's distinct shard boxes tile the array without overlap
    return sum(_volume(o) for b in boxes if (o := _overlap(b, box)) is not None) == _volume(box)


def local_slice(arr: jax.Array, box: Box) -> np.ndarray:
    """`arr[box]` assembled from this process's addressable shards (each distinct block copied once)."""
    out = np.empty(tuple(hi - lo for lo, hi in box), dtype=arr.dtype)
    seen: set[Box] = set()
    filled = 0
    for shard in arr.addressable_shards:
        have = _shard_box(shard.index, arr.shape)
        if have in seen or (o := _overlap(have, box)) is None:
            continue
        seen.add(have)
        src = tuple(slice(lo - h0, hi - h0) for (lo, hi), (h0, _) in zip(o, have, strict=True))
        dst = tuple(slice(lo - b0, hi - b0) for (lo, hi), (b0, _) in zip(o, box, strict=True))
        out[dst] = np.asarray(shard.data)[src]
        filled += _volume(o)
    if filled != out.size:
        raise MultihostError(
            f"local_slice: only {filled} of {out.size} elements are addressable from process {jax.process_index()}"
        )
    return out


def _uint(dtype: np.dtype) -> np.dtype:
    return np.dtype(f"uint{8 * np.dtype(dtype).itemsize}")


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


@functools.lru_cache(maxsize=256)
def _gather_fn(mesh, spec: PartitionSpec, shape: tuple[int, ...], dtype: np.dtype, lead: bool) -> Callable:
    """Jitted (arr, i) -> replicated arr[i] (lead) or replicated arr, moving unsigned-integer bits."""
    spec = tuple(spec) + (None,) * (len(shape) - len(spec))
    utype = _uint(dtype)

    def body(x, i):
        x = lax.bitcast_convert_type(x, utype) if x.dtype != utype else x
        rest = spec
        if lead:
            axes0, rest = _axes(spec[0]), spec[1:]
            if axes0:
                n = x.shape[0]
                start = lax.axis_index(axes0) * n
                mine = (i >= start) & (i < start + n)
                x = lax.dynamic_index_in_dim(x, jnp.clip(i - start, 0, n - 1), keepdims=False)
                x = lax.psum(jnp.where(mine, x, jnp.zeros_like(x)), axes0)
            else:
                x = lax.dynamic_index_in_dim(x, i, keepdims=False)
        for axis, entry in enumerate(rest):
            if _axes(entry):
                x = lax.all_gather(x, _axes(entry), axis=axis, tiled=True)
        return x

    mapped = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(PartitionSpec(*spec), PartitionSpec()),
        out_specs=PartitionSpec(),
        check_vma=False,  # all_gather results are typed as varying; they are replicated by construction
    )
    return jax.jit(mapped, out_shardings=NamedSharding(mesh, PartitionSpec()))


def gather_slice(arr: jax.Array, index: tuple = ()) -> np.ndarray | None:
    """`np.asarray(arr[index])` on the writer process, None on the others (see module docstring).

    Every process must call this for the same arrays and indices in the same order. `index` is any
    basic index of ints and unit-step slices when the writer holds the slice; otherwise `()` or one
    leading int (an expert), the only forms export needs.
    """
    box, squeeze = _normalise(arr, index)
    if jax.process_count() == 1 or held_by(arr, WRITER, box):
        if not is_writer():
            return None
        out = local_slice(arr, box)
        return out.squeeze(axis=squeeze) if squeeze else out
    lead = len(index) == 1 and isinstance(index[0], int | np.integer)
    if index != () and not lead:
        raise MultihostError(
            f"gather_slice: index {index} is held by other processes; only () or (expert,) can be gathered"
        )
    sharding = arr.sharding
    if not isinstance(sharding, NamedSharding):
        raise MultihostError(f"gather_slice: needs a NamedSharding across processes, got {sharding}")
    fn = _gather_fn(sharding.mesh, sharding.spec, tuple(arr.shape), np.dtype(arr.dtype), lead)
    out = fn(arr, np.int32(box[0][0] if lead else 0))
    if not is_writer():
        return None
    bits = np.asarray(out.addressable_shards[0].data)
    return bits.view(np.dtype(arr.dtype))


def broadcast_flags(flags: Sequence[bool]) -> list[bool]:
    """The writer's `flags` on every process (the others pass placeholders of the same length)."""
    if jax.process_count() == 1:
        return [bool(f) for f in flags]
    return [bool(f) for f in multihost_utils.broadcast_one_to_all(np.asarray(flags, np.int32))]


def broadcast_array(x: np.ndarray) -> np.ndarray:
    """The writer's `x` on every process (the others pass an array of the same shape and dtype)."""
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.broadcast_one_to_all(np.asarray(x)), np.asarray(x).dtype)


def every_process(value: int) -> list[int]:
    """Every process's `value`, in process order (`[value]` on one process): for decisions all processes
    must take alike from facts each sees on its own host (a file it saved, its free memory)."""
    if jax.process_count() == 1:
        return [int(value)]
    return np.frombuffer(all_processes_bytes(np.int64(value).tobytes()), np.int64).tolist()


def own_dir(directory: str) -> str:
    """`directory` on one process; its subdirectory `process<i>` on several, so processes that share a
    disk (one host) never write the same work file, and each host of a pod keeps its own copy."""
    if jax.process_count() == 1:
        return directory
    return os.path.join(directory, f"process{jax.process_index()}")


def all_processes_bytes(data: bytes) -> bytes:
    """Every process's `data` (same length everywhere) concatenated in process order; `data` itself on
    one process. Used to combine per-process digests into one all processes agree on."""
    if jax.process_count() == 1:
        return data
    every = multihost_utils.process_allgather(np.frombuffer(data, np.uint8))
    return np.asarray(every, np.uint8).tobytes()
