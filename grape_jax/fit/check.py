"""A held-in loss check of the fit operator's down projections, one merged layer at a time.

The least-squares fit minimises the error of each layer's routed output, and a smaller output error is
not always a smaller loss: on gcide-moe-22m, GRAPE's allocation at 4 removed per layer takes layer 4 from 8
experts to 3, the fit cuts that layer's held-out output error from 97% to 26% of its energy, and yet the
held-out perplexity rises from 13.7 to 19.1 (the fitted experts regress towards averages of the merged
members; the kept member's own output, although further away, is what the later layers were trained
on). So each fitted layer is a step W0 + α (W_fit - W0) from the base merge, and α is chosen from
{0} ∪ `steps` by the merged model's next-token loss on the calibration blocks: layers in order, each
with the earlier layers' choices installed, one forward pass of the merged model per candidate (no
all-expert outputs, no backward). α = 0 keeps the base merge, so on the calibration blocks the fit
operator is never worse than `dominant`. Candidates are cast to the merged leaves' dtype before they are
scored, so the loss is that of the model that will be installed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax
import numpy as np

from grape_jax.core.config import MoEConfig
from grape_jax.core.model import forward_jit
from grape_jax.core.sharding import RunContext, host
from grape_jax.evaluation.scoring import perplexity


def calibration_nll(
    params: Mapping[str, jax.Array], cfg: MoEConfig, ctx: RunContext, blocks: np.ndarray, *, batch_size: int = 8
) -> float:
    """Summed next-token NLL of `blocks` under the parameters (batches placed on the run context)."""

    def logits(tokens: np.ndarray, mask: np.ndarray) -> jax.Array:
        with ctx.scope():
            return forward_jit(params, cfg=cfg, tokens=ctx.put_batch(tokens), mask=ctx.put_batch(mask))

    return perplexity(logits, blocks, batch_size=batch_size).nll_sum


def checked_steps(
    merged: Mapping[str, jax.Array],
    new_cfg: MoEConfig,
    ctx: RunContext,
    overrides: Mapping[str, np.ndarray],
    blocks: np.ndarray,
    *,
    steps: Sequence[float],
    batch_size: int = 8,
    diagnostics: dict | None = None,
) -> dict[str, np.ndarray]:
    """The overrides with each layer's step α chosen by calibration loss (module docstring); layers whose
    best α is 0 are left out (they keep the base merge)."""
    by_layer: dict[int, dict[str, np.ndarray]] = {}
    for name, value in overrides.items():
        by_layer.setdefault(int(name.split(".")[1]), {})[name] = value

    def install(params: Mapping[str, jax.Array], values: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
        out = dict(params)
        for name, value in values.items():
            out[name] = jax.device_put(np.asarray(value).astype(params[name].dtype), params[name].sharding)
        return out

    current = dict(merged)
    best_loss = calibration_nll(current, new_cfg, ctx, blocks, batch_size=batch_size)
    out: dict[str, np.ndarray] = {}
    for layer in sorted(by_layer):
        start = {name: host(merged[name], ctx).astype(np.float64) for name in by_layer[layer]}
        best_alpha, best_step, best_params, base = 0.0, None, None, best_loss
        for alpha in steps:
            step = {name: w0 + alpha * (by_layer[layer][name].astype(np.float64) - w0) for name, w0 in start.items()}
            candidate = install(current, step)
            value = calibration_nll(candidate, new_cfg, ctx, blocks, batch_size=batch_size)
            if value < best_loss:
                best_alpha, best_step, best_loss, best_params = alpha, step, value, candidate
        if best_step is not None:
            current = best_params
            out.update({name: v.astype(overrides[name].dtype) for name, v in best_step.items()})
        if diagnostics is not None:
            diagnostics.setdefault(layer, {}).update(
                step=best_alpha, calibration_nll_before=base, calibration_nll_after=best_loss
            )
    return out
