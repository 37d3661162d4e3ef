"""Streaming safetensors reader/writer and atomic outputs, against the `safetensors` package,
`huggingface_hub`'s shard splitter and `transformers`' `save_pretrained` as oracles."""

from __future__ import annotations

import json
import os
import pickle
import struct
import weakref

import hypothesis.strategies as st
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from huggingface_hub import split_torch_state_dict_into_shards
from hypothesis import HealthCheck, given, settings

from conversion.safetensors_dtypes import CheckpointError, dtype_to_numpy, numpy_to_dtype
from conversion.safetensors_io import CheckpointIndex
from conversion.safetensors_write import ShardPlan, TensorEntry, plan_shards, write_checkpoint
from grape_jax.base.atomic import OutputExistsError, atomic_output_dir, atomic_write_json, atomic_write_text

# safetensors dtype -> (torch dtype, numpy dtype); torch is the oracle's own type system.
DTYPES = {
    "F64": (torch.float64, np.float64),
    "F32": (torch.float32, np.float32),
    "F16": (torch.float16, np.float16),
    "BF16": (torch.bfloat16, ml_dtypes.bfloat16),
    "I64": (torch.int64, np.int64),
    "I32": (torch.int32, np.int32),
    "I16": (torch.int16, np.int16),
    "I8": (torch.int8, np.int8),
    "U8": (torch.uint8, np.uint8),
    "BOOL": (torch.bool, np.bool_),
    "F8_E4M3": (torch.float8_e4m3fn, ml_dtypes.float8_e4m3fn),
    "F8_E5M2": (torch.float8_e5m2, ml_dtypes.float8_e5m2),
    "U16": (torch.uint16, np.uint16),
    "U32": (torch.uint32, np.uint32),
    "U64": (torch.uint64, np.uint64),
}
_TORCH_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def random_array(rng: np.random.Generator, dtype, shape) -> np.ndarray:
    """Random bit patterns (NaN payloads, infinities, subnormals included) of `dtype`."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    return rng.integers(0, 256, size=(*shape, dtype.itemsize), dtype=np.uint8).view(dtype).reshape(shape)


def to_torch(a: np.ndarray) -> torch.Tensor:
    """Same bits as a torch tensor (torch cannot take ml_dtypes arrays directly)."""
    name = numpy_to_dtype(a.dtype)
    if a.dtype == np.bool_:
        return torch.from_numpy(a.copy())
    n = a.dtype.itemsize
    raw = a.copy(order="C").view(np.uint8 if n == 1 else f"i{n}")  # (ascontiguousarray makes 0-d 1-d)
    return torch.from_numpy(raw.copy()).view(DTYPES[name][0])


def bits_of_torch(t: torch.Tensor) -> np.ndarray:
    t = t.contiguous()
    if t.dtype == torch.bool:
        return t.numpy().view(np.uint8)
    return t.view(_TORCH_BITS[t.element_size()]).numpy().view(f"u{t.element_size()}")


def bits(a: np.ndarray) -> np.ndarray:
    return a.copy(order="C").view(np.uint8 if a.dtype.itemsize == 1 else f"u{a.dtype.itemsize}")


def raw_file(path, header: dict, data: bytes = b"", *, pad: bool = True) -> str:
    """A hand-built safetensors file (to break it in controlled ways)."""
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8 if pad else 0)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)) + h + data)
    return os.fspath(path)


def write_all(out_dir, arrays: dict[str, np.ndarray], **kw) -> list[str]:
    entries = [TensorEntry(k, a.shape, a.dtype) for k, a in arrays.items()]
    return write_checkpoint(out_dir, entries, lambda e: arrays[e.name], **kw)


# ---- dtypes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(DTYPES))
def test_dtype_maps_both_ways(name):
    assert dtype_to_numpy(name) == np.dtype(DTYPES[name][1])
    assert numpy_to_dtype(DTYPES[name][1]) == name


def test_dtype_map_errors_and_byte_order():
    assert numpy_to_dtype(np.dtype(">f4")) == "F32"
    with pytest.raises(CheckpointError, match="unknown safetensors dtype 'F128'"):
        dtype_to_numpy("F128")
    for bad in (np.complex64, np.object_, "U3"):
        with pytest.raises(CheckpointError, match="cannot be stored in safetensors"):
            numpy_to_dtype(bad)


# ---- reading what safetensors wrote -------------------------------------------------------------------


def test_reads_reference_files_bit_identically(tmp_path):
    rng = np.random.default_rng(0)
    shapes = [(3, 5), (7,), (), (0, 4), (2, 3, 4)]
    tensors = {
        f"t.{name}.{i}": to_torch(random_array(rng, DTYPES[name][1], shape))
        for name in DTYPES
        for i, shape in enumerate(shapes)
    }
    safetensors.torch.save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt", "k": "v"})
    with CheckpointIndex.open(tmp_path) as index:
        assert sorted(index.keys()) == sorted(tensors) and len(index) == len(tensors)
        assert index.metadata == {"format": "pt", "k": "v"}
        for key, t in tensors.items():
            ours = index.read(key)
            assert ours.dtype == dtype_to_numpy(key.split(".")[1]) and ours.shape == tuple(t.shape)
            np.testing.assert_array_equal(bits(ours), bits_of_torch(t))
            assert index.info(key).nbytes == t.numel() * t.element_size()


def test_reads_reference_numpy_files(tmp_path):
    rng = np.random.default_rng(1)
    arrays = {
        f"a{i}": random_array(rng, dt, (4, 3))
        for i, dt in enumerate(
            [np.float64, np.float32, np.float16, np.int64, np.int32, np.int16, np.int8, np.uint8, np.bool_]
        )
    }
    safetensors.numpy.save_file(arrays, tmp_path / "weights.safetensors")
    index = CheckpointIndex.open(tmp_path)
    for key, a in arrays.items():
        np.testing.assert_array_equal(bits(index.read(key)), bits(a))


def test_reads_a_save_pretrained_checkpoint_with_index(tmp_path):
    from tests.hf_models import build_model, tiny_mixtral_config

    model = build_model(tiny_mixtral_config(), seed=0, dtype=torch.bfloat16)
    model.save_pretrained(tmp_path / "ref", max_shard_size=30_000)
    index = CheckpointIndex.open(tmp_path / "ref")
    weight_map = json.load(open(tmp_path / "ref" / "model.safetensors.index.json"))["weight_map"]
    assert sorted(index.keys()) == sorted(weight_map)
    for shard in sorted(set(weight_map.values())):
        for key, t in safetensors.torch.load_file(tmp_path / "ref" / shard).items():
            assert index.info(key).file == os.path.join(tmp_path / "ref", shard)
            np.testing.assert_array_equal(bits(index.read(key)), bits_of_torch(t))

    # The oracle for the writer: the same tensors, shard limit and file order give the same bytes.
    files = sorted(set(weight_map.values()))
    keys = [k for f in files for k in index.keys() if weight_map[k] == f]
    entries = [TensorEntry(k, index.info(k).shape, index.info(k).dtype) for k in keys]
    (tmp_path / "ours").mkdir()
    written = write_checkpoint(tmp_path / "ours", entries, lambda e: index.read(e.name), max_shard_bytes=30_000)
    assert len(files) > 1 and sorted(os.path.basename(p) for p in written) == files + ["model.safetensors.index.json"]
    for p in written:
        assert open(p, "rb").read() == open(tmp_path / "ref" / os.path.basename(p), "rb").read(), p


# ---- slices -------------------------------------------------------------------------------------------

SLICES = [
    (),
    (1,),
    (-1,),
    (slice(None),),
    (slice(1, 3),),
    (slice(None, None, 2), 3),
    (2, slice(1, None), -2),
    (slice(None, None, -1),),
    (slice(5, 1, -2), slice(0, 4, 3)),
    (np.int64(2), slice(10, 20)),
    (0, 0, 0),
]


@pytest.mark.parametrize("index", SLICES, ids=[str(i) for i in range(len(SLICES))])
@pytest.mark.parametrize("name", ["BF16", "F32", "F8_E4M3", "BOOL"])
def test_read_slice_equals_numpy_slicing(tmp_path, name, index):
    full = random_array(np.random.default_rng(2), DTYPES[name][1], (6, 5, 4))
    safetensors.torch.save_file({"w": to_torch(full)}, tmp_path / "model.safetensors")
    ckpt = CheckpointIndex.open(tmp_path)
    got = ckpt.read_slice("w", index)
    want = full[index]
    assert got.dtype == full.dtype and got.shape == want.shape
    np.testing.assert_array_equal(bits(got), bits(np.asarray(want)))
    assert got.flags.writeable  # a copy: views of the read-only mapping are read-only
    ckpt.close()
    np.testing.assert_array_equal(bits(got), bits(np.asarray(want)))  # still valid after unmapping
    np.testing.assert_array_equal(bits(ckpt.read_slice("w", index)), bits(np.asarray(want)))  # reopens


@pytest.mark.parametrize("name", ["BF16", "F32", "F8_E4M3", "BOOL"])
@pytest.mark.parametrize("chunk_bytes", [1, 50, 1 << 20])
def test_read_into_equals_numpy_slicing(tmp_path, name, chunk_bytes):
    """Positioned reads of random boxes (whole rows: one read; partial rows: chunked whole-row reads)."""
    rng = np.random.default_rng(7)
    full = random_array(rng, DTYPES[name][1], (6, 5, 4))
    scalar = random_array(rng, DTYPES[name][1], ())
    safetensors.torch.save_file({"w": to_torch(full), "s": to_torch(scalar)}, tmp_path / "model.safetensors")
    ckpt = CheckpointIndex.open(tmp_path)
    for _ in range(25):
        box = []
        for d in full.shape:
            a = int(rng.integers(0, d))
            box.append(slice(a, int(rng.integers(a, d + 1))))
        box = tuple(box)
        out = np.empty(full[box].shape, full.dtype)
        ckpt.read_into("w", box, out, chunk_bytes=chunk_bytes)
        np.testing.assert_array_equal(bits(out), bits(full[box]))
    whole = tuple(slice(0, d) for d in full.shape)
    out = np.empty_like(full)
    ckpt.read_into("w", whole, out, chunk_bytes=chunk_bytes)
    np.testing.assert_array_equal(bits(out), bits(full))
    got = np.empty((), full.dtype)
    ckpt.read_into("s", (), got)
    np.testing.assert_array_equal(bits(got), bits(scalar))
    with pytest.raises(CheckpointError, match=r"tensor 'w' .*cannot read"):
        ckpt.read_into("w", whole, np.empty((6, 5, 3), full.dtype))
    ckpt.close()


@pytest.mark.parametrize("name", ["BF16", "F32", "F64", "F8_E4M3", "BOOL"])
@pytest.mark.parametrize("chunk_bytes", [1, 100, 1 << 20])
def test_transposed_read_into_equals_numpy(tmp_path, name, chunk_bytes):
    """Transposing reads of random boxes: whole packs of rows and the rows left over, any columns."""
    rng = np.random.default_rng(11)
    full = random_array(rng, DTYPES[name][1], (37, 21))
    safetensors.torch.save_file({"w": to_torch(full)}, tmp_path / "model.safetensors")
    ckpt = CheckpointIndex.open(tmp_path)
    boxes = [(slice(0, 37), slice(0, 21)), (slice(3, 3), slice(0, 21))]
    for _ in range(20):
        a, b = (int(rng.integers(0, d)) for d in full.shape)
        boxes.append((slice(a, int(rng.integers(a, 38))), slice(b, int(rng.integers(b, 22)))))
    for box in boxes:
        out = np.empty(full[box].T.shape, full.dtype)
        ckpt.read_into("w", box, out, transpose=True, chunk_bytes=chunk_bytes)
        np.testing.assert_array_equal(bits(out), bits(np.ascontiguousarray(full[box].T)))
    with pytest.raises(CheckpointError, match=r"tensor 'w' .*cannot read .* transposed into"):
        ckpt.read_into("w", boxes[0], np.empty((37, 21), full.dtype), transpose=True)
    ckpt.close()


def test_prefetch_is_a_harmless_hint(tmp_path):
    """Prefetching known, unknown and empty tensors neither fails nor changes what is read."""
    write_all(tmp_path, {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "e": np.zeros((0,), np.float32)})
    ckpt = CheckpointIndex.open(tmp_path)
    ckpt.prefetch(["w", "e", "not-a-tensor"])
    np.testing.assert_array_equal(ckpt.read("w"), np.arange(12, dtype=np.float32).reshape(3, 4))
    ckpt.close()


def test_read_into_detects_truncation(tmp_path):
    write_all(tmp_path, {"w": np.ones((64, 64), np.float32)})
    ckpt = CheckpointIndex.open(tmp_path)
    path = tmp_path / "model.safetensors"
    os.truncate(path, os.path.getsize(path) - 100)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: file shrank since it was opened"):
        ckpt.read_into("w", (slice(0, 64), slice(0, 64)), np.empty((64, 64), np.float32))


def test_read_slice_rejects_bad_indices(tmp_path):
    write_all(tmp_path, {"w": np.zeros((3, 4), np.float32)})
    ckpt = CheckpointIndex.open(tmp_path)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'w' of shape \(3, 4\): bad index"):
        ckpt.read_slice("w", (3,))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor 'w' of shape \(3, 4\): bad index"):
        ckpt.read_slice("w", (0, 0, 0))
    for bad in ((None,), (Ellipsis,), ([0, 1],), (True,)):
        with pytest.raises(CheckpointError, match="must hold only ints and slices"):
            ckpt.read_slice("w", bad)
    assert ckpt.read_slice("w", 1).shape == (4,)  # a bare int or slice is one index


# ---- writing ------------------------------------------------------------------------------------------

NAMES = st.text(alphabet=st.sampled_from("abz.0_9é"), min_size=1, max_size=6)
TENSORS = st.dictionaries(
    NAMES, st.tuples(st.sampled_from(sorted(DTYPES)), st.lists(st.integers(0, 4), max_size=3)), max_size=6
)


@FAST
@given(spec=TENSORS, seed=st.integers(0, 2**32 - 1))
def test_single_file_is_byte_identical_to_save_file(tmp_path_factory, spec, seed):
    rng = np.random.default_rng(seed)
    arrays = {k: random_array(rng, DTYPES[d][1], tuple(s)) for k, (d, s) in spec.items()}
    out = tmp_path_factory.mktemp("w")
    assert write_all(out, arrays) == [os.path.join(out, "model.safetensors")]
    safetensors.torch.save_file(
        {k: to_torch(a) for k, a in arrays.items()}, out / "ref.safetensors", metadata={"format": "pt"}
    )
    ours = open(out / "model.safetensors", "rb").read()
    assert ours == open(out / "ref.safetensors", "rb").read()
    assert (8 + struct.unpack("<Q", ours[:8])[0]) % 8 == 0
    loaded = safetensors.torch.load_file(out / "model.safetensors")
    assert sorted(loaded) == sorted(arrays)
    for k, a in arrays.items():
        np.testing.assert_array_equal(bits_of_torch(loaded[k]), bits(a))


def test_written_files_load_in_safetensors_numpy_and_metadata(tmp_path):
    rng = np.random.default_rng(3)
    arrays = {"x": random_array(rng, np.float32, (3, 2)), "y": random_array(rng, np.int8, (5,))}
    write_all(tmp_path, arrays, metadata={"format": "np"})
    loaded = safetensors.numpy.load_file(tmp_path / "model.safetensors")
    for k, a in arrays.items():
        np.testing.assert_array_equal(bits(loaded[k]), bits(a))
    assert CheckpointIndex.open(tmp_path).metadata == {"format": "np"}
    with safetensors.safe_open(tmp_path / "model.safetensors", framework="np") as f:
        assert f.metadata() == {"format": "np"}


ENTRY_LISTS = st.lists(
    st.tuples(st.sampled_from(["F32", "BF16", "I8", "F64"]), st.integers(1, 40)), min_size=1, max_size=12
)  # >= 1 element: torch gives empty tensors one shared storage,
# which the hub keeps in one file (a tied-weights rule); no file at all is planned for nothing


@FAST
@given(spec=ENTRY_LISTS, limit=st.integers(1, 200))
def test_plan_shards_matches_huggingface_hub(spec, limit):
    entries = [TensorEntry(f"t{i}", (n,), DTYPES[d][1]) for i, (d, n) in enumerate(spec)]
    plan = plan_shards(entries, max_shard_bytes=limit)
    ref = split_torch_state_dict_into_shards(
        {e.name: torch.zeros(e.shape, dtype=DTYPES[d][0]) for e, (d, _) in zip(entries, spec)}, max_shard_size=limit
    )
    assert [p.filename for p in plan] == list(ref.filename_to_tensors)
    assert [{e.name for e in p.entries} for p in plan] == [set(v) for v in ref.filename_to_tensors.values()]
    assert sorted(e.name for p in plan for e in p.entries) == sorted(e.name for e in entries)  # each once
    for p in plan:
        assert sum(e.nbytes for e in p.entries) <= limit or len(p.entries) == 1


def test_sharded_write_round_trips_and_streams_one_tensor_at_a_time(tmp_path):
    rng = np.random.default_rng(4)
    arrays = {f"layer.{i}.w": random_array(rng, ml_dtypes.bfloat16, (16, 8)) for i in range(6)}
    arrays["big"] = random_array(rng, np.float32, (200,))  # 800 bytes > the limit: a file of its own
    arrays["bias"] = random_array(rng, np.float32, (8,))
    entries = [TensorEntry(k, a.shape, a.dtype) for k, a in arrays.items()]
    calls, alive = [], []

    def produce(e: TensorEntry) -> np.ndarray:
        assert all(r() is None for r in alive), "the previous tensor is still referenced"
        calls.append(e.name)
        out = arrays[e.name].copy()
        alive.append(weakref.ref(out))
        return out

    written = write_checkpoint(tmp_path, entries, produce, max_shard_bytes=600)
    plan = plan_shards(entries, max_shard_bytes=600)
    assert calls == [e.name for p in plan for e in p.entries]  # the order followers can replay
    assert [os.path.basename(p) for p in written] == [p.filename for p in plan] + ["model.safetensors.index.json"]
    # 256-byte tensors pair up; "big" is placed when met, before the open file that "bias" then joins
    assert [[e.name for e in p.entries] for p in plan] == [
        ["layer.0.w", "layer.1.w"],
        ["layer.2.w", "layer.3.w"],
        ["big"],
        ["bias", "layer.4.w", "layer.5.w"],
    ]
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    assert index["metadata"] == {
        "total_parameters": sum(a.size for a in arrays.values()),
        "total_size": sum(a.nbytes for a in arrays.values()),
    }
    assert index["weight_map"] == {e.name: p.filename for p in plan for e in p.entries}
    ckpt = CheckpointIndex.open(tmp_path)
    for k, a in arrays.items():
        np.testing.assert_array_equal(bits(ckpt.read(k)), bits(a))
        ref = safetensors.torch.load_file(tmp_path / index["weight_map"][k])[k]
        np.testing.assert_array_equal(bits_of_torch(ref), bits(a))


def test_writer_errors(tmp_path):
    e = TensorEntry("w", (2, 3), np.float32)
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: tensor 'w' produced as \(3, 2\) float32, planned \(2, 3\) float32"
    ):
        write_checkpoint(tmp_path, [e], lambda _: np.zeros((3, 2), np.float32))
    with pytest.raises(CheckpointError, match=r"tensor 'w' produced as \(2, 3\) bfloat16, planned"):
        write_checkpoint(tmp_path, [e], lambda _: np.zeros((2, 3), ml_dtypes.bfloat16))
    with pytest.raises(CheckpointError, match="tensor 'w' is listed twice"):
        write_checkpoint(tmp_path, [e, e], lambda _: np.zeros((2, 3), np.float32))
    with pytest.raises(CheckpointError, match="tensor 'c': dtype complex64 cannot be stored"):
        TensorEntry("c", (1,), np.complex64)
    with pytest.raises(CheckpointError, match="'__metadata__' is not a usable safetensors key"):
        TensorEntry("__metadata__", (1,), np.float32)
    with pytest.raises(CheckpointError, match=r"tensor 'n': shape \(-1,\) is not non-negative"):
        TensorEntry("n", (-1,), np.float32)
    with pytest.raises(CheckpointError, match="max_shard_bytes must be a positive integer"):
        plan_shards([e], max_shard_bytes=0)
    with pytest.raises(CheckpointError, match="metadata must map strings to strings"):
        write_checkpoint(tmp_path, [e], lambda _: np.zeros((2, 3), np.float32), metadata={"n": 1})
    with pytest.raises(CheckpointError, match="missing: output directory does not exist"):
        write_checkpoint(tmp_path / "missing", [e], lambda _: np.zeros((2, 3), np.float32))
    # big-endian input of the planned dtype is stored little-endian
    big = np.arange(6, dtype=">f4").reshape(2, 3)
    write_checkpoint(tmp_path, [e], lambda _: big)
    np.testing.assert_array_equal(CheckpointIndex.open(tmp_path).read("w"), big)
    assert plan_shards([]) == [ShardPlan("model.safetensors", ())]


# ---- reader errors ------------------------------------------------------------------------------------


def _good(tmp_path) -> str:
    write_all(tmp_path, {"a": np.arange(4, dtype=np.float32), "b": np.ones((2, 2), np.int8)})
    return os.fspath(tmp_path / "model.safetensors")


@pytest.mark.parametrize(
    "case, match",
    [
        ("short", r"model\.safetensors: truncated \(no 8-byte header length"),
        ("header_len", r"model\.safetensors: header length \d+ exceeds the file size"),
        ("data_cut", r"model\.safetensors: tensor 'b' ends at byte \d+ beyond the file size \d+ \(truncated\)"),
        ("json", r"model\.safetensors: malformed safetensors header JSON"),
        ("not_object", r"model\.safetensors: header is list, expected a JSON object"),
        ("dtype", r"model\.safetensors: tensor 'a': unknown safetensors dtype 'F12'"),
        ("offsets", r"model\.safetensors: tensor 'a': data_offsets 0\.\.12 hold 12 bytes, shape \(4,\) x F32 needs 16"),
        ("entry", r"model\.safetensors: tensor 'a': header entry needs dtype, shape, data_offsets"),
        ("shape", r"model\.safetensors: tensor 'a': shape \[4\.5\] is not a list of non-negative integers"),
        ("overlap", r"model\.safetensors: tensors 'a' and 'b' overlap"),
        ("metadata", r"model\.safetensors: __metadata__ must map strings to strings"),
    ],
)
def test_malformed_files_name_the_file(tmp_path, case, match):
    path = os.path.join(tmp_path, "model.safetensors")
    a = {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}
    b = {"dtype": "I8", "shape": [2, 2], "data_offsets": [16, 20]}
    if case == "short":
        open(path, "wb").write(b"\x01\x00")
    elif case == "header_len":
        open(path, "wb").write(struct.pack("<Q", 1000) + b"{}")
    elif case == "data_cut":
        raw = open(_good(tmp_path), "rb").read()
        open(path, "wb").write(raw[:-1])
    elif case == "json":
        open(path, "wb").write(struct.pack("<Q", 8) + b'{"a": [1')
    elif case == "not_object":
        raw_file(path, [1, 2])  # type: ignore[arg-type]
    else:
        header = {
            "dtype": dict(a=dict(a, dtype="F12"), b=b),
            "offsets": dict(a=dict(a, data_offsets=[0, 12]), b=b),
            "entry": dict(a={"dtype": "F32"}, b=b),
            "shape": dict(a=dict(a, shape=[4.5]), b=b),
            "overlap": dict(a=a, b=dict(b, data_offsets=[12, 16])),
            "metadata": {"__metadata__": {"x": 1}, "a": a, "b": b},
        }[case]
        raw_file(path, header, bytes(20))
    with pytest.raises(CheckpointError, match=match):
        CheckpointIndex.open(tmp_path)


def test_index_errors_name_the_file(tmp_path):
    write_all(tmp_path, {"a": np.zeros(40, np.float32), "b": np.zeros(40, np.float32)}, max_shard_bytes=200)
    index_path = tmp_path / "model.safetensors.index.json"
    index = json.load(open(index_path))
    CheckpointIndex.open(tmp_path)

    json.dump(
        dict(index, weight_map=dict(index["weight_map"], c="model-00001-of-00002.safetensors")), open(index_path, "w")
    )
    with pytest.raises(
        CheckpointError,
        match=r"model-00001-of-00002\.safetensors: tensor 'c' named in model\.safetensors\.index\.json is absent",
    ):
        CheckpointIndex.open(tmp_path)
    json.dump(dict(index, weight_map=dict(index["weight_map"], c="../x.safetensors")), open(index_path, "w"))
    with pytest.raises(CheckpointError, match=r"index\.json: shard '\.\./x\.safetensors' is not a plain file name"):
        CheckpointIndex.open(tmp_path)
    json.dump({"weight_map": ["a"]}, open(index_path, "w"))
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: expected a 'weight_map' object"):
        CheckpointIndex.open(tmp_path)
    open(index_path, "w").write("{not json")
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: malformed index JSON"):
        CheckpointIndex.open(tmp_path)
    json.dump(index, open(index_path, "w"))
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"model-00002-of-00002\.safetensors: shard named in model\.safetensors\.index\.json is missing",
    ):
        CheckpointIndex.open(tmp_path)


def test_directory_errors(tmp_path):
    with pytest.raises(CheckpointError, match=r"nowhere: checkpoint directory not found"):
        CheckpointIndex.open(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match=r": no \*\.safetensors files$"):
        CheckpointIndex.open(tmp_path)
    _good(tmp_path)
    with pytest.raises(CheckpointError, match=r"tensor 'zz' not found in the checkpoint"):
        CheckpointIndex.open(tmp_path).read("zz")
    assert "a" in CheckpointIndex.open(tmp_path) and "zz" not in CheckpointIndex.open(tmp_path)


class _Trap:
    """Unpickling this writes a marker file: proof that something was unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickles_are_never_loaded(tmp_path):
    marker = tmp_path / "unpickled"
    for name in ("pytorch_model.bin", "model.pt"):
        with open(tmp_path / name, "wb") as f:
            pickle.dump(_Trap(os.fspath(marker)), f)
    with pytest.raises(CheckpointError, match=r"found model\.pt: only safetensors are loaded, pickles never"):
        CheckpointIndex.open(tmp_path)
    assert not marker.exists()


def test_file_choice_without_index(tmp_path):
    write_all(tmp_path, {"a": np.zeros(2, np.float32)})
    raw_file(
        tmp_path / "consolidated.safetensors", {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)
    )
    assert CheckpointIndex.open(tmp_path).files == [os.path.join(tmp_path, "model.safetensors")]
    os.rename(tmp_path / "model.safetensors", tmp_path / "part1.safetensors")
    with pytest.raises(CheckpointError, match=r"part1\.safetensors: tensor 'a' also stored in .*consolidated"):
        CheckpointIndex.open(tmp_path)
    os.remove(tmp_path / "consolidated.safetensors")
    write_all(tmp_path, {"b": np.ones(3, np.int8)})
    os.rename(tmp_path / "model.safetensors", tmp_path / "part2.safetensors")
    ckpt = CheckpointIndex.open(tmp_path)
    assert sorted(ckpt.keys()) == ["a", "b"] and ckpt.read("b").tolist() == [1, 1, 1]


# ---- atomic outputs -----------------------------------------------------------------------------------


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_atomic_dir_success_and_refusal(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as tmp:
        assert os.path.dirname(tmp) == os.fspath(tmp_path) and os.path.basename(tmp).startswith(".out.tmp-")
        assert not out.exists()
        open(os.path.join(tmp, "f"), "w").write("new")
    assert os.listdir(tmp_path) == ["out"] and (out / "f").read_text() == "new"
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~_umask()
    with pytest.raises(OutputExistsError) as err:
        with atomic_output_dir(out):
            pytest.fail("must refuse before yielding")
    assert isinstance(err.value, FileExistsError)
    assert str(err.value) == f"{out} already exists; pass overwrite=True to replace it"
    assert os.listdir(tmp_path) == ["out"] and (out / "f").read_text() == "new"


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_atomic_dir_leaves_nothing_on_error(tmp_path, exc):
    with pytest.raises(exc):
        with atomic_output_dir(tmp_path / "out") as tmp:
            open(os.path.join(tmp, "half"), "w").write("x")
            raise exc()
    assert os.listdir(tmp_path) == []
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("old")
    with pytest.raises(exc):
        with atomic_output_dir(tmp_path / "out", overwrite=True) as tmp:
            open(os.path.join(tmp, "half"), "w").write("x")
            raise exc()
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == ["old"]


def test_atomic_dir_overwrite_replaces(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("old")
    with atomic_output_dir(tmp_path / "out", overwrite=True) as tmp:
        open(os.path.join(tmp, "new"), "w").write("new")
        assert (tmp_path / "out" / "old").exists()  # the old output stays until the new one is whole
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == ["new"]


def test_atomic_write_text_and_json(tmp_path):
    path = tmp_path / "sub" / "plan.json"
    atomic_write_json(path, {"b": 1, "a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1} and path.read_text().endswith("\n")
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~_umask()
    with pytest.raises(UnicodeEncodeError):  # fails mid-write: the old file stays, the temp goes
        atomic_write_text(path, "\ud800")
    atomic_write_text(tmp_path / "sub" / "t.txt", "héllo")
    assert (tmp_path / "sub" / "t.txt").read_text(encoding="utf-8") == "héllo"
    assert sorted(os.listdir(tmp_path / "sub")) == ["plan.json", "t.txt"]
    assert json.loads(path.read_text()) == {"a": [1, 2], "b": 1}
