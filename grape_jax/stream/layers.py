"""Where a streamed pass gets its weights and keeps its hidden states.

A `LayerSource` reads any subset of a model's parameters onto its run context (`conversion.load.HFReader`
reads them from an HF directory; `ResidentLayers` serves a model already on the mesh). `sweep` walks the
decoder layers in a given order with the next layer read on a thread while the current one computes, so
at most two layers' weights are held. Passes compile once per *kind* of layer, not once per layer: a
layer's parameters are renamed to the first layer of the same kind (`canonical_layer`: same attention
window/chunk, RoPE use and expert count), whose index the jitted step takes as a static argument.

`HiddenStates` keeps one layer's hidden states of every calibration block, [batches, rows, T, d] fp32, as
a `.npy` file in a directory (memory-mapped: the kernel pages it to disk as needed), so host memory holds
the batch in use, not the depth times the tokens.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import jax
import numpy as np
from jaxtyping import Float

from grape_jax.base.memory import limit_malloc_arenas, release_free_memory
from grape_jax.core import transformer
from grape_jax.core.config import MoEConfig
from grape_jax.core.model import MoEModel, param_view
from grape_jax.core.params import layer_of, param_specs
from grape_jax.core.sharding import RunContext


class LayerSource(Protocol):
    """Reads parameters by name onto `ctx` (each straight into its sharding)."""

    cfg: MoEConfig
    ctx: RunContext

    def read(self, names: Sequence[str]) -> dict[str, jax.Array]: ...

    def abstract(self, name: str) -> jax.ShapeDtypeStruct: ...


class ResidentLayers:
    """A model already on its mesh served as a `LayerSource` (tests; grape checkpoints)."""

    def __init__(self, model: MoEModel):
        self.model, self.cfg, self.ctx = model, model.cfg, model.ctx

    def read(self, names: Sequence[str]) -> dict[str, jax.Array]:
        view = param_view(self.model)
        return {name: view[name] for name in names}

    def abstract(self, name: str) -> jax.ShapeDtypeStruct:
        x = param_view(self.model)[name]
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)


def layer_names(cfg: MoEConfig, layer: int) -> list[str]:
    """The parameters of decoder layer `layer`, in the table's order."""
    return [name for name in param_specs(cfg) if layer_of(name) == layer]


def head_names(cfg: MoEConfig) -> list[str]:
    """The parameters of the final norm and the output projection (the embedding when tied)."""
    names = [name for name in param_specs(cfg) if layer_of(name) is None and name != "embed"]
    return names + (["embed"] if cfg.tie_word_embeddings else [])


def _kind(cfg: MoEConfig, layer: int) -> tuple:
    return (
        transformer.layer_window(cfg, layer),
        transformer.layer_chunk(cfg, layer),
        cfg.layer_uses_rope(layer),
        cfg.num_experts[layer],
    )


def canonical_layer(cfg: MoEConfig, layer: int, merged: MoEConfig | None = None) -> int:
    """The first layer that computes like `layer` (one compile serves them all); with `merged`, also
    with as many experts after the merge (a pass that computes with both)."""

    def kind(i: int) -> tuple:
        return _kind(cfg, i) + ((merged.num_experts[i],) if merged is not None else ())

    return next(i for i in range(cfg.num_layers) if kind(i) == kind(layer))


def renamed(params: Mapping[str, jax.Array], layer: int, to: int) -> dict[str, jax.Array]:
    """`params` with layer `layer`'s names moved to layer `to` (other names unchanged)."""
    old, new = f"layers.{layer}.", f"layers.{to}."
    return {(new + k[len(old) :] if k.startswith(old) else k): v for k, v in params.items()}


def sweep(
    source: LayerSource, layers: Sequence[int], names: Callable[[int], Sequence[str]] | None = None
) -> Iterator[tuple[int, dict[str, jax.Array]]]:
    """(layer, its parameters) for each of `layers` in order, the next read on a thread meanwhile.

    The dict yielded is emptied when the loop asks for the next layer, so a caller that keeps no other
    reference holds at most two layers (the one in use and the one being read); the freed pages are
    then given back to the OS, from a few malloc arenas (`base.memory`), so the process does not grow
    layer by layer."""
    limit_malloc_arenas()
    names = names or (lambda layer: layer_names(source.cfg, layer))
    layers = list(layers)
    if not layers:
        return
    with ThreadPoolExecutor(1, thread_name_prefix="layer-read") as pool:
        pending = pool.submit(source.read, names(layers[0]))
        try:
            for i, layer in enumerate(layers):
                params = pending.result()
                pending = pool.submit(source.read, names(layers[i + 1])) if i + 1 < len(layers) else None
                yield layer, params
                params.clear()
                del params
                release_free_memory()
        finally:
            if pending is not None:
                pending.cancel()


class HiddenStates:
    """Per-layer hidden states of every calibration batch, as `.npy` files in `directory`."""

    def __init__(self, directory: str | os.PathLike, shape: tuple[int, ...]):
        self.directory = os.fspath(directory)
        self.shape = tuple(shape)
        os.makedirs(self.directory, exist_ok=True)

    def path(self, key: str) -> str:
        return os.path.join(self.directory, f"{key}.npy")

    def create(self, key: str) -> Float[np.ndarray, "k rows t d"]:
        """A new writable array (written as `key` + '.tmp' until `commit`)."""
        return np.lib.format.open_memmap(self.path(key + ".tmp"), mode="w+", dtype=np.float32, shape=self.shape)

    def commit(self, key: str, array: np.ndarray) -> None:
        """Flush `array` (from `create(key)`) and move it into place atomically."""
        if isinstance(array, np.memmap):
            array.flush()
        del array
        os.replace(self.path(key + ".tmp"), self.path(key))

    def has(self, key: str) -> bool:
        return os.path.isfile(self.path(key))

    def open(self, key: str) -> Float[np.ndarray, "k rows t d"]:
        array = np.load(self.path(key), mmap_mode="r")
        if array.shape != self.shape:
            raise ValueError(f"{self.path(key)}: shape {array.shape}, expected {self.shape}")
        return array

    def drop(self, key: str) -> None:
        for path in (self.path(key), self.path(key + ".tmp")):
            if os.path.exists(path):
                os.remove(path)
