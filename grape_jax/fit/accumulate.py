"""Per-token accumulation of the fit operator's sufficient statistics (`grape_jax.fit.operator` explains the maths).

For one merged MoE layer and a chunk of its ORIGINAL inputs x: the original routed output split into slot
targets T_k (`slot_targets`), the merged router's gates ĝ_k, the kept members' features h_k, and the
fold-wise sums G = Σ ĝ² h̃ h̃ᵀ, C = Σ ĝ h̃ Tᵀ, Σ ‖T‖², counts (`accumulate_down`, run inside the streamed pass
of `grape_jax.fit.stream`). h̃ is h with a constant 1 appended when the experts have a down bias.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from grape_jax.calibration.calibrate import cast_for_compute
from grape_jax.core import transformer
from grape_jax.core.config import MoEConfig
from grape_jax.fit.stream import FOLDS, fold_one_hot

HIGHEST = jax.lax.Precision.HIGHEST


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class FitAccumulators:
    """Sufficient statistics of one merged layer (sums over calibration tokens), per cross-validation fold."""

    gram: Float[Array, "folds experts feat feat"]  # G_k = Σ ĝ_k² h̃ h̃ᵀ
    cross: Float[Array, "folds experts feat embed"]  # C_k = Σ ĝ_k h̃ T_kᵀ
    target_sq: Float[Array, "folds experts"]  # Σ ‖T_k‖²
    count: Int[Array, "folds experts"]  # tokens on which k is selected


ACCUMULATOR_AXES = {  # logical axes of each field: placed over the experts like the merged layer's leaves
    "gram": (None, "experts", None, None),
    "cross": (None, "experts", None, "embed"),
    "target_sq": (None, "experts"),
    "count": (None, "experts"),
}


def slot_targets(
    orig_idx: Int[Array, "t k"],
    orig_w: Float[Array, "t k"],
    y_sel: Float[Array, "t k d"],
    new_idx: Int[Array, "t k"],
    new_w: Float[Array, "t k"],
    assign: Int[Array, " experts"],
    num_new: int,
) -> tuple[Float[Array, "t new d"], Float[Array, "t new"]]:
    """Per token: each selected output's target T_k (module docstring) scattered densely over the `num_new`
    output experts, and the merged gates ĝ densely. `y_sel[t, j]` is the output of original expert
    orig_idx[t, j]; `assign[i]` is i's output expert (-1: dropped)."""
    group = jnp.where(orig_idx >= 0, assign[orig_idx], -1)  # [t, k] output expert of each original slot
    match = (group[:, None, :] == new_idx[:, :, None]) & (group[:, None, :] >= 0)  # [t, s (new), j (orig)]
    orphan = ~jnp.any(match, axis=1)  # [t, j]
    free = ~jnp.any(match, axis=2)  # [t, s]
    # decreasing weight within each row: top_k sorts, but ties and biased routers may not, so rank explicitly
    orphan_rank = _rank_among(orphan, orig_w)
    free_rank = _rank_among(free, new_w)
    extra = orphan[:, None, :] & free[:, :, None] & (orphan_rank[:, None, :] == free_rank[:, :, None])
    take = (match | extra).astype(y_sel.dtype)  # [t, s, j]
    slot_target = jnp.einsum("tsj,tj,tjd->tsd", take, orig_w.astype(y_sel.dtype), y_sel, precision=HIGHEST)
    onehot = jax.nn.one_hot(new_idx, num_new, dtype=y_sel.dtype)  # [t, s, e]
    target = jnp.einsum("tse,tsd->ted", onehot, slot_target, precision=HIGHEST)
    gates = jnp.einsum("tse,ts->te", onehot, new_w.astype(y_sel.dtype), precision=HIGHEST)
    return target, gates


def _rank_among(flag: Bool[Array, "t k"], weight: Float[Array, "t k"]) -> Int[Array, "t k"]:
    """Rank of each flagged slot among the flagged slots of its row, by decreasing weight (ties -> earlier
    slot); unflagged slots get rank k (never matched)."""
    k = flag.shape[1]
    pos = jnp.arange(k)
    before = (weight[:, None, :] > weight[:, :, None]) | (
        (weight[:, None, :] == weight[:, :, None]) & (pos[None, None, :] < pos[None, :, None])
    )  # [t, a, b]: slot b comes before slot a
    rank = jnp.sum(before & flag[:, None, :], axis=2)
    return jnp.where(flag, rank, k)


def accumulate_down(
    acc: FitAccumulators,
    aux: Mapping[str, jax.Array],
    params: Mapping[str, jax.Array],
    p: str,
    x: Float[Array, "t d"],
    mask: Bool[Array, " t"],
    fold: Int[Array, " t"],
    *,
    cfg: MoEConfig,
    new_cfg: MoEConfig,
    expert_dtype: jnp.dtype,
) -> tuple[FitAccumulators, Float[Array, "t d"]]:
    """Add one chunk of layer inputs (`aux`: the merged layer's leaves and `assign`, original -> output
    expert); returns the accumulators and the ORIGINAL block output (the pass goes on through it)."""
    merged = cast_for_compute(aux["merged"], new_cfg, expert_dtype)
    out, routing, y_all = transformer.moe_block(params, p, cfg, x, expert_dtype=expert_dtype)
    new = transformer.router(merged, p, new_cfg, x)
    y_all = y_all.astype(jnp.float32)
    y_sel = jnp.take_along_axis(jnp.moveaxis(y_all, 0, 1), routing.indices[:, :, None], axis=1)  # [t, k, d]
    num_new = new_cfg.num_experts[int(p.split(".")[1])]
    target, gates = slot_targets(
        routing.indices, routing.weights, y_sel, new.indices, new.weights, aux["assign"], num_new
    )
    valid = mask.astype(jnp.float32)
    gates = gates * valid[:, None]
    target = target * valid[:, None, None]
    h = transformer.expert_hidden(merged, p, new_cfg, x.astype(expert_dtype)).astype(jnp.float32)
    if p + "b_down" in merged:  # the bias is fitted with W_down: a constant feature 1
        h = jnp.concatenate([h, jnp.ones(h.shape[:2] + (1,), h.dtype)], axis=-1)
    weighted = h * jnp.moveaxis(gates, 0, 1)[:, :, None]  # [e, t, feat]: ĝ_k h̃
    in_fold = fold_one_hot(fold)  # [t, folds]
    split = weighted[None] * jnp.moveaxis(in_fold, 0, 1)[:, None, :, None]  # [folds, e, t, feat]
    return FitAccumulators(
        gram=acc.gram + jnp.einsum("cetf,etg->cefg", split, weighted, precision=HIGHEST),
        cross=acc.cross + jnp.einsum("cetf,ted->cefd", split, target, precision=HIGHEST),
        target_sq=acc.target_sq + jnp.einsum("tc,te->ce", in_fold, jnp.sum(jnp.square(target), axis=2)),
        count=acc.count + jnp.einsum("tc,te->ce", in_fold.astype(jnp.int32), (gates > 0).astype(jnp.int32)),
    ), out


def _feature_count(new_cfg: MoEConfig, with_bias: bool) -> int:
    return new_cfg.moe_intermediate_size + int(with_bias)


def init_fit_accumulators(new_cfg: MoEConfig, layer: int, *, with_bias: bool) -> FitAccumulators:
    e, feat, d = new_cfg.num_experts[layer], _feature_count(new_cfg, with_bias), new_cfg.hidden_size
    return FitAccumulators(
        gram=jnp.zeros((FOLDS, e, feat, feat), jnp.float32),
        cross=jnp.zeros((FOLDS, e, feat, d), jnp.float32),
        target_sq=jnp.zeros((FOLDS, e), jnp.float32),
        count=jnp.zeros((FOLDS, e), jnp.int32),
    )


def accumulator_bytes(new_cfg: MoEConfig, layer: int) -> int:
    """Bytes of one layer's accumulators (with room for a bias feature)."""
    e, feat, d = new_cfg.num_experts[layer], _feature_count(new_cfg, True), new_cfg.hidden_size
    return 4 * FOLDS * e * feat * (feat + d)
