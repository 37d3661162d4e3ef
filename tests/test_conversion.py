"""HF <-> JAX <-> HF and HF -> Orbax -> HF round trips, and errors on bad checkpoints."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
import transformers

from conversion.export import export_hf
from conversion.families.base import ConversionError
from conversion.load import load_hf
from conversion.safetensors_dtypes import CheckpointError
from conversion.safetensors_io import CheckpointIndex
from grape_jax.cli.main import main as grape
from grape_jax.core.model import param_view
from grape_jax.core.sharding import make_mesh
from tests.hf_models import build_model, random_tokens, save_model, tiny_mixtral_config, torch_logits


def assert_same_tensors(dir_a, dir_b):
    a, b = CheckpointIndex.open(dir_a), CheckpointIndex.open(dir_b)
    assert sorted(a.keys()) == sorted(b.keys())
    for key in a.keys():
        x, y = a.read(key), b.read(key)
        assert x.dtype == y.dtype and x.shape == y.shape, key
        assert x.tobytes() == y.tobytes(), key


@pytest.fixture(scope="module")
def bf16_mixtral(tmp_path_factory):
    model = build_model(tiny_mixtral_config(), seed=3, dtype=torch.bfloat16)
    return save_model(model, tmp_path_factory.mktemp("bf16") / "hf")


@pytest.mark.parametrize("mesh_spec", [None, "fsdp=2,expert=4"])
def test_hf_jax_hf_round_trip_is_bit_identical(tiny_mixtral, tmp_path, mesh_spec):
    model = load_hf(tiny_mixtral.path, mesh=None if mesh_spec is None else make_mesh(mesh_spec))
    out = export_hf(model, tmp_path / "out")
    assert_same_tensors(tiny_mixtral.path, out)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = random_tokens(128, seed=4)
    np.testing.assert_array_equal(torch_logits(reloaded, tokens), torch_logits(tiny_mixtral.model, tokens))
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")], "temp dirs left behind"


def test_bf16_round_trip_keeps_dtype_and_bits(bf16_mixtral, tmp_path):
    model = load_hf(bf16_mixtral)
    assert str(model.layers[0].mlp.w_gate.get_value().dtype) == "bfloat16"
    out = export_hf(model, tmp_path / "out")
    assert_same_tensors(bf16_mixtral, out)


@pytest.mark.parametrize("mesh_spec", [None, "fsdp=2,expert=4", "expert=2,tensor=4"])
@pytest.mark.parametrize("dtype", [None, "float32"])
@pytest.mark.parametrize("transpose_on", ["read", "devices"])
def test_stored_layout_paths_equal_host_path(bf16_mixtral, monkeypatch, mesh_spec, dtype, transpose_on):
    """Leaves read by positioned reads into aligned buffers (transposed by the reading threads, as on CPU
    devices, or permuted on the devices, as on accelerators) equal the host-transposed ones: same bits,
    same shardings (every leaf of the tiny model takes that path at threshold 0)."""
    from conversion import load as load_module

    mesh = None if mesh_spec is None else make_mesh(mesh_spec)
    host = param_view(load_hf(bf16_mixtral, mesh=mesh, dtype=dtype))
    monkeypatch.setattr(load_module, "DEVICE_LAYOUT_MIN_BYTES", 0)
    if transpose_on == "devices":
        monkeypatch.setattr(load_module, "_host_memory", lambda sharding: False)
    fast = param_view(load_hf(bf16_mixtral, mesh=mesh, dtype=dtype))
    assert fast.keys() == host.keys()
    for name, a in host.items():
        b = fast[name]
        assert b.sharding == a.sharding and b.dtype == a.dtype and b.shape == a.shape, name
        assert np.asarray(b).tobytes() == np.asarray(a).tobytes(), name


def test_aligned_buffers_are_page_aligned():
    from conversion.load import aligned_empty

    for shape in [(3,), (5, 7), (2, 3, 1000)]:
        a = aligned_empty(shape, np.float32)
        assert a.shape == shape and a.ctypes.data % 4096 == 0 and a.flags.c_contiguous


def test_sharded_export_writes_index(tiny_mixtral, tmp_path):
    out = export_hf(load_hf(tiny_mixtral.path), tmp_path / "out", max_shard_bytes=40_000)
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    files = set(index["weight_map"].values())
    assert len(files) > 2
    for f in files:
        assert os.path.getsize(os.path.join(out, f)) <= 40_000 + 20_000  # data + header
    assert_same_tensors(tiny_mixtral.path, out)
    transformers.AutoModelForCausalLM.from_pretrained(out)


def test_orbax_round_trip_via_cli(tiny_mixtral, tmp_path, capsys):
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "hf")
    assert grape(["convert", tiny_mixtral.path, ckpt, "--mesh", "expert=4,fsdp=2"]) == 0
    assert grape(["export", ckpt, out, "--mesh", "expert=2,tensor=2"]) == 0
    assert_same_tensors(tiny_mixtral.path, out)
    assert grape(["export", ckpt, out]) == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert grape(["export", ckpt, out, "--overwrite"]) == 0


# ----------------------------------------------------------------------------------- bad input


def _copy(src, dst):
    shutil.copytree(src, dst)
    return str(dst)


def test_missing_shard_file(tiny_mixtral, tmp_path):
    d = _copy(tiny_mixtral.path, tmp_path / "m")
    sharded = export_hf(load_hf(d), tmp_path / "sharded", max_shard_bytes=40_000)
    os.remove(os.path.join(sharded, "model-00002-of-" + sorted(os.listdir(sharded))[-2][-17:]))
    with pytest.raises(CheckpointError, match=r"model-00002-of-\d+\.safetensors: shard named in"):
        load_hf(sharded)


def test_truncated_file(tiny_mixtral, tmp_path):
    d = _copy(tiny_mixtral.path, tmp_path / "m")
    path = os.path.join(d, "model.safetensors")
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: tensor .* beyond the file size .*truncated"):
        load_hf(d)


def test_shape_contradicting_config(tiny_mixtral, tmp_path):
    d = _copy(tiny_mixtral.path, tmp_path / "m")
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["intermediate_size"] = 40
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    with pytest.raises(
        ConversionError,
        match=r"model\.safetensors: tensor 'model\.layers\.0\.block_sparse_moe\.experts\.0\.w1\.weight' "
        r"has shape \(48, 32\), but config\.json implies \(40, 32\)",
    ):
        load_hf(d)


def test_unknown_model_type(tiny_mixtral, tmp_path, capsys):
    d = _copy(tiny_mixtral.path, tmp_path / "m")
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg["model_type"] = "jamba"
    json.dump(cfg, open(os.path.join(d, "config.json"), "w"))
    assert grape(["convert", d, str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "config.json: model_type 'jamba' is not supported; supported:" in err and "mixtral" in err
    assert not os.path.exists(tmp_path / "out")


def test_pickle_only_checkpoint_is_refused(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="only safetensors are loaded"):
        CheckpointIndex.open(d)


def test_failed_export_leaves_nothing(tiny_mixtral, tmp_path):
    model = load_hf(tiny_mixtral.path)
    w_up = model.layers[1].mlp.w_up
    w_up.set_value(w_up.get_value()[:, :, :5])  # wrong shape mid-way
    with pytest.raises(Exception, match="w3|produced"):
        export_hf(model, tmp_path / "out")
    assert os.listdir(tmp_path) == []
