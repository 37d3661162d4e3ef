"""The fit operator (`grape_jax.fit.operator`) with one layer's weights on the mesh at a time.

Accumulation: one forward sweep of the ORIGINAL model over the calibration blocks (hidden states on the
host, `HiddenStates`) up to the last fitted layer; at each fitted layer its input runs through
`accumulate_down` in token chunks (the same function and fold split as the resident pass) with the
layer's base-merged leaves, and the layer is solved on the host (`solve_layer`) as soon as it is done,
so one layer's accumulators exist at a time (the resident pass holds up to `FitOptions.max_bytes`).

Loss check (`checked_steps_streamed`), exact: layers in order, with the earlier layers' choices
installed, each candidate step α ∈ {0} ∪ steps of a fitted layer l is installed in layer l, the merged
model's hidden states at l's input go through it, then every later merged layer is read once and applied
to all candidates' hidden states, and the head gives each candidate's summed NLL (batches of 8 blocks
and float64 sums, as `calibration_nll`). The candidates' hidden states at the next fitted layer's input
are kept, so the chosen one continues from there. Cost: the resident check runs (|steps| + 1) full
forwards per fitted layer; this runs the same layer computations, and reads each later layer once per
fitted layer: O(L²/2) layer reads in all (memory: (|steps| + 1) x 2 copies of the blocks' hidden states).

On several processes each layer's outputs are gathered whole to every process (`host`), as in the
streamed calibration: every process holds the hidden states, each reads only its own weight slices.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from grape_jax.base.multihost import own_dir
from grape_jax.calibration.calibrate import cast_for_compute, check_blocks
from grape_jax.calibration.options import CalibrationOptions, resolve_compute_dtype
from grape_jax.core import transformer
from grape_jax.core.params import layer_of
from grape_jax.core.sharding import host, pin
from grape_jax.fit.accumulate import ACCUMULATOR_AXES, accumulate_down, init_fit_accumulators
from grape_jax.fit.operator import MERGED_KEYS, FitError, FitOptions, assignment, check_supported, solve_layer
from grape_jax.fit.stream import FOLDS
from grape_jax.passes.engine import Batches, stream_pass
from grape_jax.planners.plan import Plan
from grape_jax.stream.layers import HiddenStates, LayerSource, canonical_layer, head_names, layer_names, renamed, sweep
from grape_jax.stream.merge import MergedLayers
from grape_jax.stream.spill import ArrayFiles, overrides_of_layer

STATIC = ("cfg", "layer", "token_chunk", "accumulate", "compute_dtype", "acc_shardings")


@functools.partial(jax.jit, static_argnames=STATIC, donate_argnums=(0,))
def fit_layer(
    acc: Any,
    aux: Mapping[str, Any],
    params: Mapping[str, jax.Array],
    x: Float[Array, "b t d"],
    mask: Bool[Array, "b t"],
    fold: Int[Array, "b t"],
    *,
    cfg,
    layer: int,
    token_chunk: int,
    accumulate,
    compute_dtype: str,
    acc_shardings: tuple | None = None,
) -> tuple[Any, Float[Array, "b t d"]]:
    """One batch through original layer `layer`, accumulating at its MoE block when `acc` is given (as
    `fit.stream.stream_step` does for that layer)."""
    expert_dtype = jnp.dtype(compute_dtype)
    params = cast_for_compute(params, cfg, expert_dtype)
    folds = fold.reshape(-1)
    out_acc = [acc]

    def moe_fn(prefix: str, h: jax.Array, m: jax.Array) -> jax.Array:
        if acc is None:
            return transformer.moe_block(params, prefix, cfg, h, expert_dtype=expert_dtype)[0]
        t, d = h.shape
        chunk = min(token_chunk, t)
        pad = (-t) % chunk
        hp, mp, fp = jnp.pad(h, ((0, pad), (0, 0))), jnp.pad(m, (0, pad)), jnp.pad(folds, (0, pad))
        n = hp.shape[0] // chunk

        def body(a, xs):
            return accumulate(a, aux, params, prefix, *xs, expert_dtype=expert_dtype)

        out_acc[0], outs = jax.lax.scan(
            body, acc, (hp.reshape(n, chunk, d), mp.reshape(n, chunk), fp.reshape(n, chunk))
        )
        return outs.reshape(n * chunk, d)[:t]

    y = transformer.decoder_layer(params, cfg, layer, x, transformer.default_positions(mask), mask, moe_fn=moe_fn)
    return pin(out_acc[0], acc_shardings), y


@functools.partial(jax.jit, static_argnames=("cfg", "layer"))
def plain_layer(params, x: Float[Array, "b t d"], mask: Bool[Array, "b t"], *, cfg, layer: int) -> jax.Array:
    """One batch through a decoder layer as the model's forward computes it."""
    return transformer.decoder_layer(params, cfg, layer, x, transformer.default_positions(mask), mask)


@functools.partial(jax.jit, static_argnames=("cfg",))
def head_row_nll(params, x: Float[Array, "b t d"], tokens: Int[Array, "b t"], mask: Bool[Array, "b t"], *, cfg):
    """Per row: the summed next-token NLL of its real positions (as `evaluation.scoring`)."""
    logp = jax.nn.log_softmax(transformer.head(params, cfg, x)[:, :-1].astype(jnp.float32), axis=-1)
    target = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    return -jnp.sum(jnp.where(mask[:, 1:], target, 0.0), axis=1)


def fit_overrides_streamed(
    source: LayerSource,
    plan: Plan,
    blocks: Int[np.ndarray, "n seq"],
    *,
    options: FitOptions = FitOptions(),
    work_dir: str,
) -> tuple[ArrayFiles, dict[int, dict]]:
    """`fit.operator.fit_overrides` streamed (module docstring); `work_dir` holds the hidden states and
    the overrides, which are returned as `ArrayFiles` there, read back a layer at a time by the merge (in
    a subdirectory per process on several, `base.multihost.own_dir`)."""
    if plan.operator != "fit":
        raise FitError(f"plan {plan.method!r} has operator {plan.operator!r}; the fit runs for operator 'fit'")
    cfg, ctx = source.cfg, source.ctx
    check_supported(cfg)
    try:
        blocks = check_blocks(blocks, cfg)
    except ValueError as e:
        raise FitError(f"operator 'fit': {e}") from None
    # the dominant members' gate/up, router and W0 (the fit's weights are the dominant operator's)
    base = MergedLayers(source, dataclasses.replace(plan, operator="dominant"))
    new_cfg = base.cfg
    first = layer_names(cfg, cfg.moe_layers[0])
    compute_dtype = resolve_compute_dtype(
        {n: source.abstract(n) for n in first}, CalibrationOptions(compute_dtype=options.compute_dtype)
    )
    assign = assignment(plan)
    plans = {lp.layer: lp for lp in plan.layers}
    identity = {
        lp.layer for lp in plan.layers if lp.num_kept == lp.num_experts_before and max(map(len, lp.groups)) == 1
    }
    fitted = [lp.layer for lp in plan.layers if lp.layer not in identity]
    work_dir = own_dir(work_dir)
    overrides = ArrayFiles(os.path.join(work_dir, "solved"))
    diagnostics: dict[int, dict] = {layer: {} for layer in fitted}
    if not fitted:
        return overrides, diagnostics
    batches = Batches.of(blocks, options.batch_size, data_parallel=ctx.data_parallel_size)
    rows = (np.arange(batches.count * batches.rows) % FOLDS).reshape(batches.count, batches.rows)
    fold = np.broadcast_to(rows[..., None], batches.tokens.shape).astype(np.int32)
    store = HiddenStates(work_dir, (batches.count, batches.rows, blocks.shape[1], cfg.hidden_size))
    accumulate = functools.partial(accumulate_down, cfg=cfg, new_cfg=new_cfg)
    x0 = store.create("x0")
    embed = cast_for_compute(source.read(["embed"]), cfg, jnp.float32)
    for i in range(batches.count):
        x0[i] = host(transformer.embed(embed, ctx.put_batch(batches.tokens[i])), ctx)
    store.commit("x0", x0)
    del embed
    run = _FitRun(base, batches, fold, store, accumulate=accumulate, compute_dtype=compute_dtype, options=options)
    for layer, params in sweep(source, range(max(fitted) + 1)):
        acc, merged = run.layer(layer, params, fitted=layer in diagnostics, assign=assign.get(layer))
        if merged is not None:
            overrides.update(solve_layer(acc, merged, plans[layer], options, diagnostics[layer], ctx))
        del acc, merged
    store.drop(f"x{max(fitted) + 1}")
    if options.steps and overrides:
        overrides = checked_steps_streamed(
            base, overrides, blocks, steps=options.steps, diagnostics=diagnostics, out=os.path.join(work_dir, "checked")
        )
    return overrides, diagnostics


class _FitRun:
    """The accumulation sweep's per-layer step (module docstring)."""

    def __init__(self, base: MergedLayers, batches: Batches, fold, store: HiddenStates, **kw: Any):
        self.base, self.batches, self.fold, self.store = base, batches, fold, store
        self.accumulate, self.compute_dtype, self.options = kw["accumulate"], kw["compute_dtype"], kw["options"]

    def layer(self, layer: int, params: Mapping[str, jax.Array], *, fitted: bool, assign) -> tuple[Any, Any]:
        """x{layer} -> x{layer+1}; a fitted layer's accumulators and base-merged leaves (else None, None)."""
        cfg, new_cfg, ctx = self.base.source.cfg, self.base.cfg, self.base.ctx
        canon = canonical_layer(cfg, layer, new_cfg)
        p = renamed(params, layer, canon)
        acc = shardings = aux = merged = None
        if fitted:
            merged = self.base.merge(layer, params)
            prefix = f"layers.{layer}.mlp."
            leaves = {prefix + k: merged[prefix + k] for k in MERGED_KEYS if prefix + k in merged}
            aux = {"merged": renamed(leaves, layer, canon), "assign": jnp.asarray(assign)}
            zero = init_fit_accumulators(new_cfg, layer, with_bias=prefix + "b_down" in merged)
            placement = dataclasses.replace(
                zero, **{n: ctx.sharding(getattr(zero, n).shape, axes) for n, axes in ACCUMULATOR_AXES.items()}
            )
            acc, shardings = jax.device_put(zero, placement), tuple(jax.tree.leaves(placement))
        x_in, x_out = self.store.open(f"x{layer}"), self.store.create(f"x{layer + 1}")
        kw = dict(cfg=cfg, layer=canon, token_chunk=self.options.token_chunk, accumulate=self.accumulate)
        kw.update(compute_dtype=self.compute_dtype, acc_shardings=shardings)
        put, batches = ctx.put_batch, self.batches

        def step(acc: Any, i: int) -> Any:
            x, mask, fold = put(np.ascontiguousarray(x_in[i])), put(batches.mask[i]), put(self.fold[i])
            acc, y = fit_layer(acc, aux, p, x, mask, fold, **kw)
            x_out[i] = host(y, ctx)
            return acc

        acc = stream_pass(step, acc, batches, ctx=ctx)
        self.store.commit(f"x{layer + 1}", x_out)
        self.store.drop(f"x{layer}")
        return acc, merged


def checked_steps_streamed(
    base: MergedLayers,
    overrides: Mapping[str, np.ndarray],
    blocks: Int[np.ndarray, "n seq"],
    *,
    steps: Sequence[float],
    batch_size: int = 8,
    diagnostics: dict | None = None,
    out: str,
) -> ArrayFiles:
    """`fit.check.checked_steps` streamed: the overrides with each layer's step α chosen by calibration
    loss, layers whose best α is 0 left out (module docstring), written to `ArrayFiles(out)`."""
    cfg, ctx = base.cfg, base.ctx
    fitted = sorted({layer_of(name) for name in overrides})
    batches = Batches.of(np.asarray(blocks, np.int32), min(batch_size, len(blocks)))
    put = ctx.put_batch
    embed = base.read(["embed"])
    hidden = np.stack([host(transformer.embed(embed, put(batches.tokens[i])), ctx) for i in range(batches.count)])
    del embed
    head = base.read(head_names(cfg))
    chosen = ArrayFiles(out)
    pos = 0

    def apply(layer: int, params: Mapping[str, jax.Array], states: list[np.ndarray]) -> list[np.ndarray]:
        canon = canonical_layer(cfg, layer)
        p = renamed(params, layer, canon)
        out = [np.empty_like(h) for h in states]

        def step(carry: None, i: int) -> None:
            mask = put(batches.mask[i])
            for h, o in zip(states, out, strict=True):
                o[i] = host(plain_layer(p, put(h[i]), mask, cfg=cfg, layer=canon), ctx)

        stream_pass(step, None, batches, ctx=ctx)
        return out

    for n, layer in enumerate(fitted):
        current = base.with_overrides(chosen)
        for at, params in sweep(current, range(pos, layer)):
            (hidden,) = apply(at, params, [hidden])
        nxt = fitted[n + 1] if n + 1 < len(fitted) else None
        states, kept, alphas = None, None, (0.0, *steps)
        for at, params in sweep(current, range(layer, cfg.num_layers)):
            if at == layer:
                solved = overrides_of_layer(overrides, layer)
                w0 = {name: host(params[name], ctx).astype(np.float64) for name in solved}
                candidates = []
                for alpha in alphas:
                    values = {k: w0[k] + alpha * (solved[k].astype(np.float64) - w0[k]) for k in w0}
                    installed = {
                        k: jax.device_put(v.astype(params[k].dtype), params[k].sharding) for k, v in values.items()
                    }
                    candidates.append((values, {**params, **installed}))
                states = [apply(at, cand, [hidden])[0] for _, cand in candidates]
            else:
                states = apply(at, params, states)
            if nxt is not None and at + 1 == nxt:
                kept = states
        nll = [0.0] * len(alphas)
        for i in range(batches.count):
            tokens, mask, real = put(batches.tokens[i]), put(batches.mask[i]), batches.real_rows(i)
            for c, h in enumerate(states):
                rows = host(head_row_nll(head, put(h[i]), tokens, mask, cfg=cfg), ctx)
                nll[c] = nll[c] + float(rows[:real].astype(np.float64).sum())
        best, best_loss = 0, nll[0]
        for c in range(1, len(alphas)):
            if nll[c] < best_loss:
                best, best_loss = c, nll[c]
        if best:
            chosen.update({k: v.astype(overrides[k].dtype) for k, v in candidates[best][0].items()})
        if diagnostics is not None:
            diagnostics.setdefault(layer, {}).update(
                step=alphas[best], calibration_nll_before=nll[0], calibration_nll_after=best_loss
            )
        if kept is not None:
            hidden, pos = kept[best], nxt
        del candidates, states, kept, solved
    return chosen
