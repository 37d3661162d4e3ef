"""The families' routing functions, used by the forward pass and by calibration statistics alike.

Statistics must see the model's real routing (sigmoid + bias, group limits, renormalisation exactly as
the family defines them), so there is exactly one implementation of each router here.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from grape_jax.core.config import MoEConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Routing:
    """Router outputs for T tokens over E experts.

    logits   raw router logits (before any bias)
    weights  combine weights of the k chosen experts
    indices  ids of the k chosen experts
    gates    the same weights scattered densely ([T, E], 0 where not chosen)
    selected top-k membership as a boolean [T, E]
    """

    logits: Float[Array, "tokens experts"]
    weights: Float[Array, "tokens k"]
    indices: Int[Array, "tokens k"]
    gates: Float[Array, "tokens experts"]
    selected: Bool[Array, "tokens experts"]


def _densify(weights: jax.Array, indices: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
    one_hot = jax.nn.one_hot(indices, num_experts, dtype=weights.dtype)  # [T, k, E]
    gates = jnp.einsum("tk,tke->te", weights, one_hot)
    return gates, one_hot.sum(axis=1) > 0


def _sparsemixer_pick(scores: jax.Array, candidates: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """One sparsemixer step (eval mode): the best candidate, weighted by a softmax over the candidates
    whose logit is within `2 eps` of the best, relative to max(|logit|, best)."""
    index = jnp.argmax(candidates, axis=-1)
    best = jnp.max(candidates, axis=-1, keepdims=True)
    factor = jnp.maximum(jnp.abs(scores), best)
    far = ((best - scores) / factor) > 2 * eps
    gates = jax.nn.softmax(jnp.where(far, -jnp.inf, candidates), axis=-1)
    return jnp.take_along_axis(gates, index[:, None], axis=-1)[:, 0], index


def _sparsemixer(logits: jax.Array, eps: float) -> tuple[jax.Array, jax.Array]:
    """Phi-3.5-MoE's routing at inference: the top-1 expert, then the top-1 of the others (2 experts)."""
    w1, i1 = _sparsemixer_pick(logits, logits, eps)
    others = jnp.where(jax.nn.one_hot(i1, logits.shape[-1], dtype=bool), -jnp.inf, logits)
    w2, i2 = _sparsemixer_pick(logits, others, eps)
    return jnp.stack([w1, w2], axis=-1), jnp.stack([i1, i2], axis=-1).astype(jnp.int32)


def route(
    logits: Float[Array, "tokens experts"],
    cfg: MoEConfig,
    *,
    bias: Float[Array, " experts"] | None = None,
) -> Routing:
    """Apply the family's router to fp32 logits; `bias` is the router bias / score-correction bias."""
    logits = logits.astype(jnp.float32)
    k = cfg.top_k
    num_experts = logits.shape[-1]
    if cfg.router == "softmax_topk":
        probs = jax.nn.softmax(logits, axis=-1)
        weights, indices = jax.lax.top_k(probs, k)
        if cfg.norm_topk_prob:
            weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    elif cfg.router == "topk_softmax":
        biased = logits if bias is None else logits + bias
        top, indices = jax.lax.top_k(biased, k)
        weights = jax.nn.softmax(top, axis=-1)
    elif cfg.router == "sigmoid_group_topk":
        scores = jax.nn.sigmoid(logits)
        choice = scores if bias is None else scores + bias
        if cfg.n_group > 1:
            t = choice.shape[0]
            grouped = choice.reshape(t, cfg.n_group, num_experts // cfg.n_group)
            group_scores = jnp.sum(jax.lax.top_k(grouped, 2)[0], axis=-1)  # [T, G]
            _, top_groups = jax.lax.top_k(group_scores, cfg.topk_group)
            group_mask = jax.nn.one_hot(top_groups, cfg.n_group).sum(axis=1) > 0  # [T, G]
            expert_mask = jnp.repeat(group_mask, num_experts // cfg.n_group, axis=1)
            choice = jnp.where(expert_mask, choice, -jnp.inf)  # as HF: masked_fill(-inf)
        _, indices = jax.lax.top_k(choice, k)
        weights = jnp.take_along_axis(scores, indices, axis=-1)
        if cfg.norm_topk_prob:
            weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
        weights = weights * cfg.routed_scaling_factor
    elif cfg.router == "softmax_group_topk":
        scores = jax.nn.softmax(logits, axis=-1)
        choice = scores
        if cfg.n_group > 1:
            t = scores.shape[0]
            grouped = scores.reshape(t, cfg.n_group, num_experts // cfg.n_group)
            group_scores = jnp.max(grouped, axis=-1)  # [T, G]
            _, top_groups = jax.lax.top_k(group_scores, cfg.topk_group)
            group_mask = jax.nn.one_hot(top_groups, cfg.n_group).sum(axis=1) > 0  # [T, G]
            expert_mask = jnp.repeat(group_mask, num_experts // cfg.n_group, axis=1)
            choice = jnp.where(expert_mask, scores, 0.0)  # as HF: masked_fill(0.0)
        weights, indices = jax.lax.top_k(choice, k)
        if cfg.norm_topk_prob:
            weights = weights / (jnp.sum(weights, axis=-1, keepdims=True) + 1e-20)
        weights = weights * cfg.routed_scaling_factor
    elif cfg.router == "softmax_bias_topk":
        probs = jax.nn.softmax(logits, axis=-1)
        choice = probs if bias is None else probs + bias
        _, indices = jax.lax.top_k(choice, k)
        weights = jnp.take_along_axis(probs, indices, axis=-1)
        if cfg.norm_topk_prob:
            weights = weights / jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), cfg.router_norm_min)
    elif cfg.router == "sparsemixer":
        weights, indices = _sparsemixer(logits, cfg.router_jitter_eps)
    elif cfg.router == "topk_sigmoid":
        top, indices = jax.lax.top_k(logits, k)
        weights = jax.nn.sigmoid(top)
    else:  # pragma: no cover - MoEConfig validates router names
        raise ValueError(f"router {cfg.router!r} unknown")
    gates, selected = _densify(weights, indices, num_experts)
    return Routing(logits=logits, weights=weights, indices=indices, gates=gates, selected=selected)
