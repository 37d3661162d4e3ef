"""The accelerator loading path (`conversion.load._load_pipelined`), forced on the CPU devices: leaves in
flight together, each shard's reads split into many concurrent row chunks, device permutations compiled
ahead (one per distinct shape/dtype/layout, never on a leaf's own path). Oracle: the host path's bits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conversion import load as load_module
from conversion.load import load_hf
from grape_jax.core.model import param_view
from grape_jax.core.sharding import make_mesh
from tests.hf_models import build_model, save_model, tiny_mixtral_config


@pytest.fixture(scope="module")
def bf16_checkpoint(tmp_path_factory):
    config = tiny_mixtral_config(hidden_size=64, intermediate_size=96, num_local_experts=8, vocab_size=200)
    return save_model(build_model(config, seed=1, dtype=torch.bfloat16), tmp_path_factory.mktemp("bf16") / "hf")


class _CompiledOnly:
    """A jitted relayout that may be lowered and compiled ahead but not called on a leaf's path."""

    def __init__(self, fn):
        self.fn = fn

    def lower(self, *args, **kwargs):
        return self.fn.lower(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        raise AssertionError("a device permutation was compiled on a leaf's critical path")


@pytest.mark.parametrize("mesh_spec", [None, "fsdp=2,expert=4"])
@pytest.mark.parametrize("dtype", [None, "float32"])
def test_pipelined_accelerator_path_equals_host_path(bf16_checkpoint, monkeypatch, mesh_spec, dtype):
    mesh = None if mesh_spec is None else make_mesh(mesh_spec)
    host = param_view(load_hf(bf16_checkpoint, mesh=mesh, dtype=dtype))

    compiles = []
    real_compile, real_relayout = load_module.compile_relayout, load_module._relayout

    def counting_compile(*sig):
        compiles.append(sig)
        return real_compile(*sig)

    monkeypatch.setattr(load_module, "DEVICE_LAYOUT_MIN_BYTES", 0)  # every plain leaf takes the fast path
    monkeypatch.setattr(load_module, "_host_memory", lambda sharding: False)  # as on accelerators
    monkeypatch.setattr(load_module, "READ_CHUNK_BYTES", 100)  # a few rows per read task
    monkeypatch.setattr(load_module, "LEAVES_IN_FLIGHT", 3)
    monkeypatch.setattr(load_module, "compile_relayout", counting_compile)
    monkeypatch.setattr(load_module, "_relayout", lambda *a: _CompiledOnly(real_relayout(*a)))
    fast = param_view(load_hf(bf16_checkpoint, mesh=mesh, dtype=dtype))

    assert list(fast) == list(host)
    for name, a in host.items():
        b = fast[name]
        assert b.sharding == a.sharding and b.dtype == a.dtype and b.shape == a.shape, name
        assert np.asarray(b).tobytes() == np.asarray(a).tobytes(), name
    # one compile per distinct (permutation, dtype, sharding, shape), not one per leaf
    assert len(compiles) == len(set(compiles))
    transposed = [n for n in host if n.endswith(("_proj", "w_gate", "w_up", "w_down", "lm_head"))]
    assert len(compiles) < len(transposed)
    shapes = {tuple(c[3]) for c in compiles}
    assert (8, 96, 64) in shapes and (200, 64) in shapes  # stored w1/w3 stacks, lm_head


def test_read_chunks_cover_the_rows_exactly(bf16_checkpoint, monkeypatch):
    """`_read_chunked` splits a box into row chunks that together are exactly `tensor[box]`."""
    from concurrent.futures import ThreadPoolExecutor

    from conversion.safetensors_io import CheckpointIndex

    monkeypatch.setattr(load_module, "READ_CHUNK_BYTES", 1000)  # 15 rows of 32 bf16 columns per task
    ckpt = CheckpointIndex.open(bf16_checkpoint)
    key = "lm_head.weight"
    whole = ckpt.read(key)
    box = (slice(7, 190), slice(16, 48))
    out = np.zeros((183, 32), whole.dtype)
    with ThreadPoolExecutor(3) as pool:
        tasks = load_module._read_chunked(ckpt, key, box, out, pool)
        for t in tasks:
            t.result()
    assert len(tasks) > 10
    np.testing.assert_array_equal(out.view(np.uint16), whole[box].view(np.uint16))
