"""Flax NNX shell around the pure decoder in `grape_jax.layers`.

`MoEModel` holds one `nnx.Param` per entry of the parameter table, in a module tree whose state paths
joined with '.' are exactly the table's names (`layers.3.mlp.w_gate`). The maths lives in pure
functions; the module only owns the arrays, so `nnx.split` / `nnx.merge`, Orbax and sharding work on it
as on any NNX model while merge and calibration can use the flat dict directly.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from grape_jax import layers
from grape_jax.config import MoEConfig
from grape_jax.params import param_specs


class ParamGroup(nnx.Module):
    """A named group of parameters (attention, MoE block, ...), built from a flat sub-dict."""

    def __init__(self, flat: Mapping[str, jax.Array]):
        children: dict[str, dict[str, jax.Array]] = {}
        for name, value in flat.items():
            head, _, rest = name.partition(".")
            if rest:
                children.setdefault(head, {})[rest] = value
            else:
                setattr(self, head, nnx.Param(value))
        for head, sub in children.items():
            setattr(self, head, ParamGroup(sub))


class DecoderLayer(ParamGroup):
    """attn_norm, attn.*, mlp_norm, mlp.* of one decoder layer."""


class MoEModel(nnx.Module):
    """A decoder-only MoE language model (Mixtral-style and the other supported families)."""

    def __init__(self, cfg: MoEConfig, params: Mapping[str, jax.Array]):
        expected = set(param_specs(cfg))
        if set(params) != expected:
            missing, extra = sorted(expected - set(params)), sorted(set(params) - expected)
            raise ValueError(f"parameters do not match the config: missing {missing[:5]}, "
                             f"unexpected {extra[:5]}")
        self.cfg = cfg
        per_layer: list[dict[str, jax.Array]] = [{} for _ in range(cfg.num_layers)]
        top: dict[str, jax.Array] = {}
        for name, value in params.items():
            if name.startswith("layers."):
                _, idx, rest = name.split(".", 2)
                per_layer[int(idx)][rest] = value
            else:
                top[name] = value
        self.embed = nnx.Param(top["embed"])
        self.layers = nnx.List([DecoderLayer(sub) for sub in per_layer])
        for name, value in top.items():  # final_norm (+ bias), lm_head (+ bias)
            if name != "embed":
                setattr(self, name, nnx.Param(value))

    def __call__(
        self, tokens: Int[Array, "b t"], mask: Bool[Array, "b t"] | None = None
    ) -> Float[Array, "b t v"]:
        if mask is None:
            mask = jnp.ones(tokens.shape, dtype=bool)
        return forward_jit(flat_params(self), cfg=self.cfg, tokens=tokens, mask=mask)


def flat_params(model: nnx.Module) -> dict[str, jax.Array]:
    """The model's parameters as the flat `{dotted.name: array}` dict of the parameter table."""
    state = nnx.state(model, nnx.Param)
    return {".".join(str(k) for k in path): v[...] for path, v in nnx.to_flat_state(state)}


def with_params(model: MoEModel, params: Mapping[str, jax.Array], cfg: MoEConfig | None = None) -> MoEModel:
    """A new model with other parameters (and, after a merge, another config)."""
    return MoEModel(model.cfg if cfg is None else cfg, params)


forward_jit = jax.jit(layers.forward, static_argnames=("cfg",))
"""Jitted `forward(params, cfg, tokens, mask)`; `cfg` is static (hashable), one compile per config/shape."""


def logits(
    params: Mapping[str, jax.Array], cfg: MoEConfig, tokens: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
    """Logits of a right-padded token batch through the jitted forward."""
    if mask is None:
        mask = jnp.ones(tokens.shape, dtype=bool)
    return forward_jit(dict(params), cfg=cfg, tokens=tokens, mask=mask)
