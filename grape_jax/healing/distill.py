"""The pure pieces of healing by distillation: the loss, the learning-rate schedule, the optimizer chain,
which parameters train, the order of the data, and whether a teacher fits a student.

Loss (per batch, token-weighted over predicted positions: position p of a row predicts token p + 1, so
positions 0..T-2 whose next token is real):
    kl_weight * τ² * KL(softmax(z_teacher / τ) || softmax(z_student / τ)) + lm_weight * NLL(next token)
in fp32; τ² keeps the gradient scale of the soft targets independent of the temperature (Hinton et al.).

Optimizer: AdamW with gradient clipping, as one optax chain whose learning rate is an extra argument of
each update (`scale_by_learning_rate_arg`), computed inside the jitted step from the step count and the
run's horizon (`warmup_cosine`, optax's warm-up + cosine schedule). The horizon is therefore an input of
the compiled step, not a constant in it: a run bounded by time fixes it after timing its first warm-up
steps without compiling again. Frozen parts of partly trained leaves (the rows of experts that were kept as
they were) are masked twice: their gradients before clipping (so they neither count in the clipping norm
nor enter Adam's moments) and the final updates after weight decay (so they do not move at all).

Data order: the training rows of step s are positions s*b .. s*b+b-1 of an endless stream made of one
permutation of the rows per epoch, `np.random.default_rng([seed, epoch])`: a pure function of (seed,
step), so a resumed run sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Bool, Float, Int

from grape_jax.core.config import MoEConfig
from grape_jax.core.model import ModelInfo
from grape_jax.core.params import EXPERTS, ParamSpec, param_specs
from grape_jax.healing.options import TRAIN_MODES

ROUTER_LEAVES = ("router", "router_bias")


class HealError(ValueError):
    """A healing request that cannot run (mismatched teacher, bad data, a loss that is not finite)."""


def distill_loss(
    student_logits: Float[Array, "b t v"],
    teacher_logits: Float[Array, "b t v"],
    tokens: Int[Array, "b t"],
    mask: Bool[Array, "b t"],
    *,
    kl_weight: float,
    lm_weight: float,
    temperature: float,
) -> tuple[Float[Array, ""], dict[str, Float[Array, ""]]]:
    """(loss, {"kl", "nll", "tokens"}) of one batch (module docstring); padding positions do not count."""
    s = student_logits[:, :-1].astype(jnp.float32)
    t = jax.lax.stop_gradient(teacher_logits[:, :-1].astype(jnp.float32))
    keep = (mask[:, 1:] & mask[:, :-1]).astype(jnp.float32)
    count = jnp.maximum(keep.sum(), 1.0)
    log_p_s = jax.nn.log_softmax(s / temperature, axis=-1)
    log_p_t = jax.nn.log_softmax(t / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_p_t) * (log_p_t - log_p_s), axis=-1) * temperature**2
    logp = jax.nn.log_softmax(s, axis=-1)
    nll = -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    kl_mean, nll_mean = (kl * keep).sum() / count, (nll * keep).sum() / count
    loss = kl_weight * kl_mean + lm_weight * nll_mean
    return loss, {"kl": kl_mean, "nll": nll_mean, "tokens": keep.sum()}


def warmup_cosine(count: Int[Array, ""], *, peak: float, warmup: int, horizon: Int[Array, ""]) -> Float[Array, ""]:
    """optax.warmup_cosine_decay_schedule(0, peak, warmup, horizon) with a traced horizon: linear from 0
    to `peak` over `warmup` steps, then a cosine down to 0 at step `horizon` (and 0 after it)."""
    count = jnp.asarray(count, jnp.float32)
    horizon = jnp.asarray(horizon, jnp.float32)
    rising = peak * count / max(warmup, 1)
    progress = jnp.clip((count - warmup) / jnp.maximum(horizon - warmup, 1.0), 0.0, 1.0)
    falling = 0.5 * peak * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(count < warmup, rising, falling)


def scale_by_learning_rate_arg() -> optax.GradientTransformationExtraArgs:
    """Updates times -learning_rate, the rate given to each update as the extra argument `learning_rate`."""

    def update(updates, state, params=None, *, learning_rate, **extra):
        del params, extra
        return jax.tree.map(lambda u: (-learning_rate * u).astype(u.dtype), updates), state

    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def keep_rows(masks: Any) -> optax.GradientTransformation:
    """Updates zeroed where `masks` (same tree, boolean arrays broadcasting against each leaf) is False."""

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: jnp.where(m, u, jnp.zeros_like(u)), updates, masks), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def healing_optimizer(masks: Any, *, clip_norm: float, weight_decay: float) -> optax.GradientTransformationExtraArgs:
    """mask -> clip by global norm -> Adam -> decoupled weight decay -> -learning_rate -> mask (module
    docstring); `update(..., learning_rate=lr)`."""
    return optax.chain(
        keep_rows(masks),
        optax.clip_by_global_norm(clip_norm),
        optax.scale_by_adam(),
        optax.add_decayed_weights(weight_decay),
        scale_by_learning_rate_arg(),
        keep_rows(masks),
    )


def batch_rows(step: int, *, num_rows: int, batch_size: int, seed: int) -> np.ndarray:
    """The row indices of training step `step` (module docstring: a pure function of seed and step)."""
    positions = np.arange(step * batch_size, (step + 1) * batch_size)
    out = np.empty(batch_size, np.int64)
    for epoch in np.unique(positions // num_rows):
        order = np.random.default_rng([seed, int(epoch)]).permutation(num_rows)
        here = positions // num_rows == epoch
        out[here] = order[positions[here] % num_rows]
    return out


def merged_rows(info: ModelInfo, cfg: MoEConfig) -> dict[int, np.ndarray]:
    """Per MoE layer, which of the current experts came from merging several original experts (followed
    through every merge in the provenance: a row merged once stays merged when later kept)."""
    merges = [r for r in info.provenance if r.get("stage") == "merge"]
    if not merges:
        raise HealError(
            "train='merged' needs the student's merge record (a model pruned by grape-jax, or its "
            "export); this model has none: use train='routers' or train='all'"
        )
    merged: dict[int, np.ndarray] = {}
    for record in merges:
        for lp in record.get("plan", {}).get("layers", []):
            layer, before = int(lp["layer"]), merged.get(int(lp["layer"]))
            merged[layer] = np.asarray(
                [len(g) > 1 or (before is not None and bool(before[list(g)].any())) for g in lp["groups"]], bool
            )
    for layer in cfg.moe_layers:
        rows = merged.get(layer)
        if rows is None or len(rows) != cfg.num_experts[layer]:
            have = None if rows is None else len(rows)
            raise HealError(
                f"train='merged': the student's merge record gives layer {layer} {have} experts, the "
                f"model has {cfg.num_experts[layer]}"
            )
    return merged


def _is_router(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ROUTER_LEAVES and ".mlp." in name


def trainable_masks(cfg: MoEConfig, info: ModelInfo, train: str) -> dict[str, np.ndarray | None]:
    """Parameter name -> which of its entries train: None for the whole leaf, else a boolean array that
    broadcasts against it (True on the expert rows that train). Parameters not listed stay frozen.

    routers  the `router` / `router_bias` leaves of every MoE layer
    merged   routers + every expert leaf's rows of experts that came from merging several
    all      every parameter"""
    if train not in TRAIN_MODES:
        raise HealError(f"train: {train!r} unknown; expected one of {', '.join(TRAIN_MODES)}")
    specs: dict[str, ParamSpec] = param_specs(cfg)
    if train == "all":
        return dict.fromkeys(specs)
    out: dict[str, np.ndarray | None] = {name: None for name in specs if _is_router(name)}
    if train == "merged":
        rows = merged_rows(info, cfg)
        for name, spec in specs.items():
            layer = name.split(".")[1] if name.startswith("layers.") else None
            if spec.role != "expert" or layer is None or not rows[int(layer)].any():
                continue
            shape = [1] * len(spec.shape)
            shape[spec.axes.index(EXPERTS)] = spec.shape[spec.axes.index(EXPERTS)]
            out[name] = rows[int(layer)].reshape(shape)
    return out


def count_trainable(cfg: MoEConfig, masks: Mapping[str, np.ndarray | None]) -> int:
    """How many parameter entries train."""
    specs = param_specs(cfg)
    total = 0
    for name, m in masks.items():
        size = math.prod(specs[name].shape)
        total += size if m is None else size // m.size * int(m.sum())
    return total


SAME_FIELDS = ("family", "vocab_size", "num_layers", "hidden_size")


def check_teacher(
    student_cfg: MoEConfig, student_info: ModelInfo, teacher_cfg: MoEConfig, teacher_info: ModelInfo
) -> None:
    """The teacher is the model the student was pruned from: the same architecture up to expert counts
    (vocabulary, layers and width named first), at least as many experts in every layer, and, when both
    carry provenance, the teacher's fingerprint is that of some prefix of the student's records before
    its first merge (the student was loaded from it, possibly re-loaded from an export of it)."""
    for name in SAME_FIELDS + tuple(f for f in student_cfg.to_dict() if f not in SAME_FIELDS + ("num_experts",)):
        mine, theirs = getattr(student_cfg, name), getattr(teacher_cfg, name)
        if mine != theirs:
            raise HealError(
                f"teacher and student differ in {name} (teacher {theirs!r}, student {mine!r}); the "
                f"teacher must be the model the student was pruned from"
            )
    fewer = [
        layer
        for layer, (s, t) in enumerate(zip(student_cfg.num_experts, teacher_cfg.num_experts, strict=True))
        if s > t
    ]
    if fewer:
        raise HealError(
            f"the student has more experts than the teacher in layers {fewer}; the teacher must be the "
            f"model the student was pruned from"
        )
    want, records = teacher_info.fingerprint, student_info.provenance
    if not want or not records:
        return
    first_merge = next((n for n, r in enumerate(records) if r.get("stage") == "merge"), len(records))
    prefixes = {ModelInfo.create(provenance=records[:n]).fingerprint for n in range(1, first_merge + 1)}
    if want not in prefixes:
        source = next((r.get("source") for r in records if r.get("stage") == "load"), "?")
        raise HealError(
            f"the student was not pruned from this teacher: the teacher is model {want[:16]} "
            f"({teacher_info.source}), the student comes from model "
            f"{ModelInfo.create(provenance=records[: max(first_merge, 1)]).fingerprint[:16]} ({source})"
        )


def data_digest(blocks: np.ndarray) -> str:
    """sha256 of token blocks (shape and ids): what a healing record keeps of its training text."""
    return _sha256(np.ascontiguousarray(blocks, np.int32).tobytes(), repr(blocks.shape).encode())


def _sha256(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()


def split_validation(num_blocks: int, val_blocks: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, validation rows) of `num_blocks` blocks: `val_blocks` drawn with `seed`, never
    trained on; both sorted."""
    if num_blocks == 0:
        raise HealError("no training blocks: the data set is empty")
    if val_blocks >= num_blocks:
        raise HealError(
            f"val_blocks={val_blocks} leaves no training block of the {num_blocks} given; pass more "
            f"text or fewer validation blocks"
        )
    order = np.random.default_rng([seed, 1 << 30]).permutation(num_blocks)
    return np.sort(order[val_blocks:]), np.sort(order[:val_blocks])
