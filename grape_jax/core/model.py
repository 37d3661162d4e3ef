"""The model users hold: `MoEModel`, a Flax NNX module built from the parameter table.

Every entry of `params.param_specs(cfg)` is an `nnx.Param` at the same dotted path (`layers.3.mlp.w_gate`
is `model.layers[3].mlp.w_gate`), carrying its logical axes (`out_sharding` metadata, resolved to mesh axes
by the model's `RunContext`) and its merge role (`merge_role`). The maths lives in pure functions of the
parameters (`grape_jax.core.transformer`); the module owns the arrays, the config, where the arrays live (`ctx`) and
where they came from (`info`). Pure work goes through `nnx.split(model)` -> a function of the state ->
`nnx.merge`, and loading fills an abstract model made by `nnx.eval_shape`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from grape_jax.core import transformer
from grape_jax.core.config import MoEConfig
from grape_jax.core.params import ParamSpec, init_params, param_specs
from grape_jax.core.sharding import RunContext


class ModelError(ValueError):
    """Arrays or state that do not fit the model's config."""


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """Where a model came from and what was done to it; static (part of the NNX graph definition).

    family           the conversion family (`conversion.families`) its checkpoint uses ('' when built in Python)
    source           the directory or checkpoint it was loaded from
    hf_config_json   the source's config.json as JSON text (export updates it), '{}' when none
    provenance_json  JSON list of records appended by each stage (source fingerprint, calibration, plan, ...)
    """

    family: str = ""
    source: str = ""
    hf_config_json: str = "{}"
    provenance_json: str = "[]"

    @property
    def hf_config(self) -> dict[str, Any]:
        return json.loads(self.hf_config_json)

    @property
    def provenance(self) -> list[dict[str, Any]]:
        return json.loads(self.provenance_json)

    @property
    def fingerprint(self) -> str:
        """The weights' identity, from every provenance record's own fingerprint (where the model was
        loaded from, which plans were applied, ...), so paths do not count; '' when unknown (a model
        built in Python). A model as loaded has one record, and its fingerprint is that record's, the
        source's: one fingerprint per source in statistics, plans, model cards, `describe` and heal.
        Later records chain: the digest of all the records' fingerprints."""
        parts = [record.get("fingerprint") for record in self.provenance]
        if not parts:
            return ""
        if len(parts) == 1 and isinstance(parts[0], str) and parts[0]:
            return parts[0]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def with_record(self, record: Mapping[str, Any]) -> ModelInfo:
        """This info with one more provenance record (a stage that changed the model)."""
        records = [*self.provenance, dict(record)]
        return dataclasses.replace(self, provenance_json=json.dumps(records, sort_keys=True, default=str))

    @classmethod
    def create(
        cls,
        *,
        family: str = "",
        source: str = "",
        hf_config: Mapping[str, Any] | None = None,
        provenance: list[Mapping[str, Any]] | None = None,
    ) -> ModelInfo:
        return cls(
            family=family,
            source=source,
            hf_config_json=json.dumps(dict(hf_config or {}), sort_keys=True),
            provenance_json=json.dumps([dict(r) for r in provenance or []], sort_keys=True, default=str),
        )


def _param(spec: ParamSpec, value: jax.Array) -> nnx.Param:
    return nnx.Param(value, out_sharding=spec.axes, eager_sharding=False, merge_role=spec.role)


class ParamGroup(nnx.Module):
    """Parameters and sub-groups of one part of the model, built from `(relative name -> spec)`.

    `make(full_name, spec)` returns each parameter's value; `prefix` is this group's dotted path."""

    def __init__(self, cfg: MoEConfig, specs: Mapping[str, ParamSpec], make: Callable, prefix: str):
        self.cfg = cfg
        children: dict[str, dict[str, ParamSpec]] = {}
        for name, spec in specs.items():
            head, _, rest = name.partition(".")
            if rest:
                children.setdefault(head, {})[rest] = spec
            else:
                setattr(self, head, _param(spec, make(prefix + name, spec)))
        for head, sub in children.items():
            setattr(self, head, _group_class(head, sub)(cfg, sub, make, prefix + head + "."))

    def params(self) -> dict[str, jax.Array]:
        """This group's parameter values by relative dotted name (what the layer functions index)."""
        return param_view(self)


class Attention(ParamGroup):
    """Grouped-query attention (or multi-head latent attention) of one decoder layer."""

    def __call__(self, x: Float[Array, "b t d"], positions: Int[Array, "b t"], mask: Bool[Array, "b 1 t t"]):
        return transformer.attention(self.params(), "", self.cfg, x, positions, mask)


class MLP(ParamGroup):
    """A dense SwiGLU MLP (dense layers, shared experts)."""

    def __call__(self, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
        return transformer.dense_mlp(self.params(), "", self.cfg, x)


class MoEBlock(ParamGroup):
    """Routed experts stacked on a leading `experts` axis, their router, and an optional shared expert."""

    def __call__(self, x: Float[Array, "t d"]) -> Float[Array, "t d"]:
        return transformer.moe_block(self.params(), "", self.cfg, x)[0]


class DecoderLayer(ParamGroup):
    """attn_norm, attn, mlp_norm and mlp (an MoEBlock, or an MLP in dense layers) of one layer."""


def _group_class(name: str, specs: Mapping[str, ParamSpec]) -> type[ParamGroup]:
    if name == "attn":
        return Attention
    if name == "mlp":
        return MoEBlock if "router" in specs else MLP
    if name == "shared":
        return MLP
    return ParamGroup


class MoEModel(nnx.Module):
    """A decoder-only MoE language model (Mixtral-style and every other supported family).

    `MoEModel(cfg, rngs=nnx.Rngs(0))` draws random weights (normal(0, `init_scale`), unit norms, zero
    biases); `load_hf` / `restore_checkpoint` fill an abstract one from files. Calling it gives causal-LM
    logits for right-padded token rows."""

    def __init__(
        self,
        cfg: MoEConfig,
        *,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
        init_scale: float = 0.02,
        ctx: RunContext = RunContext(),
        info: ModelInfo = ModelInfo(),
    ):
        def make(name: str, spec: ParamSpec) -> jax.Array:
            if spec.init == "ones":
                return jnp.ones(spec.shape, dtype)
            if spec.init == "zeros":
                return jnp.zeros(spec.shape, dtype)
            return (init_scale * jax.random.normal(rngs.params(), spec.shape, jnp.float32)).astype(dtype)

        self._build(cfg, make, ctx, info)

    def _build(self, cfg: MoEConfig, make: Callable, ctx: RunContext, info: ModelInfo) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.info = info
        specs = param_specs(cfg)
        per_layer: list[dict[str, ParamSpec]] = [{} for _ in range(cfg.num_layers)]
        for name, spec in specs.items():
            if name.startswith("layers."):
                _, idx, rest = name.split(".", 2)
                per_layer[int(idx)][rest] = spec
            else:
                setattr(self, name, _param(spec, make(name, spec)))
        self.layers = nnx.List([DecoderLayer(cfg, sub, make, f"layers.{i}.") for i, sub in enumerate(per_layer)])

    def __call__(
        self, tokens: Int[Array, "b t"], mask: Bool[Array, "b t"] | None = None, *, dispatch: str = "auto"
    ) -> Float[Array, "b t v"]:
        if mask is None:
            mask = np.ones(np.shape(tokens), dtype=bool)
        params = param_view(self)
        check_param_shapes(self.cfg, params)
        tokens, mask = self.ctx_batch(tokens), self.ctx_batch(mask)
        with self.ctx.scope():  # the routed dispatch splits its work over the mesh in context
            return forward_jit(params, cfg=self.cfg, tokens=tokens, mask=mask, dispatch=dispatch)

    def ctx_batch(self, x) -> jax.Array:
        """A token batch placed on the model's mesh (batch over the data axes); traced or already
        placed arrays pass through."""
        if isinstance(x, jax.core.Tracer) or (isinstance(x, jax.Array) and self.ctx.mesh is None):
            return x
        return self.ctx.put_batch(np.asarray(x))

    @property
    def num_params(self) -> int:
        return sum(int(np.prod(v.shape)) for v in jax.tree.leaves(nnx.state(self, nnx.Param)))


forward_jit = jax.jit(transformer.forward, static_argnames=("cfg", "dispatch"))
"""Jitted `transformer.forward(params, cfg, tokens, mask, *, dispatch)`; one compile per config, dispatch and
shape. `dispatch`: 'auto' (routed on accelerators and on CPU where it is faster), 'dense' (every expert
on every token, the oracle), 'routed', 'ragged_dot', 'blocked' (see `grape_jax.core.dispatch`)."""


def check_param_shapes(cfg: MoEConfig, params: Mapping[str, Any]) -> None:
    """Every parameter (`param_view`) has the shape `cfg` gives it; a one-line error otherwise, naming the
    MoE layer and both expert counts when a merged state was put under the original graph definition."""
    specs = _specs(cfg)
    for name, value in params.items():
        spec = specs.get(name)
        if spec is None or tuple(value.shape) == spec.shape:
            continue
        axis = spec.expert_axis
        if axis is not None and value.shape[axis] != spec.shape[axis]:
            layer = int(name.split(".")[1])
            raise ModelError(
                f"layer {layer}: the module's config has {spec.shape[axis]} experts but its parameters hold "
                f"{value.shape[axis]} ({name}); a merged state needs the merged graph definition: "
                f"nnx.merge(gj.merged_graphdef(model, plan, inputs), state)"
            )
        raise ModelError(f"parameter {name}: shape {tuple(value.shape)}, the module's config needs {spec.shape}")


@functools.lru_cache(maxsize=32)
def _specs(cfg: MoEConfig) -> dict[str, ParamSpec]:
    return param_specs(cfg)


def param_view(node: nnx.Module | nnx.State) -> dict[str, jax.Array]:
    """The parameter values of a module or state by dotted name, relative to it (`layers.3.mlp.w_gate`
    for a whole model): the view the pure layer functions index. It is rebuilt on each call from the
    state, never stored: the module (or its `nnx.State`) is the one representation of a model."""
    state = nnx.state(node, nnx.Param) if isinstance(node, nnx.Module) else node
    return {".".join(str(k) for k in path): v.get_value() for path, v in nnx.to_flat_state(state)}


def abstract_model(
    cfg: MoEConfig, *, ctx: RunContext = RunContext(), info: ModelInfo = ModelInfo(), dtype: Any = jnp.float32
) -> MoEModel:
    """The model with `jax.ShapeDtypeStruct` leaves: nothing allocated, nothing computed."""
    return nnx.eval_shape(lambda: MoEModel(cfg, rngs=nnx.Rngs(0), dtype=dtype, ctx=ctx, info=info))


def state_shardings(state: nnx.State, ctx: RunContext) -> nnx.State:
    """Each parameter's sharding on `ctx` from its logical axes (same tree as `state`)."""
    return jax.tree.map(
        lambda v: ctx.sharding(v.shape, v.get_metadata()["out_sharding"]),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def fill_model(
    cfg: MoEConfig,
    value: Callable[[str, ParamSpec, jax.sharding.Sharding], jax.Array],
    *,
    ctx: RunContext = RunContext(),
    info: ModelInfo = ModelInfo(),
) -> MoEModel:
    """A model whose every parameter is `value(name, spec, sharding)`: how files become a model (an
    abstract model's state filled leaf by leaf, each leaf made straight into its sharding)."""
    graphdef, state = nnx.split(abstract_model(cfg, ctx=ctx, info=info))
    specs = param_specs(cfg)
    flat = []
    for path, var in nnx.to_flat_state(state):
        name = ".".join(str(k) for k in path)
        spec = specs[name]
        array = value(name, spec, ctx.sharding(spec.shape, spec.axes))
        if tuple(array.shape) != spec.shape:
            raise ModelError(f"parameter {name}: got shape {tuple(array.shape)}, the config needs {spec.shape}")
        flat.append((path, var.replace(array)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def model_from_arrays(
    cfg: MoEConfig, arrays: Mapping[str, Any], *, ctx: RunContext = RunContext(), info: ModelInfo = ModelInfo()
) -> MoEModel:
    """A model from arrays keyed by the parameter table's names (host arrays are placed by `ctx`)."""
    expected = set(param_specs(cfg))
    if set(arrays) != expected:
        missing, extra = sorted(expected - set(arrays)), sorted(set(arrays) - expected)
        raise ModelError(f"parameters do not match the config: missing {missing[:5]}, unexpected {extra[:5]}")
    return fill_model(cfg, lambda name, spec, sharding: jax.device_put(arrays[name], sharding), ctx=ctx, info=info)


def init_model(
    cfg: MoEConfig,
    *,
    seed: int = 0,
    dtype: Any = jnp.float32,
    scale: float = 0.02,
    ctx: RunContext = RunContext(),
    info: ModelInfo = ModelInfo(),
) -> MoEModel:
    """A randomly initialised model drawn on the host (NumPy, seeded): no compile, placed by `ctx`."""
    return model_from_arrays(cfg, init_params(cfg, seed=seed, dtype=dtype, scale=scale), ctx=ctx, info=info)
