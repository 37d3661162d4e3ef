"""The merge, one layer at a time: `merge_state` (the one pure merge) applied to a state holding one
layer's leaves with the plan restricted to that layer, served as the merged model's `LayerSource`
(`MergedLayers`) and as the lazy parameter mapping a streamed export reads (`MergedParams`)."""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx

from grape_jax.base.memory import release_free_memory
from grape_jax.core.model import state_shardings
from grape_jax.core.params import layer_of, param_specs
from grape_jax.merge.state import MergeInputs, alignment_inputs, merge_state, merged_config
from grape_jax.planners.plan import Plan
from grape_jax.stream.layers import LayerSource, layer_names
from grape_jax.stream.spill import overrides_of_layer


def plan_for_layer(plan: Plan, layer: int) -> Plan | None:
    """The plan restricted to `layer` (None when the plan does not touch it)."""
    lps = tuple(lp for lp in plan.layers if lp.layer == layer)
    return dataclasses.replace(plan, layers=lps) if lps else None


def _merge_fn(plan: Plan):
    def merge(state: nnx.State, inputs: MergeInputs) -> nnx.State:
        return merge_state(state, plan, inputs)

    return merge


class MergedLayers:
    """The merged model as a `LayerSource`: each read reads the original layer from `source` and merges it
    with `plan` (`inputs`: the fit's overrides, or nothing; operator 'aligned' computes its permutations
    from the layer read)."""

    def __init__(self, source: LayerSource, plan: Plan, inputs: MergeInputs | None = None):
        self.source, self.plan = source, plan
        self.inputs = inputs or MergeInputs()
        self.cfg, self.ctx = merged_config(source.cfg, plan), source.ctx
        self._specs, self._old_specs = param_specs(self.cfg), param_specs(source.cfg)

    def with_overrides(self, overrides: Mapping[str, np.ndarray]) -> MergedLayers:
        """The same merge with other overrides (the mapping itself, not a copy: it may live on disk)."""
        return MergedLayers(self.source, self.plan, dataclasses.replace(self.inputs, overrides=overrides))

    def abstract(self, name: str) -> jax.ShapeDtypeStruct:
        spec = self._specs[name]
        dtype = self.source.abstract(name).dtype
        return jax.ShapeDtypeStruct(spec.shape, dtype, sharding=self.ctx.sharding(spec.shape, spec.axes))

    def read(self, names: Sequence[str]) -> dict[str, jax.Array]:
        out: dict[str, jax.Array] = {}
        layers = sorted({layer_of(n) for n in names if layer_of(n) is not None})
        plain = [n for n in names if layer_of(n) is None]
        if plain:
            out.update(self.source.read(plain))
        for layer in layers:
            merged = self.layer(layer)
            out.update({n: merged[n] for n in names if layer_of(n) == layer})
        return out

    def layer(self, layer: int) -> dict[str, jax.Array]:
        """Every merged leaf of decoder layer `layer`."""
        return self.merge(layer, self.source.read(layer_names(self.source.cfg, layer)))

    def merge(self, layer: int, params: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """Layer `layer`'s merged leaves from its original ones (`params`, as read from the source)."""
        sub = plan_for_layer(self.plan, layer)
        if sub is None:
            return dict(params)
        inputs = MergeInputs(
            overrides=overrides_of_layer(self.inputs.overrides, layer),
            made_by=self.inputs.made_by,
        )
        if self.plan.operator == "aligned":
            inputs = dataclasses.replace(inputs, permutations=alignment_inputs(params, sub).permutations)
        flat = []
        for name, value in params.items():
            spec = self._old_specs[name]
            var = nnx.Param(value, out_sharding=spec.axes, eager_sharding=False, merge_role=spec.role)
            flat.append((tuple(name.split(".")), var))
        state = nnx.from_flat_state(flat)
        merge = _merge_fn(sub)
        shapes = jax.eval_shape(merge, state, inputs)
        merged = jax.jit(merge, out_shardings=state_shardings(shapes, self.ctx))(state, inputs)
        return {".".join(str(k) for k in path): v.get_value() for path, v in nnx.to_flat_state(merged)}


class MergedParams(Mapping):
    """The merged model's parameters by name, read and merged a layer at a time when first asked for and
    kept for the `keep` most recent layers (or other leaves): what `export_hf(params=...)` reads, in
    the table's order, so each layer is merged once. `shapes` gives every leaf's shape and dtype
    without reading anything."""

    def __init__(self, merged: MergedLayers, keep: int = 2):
        self.merged, self.keep = merged, keep
        self._names = list(param_specs(merged.cfg))
        self._cache: collections.OrderedDict = collections.OrderedDict()
        self.shapes = {n: merged.abstract(n) for n in self._names}
        self.reads = 0

    def __getitem__(self, name: str) -> jax.Array:
        if name not in self.shapes:
            raise KeyError(name)
        layer = layer_of(name)
        key = name if layer is None else layer
        if key not in self._cache:
            self.reads += 1
            self._cache[key] = self.merged.read([name]) if layer is None else self.merged.layer(layer)
            while len(self._cache) > self.keep:
                self._cache.popitem(last=False)
                release_free_memory()
        self._cache.move_to_end(key)
        return self._cache[key][name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)
