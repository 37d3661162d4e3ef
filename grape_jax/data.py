"""Calibration and evaluation text: read files, tokenise with the model's tokenizer, pack into blocks.

Documents: a .txt file is split on blank lines (one paragraph = one document; the shipped text has one
chapter per paragraph); a .jsonl file gives one document per line from `text_field`; a directory saved
by `datasets.Dataset.save_to_disk` gives one per row (needs the optional `datasets` package).
Packing: documents are tokenised, joined with the EOS token between them, and the stream is cut into
non-overlapping blocks of `seq_len` tokens (a trailing partial block is dropped); `num_samples` blocks
are then drawn without replacement with `seed`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from importlib import resources

import numpy as np


class DataError(ValueError):
    """Calibration/evaluation data that cannot be used."""


def _asset(name: str) -> str:
    return resources.files("grape_jax").joinpath("assets", name).read_text(encoding="utf-8")


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.split("\n\n") if p.strip()]


def default_calibration_texts() -> list[str]:
    """The shipped public-domain calibration text (Genesis and Exodus, KJV), one chapter per document."""
    return _paragraphs(_asset("kjv_calibration.txt"))


def default_heldout_texts() -> list[str]:
    """The shipped held-out text (Mark and Ruth, KJV), disjoint from the calibration text."""
    return _paragraphs(_asset("kjv_heldout.txt"))


def load_texts(paths: Sequence[str | os.PathLike], *, text_field: str | None = None) -> list[str]:
    """Documents from .txt files, .jsonl files (`text_field`) or saved `datasets` directories."""
    docs: list[str] = []
    for path in map(os.fspath, paths):
        if os.path.isdir(path):
            docs.extend(_load_dataset_dir(path, text_field))
        elif not os.path.isfile(path):
            raise DataError(f"{path}: file not found")
        elif path.endswith((".jsonl", ".json")):
            docs.extend(_load_jsonl(path, text_field))
        else:
            with open(path, encoding="utf-8") as f:
                found = _paragraphs(f.read())
            if not found:
                raise DataError(f"{path}: file holds no text")
            docs.extend(found)
    if not docs:
        raise DataError("calibration corpus is empty")
    return docs


def _load_jsonl(path: str, text_field: str | None) -> list[str]:
    if not text_field:
        raise DataError(f"{path}: JSONL input needs --text-field (the key holding the text)")
    out = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict) or text_field not in row:
                raise DataError(f"{path}:{n}: field {text_field!r} missing")
            if not isinstance(row[text_field], str):
                raise DataError(f"{path}:{n}: field {text_field!r} is not a string")
            if row[text_field].strip():
                out.append(row[text_field])
    if not out:
        raise DataError(f"{path}: no non-empty {text_field!r} values")
    return out


def _load_dataset_dir(path: str, text_field: str | None) -> list[str]:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{path}: reading a saved dataset needs the `datasets` package (pip install datasets)") from None
    ds = datasets.load_from_disk(path)
    field = text_field or "text"
    if field not in ds.column_names:
        raise DataError(f"{path}: dataset has no column {field!r} (columns: {ds.column_names})")
    return [t for t in ds[field] if isinstance(t, str) and t.strip()]


def tokenize_and_pack(
    texts: Sequence[str],
    tokenizer,
    *,
    seq_len: int,
    num_samples: int | None,
    seed: int = 0,
    max_positions: int | None = None,
) -> np.ndarray:
    """[n, seq_len] int32 blocks (see module docstring)."""
    if seq_len < 2:
        raise DataError(f"seq_len must be >= 2, got {seq_len}")
    if max_positions is not None and seq_len > max_positions:
        raise DataError(f"seq_len {seq_len} exceeds the model's maximum of {max_positions} positions")
    if not texts:
        raise DataError("calibration corpus is empty")
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for doc in texts:
        stream.extend(tokenizer(doc, add_special_tokens=False, verbose=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
    n = len(stream) // seq_len
    if n == 0:
        raise DataError(f"corpus has {len(stream)} tokens, fewer than one block of {seq_len}")
    blocks = np.asarray(stream[: n * seq_len], np.int32).reshape(n, seq_len)
    if num_samples is None:
        return blocks
    if num_samples > n:
        raise DataError(f"asked for {num_samples} blocks of {seq_len} tokens; the corpus has only {n}")
    idx = np.sort(np.random.default_rng(seed).choice(n, size=num_samples, replace=False))
    return blocks[idx]
