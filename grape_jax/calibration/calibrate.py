"""Calibration: run token blocks through the model and accumulate per-MoE-layer statistics.

One jitted `update(acc, params, tokens, mask) -> acc` (the accumulator is donated) runs the decoder layer
by layer; at each MoE layer it scans over token chunks of the layer input, runs *every* expert on every
token of the chunk (`transformer.moe_block` returns all expert outputs), feeds them with the layer's own
routing to `similarity.update_accumulators`, and continues the forward pass with the same chunk outputs.
Memory per step is bounded by the chunk size, independent of how many tokens are calibrated. Experts
stay sharded over the `expert` mesh axis and tokens over `data`, as the parameters and batch are placed.

The experts (routed and shared: nearly all of the forward's FLOPs) and the big statistics matmuls run in
`compute_dtype`: by default the parameters' own dtype on accelerators (bf16 for bf16 checkpoints) and
float32 on CPU (where XLA's bf16 matmuls are slow and fp32 costs no more). The rest of the forward
(attention, norms, router, residual stream) runs in fp32, so the routing the statistics describe is the
fp32 reference's wherever the layer input is (the first MoE layer: always). Statistics are fp32 sums:
matmuls over bf16 expert outputs accumulate in fp32 (`preferred_element_type`; each product is exact).

Gradient sensitivities (option `gradients`, on by default; the `grape-l` planner needs them): each step
first takes one backward pass of the batch's summed next-token loss to the output of every MoE block
(`output_gradients`: the routed forward, each decoder layer rematerialised, so its memory is that of a
training step of one batch, never of the number of blocks); the statistics pass then adds
∂L/∂out · y_j per expert and token to the accumulators (`grape_jax.calibration.similarity`). It costs about one more
forward and a backward per batch.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from grape_jax.calibration import similarity
from grape_jax.calibration.options import (
    CalibrationOptions,
    calibration_fingerprint,
    choose_cka_mode,
    resolve_compute_dtype,
    run_record,
)
from grape_jax.calibration.stats import SENSITIVITIES, LayerStats, ModelStats, StatsError
from grape_jax.core import transformer
from grape_jax.core.config import MoEConfig
from grape_jax.core.model import MoEModel, param_view
from grape_jax.core.params import param_specs
from grape_jax.core.sharding import RunContext, pin, replicate
from grape_jax.passes.engine import Batches, PassInterrupted, Saves, stream_pass
from grape_jax.passes.resume import Progress

Accumulators = dict[str, Any]  # str(layer) -> similarity.Accumulators


class CalibrationInterrupted(KeyboardInterrupt):
    """Ctrl-C during calibration; `saved` is the number of blocks whose statistics are saved for resuming
    (0 when nothing could be saved)."""

    def __init__(self, saved: int, total: int, directory: str | None):
        super().__init__(saved, total, directory)
        self.saved, self.total, self.directory = saved, total, directory


def model_accumulators(cfg: MoEConfig, *, cka: str, token_chunk: int) -> Accumulators:
    return {
        str(layer): similarity.init_accumulators(cfg.num_experts[layer], cfg.hidden_size, cka=cka, chunk=token_chunk)
        for layer in cfg.moe_layers
    }


def accumulator_shardings(acc: Accumulators, ctx: RunContext) -> Accumulators:
    """Where each accumulator lives: by its logical axes on the run context.

    The initial (zero) accumulators are placed here and every step keeps them here, so the jitted step
    sees the same input placement each batch and compiles once per run."""

    def place(a: similarity.Accumulators) -> similarity.Accumulators:
        return dataclasses.replace(
            a, **{n: ctx.sharding(getattr(a, n).shape, axes) for n, axes in similarity.accumulator_axes(a.cka).items()}
        )

    return {k: place(v) for k, v in acc.items()}


def moe_layer_with_stats(params, p, cfg, h, mask, acc, chunk, expert_dtype, grad=None):
    """MoE block over token chunks (lax.scan), accumulating statistics of every chunk (`grad`: the loss
    gradient w.r.t. the block output [t, d], for the sensitivities)."""
    t, d = h.shape
    pad = (-t) % chunk
    h = jnp.pad(h, ((0, pad), (0, 0)))
    mask = jnp.pad(mask, (0, pad))
    n = h.shape[0] // chunk
    grads = None if grad is None else jnp.pad(grad, ((0, pad), (0, 0))).reshape(n, chunk, d)

    def body(acc, xs):
        x, m, g = xs
        out, routing, y_all = transformer.moe_block(params, p, cfg, x, expert_dtype=expert_dtype)
        acc = similarity.update_accumulators(acc, y_all, routing.gates, routing.selected, routing.logits, m, out_grad=g)
        return acc, out

    acc, outs = jax.lax.scan(body, acc, (h.reshape(n, chunk, d), mask.reshape(n, chunk), grads))
    return outs.reshape(n * chunk, d)[:t], acc


def output_gradients(
    params: Mapping[str, jax.Array], cfg: MoEConfig, tokens: Int[Array, "b t"], mask: Bool[Array, "b t"]
) -> dict[str, Float[Array, "bt d"]]:
    """∂L/∂(MoE block output) of every MoE layer (key str(layer)), [b*t, d] fp32, where L is the summed
    next-token NLL of the batch's real positions. The forward takes the routed dispatch and recomputes
    each decoder layer in the backward pass (`jax.checkpoint`), so nothing of size experts x tokens is
    kept between the passes."""
    positions = transformer.default_positions(mask)
    b, t = tokens.shape
    zeros = {str(layer): jnp.zeros((b * t, cfg.hidden_size), jnp.float32) for layer in cfg.moe_layers}

    @functools.partial(jax.checkpoint, static_argnums=(0,))
    def decoder_layer(layer: int, params, x, delta):
        def moe_fn(prefix: str, h: jax.Array, m: jax.Array) -> jax.Array:
            out = transformer.moe_output(params, prefix, cfg, h)
            return out + delta.astype(out.dtype)

        return transformer.decoder_layer(params, cfg, layer, x, positions, mask, moe_fn=moe_fn)

    def loss(deltas: dict[str, jax.Array]) -> jax.Array:
        x = transformer.embed(params, tokens)
        for layer in range(cfg.num_layers):
            x = decoder_layer(layer, params, x, deltas.get(str(layer)))
        logp = jax.nn.log_softmax(transformer.head(params, cfg, x)[:, :-1], axis=-1)
        nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(jnp.where(mask[:, 1:] & mask[:, :-1], nll, 0.0))

    return jax.grad(loss)(zeros)


def cast_for_compute(params: Mapping[str, jax.Array], cfg: MoEConfig, expert_dtype: jnp.dtype) -> dict[str, jax.Array]:
    """Routed experts (the table's role 'expert') and shared experts of MoE layers to `expert_dtype`, every
    other floating parameter to fp32."""
    specs = param_specs(cfg)

    def target(name: str) -> jnp.dtype:
        return expert_dtype if specs[name].role == "expert" or ".mlp.shared." in name else jnp.dtype(jnp.float32)

    return {k: v.astype(target(k)) if jnp.issubdtype(v.dtype, jnp.floating) else v for k, v in params.items()}


def calibration_step(
    acc: Accumulators,
    params: Mapping[str, jax.Array],
    tokens: Int[Array, "b t"],
    mask: Bool[Array, "b t"],
    *,
    cfg: MoEConfig,
    token_chunk: int,
    acc_shardings: tuple[jax.sharding.Sharding, ...] | None = None,
    compute_dtype: str | None = None,
    gradients: bool = False,
) -> Accumulators:
    """One batch through the model, updating every MoE layer's accumulators (pure; jit it).

    `acc_shardings` (flattened `accumulator_shardings`) pins the updated accumulators' placement;
    `compute_dtype` (None: the parameters' own dtypes throughout) is the dtype of the experts' weights and
    inputs, every other floating parameter computing in fp32 (module docstring); with `gradients` a
    backward pass first gives each MoE layer's output gradients (`output_gradients`)."""
    chex.assert_rank(tokens, 2)
    chex.assert_type(tokens, int)
    chex.assert_equal_shape([tokens, mask])
    expert_dtype = None
    if compute_dtype is not None:
        expert_dtype = jnp.dtype(compute_dtype)
        params = cast_for_compute(params, cfg, expert_dtype)
    positions = transformer.default_positions(mask)
    acc = dict(acc)
    grads = output_gradients(params, cfg, tokens, mask) if gradients else {}

    def moe_fn(prefix: str, h: jax.Array, m: jax.Array) -> jax.Array:
        key = prefix.split(".")[1]
        out, acc[key] = moe_layer_with_stats(
            params, prefix, cfg, h, m, acc[key], min(token_chunk, h.shape[0]), expert_dtype, grads.get(key)
        )
        return out

    x = transformer.embed(params, tokens)
    for layer in range(cfg.num_layers):
        x = transformer.decoder_layer(params, cfg, layer, x, positions, mask, moe_fn=moe_fn)
    return pin(acc, acc_shardings)


calibration_step_jit = jax.jit(
    calibration_step,
    static_argnames=("cfg", "token_chunk", "acc_shardings", "compute_dtype", "gradients"),
    donate_argnums=(0,),
)


def finalize_stats(
    acc: Accumulators, model: MoEModel, *, meta: Mapping[str, Any], gradients: bool = False
) -> ModelStats:
    """Host statistics of every MoE layer, with weight-space cosine added (needs no data); the gradient
    sensitivities only when they were accumulated (`gradients`).

    On a mesh the accumulators are first replicated (an all-reduce/all-gather of E x E-sized sums), so
    every process, on any number of hosts, finalises the same statistics."""
    cfg, mesh = model.cfg, model.ctx.mesh
    params = param_view(model)
    out = [layer_stats(layer, acc[str(layer)], params, cfg, mesh, gradients=gradients) for layer in cfg.moe_layers]
    stats = ModelStats(layers=tuple(out), meta=dict(meta))
    stats.validate()
    return stats


def layer_stats(
    layer: int,
    layer_acc: similarity.Accumulators,
    params: Mapping[str, jax.Array],
    cfg: MoEConfig,
    mesh: jax.sharding.Mesh | None,
    *,
    gradients: bool,
) -> LayerStats:
    """One MoE layer's host statistics from its accumulators and its expert weights (`params` holds at
    least that layer's `w_gate`, `w_up`, `w_down`): `finalize_stats` per layer."""
    p = f"layers.{layer}.mlp."
    weight = similarity.weight_cosine(params[p + "w_gate"], params[p + "w_up"], params[p + "w_down"])
    if mesh is not None:
        layer_acc, weight = replicate((layer_acc, weight), mesh)
    try:
        s = similarity.finalize(layer_acc)
    except ValueError as e:
        raise StatsError(f"layer {layer}: {e}") from None
    return LayerStats(
        layer=layer,
        num_tokens=int(s["num_tokens"]),
        top_k=cfg.top_k,
        freq=s["freq"],
        gate_mass=s["gate_mass"],
        reap=s["reap"],
        sim={
            "cka": s["cka"],
            "cos_mean": s["cos_mean"],
            "router": s["router"],
            "weight": np.asarray(weight, np.float64),
        },
        routed_m=s["routed_m"],
        routed_n=s["routed_n"],
        **({name: s[name] for name in SENSITIVITIES} if gradients else {}),
        count_multiple=cfg.expert_count_multiple,
        min_count=cfg.min_routable_experts,
    )


def check_blocks(blocks: np.ndarray, cfg: MoEConfig) -> np.ndarray:
    """[n, seq_len] int32 token ids the model can take (one-line errors otherwise)."""
    blocks = np.asarray(blocks)
    if blocks.ndim != 2 or blocks.shape[0] == 0 or not np.issubdtype(blocks.dtype, np.integer):
        raise ValueError(
            f"calibration blocks must be a non-empty [n, seq_len] integer array, got {blocks.shape} {blocks.dtype}"
        )
    if blocks.shape[1] > cfg.max_position_embeddings:
        raise ValueError(
            f"sequence length {blocks.shape[1]} exceeds the model's max_position_embeddings="
            f"{cfg.max_position_embeddings}"
        )
    if blocks.min() < 0 or blocks.max() >= cfg.vocab_size:
        raise ValueError(f"token ids must lie in [0, {cfg.vocab_size}); got [{blocks.min()}, {blocks.max()}]")
    return blocks.astype(np.int32)


def calibrate(
    model: MoEModel,
    blocks: Int[np.ndarray, "n seq"],
    *,
    options: CalibrationOptions = CalibrationOptions(),
    meta: Mapping[str, Any] | None = None,
    resume_dir: str | os.PathLike | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> ModelStats:
    """Statistics of every MoE layer over `blocks` [n, seq_len] of token ids.

    With `resume_dir` the accumulators are saved every `options.checkpoint_seconds` (and/or
    `checkpoint_every` batches) and when interrupted (Ctrl-C raises `CalibrationInterrupted` after
    saving); a later call with the same model, blocks and options continues from the last save and
    ends with the same statistics, bit for bit."""
    cfg, ctx = model.cfg, model.ctx
    blocks = check_blocks(blocks, cfg)
    cka = choose_cka_mode(cfg, options)
    batches = Batches.of(blocks, options.batch_size, data_parallel=ctx.data_parallel_size)
    chunk = min(options.token_chunk, batches.rows * blocks.shape[1])
    placement = accumulator_shardings(model_accumulators(cfg, cka=cka, token_chunk=chunk), ctx)
    acc = jax.device_put(model_accumulators(cfg, cka=cka, token_chunk=chunk), placement)
    params = param_view(model)
    compute_dtype = resolve_compute_dtype(params, options)
    fingerprint = calibration_fingerprint(model.info.fingerprint, cfg, blocks, options)
    step = functools.partial(
        calibration_step_jit,
        cfg=cfg,
        token_chunk=chunk,
        acc_shardings=tuple(jax.tree.leaves(placement)),
        compute_dtype=compute_dtype,
        gradients=options.gradients,
    )

    def one_batch(acc: Accumulators, i: int) -> Accumulators:
        return step(acc, params, ctx.put_batch(batches.tokens[i]), ctx.put_batch(batches.mask[i]))

    saver = Progress(resume_dir, fingerprint=fingerprint) if resume_dir is not None else None
    start = 0
    try:
        if saver is not None:
            restored = saver.restore(acc)
            if restored is not None:
                acc, start, _ = restored
                if log is not None:
                    log(f"resuming calibration after batch {start} of {batches.count} (saved in {saver.directory})")
        saves = None if saver is None else Saves(saver, options.checkpoint_seconds, options.checkpoint_every)
        t0 = time.perf_counter()
        try:
            acc = stream_pass(
                one_batch, acc, batches, ctx=ctx, start=start, saves=saves, desc="calibrate", progress=progress
            )
        except PassInterrupted as e:
            raise CalibrationInterrupted(
                min(e.saved * batches.rows, blocks.shape[0]),
                blocks.shape[0],
                None if saver is None else saver.directory,
            ) from None
        elapsed = time.perf_counter() - t0
    finally:
        if saver is not None:
            saver.close()
    info = run_record(
        blocks, cka=cka, token_chunk=chunk, compute_dtype=compute_dtype, gradients=options.gradients, seconds=elapsed
    )
    model_record = {"fingerprint": model.info.fingerprint, "source": model.info.source}
    return finalize_stats(
        acc,
        model,
        meta={**dict(meta or {}), "model": model_record, "calibration": info, "fingerprint": fingerprint},
        gradients=options.gradients,
    )
