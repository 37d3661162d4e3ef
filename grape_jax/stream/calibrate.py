"""Layer-streamed calibration: the statistics and gradient sensitivities of `calibration.calibrate` with
one decoder layer's weights on the mesh at a time.

Forward sweep: the embeddings of every calibration block are written to the host (`HiddenStates`, fp32);
then each layer is read (`layers.sweep`, the next one read meanwhile), every batch of its input runs
through it by the pass engine, its output is written as the next layer's input, and the layer is freed.
Without gradients the MoE layers accumulate their statistics in this sweep (the same
`moe_layer_with_stats` over token chunks as the resident step) and each layer's input file is dropped
once the layer is done.

With gradients (the default) the forward sweep keeps every layer's input on disk, and a reverse sweep
computes the sensitivities: the final norm and head give the cotangent C_L = ∂L/∂x_L per batch (L the
summed next-token NLL of the batch's real positions, as `output_gradients`); then from the top each
layer is read again and pulled back with its VJP at its stored input: `(x, δ) -> decoder_layer(x)` where
δ is added to the MoE block's output, so the δ-cotangent is ∂L/∂(block output), the gradient the
resident run takes, and the x-cotangent is C_l, which flows down. The layer's statistics accumulate in
the same step with that gradient. Host memory: one batch of hidden states and cotangents plus the
memory-mapped files' pages in use; disk: (layers + 2) x blocks x T x d x 4 bytes with gradients.

On several processes every layer's output (and cotangent) is gathered whole to every process (`host`:
replicated on the mesh, then read on the host), so each process keeps all calibration blocks' hidden
states in its own work directory while each reads only its own slices of the weights.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from grape_jax.calibration import similarity
from grape_jax.calibration.calibrate import (
    accumulator_shardings,
    cast_for_compute,
    layer_stats,
    moe_layer_with_stats,
)
from grape_jax.calibration.stats import LayerStats
from grape_jax.core import transformer
from grape_jax.core.config import MoEConfig
from grape_jax.core.sharding import host, pin
from grape_jax.passes.engine import Batches, stream_pass
from grape_jax.stream.layers import HiddenStates, LayerSource, canonical_layer, head_names, renamed, sweep

STATIC = ("cfg", "layer", "token_chunk", "compute_dtype", "acc_shardings")


def chunked_moe(
    params: Mapping[str, jax.Array], p: str, cfg: MoEConfig, h: Float[Array, "t d"], chunk: int, expert_dtype
) -> Float[Array, "t d"]:
    """The MoE block's output computed as the statistics pass computes it (all experts, token chunks)."""
    t, d = h.shape
    pad = (-t) % chunk
    hp = jnp.pad(h, ((0, pad), (0, 0))).reshape(-1, chunk, d)

    def body(carry, x):
        return carry, transformer.moe_block(params, p, cfg, x, expert_dtype=expert_dtype)[0]

    _, out = jax.lax.scan(body, None, hp)
    return out.reshape(-1, d)[:t]


@functools.partial(jax.jit, static_argnames=(*STATIC, "stats"), donate_argnums=(0,))
def forward_layer(
    acc: similarity.Accumulators | None,
    params: Mapping[str, jax.Array],
    x: Float[Array, "b t d"],
    mask: Bool[Array, "b t"],
    *,
    cfg: MoEConfig,
    layer: int,
    token_chunk: int,
    compute_dtype: str,
    stats: bool,
    acc_shardings: tuple | None = None,
) -> tuple[similarity.Accumulators | None, Float[Array, "b t d"]]:
    """One batch through decoder layer `layer` (statistics accumulated at its MoE block with `stats`)."""
    expert_dtype = jnp.dtype(compute_dtype)
    params = cast_for_compute(params, cfg, expert_dtype)
    out_acc = [acc]

    def moe_fn(prefix: str, h: jax.Array, m: jax.Array) -> jax.Array:
        chunk = min(token_chunk, h.shape[0])
        if not stats:
            return chunked_moe(params, prefix, cfg, h, chunk, expert_dtype)
        out, out_acc[0] = moe_layer_with_stats(params, prefix, cfg, h, m, acc, chunk, expert_dtype)
        return out

    y = transformer.decoder_layer(params, cfg, layer, x, transformer.default_positions(mask), mask, moe_fn=moe_fn)
    return pin(out_acc[0], acc_shardings), y


@functools.partial(jax.jit, static_argnames=STATIC, donate_argnums=(0,))
def reverse_layer(
    acc: similarity.Accumulators | None,
    params: Mapping[str, jax.Array],
    x: Float[Array, "b t d"],
    cot: Float[Array, "b t d"],
    mask: Bool[Array, "b t"],
    *,
    cfg: MoEConfig,
    layer: int,
    token_chunk: int,
    compute_dtype: str,
    acc_shardings: tuple | None = None,
) -> tuple[similarity.Accumulators | None, Float[Array, "b t d"]]:
    """The layer's VJP at its input `x` against the cotangent of its output: returns the accumulators
    (statistics with ∂L/∂(MoE block output) at a MoE layer) and the cotangent of `x` (module docstring)."""
    expert_dtype = jnp.dtype(compute_dtype)
    params = cast_for_compute(params, cfg, expert_dtype)
    positions = transformer.default_positions(mask)
    b, t, d = x.shape

    def f(x: jax.Array, delta: jax.Array) -> tuple[jax.Array, jax.Array]:
        seen = {}

        def moe_fn(prefix: str, h: jax.Array, m: jax.Array) -> jax.Array:
            seen["h"] = h
            out = transformer.moe_output(params, prefix, cfg, h)
            return out + delta.astype(out.dtype)

        y = transformer.decoder_layer(params, cfg, layer, x, positions, mask, moe_fn=moe_fn)
        return y, seen.get("h", jnp.zeros((), x.dtype))

    _, vjp, h = jax.vjp(f, x, jnp.zeros((b * t, d), jnp.float32), has_aux=True)
    cot_x, grad = vjp(cot.astype(x.dtype))
    if cfg.num_experts[layer]:
        chunk = min(token_chunk, b * t)
        prefix = f"layers.{layer}.mlp."
        _, acc = moe_layer_with_stats(params, prefix, cfg, h, mask.reshape(-1), acc, chunk, expert_dtype, grad)
    return pin(acc, acc_shardings), cot_x


@functools.partial(jax.jit, static_argnames=("cfg",))
def embed_batch(params: Mapping[str, jax.Array], tokens: Int[Array, "b t"], *, cfg: MoEConfig) -> jax.Array:
    return transformer.embed(cast_for_compute(params, cfg, jnp.float32), tokens)


@functools.partial(jax.jit, static_argnames=("cfg",))
def head_cotangent(
    params: Mapping[str, jax.Array],
    x: Float[Array, "b t d"],
    tokens: Int[Array, "b t"],
    mask: Bool[Array, "b t"],
    *,
    cfg: MoEConfig,
) -> Float[Array, "b t d"]:
    """∂L/∂x of the summed next-token NLL of the batch's real positions (as `output_gradients`)."""
    params = cast_for_compute(params, cfg, jnp.float32)

    def loss(x: jax.Array) -> jax.Array:
        logp = jax.nn.log_softmax(transformer.head(params, cfg, x)[:, :-1], axis=-1)
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(mask[:, 1:] & mask[:, :-1], nll, 0.0))

    return jax.grad(loss)(x)


class Sweeps:
    """The forward and reverse sweeps of one streamed calibration (module docstring)."""

    def __init__(
        self,
        source: LayerSource,
        batches: Batches,
        store: HiddenStates,
        *,
        cka: str,
        chunk: int,
        compute_dtype: str,
        gradients: bool,
        on_layer: Callable[[str, int], None] | None = None,
    ):
        self.source, self.cfg, self.ctx = source, source.cfg, source.ctx
        self.batches, self.store = batches, store
        self.cka, self.chunk, self.compute_dtype, self.gradients = cka, chunk, compute_dtype, gradients
        self.on_layer = on_layer or (lambda phase, layer: None)

    def _accumulators(self, layer: int) -> tuple[Any, tuple | None]:
        cfg, ctx = self.cfg, self.ctx
        zero = similarity.init_accumulators(cfg.num_experts[layer], cfg.hidden_size, cka=self.cka, chunk=self.chunk)
        acc = {"a": zero}
        placement = accumulator_shardings(acc, ctx)
        return jax.device_put(acc, placement)["a"], tuple(jax.tree.leaves(placement["a"]))

    def _put(self, x: np.ndarray) -> jax.Array:
        return self.ctx.put_batch(np.ascontiguousarray(x))

    def embed(self) -> None:
        """x0: the embeddings of every batch."""
        params = self.source.read(["embed"])
        out = self.store.create("x0")
        for i in range(self.batches.count):
            out[i] = host(embed_batch(params, self._put(self.batches.tokens[i]), cfg=self.cfg), self.ctx)
        self.store.commit("x0", out)

    def forward(self, start: int = 0, stats: dict[int, LayerStats] | None = None) -> None:
        """Layers `start`.. : x{l} -> x{l+1}; without gradients, the MoE layers' statistics into `stats`."""
        for layer, params in sweep(self.source, range(start, self.cfg.num_layers)):
            self._forward_one(layer, params, stats)
            self.on_layer("forward", layer)
            if not self.gradients:
                self.store.drop(f"x{layer}")

    def _forward_one(self, layer: int, params: dict[str, jax.Array], stats: dict[int, LayerStats] | None) -> None:
        cfg, put = self.cfg, self._put
        moe_stats = not self.gradients and cfg.num_experts[layer] > 0
        acc, shardings = self._accumulators(layer) if moe_stats else (None, None)
        canon = canonical_layer(cfg, layer)
        p = renamed(params, layer, canon)
        x_in, x_out = self.store.open(f"x{layer}"), self.store.create(f"x{layer + 1}")
        kw = dict(cfg=cfg, layer=canon, token_chunk=self.chunk, compute_dtype=self.compute_dtype, stats=moe_stats)

        def step(acc: Any, i: int) -> Any:
            acc, y = forward_layer(acc, p, put(x_in[i]), put(self.batches.mask[i]), acc_shardings=shardings, **kw)
            x_out[i] = host(y, self.ctx)
            return acc

        acc = stream_pass(step, acc, self.batches, ctx=self.ctx)
        self.store.commit(f"x{layer + 1}", x_out)
        if moe_stats:
            stats[layer] = layer_stats(layer, acc, params, cfg, self.ctx.mesh, gradients=False)

    def head(self) -> None:
        """g{L}: the cotangent of the last layer's output (x{L} is left for the caller to drop)."""
        cfg, put, L = self.cfg, self._put, self.cfg.num_layers
        params = self.source.read(head_names(cfg))
        x, out = self.store.open(f"x{L}"), self.store.create(f"g{L}")
        for i in range(self.batches.count):
            tokens, mask = put(self.batches.tokens[i]), put(self.batches.mask[i])
            out[i] = host(head_cotangent(params, put(x[i]), tokens, mask, cfg=cfg), self.ctx)
        self.store.commit(f"g{L}", out)

    def reverse(self, start: int, stats: dict[int, LayerStats]) -> None:
        """Layers `start`, start-1, ..., 0: g{l+1} -> g{l}, with the MoE layers' statistics into `stats`."""
        for layer, params in sweep(self.source, range(start, -1, -1)):
            self._reverse_one(layer, params, stats)
            self.on_layer("reverse", layer)
            self.store.drop(f"x{layer}")
            self.store.drop(f"g{layer + 1}")

    def _reverse_one(self, layer: int, params: dict[str, jax.Array], stats: dict[int, LayerStats]) -> None:
        cfg, put = self.cfg, self._put
        moe = cfg.num_experts[layer] > 0
        acc, shardings = self._accumulators(layer) if moe else (None, None)
        canon = canonical_layer(cfg, layer)
        p = renamed(params, layer, canon)
        x_in, cot_in = self.store.open(f"x{layer}"), self.store.open(f"g{layer + 1}")
        cot_out = self.store.create(f"g{layer}") if layer > 0 else None
        kw = dict(cfg=cfg, layer=canon, token_chunk=self.chunk, compute_dtype=self.compute_dtype)

        def step(acc: Any, i: int) -> Any:
            acc, cot = reverse_layer(
                acc, p, put(x_in[i]), put(cot_in[i]), put(self.batches.mask[i]), acc_shardings=shardings, **kw
            )
            if cot_out is not None:
                cot_out[i] = host(cot, self.ctx)
            return acc

        acc = stream_pass(step, acc, self.batches, ctx=self.ctx)
        if cot_out is not None:
            self.store.commit(f"g{layer}", cot_out)
        if moe:
            stats[layer] = layer_stats(layer, acc, params, cfg, self.ctx.mesh, gradients=True)
