"""Arrays kept on disk instead of in host memory, for results that accumulate over the decoder layers.

A streamed run holds about two layers' weights at a time; what it produces per layer (the fit's solved
down projections and the step-checked ones that go to the export) would otherwise grow with depth, so
each layer's arrays are written to `.npy` files as soon as they exist and read back, memory-mapped,
when that layer is merged.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator, MutableMapping

import numpy as np

from grape_jax.core.params import layer_of


class ArrayFiles(MutableMapping):
    """A mapping name -> array stored as `directory/<name>.npy` (written to a temporary name and moved
    into place); a value read is memory-mapped read-only, so nothing is loaded until it is used. A new
    store starts empty: whatever `directory` held is removed (it belongs to an earlier run).
    Names are those of the parameter table (`layers.3.mlp.w_down`)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        shutil.rmtree(self.directory, ignore_errors=True)
        os.makedirs(self.directory)
        self._names: list[str] = []

    def _path(self, name: str) -> str:
        if os.sep in name or name.startswith("."):
            raise KeyError(name)
        return os.path.join(self.directory, name + ".npy")

    def __setitem__(self, name: str, value: np.ndarray) -> None:
        path = self._path(name)
        with open(path + ".tmp", "wb") as f:
            np.save(f, np.asarray(value), allow_pickle=False)
        os.replace(path + ".tmp", path)
        if name not in self._names:
            self._names.append(name)

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._names:
            raise KeyError(name)
        return np.load(self._path(name), mmap_mode="r", allow_pickle=False)

    def __delitem__(self, name: str) -> None:
        if name not in self._names:
            raise KeyError(name)
        self._names.remove(name)
        os.remove(self._path(name))

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._names))

    def __len__(self) -> int:
        return len(self._names)

    def __contains__(self, name: object) -> bool:
        return name in self._names


def overrides_of_layer(overrides, layer: int) -> dict[str, np.ndarray]:
    """The overrides of decoder layer `layer` from any mapping of them, reading no other layer's values."""
    return {name: overrides[name] for name in overrides if layer_of(name) == layer}
