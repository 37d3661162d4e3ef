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
from grape_jax.cli.args import UsageError, add_data_args, add_mesh_args, data_spec, mesh_from_args
from grape_jax.core.model import ModelInfo
from grape_jax.data.text import DataSpec
from grape_jax.evaluation.scoring import perplexity
from grape_jax.healing.distill import TRAIN_MODES, HealError, check_teacher
from grape_jax.healing.heal import (
    TEACHER_LOGITS,
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
from grape_jax.source import ModelSource

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json")
DEFAULT_STEPS = 200


def configure_heal(p: argparse.ArgumentParser) -> None:
    p.add_argument("pruned", help="the pruned model: Hugging Face directory (a grape-jax export) or grape checkpoint")
    p.add_argument(
        "--teacher", required=True, help="the original model it was pruned from (HF directory or grape checkpoint)"
    )
    p.add_argument("--out", required=True, help="output Hugging Face directory (with heal.json and loss.png)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--work-dir", default=None, help="checkpoints for resuming (default: OUT.work)")
    p.add_argument("--keep-work", action="store_true", help="keep the work directory after success")
    d = HealOptions()
    g = p.add_argument_group("healing")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help=f"optimizer steps (default {DEFAULT_STEPS})")
    length.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="train as many steps as fit in this many minutes (estimated from the first warm-up steps)",
    )
    g.add_argument(
        "--train",
        default=d.train,
        choices=TRAIN_MODES,
        help="what trains: routers, routers + experts merged from several, or every parameter",
    )
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="blocks per step")
    g.add_argument("--learning-rate", type=float, default=d.learning_rate, help="peak AdamW learning rate")
    g.add_argument("--warmup", type=int, default=d.warmup, help="linear warm-up steps (then cosine decay to 0)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW decoupled weight decay")
    g.add_argument("--clip-norm", type=float, default=d.clip_norm, help="clip the gradient's global norm")
    g.add_argument("--kl-weight", type=float, default=d.kl_weight, help="weight of the KL to the teacher")
    g.add_argument("--lm-weight", type=float, default=d.lm_weight, help="weight of the next-token NLL")
    g.add_argument("--temperature", type=float, default=d.temperature, help="softmax temperature of the KL")
    g.add_argument(
        "--teacher-logits",
        default=d.teacher_logits,
        choices=TEACHER_LOGITS,
        help="live: the teacher runs in each step; cached: one pass first, then the teacher is dropped",
    )
    g.add_argument(
        "--val-blocks",
        type=int,
        default=d.val_blocks,
        help="training blocks held out to pick the best step (0: keep the last)",
    )
    g.add_argument("--val-every", type=int, default=d.val_every, help="validate every this many steps")
    g.add_argument(
        "--checkpoint-every",
        type=int,
        default=d.checkpoint_every,
        help="save for resuming every this many steps (0: never by count)",
    )
    g.add_argument(
        "--checkpoint-seconds",
        type=float,
        default=d.checkpoint_seconds,
        help="save for resuming at most this often (0: never by time)",
    )
    add_data_args(p, num_samples=256)
    e = p.add_argument_group("evaluation")
    e.add_argument(
        "--eval-data",
        nargs="*",
        default=None,
        help="held-out text for perplexity before/after (default: the shipped held-out text)",
    )
    e.add_argument("--eval-samples", type=int, default=64, help="held-out blocks")
    add_mesh_args(p)


def heal_options(args: argparse.Namespace) -> HealOptions:
    steps = DEFAULT_STEPS if args.steps is None and args.max_minutes is None else args.steps
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
    if frac is not None:
        lines.append(
            f"healing recovered {100 * frac:.1f}% of the perplexity gap in {r.steps} steps ({r.seconds:.0f} s)"
        )
    return "\n".join(lines)


def _json(obj: Any) -> str:
    return jsonio.dumps(obj, indent=1, sort_keys=True, default=str)
