"""Streamed passes over calibration blocks that accumulate statistics from MoE layer inputs (for the fit
operator, `grape_jax.fit.operator`).

The ORIGINAL model runs block by block up to the last layer that is accumulated; at each such layer the
layer input is scanned in token chunks through
`accumulate(acc, aux, params, prefix, x, mask, fold) -> (acc, out)`, which must return the original
block output so the pass continues through the original model. One jitted step per batch (accumulators
donated and pinned to their placement on the model's run context, batches over the data axes as in
calibration); memory is bounded by the batch and the chunk, never by the number of calibration tokens.
Block n belongs to cross-validation fold n mod FOLDS (`fold`, per token), so accumulators can keep
per-fold sums.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from grape_jax.calibration.calibrate import cast_for_compute
from grape_jax.core import transformer
from grape_jax.core.config import MoEConfig
from grape_jax.core.sharding import RunContext, pin
from grape_jax.passes.engine import Batches, stream_pass

FOLDS = 2
Accumulate = Callable[..., tuple[Any, jax.Array]]


def stream_step(
    acc: dict[str, Any],
    aux: dict[str, Any],
    params: Mapping[str, jax.Array],
    tokens: Int[Array, "b t"],
    mask: Bool[Array, "b t"],
    fold: Int[Array, "b t"],
    *,
    cfg: MoEConfig,
    token_chunk: int,
    accumulate: Accumulate,
    compute_dtype: str,
    acc_shardings: tuple[jax.sharding.Sharding, ...] | None = None,
) -> dict[str, Any]:
    """One batch through the original model, `accumulate` at every layer keyed (str(layer)) in `acc`
    (experts in `compute_dtype`, the rest in fp32, as calibration computes)."""
    expert_dtype = jnp.dtype(compute_dtype)
    params = cast_for_compute(params, cfg, expert_dtype)
    acc = dict(acc)
    last = max(int(k) for k in acc)
    positions = transformer.default_positions(mask)
    folds = fold.reshape(-1)

    def moe_fn(prefix: str, h: jax.Array, m: jax.Array) -> jax.Array:
        key = prefix.split(".")[1]
        if key not in acc:
            return transformer.moe_block(params, prefix, cfg, h, expert_dtype=expert_dtype)[0]
        t, d = h.shape
        chunk = min(token_chunk, t)
        pad = (-t) % chunk
        hp, mp, fp = jnp.pad(h, ((0, pad), (0, 0))), jnp.pad(m, (0, pad)), jnp.pad(folds, (0, pad))
        n = hp.shape[0] // chunk

        def body(a, xs):
            return accumulate(a, aux[key], params, prefix, *xs, expert_dtype=expert_dtype)

        acc[key], outs = jax.lax.scan(
            body, acc[key], (hp.reshape(n, chunk, d), mp.reshape(n, chunk), fp.reshape(n, chunk))
        )
        return outs.reshape(n * chunk, d)[:t]

    x = transformer.embed(params, tokens)
    for layer in range(last + 1):
        x = transformer.decoder_layer(params, cfg, layer, x, positions, mask, moe_fn=moe_fn)
    return pin(acc, acc_shardings)


stream_step_jit = jax.jit(
    stream_step,
    static_argnames=("cfg", "token_chunk", "accumulate", "compute_dtype", "acc_shardings"),
    donate_argnums=(0,),
)


def run_pass(
    params: Mapping[str, jax.Array],
    cfg: MoEConfig,
    ctx: RunContext,
    blocks: np.ndarray,
    acc: dict[str, Any],
    aux: dict[str, Any],
    *,
    accumulate: Accumulate,
    batch_size: int,
    token_chunk: int,
    compute_dtype: str,
    acc_shardings: dict[str, Any] | None = None,
    progress: bool = False,
    desc: str = "fit",
) -> dict[str, Any]:
    """Stream every block through `stream_step` (batches padded with masked rows and rounded up to the
    data-parallel size; block n in fold n mod FOLDS); returns the accumulators (placed by
    `acc_shardings`, the same tree as `acc`, when given)."""
    batches = Batches.of(np.asarray(blocks, np.int32), batch_size, data_parallel=ctx.data_parallel_size)
    rows = (np.arange(batches.count * batches.rows) % FOLDS).reshape(batches.count, batches.rows)
    fold = np.broadcast_to(rows[..., None], batches.tokens.shape).astype(np.int32)
    flat = None
    if acc_shardings is not None:
        acc = jax.device_put(acc, acc_shardings)
        flat = tuple(jax.tree.leaves(acc_shardings))
    step = functools.partial(
        stream_step_jit,
        cfg=cfg,
        token_chunk=token_chunk,
        accumulate=accumulate,
        compute_dtype=compute_dtype,
        acc_shardings=flat,
    )

    def one_batch(acc: dict[str, Any], i: int) -> dict[str, Any]:
        put = ctx.put_batch
        return step(acc, aux, params, put(batches.tokens[i]), put(batches.mask[i]), put(fold[i]))

    return stream_pass(one_batch, acc, batches, ctx=ctx, desc=desc, progress=progress)


def fold_one_hot(fold: Int[Array, " t"]) -> Float[Array, "t folds"]:
    return jax.nn.one_hot(fold, FOLDS, dtype=jnp.float32)
