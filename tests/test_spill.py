"""`grape_jax.stream.spill`: per-layer results of a streamed run kept on disk, read back lazily."""

from __future__ import annotations

import os

import numpy as np
import pytest

from grape_jax.stream.spill import ArrayFiles, overrides_of_layer


def test_array_files_round_trip_memory_mapped(tmp_path):
    store = ArrayFiles(tmp_path / "s")
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    store["layers.1.mlp.w_down"] = a
    store["layers.0.mlp.w_down"] = a.astype(np.float64) * 2
    assert list(store) == ["layers.1.mlp.w_down", "layers.0.mlp.w_down"]
    got = store["layers.1.mlp.w_down"]
    assert isinstance(got, np.memmap) and not got.flags.writeable
    np.testing.assert_array_equal(got, a)
    assert store["layers.0.mlp.w_down"].dtype == np.float64
    store["layers.1.mlp.w_down"] = a + 1  # replaced in place
    np.testing.assert_array_equal(store["layers.1.mlp.w_down"], a + 1)
    assert len(store) == 2 and "layers.1.mlp.w_down" in store and "embed" not in store
    del store["layers.0.mlp.w_down"]
    assert sorted(os.listdir(tmp_path / "s")) == ["layers.1.mlp.w_down.npy"]
    with pytest.raises(KeyError):
        store["layers.0.mlp.w_down"]


def test_array_files_start_empty(tmp_path):
    old = ArrayFiles(tmp_path / "s")
    old["layers.0.mlp.w_down"] = np.ones(2)
    new = ArrayFiles(tmp_path / "s")
    assert len(new) == 0 and os.listdir(tmp_path / "s") == []


def test_overrides_of_layer_reads_only_that_layer():
    class Recording(dict):
        reads: list[str] = []

        def __getitem__(self, name):
            self.reads.append(name)
            return super().__getitem__(name)

    overrides = Recording({f"layers.{i}.mlp.w_down": np.full(2, i) for i in (1, 2, 12)})
    got = overrides_of_layer(overrides, 1)
    assert list(got) == ["layers.1.mlp.w_down"] and overrides.reads == ["layers.1.mlp.w_down"]
    assert overrides_of_layer(overrides, 3) == {}
