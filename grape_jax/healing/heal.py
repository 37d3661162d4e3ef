"""Healing: a short distillation fine-tune of a pruned model against the model it was pruned from.

`heal(student, teacher, blocks)` trains a copy of the student (the student itself is never changed) to
match the teacher's next-token distributions on token blocks, with the loss, optimizer, data order and
choice of trained parameters of `grape_jax.healing.distill`. One jitted step takes the trained state (trained
parameters in fp32 and the `nnx.Optimizer` state, donated), the frozen parameters (shared with the
student, never copied) and either the teacher's parameters (its forward runs in the same step, on the
same mesh) or the teacher's cached logits of the batch (`TeacherLogits`, computed once before training:
then the teacher need not stay in device memory). Parameters and optimizer moments keep their logical
axes (experts on `expert`, the embed dimension on `fsdp`); token batches are split over the data axes.

A small validation split of the training blocks (never the held-out evaluation text) is scored every
`val_every` steps; the returned model is the one at the lowest validation loss (the last when there is
no validation split). With `resume_dir`, the trained state, the step and the curves are saved through
Orbax (`resume.Progress`, `DIR/last`), the best parameters in `DIR/best`; a killed or interrupted run
resumes to the result an uninterrupted one gives, bit for bit (the data order is a function of seed and
step, and nothing else is random). A step whose loss or gradient is not finite leaves the state as it
was; the run stops there with a `HealError` saying what was kept.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Int

from grape_jax.core.model import MoEModel, abstract_model
from grape_jax.evaluation.scoring import perplexity
from grape_jax.healing.distill import (
    HealError,
    check_teacher,
    count_trainable,
    data_digest,
    distill_loss,
    healing_optimizer,
    split_validation,
    trainable_masks,
    warmup_cosine,
)
from grape_jax.healing.loop import HealInterrupted, TrainLoop
from grape_jax.healing.options import TEACHER_LOGITS, TRAIN_MODES, HealOptions
from grape_jax.healing.step import TrainStep
from grape_jax.passes.engine import Batches, stream_pass

__all__ = [
    "TEACHER_LOGITS",
    "TRAIN_MODES",
    "HealError",
    "HealInterrupted",
    "HealOptions",
    "HealResult",
    "TeacherLogits",
    "cache_teacher_logits",
    "model_logits",
    "heal",
    "job_fingerprint",
]


@dataclasses.dataclass(frozen=True)
class TeacherLogits:
    """The teacher's logits of every training block, computed once (`cache_teacher_logits`), with what the
    checks need of the teacher (its config and provenance)."""

    logits: np.ndarray  # [n, seq, vocab] float32
    blocks_digest: str
    teacher: MoEModel  # abstract: shapes, config and info only

    @property
    def nbytes(self) -> int:
        return int(self.logits.nbytes)


def model_logits(model: MoEModel, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """The one place healing runs a model (student and teacher): the routed MoE dispatch where it is
    faster ('auto': every backend's choice; its gradients equal the dense path's)."""
    return model(tokens, mask, dispatch="auto")


def cache_teacher_logits(
    teacher: MoEModel, blocks: Int[np.ndarray, "n seq"], *, batch_size: int = 8, progress: bool = False
) -> TeacherLogits:
    """The teacher's fp32 logits of every block, on the host (n x seq x vocab x 4 bytes)."""
    blocks = _check_blocks(blocks, teacher.cfg)
    run = jax.jit(lambda state, tokens, mask: model_logits(nnx.merge(graphdef, state), tokens, mask))
    graphdef, state = nnx.split(teacher)
    ctx = teacher.ctx
    batches = Batches.of(blocks, batch_size, data_parallel=ctx.data_parallel_size)

    def one_batch(out: np.ndarray, i: int) -> np.ndarray:
        logits = run(state, ctx.put_batch(batches.tokens[i]), ctx.put_batch(batches.mask[i]))
        start = i * batches.rows
        out[start : start + batches.real_rows(i)] = np.asarray(logits, np.float32)[: batches.real_rows(i)]
        return out

    empty = np.empty((*blocks.shape, teacher.cfg.vocab_size), np.float32)
    out = stream_pass(one_batch, empty, batches, ctx=ctx, desc="teacher logits", progress=progress)
    shapes = abstract_model(teacher.cfg, ctx=teacher.ctx, info=teacher.info)
    return TeacherLogits(out, data_digest(blocks), shapes)


@dataclasses.dataclass(frozen=True)
class HealResult:
    """The healed model and how the healing went.

    model           a new module: the student's config with the parameters of the best validated step
    steps, horizon  optimizer steps taken, and the schedule's horizon (steps < horizon: stopped by time)
    losses, kl, nll per step, training batch values (loss = kl_weight * kl + lm_weight * nll), and the
                    gradient's global norm (before clipping) in grad_norms
    val_losses      (step, validation loss) pairs from step 0 (the unhealed model); best_step the step the
                    model comes from (0: no step validated better than the unhealed model)
    ppl_*           held-out perplexity of the student, the healed model and the teacher (None without
                    held-out blocks; the teacher's also None when only its cached logits were given)
    record          the provenance record appended to the healed model's info
    """

    model: MoEModel
    steps: int
    horizon: int
    best_step: int
    losses: list[float]
    kl: list[float]
    nll: list[float]
    grad_norms: list[float]
    val_losses: list[tuple[int, float]]
    seconds: float
    tokens_per_second: float
    trained_params: int
    ppl_before: float | None
    ppl_after: float | None
    ppl_teacher: float | None
    record: dict[str, Any]


def _check_blocks(blocks: np.ndarray, cfg) -> np.ndarray:
    blocks = np.asarray(blocks)
    if blocks.ndim != 2 or not np.issubdtype(blocks.dtype, np.integer):
        raise HealError(f"training blocks must be an [n, seq_len] integer array, got {blocks.shape} {blocks.dtype}")
    if blocks.shape[0] == 0:
        raise HealError("no training blocks: the data set is empty")
    if blocks.shape[1] < 2 or blocks.shape[1] > cfg.max_position_embeddings:
        raise HealError(f"training blocks of {blocks.shape[1]} tokens: expected 2 to {cfg.max_position_embeddings}")
    if blocks.min() < 0 or blocks.max() >= cfg.vocab_size:
        raise HealError(f"token ids must lie in [0, {cfg.vocab_size}); got [{blocks.min()}, {blocks.max()}]")
    return blocks.astype(np.int32)


def job_fingerprint(student: MoEModel, teacher: MoEModel, blocks: np.ndarray, options: HealOptions) -> str:
    """The identity of a healing run: both models, the token blocks and every option that changes the
    result (not the checkpoint cadence). Saved progress must match it to be resumed."""
    result = {k: v for k, v in options.to_dict().items() if not k.startswith("checkpoint_")}
    identity = [
        student.info.fingerprint or _value_digest(student),
        teacher.info.fingerprint,
        data_digest(blocks),
        student.cfg.to_dict(),
        result,
    ]
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _value_digest(model: MoEModel) -> str:
    """Identity of a model built in Python (no provenance): every leaf's name, shape and value sums."""
    state = nnx.state(model, nnx.Param)
    sums = [
        (".".join(map(str, p)), list(v.get_value().shape), float(jnp.sum(v.get_value().astype(jnp.float32))))
        for p, v in nnx.to_flat_state(state)
    ]
    return hashlib.sha256(json.dumps(sums).encode()).hexdigest()


def heal(
    student: MoEModel,
    teacher: MoEModel | TeacherLogits,
    blocks: Int[np.ndarray, "n seq"],
    *,
    options: HealOptions = HealOptions(),
    heldout: Int[np.ndarray, "m seq"] | None = None,
    meta: Mapping[str, Any] | None = None,
    resume_dir: str | os.PathLike | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> HealResult:
    """Distil `teacher` into a copy of `student` on token `blocks` (module docstring).

    `teacher`: the model the student was pruned from, on the same mesh, or its `cache_teacher_logits`
    of these blocks. `heldout`: blocks to score perplexity before and after (never trained on).
    `meta["data"]`: what the provenance record keeps of where the blocks came from."""
    say = log or (lambda _: None)
    blocks = _check_blocks(blocks, student.cfg)
    cached = teacher if isinstance(teacher, TeacherLogits) else None
    teacher_model = cached.teacher if cached is not None else teacher
    check_teacher(student.cfg, student.info, teacher_model.cfg, teacher_model.info)
    if cached is None and teacher.ctx.mesh != student.ctx.mesh:
        raise HealError("teacher and student must be on the same mesh (load both with the same mesh=)")
    if cached is not None and options.teacher_logits == "live":
        raise HealError("teacher_logits='live' needs the teacher module, not its cached logits")
    masks = trainable_masks(student.cfg, student.info, options.train)
    train_rows, val_rows = split_validation(len(blocks), options.val_blocks, options.seed)
    if cached is None and options.teacher_logits == "cached":
        cached = cache_teacher_logits(teacher, blocks, batch_size=options.batch_size, progress=progress)
    if cached is not None and cached.blocks_digest != data_digest(blocks):
        raise HealError("the cached teacher logits are of other token blocks than the ones given")
    ppl_before = None if heldout is None else perplexity(student, heldout, batch_size=options.batch_size).ppl
    ppl_teacher = None
    if heldout is not None and not isinstance(teacher, TeacherLogits):
        ppl_teacher = perplexity(teacher, heldout, batch_size=options.batch_size).ppl
    fingerprint = job_fingerprint(student, teacher_model, blocks, options)
    trained = count_trainable(student.cfg, masks)
    say(
        f"healing: {options.train} trains {trained:,} of {student.num_params:,} parameters; "
        f"{len(train_rows)} training blocks, {len(val_rows)} validation blocks; teacher logits "
        f"{'cached' if cached is not None else 'live'}"
    )
    step = TrainStep(
        student,
        None if cached is not None else teacher,
        masks,
        options,
        loss=distill_loss,
        optimizer=healing_optimizer,
        schedule=warmup_cosine,
        forward=model_logits,
    )
    run = TrainLoop(
        step,
        blocks,
        train_rows,
        val_rows,
        None if cached is None else cached.logits,
        options,
        fingerprint,
        resume_dir,
        progress,
        say,
    )
    run.go()
    healed_state = step.params_state(run.best_params if run.best_params is not None else step.params_part(run.carry))
    record = _record(run, student, teacher_model, blocks, options, fingerprint, trained, meta)
    healed = _module(student, healed_state, record)
    ppl_after = None if heldout is None else perplexity(healed, heldout, batch_size=options.batch_size).ppl
    if heldout is not None:
        record["heldout"] = {
            "blocks_sha256": data_digest(np.asarray(heldout)),
            "num_blocks": int(len(heldout)),
            "ppl_before": ppl_before,
            "ppl_after": ppl_after,
            "ppl_teacher": ppl_teacher,
        }
        healed = _module(student, healed_state, record)
    say(
        f"healed {run.done} steps in {run.elapsed:.0f} s"
        + (
            ""
            if heldout is None
            else f"; held-out perplexity {ppl_before:.3f} -> {ppl_after:.3f}"
            + ("" if ppl_teacher is None else f" (teacher {ppl_teacher:.3f})")
        )
    )
    return HealResult(
        model=healed,
        steps=run.done,
        horizon=run.horizon,
        best_step=run.best_step,
        losses=run.curves["loss"],
        kl=run.curves["kl"],
        nll=run.curves["nll"],
        grad_norms=run.curves["grad_norm"],
        val_losses=[(int(s), float(v)) for s, v in run.curves["val"]],
        seconds=run.elapsed,
        tokens_per_second=run.tokens_per_second,
        trained_params=trained,
        ppl_before=ppl_before,
        ppl_after=ppl_after,
        ppl_teacher=ppl_teacher,
        record=record,
    )


def _module(student: MoEModel, params: nnx.State, record: Mapping[str, Any]) -> MoEModel:
    graphdef, _ = nnx.split(abstract_model(student.cfg, ctx=student.ctx, info=student.info.with_record(record)))
    return nnx.merge(graphdef, params)


def _record(
    run: TrainLoop,
    student: MoEModel,
    teacher: MoEModel,
    blocks: np.ndarray,
    options: HealOptions,
    fingerprint: str,
    trained: int,
    meta: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The provenance record of a healing (its fingerprint: the run's identity and where it ended)."""
    losses = run.curves["loss"]
    return {
        "stage": "heal",
        "fingerprint": hashlib.sha256(
            json.dumps([fingerprint, run.done, run.horizon, run.best_step]).encode()
        ).hexdigest(),
        "teacher": {"fingerprint": teacher.info.fingerprint, "source": teacher.info.source},
        "student_fingerprint": student.info.fingerprint,
        "data": {
            **dict((meta or {}).get("data") or {}),
            "blocks_sha256": data_digest(blocks),
            "num_blocks": int(len(blocks)),
            "seq_len": int(blocks.shape[1]),
            "val_blocks": int(len(run.val_rows)),
        },
        "options": options.to_dict(),
        "trained": options.train,
        "trained_params": trained,
        "steps": run.done,
        "horizon": run.horizon,
        "best_step": run.best_step,
        "loss_first": losses[0] if losses else None,
        "loss_last": losses[-1] if losses else None,
        "val_loss_best": run.best_loss if math.isfinite(run.best_loss) else None,
        "seconds": round(run.elapsed, 3),
    }
