"""Hugging Face directory -> sharded parameters, streamed tensor by tensor and slice by slice.

Every leaf is assembled from the slices this process's devices own (`_make_leaf`, the shape of
`jax.make_array_from_callback` with replicas read once), and `read` pulls exactly those bytes from the safetensors files
(per-expert HF tensors are read one expert at a time and stacked only for the requested slice). The
whole model is never held on the host; on several hosts each reads only its own shards.

Large leaves take the fast path (`_stored_layout_leaf`): positioned reads into page-aligned buffers,
which the CPU backend adopts without a copy (an accelerator receives them as they are). On accelerators
the host only copies bytes in the checkpoint's own layout and the [out, in] -> [in, out] transposes (and
any dtype cast) run on the devices as one jitted permutation whose shardings are the target's with the
axes permuted, so no data moves between devices. On CPU devices, whose memory is the host's, the reading
threads transpose as they copy out of the file instead (one write of each buffer, replicas share it).
Small leaves are read and transposed on the host (no compile per shape).

On accelerators the leaves are also pipelined (`_load_pipelined`): several leaves are in flight at once
(reads of one overlap the host-to-device copies and device permutations of others), each shard's
positioned reads are split into chunks read by a pool of threads, and the device permutations are
compiled ahead, once per distinct (shape, dtype, layout), on a thread of their own while the first
leaves are read, so no compile waits on the critical path. CPU devices keep the sequential loop (their
buffers are the parameters themselves; its memory goal is measured by `scripts/bench_convert.py`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from conversion.families.base import Binding, Identity, Transpose
from conversion.hf_dir import binding_reader, check_bindings, family_of, normalise_index, provenance_of, read_hf_config
from conversion.quant.bindings import read_bindings
from conversion.safetensors_io import CheckpointIndex
from grape_jax.core.config import MoEConfig
from grape_jax.core.model import ModelInfo, MoEModel, fill_model
from grape_jax.core.sharding import DEFAULT_RULES, RunContext, ShardingRules


def _make_leaf(shape: tuple[int, ...], sharding, callback, pool=None) -> jax.Array:
    """Like `jax.make_array_from_callback`, but each distinct shard is read once (replicas share the
    host copy) and put on its devices as soon as it is read, so the host holds at most one shard per
    reading thread, not the whole leaf. Only this process's devices are visited, so on several hosts
    each reads only its own slices. With a thread `pool` the distinct shards are read concurrently
    (positioned reads and copies release the GIL)."""
    indices = sharding.addressable_devices_indices_map(shape)
    wanting: dict[tuple, list] = {}
    first: dict[tuple, tuple] = {}
    for device, index in indices.items():
        key = tuple(s.indices(d)[:2] for s, d in zip(index, shape, strict=True))
        wanting.setdefault(key, []).append(device)
        first.setdefault(key, index)

    def load(key: tuple) -> list[tuple[Any, jax.Array]]:
        host = callback(first[key])
        return [(device, jax.device_put(host, device)) for device in wanting[key]]

    loaded = map(load, wanting) if pool is None else pool.map(load, wanting)
    arrays = dict(pair for pairs in loaded for pair in pairs)
    return jax.make_array_from_single_device_arrays(shape, sharding, [arrays[d] for d in indices])


# Leaves at least this big take `_stored_layout_leaf` (smaller ones: the host path, no compile per shape).
DEVICE_LAYOUT_MIN_BYTES = 4 << 20
READ_THREADS = 4  # concurrent slice reads of one leaf (I/O and copies release the GIL)
# Accelerators (`_load_pipelined`): leaves in flight at once, reading threads shared by them, and the
# bytes of one read task (a shard's rows are split into tasks of about this size).
LEAVES_IN_FLIGHT = 4
ACCELERATOR_READ_THREADS = 8
READ_CHUNK_BYTES = 16 << 20
_PAGE = 4096


def aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """An uninitialised array whose data starts on a page boundary (CPU devices adopt such buffers)."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + _PAGE, np.uint8)
    start = (-raw.ctypes.data) % _PAGE
    return raw[start : start + nbytes].view(dtype).reshape(shape)


def stored_permutation(b: Binding) -> tuple[int, ...] | None:
    """Axes permutation from the checkpoint's stacked layout to ours, or None when the binding's
    transform is not a plain copy/transpose (fused, quantised: read on the host)."""
    n = len(b.spec.shape)
    if type(b.transform) is Identity:
        return tuple(range(n))
    if type(b.transform) is Transpose:
        return (0, *reversed(range(1, n))) if b.per_expert else tuple(reversed(range(n)))
    return None


@functools.cache
def _relayout(perm: tuple[int, ...], dtype: np.dtype, sharding: jax.sharding.Sharding):
    return jax.jit(lambda x: jnp.transpose(x, perm).astype(dtype), out_shardings=sharding)


def compile_relayout(
    perm: tuple[int, ...],
    dtype: np.dtype,
    sharding: jax.sharding.Sharding,
    raw_shape: tuple[int, ...],
    stored: np.dtype,
):
    """The device permutation of a raw leaf of `raw_shape`/`stored`, compiled ahead of its data (the
    raw leaf is placed with `sharding`'s axes permuted, as `_stored_layout_leaf` builds it)."""
    raw = jax.ShapeDtypeStruct(raw_shape, stored, sharding=_permuted(sharding, perm))
    return _relayout(perm, np.dtype(dtype), sharding).lower(raw).compile()


def _permuted(sharding: jax.sharding.Sharding, perm: tuple[int, ...]) -> jax.sharding.Sharding:
    if not isinstance(sharding, NamedSharding):
        return sharding  # one device
    spec = tuple(sharding.spec) + (None,) * (len(perm) - len(sharding.spec))
    permuted = [spec[p] for p in perm]
    while permuted and permuted[-1] is None:  # as logical_to_pspec writes specs
        permuted.pop()
    return NamedSharding(sharding.mesh, PartitionSpec(*permuted))


def _host_memory(sharding: jax.sharding.Sharding) -> bool:
    """The devices are CPU devices, whose memory is host memory."""
    return all(d.platform == "cpu" for d in sharding.device_set)


def _read_layout(b: Binding, perm: tuple[int, ...], sharding) -> tuple[bool, tuple[int, ...], tuple[int, ...]]:
    """(transpose while reading, permutation left for the devices, shape of the leaf as read)."""
    lead = 1 if b.per_expert else 0
    identity = tuple(range(len(perm)))
    transpose_on_read = perm != identity and len(perm) - lead == 2 and _host_memory(sharding)
    read_perm = identity if transpose_on_read else perm
    return transpose_on_read, read_perm, tuple(b.spec.shape[p] for p in read_perm)


def _read_chunked(ckpt: CheckpointIndex, key: str, box: tuple[slice, ...], out: np.ndarray, pool) -> list:
    """Submit the positioned reads of `tensor[box]` into `out` as tasks of about READ_CHUNK_BYTES of rows."""
    rows = box[0]
    step = max(1, READ_CHUNK_BYTES // max(1, out[:1].nbytes))
    return [
        pool.submit(
            ckpt.read_into,
            key,
            (slice(r, min(r + step, rows.stop)), *box[1:]),
            out[r - rows.start : min(r + step, rows.stop) - rows.start],
        )
        for r in range(rows.start, rows.stop, step)
    ]


def _stored_layout_leaf(
    ckpt: CheckpointIndex,
    b: Binding,
    perm: tuple[int, ...],
    sharding,
    target: np.dtype,
    pool=None,
    chunk_pool=None,
    relayout=None,
):
    """The leaf read by positioned reads into page-aligned buffers, then permuted/cast on the devices.

    On CPU devices a 2-D transpose is done by the reading threads instead, a few cached rows at a time
    as they leave the file: the buffer is then written once in its final layout (not written and then
    permuted into a second fresh buffer) and replicas of a slice share it. With `chunk_pool` each shard's
    reads are split into row chunks read concurrently by that pool; `relayout` (if given) returns the
    compiled device permutation to use."""
    stored = np.dtype(ckpt.info(b.hf_keys[0]).dtype)
    lead = 1 if b.per_expert else 0
    transpose_on_read, read_perm, raw_shape = _read_layout(b, perm, sharding)

    def read(index: tuple) -> np.ndarray:
        index = normalise_index(index, raw_shape)
        out = aligned_empty(tuple(s.stop - s.start for s in index), stored)
        box = index[lead:][::-1] if transpose_on_read else index[lead:]
        parts = (
            [(b.hf_keys[e], out[i]) for i, e in enumerate(range(index[0].start, index[0].stop))]
            if b.per_expert
            else [(b.hf_keys[0], out)]
        )
        if chunk_pool is not None and not transpose_on_read and out.ndim > lead:
            for task in [t for key, part in parts for t in _read_chunked(ckpt, key, box, part, chunk_pool)]:
                task.result()
            return out
        for key, part in parts:
            ckpt.read_into(key, box, part, transpose=transpose_on_read)
        return out

    raw = _make_leaf(raw_shape, _permuted(sharding, read_perm), read, pool=pool)
    if read_perm == tuple(range(len(perm))) and stored == target:
        return raw
    fn = relayout() if relayout is not None else _relayout(read_perm, np.dtype(target), sharding)
    out = fn(raw)
    raw.delete()
    return out


def keys_read(b: Binding, sharding: jax.sharding.Sharding) -> list[str]:
    """The checkpoint tensors this process reads for `b`: per-expert ones only for the experts its
    devices hold (on several hosts each host reads its own)."""
    if not b.per_expert:
        return list(b.hf_sources())
    experts: set[int] = set()
    for index in sharding.addressable_devices_indices_map(b.spec.shape).values():
        experts.update(range(*index[0].indices(b.spec.shape[0])[:2]))
    sources = getattr(b.transform, "sources", None)
    return [k for e in sorted(experts) for k in (sources(b.hf_keys[e]) if sources else (b.hf_keys[e],))]


@dataclasses.dataclass(frozen=True)
class _LeafPlan:
    """How one leaf is read: `perm` None = the host path (small or not a plain copy/transpose)."""

    target: np.dtype
    perm: tuple[int, ...] | None
    raw: np.dtype  # dtype of the stored tensors


def _leaf_plan(ckpt: CheckpointIndex, b: Binding, dtype: Any) -> _LeafPlan:
    raw = np.dtype(ckpt.info(next(iter(b.hf_sources()))).dtype)
    stored = np.dtype(b.value_dtype(raw))
    target = stored if dtype is None else np.dtype(dtype)
    perm = stored_permutation(b)
    if perm is not None and int(np.prod(b.spec.shape)) * stored.itemsize < DEVICE_LAYOUT_MIN_BYTES:
        perm = None
    return _LeafPlan(target, perm, raw)


def _load_leaf(
    ckpt: CheckpointIndex, b: Binding, sharding, plan: _LeafPlan, *, pool=None, chunk_pool=None, relayout=None
) -> jax.Array:
    if plan.perm is not None:
        return _stored_layout_leaf(
            ckpt, b, plan.perm, sharding, plan.target, pool=pool, chunk_pool=chunk_pool, relayout=relayout
        )
    read = binding_reader(ckpt, b)
    return _make_leaf(b.spec.shape, sharding, lambda index: read(index).astype(plan.target, copy=False))


def _load_pipelined(
    ckpt: CheckpointIndex, bindings: Mapping[str, Binding], shardings: Mapping, plans: Mapping[str, _LeafPlan]
) -> dict[str, jax.Array]:
    """The accelerator path (module docstring): LEAVES_IN_FLIGHT leaves at once, chunked concurrent
    reads, device permutations compiled ahead on their own thread in the order the leaves need them."""
    names = list(bindings)
    signatures = {}
    for name in names:
        plan = plans[name]
        if plan.perm is None:
            continue
        _, read_perm, raw_shape = _read_layout(bindings[name], plan.perm, shardings[name])
        if read_perm != tuple(range(len(read_perm))) or plan.raw != plan.target:
            signatures[name] = (read_perm, plan.target, shardings[name], raw_shape, plan.raw)
    with (
        ThreadPoolExecutor(1) as compiler,
        ThreadPoolExecutor(1) as ahead,
        ThreadPoolExecutor(ACCELERATOR_READ_THREADS) as reads,
        ThreadPoolExecutor(LEAVES_IN_FLIGHT) as leaves,
    ):
        compiled: dict[tuple, Any] = {}
        for sig in signatures.values():
            if sig not in compiled:
                compiled[sig] = compiler.submit(compile_relayout, *sig)

        def one(i: int) -> jax.Array:
            if i + LEAVES_IN_FLIGHT < len(names):  # a hint: the disk works on a later leaf meanwhile
                later = names[i + LEAVES_IN_FLIGHT]
                ahead.submit(ckpt.prefetch, keys_read(bindings[later], shardings[later]))
            name = names[i]
            sig = signatures.get(name)
            relayout = None if sig is None else compiled[sig].result
            return _load_leaf(ckpt, bindings[name], shardings[name], plans[name], chunk_pool=reads, relayout=relayout)

        for i in range(min(LEAVES_IN_FLIGHT, len(names))):
            ahead.submit(ckpt.prefetch, keys_read(bindings[names[i]], shardings[names[i]]))
        futures = [leaves.submit(one, i) for i in range(len(names))]
        try:
            return {name: f.result() for name, f in zip(names, futures, strict=True)}
        except BaseException:
            for f in futures:  # the leaves not started yet are not read after an error
                f.cancel()
            raise


@dataclasses.dataclass(frozen=True)
class HFReader:
    """An HF directory opened for loading onto a run context (`open_hf`): its config and how each of its
    parameters is read and placed. `read(names)` loads any subset of parameters (a layer streamed at a
    time: `grape_jax.stream`), `load_hf` all of them."""

    path: str
    cfg: MoEConfig
    family: Any
    hf: dict
    ckpt: CheckpointIndex
    bindings: Mapping[str, Binding]
    ctx: RunContext
    shardings: Mapping[str, jax.sharding.Sharding]
    plans: Mapping[str, _LeafPlan]

    def read(self, names: Sequence[str]) -> dict[str, jax.Array]:
        """The parameters `names`, each read straight into its sharding (module docstring)."""
        bindings = {name: self.bindings[name] for name in names}
        if not any(_host_memory(self.shardings[n]) for n in names):
            return _load_pipelined(self.ckpt, bindings, self.shardings, self.plans)
        params, names = {}, list(names)
        with ThreadPoolExecutor(READ_THREADS) as pool, ThreadPoolExecutor(1) as ahead:

            def prefetch(i: int) -> None:  # a hint, on its own thread: the disk works while we copy
                if i < len(names):
                    ahead.submit(self.ckpt.prefetch, keys_read(bindings[names[i]], self.shardings[names[i]]))

            prefetch(0)
            for i, name in enumerate(names):
                prefetch(i + 1)
                params[name] = _load_leaf(self.ckpt, bindings[name], self.shardings[name], self.plans[name], pool=pool)
        return params

    def abstract(self, name: str) -> jax.ShapeDtypeStruct:
        """Shape, dtype and sharding parameter `name` will have when read (nothing is read)."""
        spec = self.bindings[name].spec
        return jax.ShapeDtypeStruct(spec.shape, self.plans[name].target, sharding=self.shardings[name])

    def nbytes(self) -> int:
        """Bytes of every parameter as loaded (the dtype each leaf will have)."""
        return sum(int(np.prod(b.spec.shape)) * self.plans[n].target.itemsize for n, b in self.bindings.items())


def open_hf(
    model_dir: str | os.PathLike, *, mesh: Mesh | None = None, rules: ShardingRules = DEFAULT_RULES, dtype: Any = None
) -> HFReader:
    """An HF directory checked against its config.json (every tensor present with the implied shape)
    and ready to read parameters onto `mesh` by `rules`; no weight is read."""
    model_dir = os.fspath(model_dir)
    hf = read_hf_config(model_dir)
    family = family_of(hf, source=os.path.join(model_dir, "config.json"))
    cfg = family.config_from_hf(hf)
    ckpt = CheckpointIndex.open(model_dir)
    bindings = read_bindings(family, cfg, hf, ckpt)
    check_bindings(ckpt, bindings, model_dir)
    ctx = RunContext(mesh, rules)
    shardings = {name: ctx.sharding(b.spec.shape, b.spec.axes) for name, b in bindings.items()}
    plans = {name: _leaf_plan(ckpt, b, dtype) for name, b in bindings.items()}
    return HFReader(model_dir, cfg, family, hf, ckpt, bindings, ctx, shardings, plans)


def load_hf(
    model_dir: str | os.PathLike,
    *,
    mesh: Mesh | None = None,
    rules: ShardingRules = DEFAULT_RULES,
    dtype: Any = None,
) -> MoEModel:
    """An HF MoE checkpoint as a `MoEModel` whose parameters are sharded on `mesh` by `rules` (see the
    module docstring); `info` records the family, the source and its config.json.

    dtype None keeps each tensor's stored dtype (bit-identical round trips); otherwise leaves are cast.
    """
    reader = open_hf(model_dir, mesh=mesh, rules=rules, dtype=dtype)
    info = ModelInfo.create(
        family=reader.family.name,
        source=os.path.abspath(reader.path),
        hf_config=reader.hf,
        provenance=provenance_of(reader.path, dtype),
    )
    params = reader.read(list(reader.bindings))
    return fill_model(reader.cfg, lambda name, spec, sharding: params.pop(name), ctx=reader.ctx, info=info)
