"""Write safetensors checkpoints one tensor at a time, resumable shard by shard.

Every offset comes from shapes alone: the header is written first, then each tensor as it is produced,
so peak host memory is one tensor. Files are byte-for-byte what `safetensors.torch.save_file` writes for
the same tensors (format notes in `conversion.safetensors_io`); sharding and the index follow
`transformers`' `save_pretrained`. Each shard is written through `grape_jax.base.atomic.atomic_write` (a temp
sibling renamed when complete), so a file under its final name is always whole; `completed_shards` finds
them for a resumed export.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from conversion.safetensors_dtypes import _DTYPE_RANK, CheckpointError, _storable, dtype_to_numpy, numpy_to_dtype
from conversion.safetensors_io import INDEX_FILE, SINGLE_FILE, _is_dim
from grape_jax.base import jsonio
from grape_jax.base.atomic import atomic_write, atomic_write_text


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    """One tensor to write: its name, shape and (storable) NumPy dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or self.name == "__metadata__":
            raise CheckpointError(f"tensor name {self.name!r} is not a usable safetensors key")
        shape = tuple(int(s) if isinstance(s, (int, np.integer)) else s for s in self.shape)
        if not all(_is_dim(s) for s in shape):
            raise CheckpointError(f"tensor {self.name!r}: shape {self.shape!r} is not non-negative integers")
        try:
            dtype = dtype_to_numpy(numpy_to_dtype(self.dtype))
        except CheckpointError as e:
            raise CheckpointError(f"tensor {self.name!r}: {e}") from None
        object.__setattr__(self, "shape", shape)
        object.__setattr__(self, "dtype", dtype)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """One output file and its tensors, in the order they are written (and produced)."""

    filename: str
    entries: tuple[TensorEntry, ...]


def write_order(entries: Sequence[TensorEntry]) -> list[TensorEntry]:
    """The reference writer's order within one file: dtype (widest enum first), then name."""
    return sorted(entries, key=lambda e: (-_DTYPE_RANK[numpy_to_dtype(e.dtype)], e.name))


def plan_shards(entries: Sequence[TensorEntry], *, max_shard_bytes: int = 5_000_000_000) -> list[ShardPlan]:
    """Split `entries` (in the given order) into files of at most `max_shard_bytes` bytes of data.

    Same rule as `huggingface_hub.split_torch_state_dict_into_shards` (what `save_pretrained` uses):
    greedy in order; a tensor bigger than the limit gets a file of its own, placed when it is met.
    One file is `model.safetensors`, several are `model-00001-of-0000N.safetensors`.
    """
    if not isinstance(max_shard_bytes, (int, np.integer)) or max_shard_bytes <= 0:
        raise CheckpointError(f"max_shard_bytes must be a positive integer, got {max_shard_bytes!r}")
    entries = list(entries)
    seen: set[str] = set()
    for e in entries:
        if e.name in seen:
            raise CheckpointError(f"tensor {e.name!r} is listed twice")
        seen.add(e.name)
    groups: list[list[TensorEntry]] = []
    current: list[TensorEntry] = []
    size = 0
    for e in entries:
        if e.nbytes > max_shard_bytes:
            groups.append([e])
            continue
        if current and size + e.nbytes > max_shard_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(e)
        size += e.nbytes
    if current or not groups:
        groups.append(current)
    if len(groups) == 1:
        return [ShardPlan(SINGLE_FILE, tuple(write_order(groups[0])))]
    n = len(groups)
    return [ShardPlan(f"model-{i + 1:05d}-of-{n:05d}.safetensors", tuple(write_order(g))) for i, g in enumerate(groups)]


def header_bytes(entries: Sequence[TensorEntry], metadata: dict[str, str] | None) -> bytes:
    """The JSON header (space-padded to a multiple of 8) for `entries` written in the given order."""
    header: dict[str, Any] = {}
    if metadata is not None:
        if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
        ):
            raise CheckpointError(f"safetensors metadata must map strings to strings, got {metadata!r}")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for e in entries:
        header[e.name] = {
            "dtype": numpy_to_dtype(e.dtype),
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return raw + b" " * (-len(raw) % 8)


def _write_shard(
    path: str, shard: ShardPlan, produce: Callable[[TensorEntry], Any], metadata: dict[str, str] | None
) -> None:
    header = header_bytes(shard.entries, metadata)

    def write(f) -> None:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for e in shard.entries:
            arr = np.asarray(produce(e))
            if tuple(arr.shape) != e.shape or _storable(arr.dtype) != numpy_to_dtype(e.dtype):
                raise CheckpointError(
                    f"{path}: tensor {e.name!r} produced as {tuple(arr.shape)} {arr.dtype}, planned {e.shape} {e.dtype}"
                )
            arr = np.ascontiguousarray(arr, dtype=e.dtype)  # little-endian, C order (no copy if already)
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))
            del arr
        expected = 8 + len(header) + sum(e.nbytes for e in shard.entries)
        if f.tell() != expected:
            raise CheckpointError(f"{path}: wrote {f.tell()} bytes, planned {expected}")

    atomic_write(path, write)


def _default_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    return {"format": "pt"} if metadata is None else metadata


def completed_shards(
    out_dir: str | os.PathLike,
    shards: Sequence[ShardPlan],
    *,
    metadata: dict[str, str] | None = None,
) -> list[bool]:
    """Which planned shards already exist in `out_dir` whole: the exact planned header and size.

    Shards appear under their final name only when complete (see `_write_shard`), so this is the
    resume point of an interrupted export whose inputs are unchanged (the caller checks that)."""
    metadata = _default_metadata(metadata)
    done = []
    for shard in shards:
        path = os.path.join(os.fspath(out_dir), shard.filename)
        header = header_bytes(shard.entries, metadata)
        expected = 8 + len(header) + sum(e.nbytes for e in shard.entries)
        ok = False
        if os.path.isfile(path) and os.path.getsize(path) == expected:
            with open(path, "rb") as f:
                ok = f.read(8 + len(header)) == struct.pack("<Q", len(header)) + header
        done.append(ok)
    return done


def write_checkpoint(
    out_dir: str | os.PathLike,
    entries: Sequence[TensorEntry],
    produce: Callable[[TensorEntry], Any],
    *,
    max_shard_bytes: int = 5_000_000_000,
    metadata: dict[str, str] | None = None,
    skip: Sequence[bool] | None = None,
    on_shard: Callable[[str], None] | None = None,
) -> list[str]:
    """Write `entries` as safetensors shards (+ index when several), one produced tensor at a time.

    `produce(entry)` is called once per entry, shard by shard in `ShardPlan.entries` order, and must
    return an array of exactly the entry's shape and dtype. `metadata` defaults to {"format": "pt"}
    (what transformers writes). `skip[i]` leaves shard i as it is (already written: `completed_shards`);
    its tensors are not produced. `on_shard(path)` is called after each shard is written. Returns the
    paths of the checkpoint's files.
    """
    out_dir = os.fspath(out_dir)
    if not os.path.isdir(out_dir):
        raise CheckpointError(f"{out_dir}: output directory does not exist")
    metadata = _default_metadata(metadata)
    entries = list(entries)
    shards = plan_shards(entries, max_shard_bytes=max_shard_bytes)
    skip = [False] * len(shards) if skip is None else list(skip)
    if len(skip) != len(shards):
        raise CheckpointError(f"skip has {len(skip)} flags for {len(shards)} shards")
    written = []
    for shard, done in zip(shards, skip, strict=True):
        path = os.path.join(out_dir, shard.filename)
        if not done:
            _write_shard(path, shard, produce, metadata)
            if on_shard is not None:
                on_shard(path)
        written.append(path)
    if len(shards) > 1:
        index = {
            "metadata": {
                "total_parameters": sum(int(np.prod(e.shape, dtype=np.int64)) for e in entries),
                "total_size": sum(e.nbytes for e in entries),
            },
            "weight_map": {e.name: s.filename for s in shards for e in s.entries},
        }
        path = os.path.join(out_dir, INDEX_FILE)
        atomic_write_text(path, jsonio.dumps(index, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written
