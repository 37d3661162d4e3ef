"""Streaming safetensors: read any slice of any tensor (writing: `conversion.safetensors_write`).

Format: 8-byte little-endian header length N, N bytes of JSON `{name: {dtype, shape, data_offsets}}`
(+ optional `__metadata__`, a str -> str map), then raw little-endian tensor bytes. Reading memory-maps
each file once and copies only the requested slice; writing computes every offset from shapes alone,
writes the header, then streams each tensor as it is produced, so peak host memory is one tensor.
bfloat16/float8 come from `ml_dtypes` (safetensors' own NumPy backend cannot read bfloat16). Nothing is
ever unpickled.

Files we write are byte-for-byte those of `safetensors.torch.save_file` for the same tensors and
metadata (given at most one metadata key: the reference serialises a hash map in random order):
tensors ordered by dtype (the reference's enum order, widest first) then name, compact JSON with
UTF-8 names, header padded with spaces so the data starts at a multiple of 8. Sharding and the index
follow `transformers`' `save_pretrained` (`huggingface_hub.split_torch_state_dict_into_shards`).
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import struct
import threading
from typing import Any

import numpy as np

from conversion.safetensors_dtypes import CheckpointError, dtype_to_numpy
from conversion.transpose import CHUNK_BYTES, copy_transposed, rows_per_chunk

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
MAX_HEADER = 100 * 1024 * 1024  # the reference refuses bigger headers too
_PICKLES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_PREFETCH_BYTES = 8 << 20


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one stored tensor lives: `offset` is the absolute byte offset of its data in `file`."""

    file: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def _is_dim(x: Any) -> bool:
    return type(x) is int and x >= 0


def read_header(path: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one file's header (only the header bytes are read)."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated (no 8-byte header length, file has {size} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path}: header length {n} exceeds the file size {size} (truncated?)")
            header = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    try:
        meta = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: malformed safetensors header JSON ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: header is {type(meta).__name__}, expected a JSON object")
    metadata = meta.pop("__metadata__", None)
    metadata = {} if metadata is None else metadata
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings, got {metadata!r}")
    data_start, infos, spans = 8 + n, {}, []
    for key, entry in meta.items():
        where = f"{path}: tensor {key!r}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise CheckpointError(f"{where}: header entry needs dtype, shape, data_offsets; got {entry!r}")
        shape, offsets = entry["shape"], entry["data_offsets"]
        if not isinstance(shape, list) or not all(_is_dim(s) for s in shape):
            raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_dim(o) for o in offsets):
            raise CheckpointError(f"{where}: data_offsets {offsets!r} is not [begin, end]")
        if not isinstance(entry["dtype"], str):
            raise CheckpointError(f"{where}: dtype {entry['dtype']!r} is not a string")
        try:
            dtype = dtype_to_numpy(entry["dtype"])
        except CheckpointError as e:
            raise CheckpointError(f"{where}: {e}") from None
        shape, (begin, end) = tuple(shape), offsets
        nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        if end - begin != nbytes:
            raise CheckpointError(
                f"{where}: data_offsets {begin}..{end} hold {end - begin} bytes, "
                f"shape {shape} x {entry['dtype']} needs {nbytes}"
            )
        if data_start + end > size:
            raise CheckpointError(f"{where} ends at byte {data_start + end} beyond the file size {size} (truncated)")
        infos[key] = TensorInfo(path, dtype, shape, data_start + begin, nbytes)
        spans.append((begin, end, key))
    spans.sort()
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise CheckpointError(f"{path}: tensors {a!r} and {b!r} overlap in the data section")
    return infos, metadata


def _load_index(directory: str) -> dict[str, str]:
    path = os.path.join(directory, INDEX_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            weight_map = json.load(f).get("weight_map")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointError(f"{path}: malformed index JSON ({e})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{path}: expected a 'weight_map' object mapping tensor names to shard files")
    for fname in set(weight_map.values()):
        if os.path.basename(fname) != fname or fname in ("", ".", ".."):
            raise CheckpointError(f"{path}: shard {fname!r} is not a plain file name in the checkpoint dir")
    return weight_map


class CheckpointIndex:
    """All tensors of an HF checkpoint dir: key -> (file, dtype, shape, offset), with slice reads."""

    def __init__(self, directory: str, infos: dict[str, TensorInfo], file_metadata: dict[str, dict[str, str]]):
        self.directory = directory
        self._infos = infos
        self.file_metadata = file_metadata  # path -> that file's __metadata__
        self.metadata = {k: v for meta in file_metadata.values() for k, v in meta.items()}
        self._maps: dict[str, mmap.mmap] = {}
        self._fds: dict[str, int] = {}
        self._lock = threading.Lock()
        self._local = threading.local()

    @classmethod
    def open(cls, directory: str | os.PathLike) -> CheckpointIndex:
        """Parse every header of `directory` (index + shards, `model.safetensors`, or all `*.safetensors`)."""
        directory = os.fspath(directory)
        if not os.path.isdir(directory):
            raise CheckpointError(f"{directory}: checkpoint directory not found")
        infos: dict[str, TensorInfo] = {}
        file_metadata: dict[str, dict[str, str]] = {}
        if os.path.isfile(os.path.join(directory, INDEX_FILE)):
            weight_map = _load_index(directory)
            headers = {}
            for fname in sorted(set(weight_map.values())):
                path = os.path.join(directory, fname)
                if not os.path.isfile(path):
                    raise CheckpointError(f"{path}: shard named in {INDEX_FILE} is missing")
                headers[fname], file_metadata[path] = read_header(path)
            for key, fname in weight_map.items():
                if key not in headers[fname]:
                    raise CheckpointError(
                        f"{os.path.join(directory, fname)}: tensor {key!r} named in {INDEX_FILE} is absent"
                    )
                infos[key] = headers[fname][key]
            return cls(directory, infos, file_metadata)
        names = sorted(os.listdir(directory))
        files = [SINGLE_FILE] if SINGLE_FILE in names else [f for f in names if f.endswith(".safetensors")]
        if not files:
            pickled = [f for f in names if f.endswith(_PICKLES)]
            found = f" (found {pickled[0]}: only safetensors are loaded, pickles never)" if pickled else ""
            raise CheckpointError(f"{directory}: no *.safetensors files{found}")
        for fname in files:
            path = os.path.join(directory, fname)
            found_infos, file_metadata[path] = read_header(path)
            for key in found_infos.keys() & infos.keys():
                raise CheckpointError(f"{path}: tensor {key!r} also stored in {infos[key].file} (no index to choose)")
            infos.update(found_infos)
        return cls(directory, infos, file_metadata)

    def keys(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, key: object) -> bool:
        return key in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    @property
    def files(self) -> list[str]:
        return list(self.file_metadata)

    def info(self, key: str) -> TensorInfo:
        if key not in self._infos:
            raise CheckpointError(f"{self.directory}: tensor {key!r} not found in the checkpoint")
        return self._infos[key]

    def _map(self, file: str) -> mmap.mmap:
        with self._lock:
            if file not in self._maps:
                with open(file, "rb") as f:
                    self._maps[file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            return self._maps[file]

    def _fd(self, file: str) -> int:
        with self._lock:
            if file not in self._fds:
                self._fds[file] = os.open(file, os.O_RDONLY)
            return self._fds[file]

    def read_into(
        self,
        key: str,
        index: tuple[slice, ...],
        out: np.ndarray,
        *,
        transpose: bool = False,
        chunk_bytes: int = CHUNK_BYTES,
    ) -> None:
        """Fill `out` with `tensor[index]` (unit-step slices, one per axis) by positioned reads; with
        `transpose` (2-D tensors) fill it with `tensor[index].T` instead.

        Whole rows are one contiguous byte range: read straight into `out` (no intermediate copy).
        Otherwise whole rows are read `chunk_bytes` at a time into a per-thread scratch buffer, still in
        cache when the wanted columns are copied (or transposed, `conversion.transpose`) out. Never
        mapped: mapped file pages would count in the process's resident set. Thread-safe (pread has
        no file position)."""
        info = self.info(key)
        box = tuple(s.stop - s.start for s in index)
        if (
            len(index) != len(info.shape)
            or out.shape != (box[::-1] if transpose else box)
            or out.dtype != info.dtype
            or not out.flags.c_contiguous
            or (transpose and len(box) != 2)
        ):
            raise CheckpointError(
                f"{info.file}: tensor {key!r} {info.shape} {info.dtype}: cannot read {index} "
                f"{'transposed ' if transpose else ''}into a {out.shape} {out.dtype} buffer"
            )
        if out.size == 0:
            return
        if info.offset + info.nbytes > os.fstat(self._fd(info.file)).st_size:
            raise CheckpointError(f"{info.file}: file shrank since it was opened (truncated)")
        row = int(np.prod(info.shape[1:], dtype=np.int64)) * info.dtype.itemsize
        if not transpose and all(s.start == 0 and s.stop == d for s, d in zip(index[1:], info.shape[1:], strict=True)):
            start = index[0].start * row if info.shape else 0
            self._pread(info, info.offset + start, memoryview(out.reshape(-1).view(np.uint8)))
            return
        rows = index[0]
        step = rows_per_chunk(row, chunk_bytes)
        bits = np.dtype(f"<u{info.dtype.itemsize}") if info.dtype.itemsize > 1 else np.dtype(np.uint8)
        n = min(step, rows.stop - rows.start)
        scratch = self._scratch(n * row, "rows").view(bits).reshape(n, *info.shape[1:])
        target = out.view(bits)
        for r0 in range(rows.start, rows.stop, step):
            r1 = min(r0 + step, rows.stop)
            chunk = scratch[: r1 - r0]
            self._pread(info, info.offset + r0 * row, memoryview(chunk.reshape(-1).view(np.uint8)))
            wanted = chunk[(slice(None), *index[1:])]
            if transpose:
                copy_transposed(
                    wanted, target[:, r0 - rows.start : r1 - rows.start], self._scratch(wanted.nbytes, "pack")
                )
            else:
                np.copyto(target[r0 - rows.start : r1 - rows.start], wanted)

    def prefetch(self, keys: list[str]) -> None:
        """Hint that these tensors will be read soon: the kernel starts reading them into the page cache
        (posix_fadvise WILLNEED, a few MiB per call so a caller on its own thread never waits long).
        Only a hint: errors are ignored and nothing is read where the call is unavailable."""
        if not hasattr(os, "posix_fadvise"):
            return
        for key in keys:
            info = self._infos.get(key)
            if info is None:
                continue
            try:
                fd = self._fd(info.file)
                for start in range(0, info.nbytes, _PREFETCH_BYTES):
                    os.posix_fadvise(
                        fd, info.offset + start, min(_PREFETCH_BYTES, info.nbytes - start), os.POSIX_FADV_WILLNEED
                    )
            except OSError:
                return

    def _scratch(self, nbytes: int, name: str) -> np.ndarray:
        """A reusable per-thread byte buffer `name` of at least `nbytes` (faulted in after first use)."""
        buffers = self._local.__dict__
        if name not in buffers or buffers[name].size < nbytes:
            buffers[name] = np.empty(nbytes, np.uint8)
        return buffers[name][:nbytes]

    def _pread(self, info: TensorInfo, offset: int, into: memoryview) -> None:
        fd, done = self._fd(info.file), 0
        while done < len(into):
            n = os.preadv(fd, [into[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(f"{info.file}: unexpected end of file (truncated)")
            done += n

    def _bits(self, info: TensorInfo) -> np.ndarray:
        """Zero-copy unsigned-integer view of the stored tensor (same width as its dtype)."""
        mapped = self._map(info.file)
        if info.offset + info.nbytes > len(mapped):
            raise CheckpointError(f"{info.file}: file shrank since it was opened (truncated)")
        bits = np.dtype(f"<u{info.dtype.itemsize}") if info.dtype.itemsize > 1 else np.dtype(np.uint8)
        return np.frombuffer(mapped, bits, info.nbytes // bits.itemsize, info.offset).reshape(info.shape)

    def read(self, key: str) -> np.ndarray:
        """The whole tensor, copied into host memory."""
        return self.read_slice(key, ())

    def read_slice(self, key: str, index: Any) -> np.ndarray:
        """Copy of `tensor[index]` (ints and slices); only the pages the slice touches are read.

        The copy goes through an unsigned-integer view of the same width (NumPy's strided copy of
        ml_dtypes' bfloat16/float8 is several times slower than of uint16/uint8; bits are unchanged),
        and the mapped pages are released afterwards: they stay in the page cache but no longer count
        in this process's RSS (else a full load would hold the whole checkpoint as file-backed RSS).
        """
        info = self.info(key)
        index = index if isinstance(index, tuple) else (index,)
        if not all(isinstance(i, (slice, int, np.integer)) and not isinstance(i, bool) for i in index):
            raise CheckpointError(f"{info.file}: tensor {key!r}: index {index!r} must hold only ints and slices")
        try:
            src = self._bits(info)[index]
        except IndexError as e:
            raise CheckpointError(
                f"{info.file}: tensor {key!r} of shape {info.shape}: bad index {index!r} ({e})"
            ) from None
        out = np.array(src).view(info.dtype)
        self._release(info)
        return out

    def _release(self, info: TensorInfo) -> None:
        """madvise(DONTNEED) the tensor's mapped pages (read-only file mapping: nothing is lost)."""
        if info.nbytes == 0 or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = info.offset - info.offset % mmap.PAGESIZE
        try:
            self._maps[info.file].madvise(mmap.MADV_DONTNEED, start, info.offset + info.nbytes - start)
        except (OSError, ValueError):  # best effort: only memory accounting depends on it
            pass

    def close(self) -> None:
        """Unmap every file (arrays returned by `read`/`read_slice` are copies and stay valid)."""
        with self._lock:
            for mapped in self._maps.values():
                mapped.close()
            self._maps.clear()
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __enter__(self) -> CheckpointIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
