"""Zero-shot task files (local JSONL, one example per line) -> `Example`s, formatted as the
lm-evaluation-harness formats them. Expected fields per task:

  arc_easy / arc_challenge  question, choices{text[], label[]}, answerKey
  boolq                     passage, question, answer (bool)
  hellaswag                 ctx (or ctx_a + ctx_b), endings[], label; optional activity_label
  openbookqa                question_stem, choices{text[], label[]}, answerKey
  piqa                      goal, sol1, sol2, label (0/1)
  rte                       sentence1, sentence2, label (0 = entailment)
  winogrande                sentence (with one "_"), option1, option2, answer ("1"/"2")
  mmlu                      question, choices[4], answer (0-3 or "A"-"D"); optional subject (adds the
                            harness's "The following are multiple choice questions ..." header)
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from importlib import resources
from typing import Any

from grape_jax.evaluation.scoring import Example, LogitsFn, multiple_choice


class TaskError(ValueError):
    """A task file that does not have the fields its task needs."""


def _answer_index(labels: list[str], key: Any) -> int:
    key = str(key)
    if key not in labels:
        raise KeyError(f"answerKey {key!r} not among labels {labels}")
    return labels.index(key)


def _arc(row: Mapping[str, Any]) -> Example:
    ch = row["choices"]
    return Example.shared_context(
        f"Question: {row['question']}\nAnswer:",
        [" " + t for t in ch["text"]],
        _answer_index(list(map(str, ch["label"])), row["answerKey"]),
    )


def _boolq(row):
    return Example.shared_context(
        f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:", [" no", " yes"], int(bool(row["answer"]))
    )


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row):
    ctx = row.get("ctx") or (row["ctx_a"] + " " + row["ctx_b"].capitalize())
    prefix = f"{row['activity_label']}: " if row.get("activity_label") else ""
    return Example.shared_context(
        _hellaswag_clean(prefix + ctx), [" " + _hellaswag_clean(e) for e in row["endings"]], int(row["label"])
    )


def _openbookqa(row):
    ch = row["choices"]
    return Example.shared_context(
        row["question_stem"],
        [" " + t for t in ch["text"]],
        _answer_index(list(map(str, ch["label"])), row["answerKey"]),
    )


def _piqa(row):
    return Example.shared_context(
        f"Question: {row['goal']}\nAnswer:", [" " + row["sol1"], " " + row["sol2"]], int(row["label"])
    )


def _rte(row):
    return Example.shared_context(
        f"{row['sentence1']}\nQuestion: {row['sentence2']} True or False?\nAnswer:",
        [" True", " False"],
        int(row["label"]),
    )


def _winogrande(row):
    sentence = row["sentence"]
    idx = sentence.index("_")
    target = " " + sentence[idx + 1 :].strip()
    options = [row["option1"], row["option2"]]
    return Example(tuple((sentence[:idx] + o, target) for o in options), int(row["answer"]) - 1)


def _mmlu(row):
    letters = ["A", "B", "C", "D"]
    body = "\n".join(f"{l}. {c}" for l, c in zip(letters, row["choices"], strict=True))
    answer = row["answer"]
    label = letters.index(answer) if isinstance(answer, str) else int(answer)
    subject = row.get("subject")
    header = (
        (f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n")
        if subject
        else ""
    )
    return Example.shared_context(
        f"{header}{row['question'].strip()}\n{body}\nAnswer:", [" " + l for l in letters], label
    )


TASKS: dict[str, Callable[[Mapping[str, Any]], Example]] = {
    "arc_easy": _arc,
    "arc_challenge": _arc,
    "boolq": _boolq,
    "hellaswag": _hellaswag,
    "openbookqa": _openbookqa,
    "piqa": _piqa,
    "rte": _rte,
    "winogrande": _winogrande,
    "mmlu": _mmlu,
}


def load_task(task: str, path: str | os.PathLike) -> list[Example]:
    if task not in TASKS:
        raise TaskError(f"task {task!r} unknown; expected one of {sorted(TASKS)}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise TaskError(f"{path}: task file not found")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(TASKS[task](json.loads(line)))
            except json.JSONDecodeError as e:
                raise TaskError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            except (KeyError, TypeError, ValueError, IndexError) as e:
                raise TaskError(f"{path}:{n}: {task} example lacks a required field or value ({e})") from None
    if not out:
        raise TaskError(f"{path}: no examples")
    return out


def sample_task_path(task: str) -> str:
    """Path of the tiny hand-written sample shipped for `task` (format reference and tests)."""
    name = "arc" if task.startswith("arc") else task
    return str(resources.files("grape_jax").joinpath("assets", "tasks", f"{name}.jsonl"))


def evaluate_tasks(
    logits_fn: LogitsFn,
    tokenizer,
    task_files: Mapping[str, str | os.PathLike],
    *,
    batch_size: int = 8,
    max_length: int = 2048,
    add_bos: bool = True,
) -> dict[str, dict[str, float]]:
    """{task: {"acc", "acc_norm", "n"}} for local JSONL task files (formats above)."""
    if not task_files:
        raise TaskError("no task files given (expected {task name: path to a JSONL file})")
    loaded = {task: load_task(task, path) for task, path in task_files.items()}  # all errors before any compute
    return {
        task: multiple_choice(
            logits_fn, tokenizer, examples, batch_size=batch_size, max_length=max_length, add_bos=add_bos
        )
        for task, examples in loaded.items()
    }
