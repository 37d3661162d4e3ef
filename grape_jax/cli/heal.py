"""`grape heal`: distil the original model into a pruned one, then export it like any other model.

Everything that needs no weights is checked first: the output path, the options, the two models'
configs (same family, vocabulary, layers, width; at most the teacher's experts per layer), that the
student was pruned from this teacher (fingerprints from the files alone), that both tokenizers are the
same files, and the text. Then both models are loaded on the same mesh (or, with
`--teacher-logits cached`, the teacher first, its logits cached on the host and the teacher dropped
before the student is loaded). Progress is saved in the work directory and resumed by the same command;
OUT (an HF directory with `heal.json` and `loss.png`) appears only when complete.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
from typing import Any

from grape_jax.base import jsonio
from grape_jax.cli.args import UsageError, data_spec, mesh_from_args
from grape_jax.core.model import ModelInfo
from grape_jax.data.text import DataSpec
from grape_jax.evaluation.scoring import perplexity
from grape_jax.healing.distill import HealError, check_teacher
from grape_jax.healing.heal import (
    HealInterrupted,
    HealOptions,
    HealResult,
    TeacherLogits,
    cache_teacher_logits,
    heal,
    job_fingerprint,
)
from grape_jax.passes.resume import Progress, ResumeError
from grape_jax.pipeline import (
    Interrupted,
    blocks_for,
    check_output,
    load_model,
    save_hf,
)
from grape_jax.report.plots import plot_loss
from grape_jax.report.recipe import UNHEALED_LEVERS
from grape_jax.source import ModelSource

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")


def heal_options(args: argparse.Namespace) -> HealOptions:
    steps = HealOptions().steps if args.steps is None and args.max_minutes is None else args.steps
    return HealOptions(
        steps=steps,
        max_minutes=args.max_minutes,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        warmup=args.warmup,
        weight_decay=args.weight_decay,
        clip_norm=args.clip_norm,
        kl_weight=args.kl_weight,
        lm_weight=args.lm_weight,
        temperature=args.temperature,
        train=args.train,
        seed=args.seed,
        val_blocks=args.val_blocks,
        val_every=args.val_every,
        checkpoint_every=args.checkpoint_every,
        checkpoint_seconds=args.checkpoint_seconds,
        teacher_logits=args.teacher_logits,
    )


def check_tokenizers(student: str, teacher: str) -> None:
    """Both models tokenise with the same files (the student's export copied the teacher's verbatim)."""
    a, b = ModelSource.open(student).tokenizer_dir, ModelSource.open(teacher).tokenizer_dir
    found = False
    for name in TOKENIZER_FILES:
        pa, pb = os.path.join(a, name), os.path.join(b, name)
        if not os.path.isfile(pa) and not os.path.isfile(pb):
            continue
        found = True
        if not (os.path.isfile(pa) and os.path.isfile(pb)) or _read(pa) != _read(pb):
            raise UsageError(
                f"the tokenizers differ ({name} in {a} and {b}); the teacher must be the model the "
                f"student was pruned from"
            )
    if not found:
        raise UsageError(
            f"{a}: no tokenizer files ({', '.join(TOKENIZER_FILES)}); healing tokenises text with the models' tokenizer"
        )


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _drop_stale(directory: str, fingerprint: str) -> None:
    """Remove saved healing progress of another request (other models, data or options)."""
    for part in ("last", "best"):
        path = os.path.join(directory, part)
        if not os.path.isdir(path):
            continue
        try:
            with Progress(path, fingerprint=fingerprint) as saved:
                saved.meta()
        except ResumeError:
            print(f"{directory}: saved healing progress is for other models, data or options; starting afresh")
            shutil.rmtree(directory, ignore_errors=True)
            return


def run_heal(args: argparse.Namespace) -> int:
    """Check -> load -> ppl before -> distil (resumable) -> ppl after -> export with heal.json, loss.png."""
    out = check_output(args.out, overwrite=args.overwrite)
    work = os.path.abspath(args.work_dir or out.rstrip("/") + ".work")
    if work == out:
        raise UsageError(f"--work-dir {work} must differ from --out")
    options = heal_options(args)
    student, teacher = ModelSource.open(args.pruned), ModelSource.open(args.teacher)
    s_info = ModelInfo.create(provenance=student.provenance())
    t_info = ModelInfo.create(provenance=teacher.provenance(), source=teacher.path)
    check_teacher(student.config, s_info, teacher.config, t_info)
    check_tokenizers(args.pruned, args.teacher)
    if args.eval_samples < 1:
        raise UsageError(f"--eval-samples must be >= 1, got {args.eval_samples}")
    spec = data_spec(args)
    eval_spec = DataSpec(
        paths=tuple(args.eval_data) if args.eval_data else None,
        text_field=args.text_field,
        seq_len=args.seq_len,
        num_samples=args.eval_samples,
        seed=args.seed + 1,
    )
    blocks = blocks_for(args.pruned, spec)
    held = blocks_for(args.pruned, eval_spec, heldout=not args.eval_data)
    mesh = mesh_from_args(args)

    teacher = load_model(args.teacher, mesh=mesh)
    ppl_teacher = None
    if options.teacher_logits == "cached":
        ppl_teacher = perplexity(teacher, held, batch_size=options.batch_size).ppl
        teacher = cache_teacher_logits(teacher, blocks, batch_size=options.batch_size, progress=True)
        gc.collect()  # the teacher's arrays go before the student's come
    student = load_model(args.pruned, mesh=mesh)
    resume_dir = os.path.join(work, "heal")
    origin = teacher.teacher if isinstance(teacher, TeacherLogits) else teacher
    _drop_stale(resume_dir, job_fingerprint(student, origin, blocks, options))
    os.makedirs(work, exist_ok=True)
    try:
        result = heal(
            student,
            teacher,
            blocks,
            options=options,
            heldout=held,
            meta={"data": spec.record()},
            resume_dir=resume_dir,
            log=print,
        )
    except HealError:
        if os.path.isdir(work) and not os.listdir(work):
            os.rmdir(work)  # nothing was kept: leave nothing behind
        raise
    except HealInterrupted as e:
        saved = (
            f"the state after step {e.saved} is saved in {resume_dir}: run the same command again to resume"
            if e.saved
            else "no step was saved yet"
        )
        raise Interrupted(f"interrupted during healing; {saved}") from None
    ppl_teacher = result.ppl_teacher if ppl_teacher is None else ppl_teacher
    png = plot_loss(result.losses, result.val_losses, os.path.join(work, "loss.png"))
    report = heal_report(args, result, ppl_teacher, spec, eval_spec)
    try:
        save_hf(
            result.model,
            out,
            overwrite=args.overwrite,
            log=print,
            extra_files={"heal.json": _json(report), "loss.png": _read(png)},
        )
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted during export; the healing is saved in {resume_dir}: run the same command again to export it"
        ) from None
    if not args.keep_work:
        shutil.rmtree(work, ignore_errors=True)
    print(summary(result, ppl_teacher))
    print(f"healed model -> {out}")
    return 0


def heal_report(
    args: argparse.Namespace, r: HealResult, ppl_teacher: float | None, spec: DataSpec, eval_spec: DataSpec
) -> dict[str, Any]:
    """heal.json: perplexities, the run, its curves, options and data."""
    return {
        "student": os.path.abspath(args.pruned),
        "teacher": os.path.abspath(args.teacher),
        "ppl_before": r.ppl_before,
        "ppl_after": r.ppl_after,
        "ppl_original": ppl_teacher,
        "gap_recovered": gap_recovered(r.ppl_before, r.ppl_after, ppl_teacher),
        "steps": r.steps,
        "horizon": r.horizon,
        "best_step": r.best_step,
        "seconds": round(r.seconds, 3),
        "tokens_per_second": r.tokens_per_second,
        "trained_params": r.trained_params,
        "losses": r.losses,
        "kl": r.kl,
        "nll": r.nll,
        "val_losses": r.val_losses,
        "options": r.record["options"],
        "data": r.record["data"],
        "eval_data": eval_spec.record(heldout=not args.eval_data),
        "fingerprint": r.model.info.fingerprint,
    }


def gap_recovered(before: float | None, after: float | None, original: float | None) -> float | None:
    """(before - after) / (before - original): the fraction of the pruning loss that healing won back."""
    if before is None or after is None or original is None or before == original:
        return None
    return (before - after) / (before - original)


def summary(r: HealResult, ppl_teacher: float | None) -> str:
    rows = [("original", ppl_teacher), ("pruned", r.ppl_before), ("healed", r.ppl_after)]
    lines = [f"{'model':10s} {'held-out ppl':>12s}"]
    lines += [f"{name:10s} {value:12.3f}" for name, value in rows if value is not None]
    frac = gap_recovered(r.ppl_before, r.ppl_after, ppl_teacher)
    if r.best_step == 0:
        lines.append(
            f"the unhealed model was kept: no step of {r.steps} ({r.seconds:.0f} s) validated better than step 0. "
            + UNHEALED_LEVERS
        )
    elif frac is not None:
        lines.append(
            f"healing recovered {100 * frac:.1f}% of the perplexity gap in {r.steps} steps ({r.seconds:.0f} s)"
        )
    return "\n".join(lines)


def _json(obj: Any) -> str:
    return jsonio.dumps(obj, indent=1, sort_keys=True, default=str)
