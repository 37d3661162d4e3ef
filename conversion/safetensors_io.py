"""Streaming safetensors: read any slice of any tensor, write checkpoints one tensor at a time.

Format: 8-byte little-endian header length N, N bytes of JSON `{name: {dtype, shape, data_offsets}}`
(+ optional `__metadata__`), then raw little-endian tensor bytes. Reading memory-maps the file and
copies only the requested slice; writing computes every offset from shapes alone, writes the header,
then streams each tensor as it is produced. bfloat16/float8 come from `ml_dtypes` (safetensors' own
NumPy backend cannot read bfloat16). Nothing is ever unpickled.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "U16": np.dtype(np.uint16),
    "U32": np.dtype(np.uint32), "U64": np.dtype(np.uint64),
}
_NAMES = {v: k for k, v in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated or inconsistent."""


def dtype_to_numpy(name: str) -> np.dtype:
    if name not in DTYPES:
        raise CheckpointError(f"unknown safetensors dtype {name!r}; known: {sorted(DTYPES)}")
    return DTYPES[name]


def numpy_to_dtype(dtype: Any) -> str:
    dtype = np.dtype(dtype)
    if dtype not in _NAMES:
        raise CheckpointError(f"dtype {dtype} cannot be stored in safetensors")
    return _NAMES[dtype]


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one file's header (only the header is read)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated (no 8-byte header length)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: header length {n} exceeds the file size {size} (truncated?)")
            header = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    try:
        meta = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: malformed safetensors header ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: header is not a JSON object")
    metadata = meta.pop("__metadata__", None) or {}
    data_start = 8 + n
    infos = {}
    for key, entry in meta.items():
        try:
            dtype = dtype_to_numpy(entry["dtype"])
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except CheckpointError as e:
            raise CheckpointError(f"{path}: tensor {key!r}: {e}") from None
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {key!r}: header entry needs dtype, shape, data_offsets") from None
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != nbytes or begin < 0:
            raise CheckpointError(
                f"{path}: tensor {key!r}: data_offsets {begin}..{end} hold {end - begin} bytes, "
                f"shape {shape} x {dtype} needs {nbytes}"
            )
        if data_start + end > size:
            raise CheckpointError(
                f"{path}: tensor {key!r} ends at byte {data_start + end} beyond the file size {size} (truncated)"
            )
        infos[key] = TensorInfo(path, dtype, shape, data_start + begin, nbytes)
    return infos, metadata


class CheckpointIndex:
    """All tensors of an HF checkpoint dir: key -> (file, dtype, shape, offset), with slice reads."""

    def __init__(self, directory: str, infos: dict[str, TensorInfo], metadata: dict[str, str]):
        self.directory = directory
        self._infos = infos
        self.metadata = metadata
        self._maps: dict[str, np.memmap] = {}

    @classmethod
    def open(cls, directory: str | os.PathLike) -> CheckpointIndex:
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise CheckpointError(f"{directory}: checkpoint directory not found")
        index_path = os.path.join(directory, INDEX_FILE)
        infos: dict[str, TensorInfo] = {}
        metadata: dict[str, str] = {}
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_path}: malformed index ({e})") from None
            files = sorted(set(weight_map.values()))
            headers = {}
            for fname in files:
                path = os.path.join(directory, fname)
                if not os.path.isfile(path):
                    raise CheckpointError(f"{path}: shard named in {INDEX_FILE} is missing")
                headers[fname], meta = read_header(path)
                metadata.update(meta)
            for key, fname in weight_map.items():
                if key not in headers[fname]:
                    raise CheckpointError(f"{os.path.join(directory, fname)}: tensor {key!r} named in the index is absent")
                infos[key] = headers[fname][key]
        else:
            files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
            if not files:
                pickled = [f for f in os.listdir(directory) if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
                what = f" (found {pickled[0]}: only safetensors are loaded, pickles never)" if pickled else ""
                raise CheckpointError(f"{directory}: no *.safetensors files{what}")
            for fname in files:
                found, meta = read_header(os.path.join(directory, fname))
                infos.update(found)
                metadata.update(meta)
        return cls(directory, infos, metadata)

    def keys(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, key: str) -> bool:
        return key in self._infos

    def info(self, key: str) -> TensorInfo:
        if key not in self._infos:
            raise CheckpointError(f"{self.directory}: tensor {key!r} not found")
        return self._infos[key]

    def _array(self, key: str) -> np.ndarray:
        info = self.info(key)
        if info.file not in self._maps:
            self._maps[info.file] = np.memmap(info.file, dtype=np.uint8, mode="r")
        raw = self._maps[info.file][info.offset : info.offset + info.nbytes]
        return raw.view(info.dtype.newbyteorder("<")).reshape(info.shape)

    def read(self, key: str) -> np.ndarray:
        return np.array(self._array(key))

    def read_slice(self, key: str, index: tuple) -> np.ndarray:
        """Copy of `tensor[index]`; only the pages the slice touches are read from disk.

        The copy goes through an unsigned-integer view of the same width (NumPy's strided copy of
        ml_dtypes' bfloat16/float8 is several times slower than of uint16/uint8; bits are unchanged),
        and the mapped pages are released afterwards: they stay in the page cache but no longer count
        in this process's RSS (else a full load would hold the whole checkpoint as file-backed RSS).
        """
        info = self.info(key)
        arr = self._array(key)
        bits = np.dtype(f"<u{arr.dtype.itemsize}")
        out = np.array(arr.view(bits)[tuple(index)]).view(arr.dtype)
        self._release(info)
        return out

    def _release(self, info: TensorInfo) -> None:
        """madvise(DONTNEED) the tensor's mapped pages (read-only file mapping: nothing is lost)."""
        raw = getattr(self._maps.get(info.file), "_mmap", None)
        if raw is None or not hasattr(raw, "madvise") or info.nbytes == 0:
            return
        start = info.offset - info.offset % mmap.PAGESIZE
        try:
            raw.madvise(mmap.MADV_DONTNEED, start, info.offset + info.nbytes - start)
        except (OSError, ValueError):  # best effort: only memory accounting depends on it
            pass


@dataclasses.dataclass(frozen=True)
class TensorEntry:
    name: str
    shape: tuple[int, ...]
    dtype: np.dtype

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    filename: str
    entries: tuple[TensorEntry, ...]


def plan_shards(entries: Sequence[TensorEntry], *, max_shard_bytes: int = 5_000_000_000) -> list[ShardPlan]:
    """Greedy shards in entry order, each at most `max_shard_bytes` (a bigger tensor stands alone)."""
    groups: list[list[TensorEntry]] = [[]]
    size = 0
    for e in entries:
        if groups[-1] and size + e.nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(e)
        size += e.nbytes
    if len(groups) == 1:
        return [ShardPlan(SINGLE_FILE, tuple(groups[0]))]
    n = len(groups)
    return [ShardPlan(f"model-{i + 1:05d}-of-{n:05d}.safetensors", tuple(g)) for i, g in enumerate(groups)]


def _header_bytes(entries: Iterable[TensorEntry], metadata: dict[str, str] | None) -> bytes:
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for e in sorted(entries, key=lambda e: e.name):
        header[e.name] = {"dtype": numpy_to_dtype(e.dtype), "shape": list(e.shape),
                          "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    return raw + b" " * ((-len(raw)) % 8)


def write_checkpoint(
    out_dir: str | os.PathLike,
    entries: Sequence[TensorEntry],
    produce: Callable[[TensorEntry], np.ndarray],
    *,
    max_shard_bytes: int = 5_000_000_000,
    metadata: dict[str, str] | None = None,
) -> list[str]:
    """Write `entries` as safetensors shards (+ index when several), one produced tensor at a time."""
    out_dir = os.fspath(out_dir)
    metadata = {"format": "pt"} if metadata is None else metadata
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise CheckpointError("write_checkpoint: duplicate tensor names")
    shards = plan_shards(entries, max_shard_bytes=max_shard_bytes)
    written = []
    for shard in shards:
        path = os.path.join(out_dir, shard.filename)
        header = _header_bytes(shard.entries, metadata)
        with open(path, "wb") as f:
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
            for e in sorted(shard.entries, key=lambda e: e.name):
                arr = np.asarray(produce(e))
                if tuple(arr.shape) != tuple(e.shape) or arr.dtype != np.dtype(e.dtype):
                    raise CheckpointError(
                        f"{path}: tensor {e.name!r} produced as {arr.shape} {arr.dtype}, "
                        f"planned {tuple(e.shape)} {np.dtype(e.dtype)}"
                    )
                arr = np.ascontiguousarray(arr.astype(arr.dtype.newbyteorder("<"), copy=False))
                f.write(memoryview(arr.reshape(-1).view(np.uint8)))
        written.append(path)
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(e.nbytes for e in entries)},
            "weight_map": {e.name: s.filename for s in shards for e in s.entries},
        }
        with open(os.path.join(out_dir, INDEX_FILE), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
        written.append(os.path.join(out_dir, INDEX_FILE))
    return written
