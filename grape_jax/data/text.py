"""Calibration and evaluation text: read files, tokenise with the model's tokenizer, pack into blocks.

What a document is, per input kind:
  * plain text (any file not ending in .jsonl/.json): split on blank lines, one paragraph = one
    document (the shipped KJV text has one chapter per paragraph);
  * JSON Lines (.jsonl, or .json holding one object per line): one document per non-blank line, the
    string in `text_field` (required);
  * a directory written by `datasets.Dataset.save_to_disk`: one document per row, column `text_field`
    (default "text"); needs the optional `datasets` package, which is not a dependency.
Empty documents are skipped; a file that yields none is an error.

Packing (`tokenize_and_pack`): each document is tokenised without special tokens and followed by the
EOS token (when the tokenizer has one); the concatenated stream is cut into consecutive,
non-overlapping blocks. With BOS (by default when the tokenizer has a BOS token) every block is
`[BOS] + seq_len - 1 stream tokens`, as a model sees text at inference; without, `seq_len` stream tokens.
A trailing partial block is dropped. `num_samples` blocks are then drawn without replacement with
`seed` and returned in corpus order (`num_samples=None` keeps every block).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from importlib import resources
from typing import Any

import numpy as np
from jaxtyping import Int
from transformers import AutoTokenizer, PreTrainedTokenizerBase


class DataError(ValueError):
    """Calibration/evaluation data that cannot be used."""


CALIBRATION_ASSET, HELDOUT_ASSET = "kjv_calibration.txt", "kjv_heldout.txt"


def _asset(name: str) -> str:
    return resources.files("grape_jax").joinpath("assets", name).read_text(encoding="utf-8")


def _paragraphs(text: str) -> list[str]:
    return [p.strip() for p in text.replace("\r\n", "\n").split("\n\n") if p.strip()]


def default_calibration_texts() -> list[str]:
    """The shipped public-domain calibration text (KJV Genesis and Exodus), one chapter per document."""
    return _paragraphs(_asset(CALIBRATION_ASSET))


def default_heldout_texts() -> list[str]:
    """The shipped held-out text (KJV Mark and Ruth), disjoint from the calibration text."""
    return _paragraphs(_asset(HELDOUT_ASSET))


def load_texts(paths: Sequence[str | os.PathLike], *, text_field: str | None = None) -> list[str]:
    """Documents from text files, JSON Lines files (`text_field`) or saved `datasets` directories."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    docs: list[str] = []
    for path in map(os.fspath, paths):
        if os.path.isdir(path):
            docs.extend(_load_dataset_dir(path, text_field))
        elif not os.path.isfile(path):
            raise DataError(f"{path}: file not found")
        elif path.endswith((".jsonl", ".json")):
            docs.extend(_load_jsonl(path, text_field))
        else:
            try:
                with open(path, encoding="utf-8") as f:
                    found = _paragraphs(f.read())
            except UnicodeDecodeError as e:
                raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
            if not found:
                raise DataError(f"{path}: file holds no text")
            docs.extend(found)
    if not docs:
        raise DataError("calibration corpus is empty: no input paths given")
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
                raise DataError(f"{path}:{n}: invalid JSON ({e.msg}); expected one JSON object per line") from None
            if not isinstance(row, dict) or text_field not in row:
                raise DataError(f"{path}:{n}: field {text_field!r} missing")
            if not isinstance(row[text_field], str):
                kind = type(row[text_field]).__name__
                raise DataError(f"{path}:{n}: field {text_field!r} is {kind}, expected a string")
            if row[text_field].strip():
                out.append(row[text_field])
    if not out:
        raise DataError(f"{path}: file holds no non-empty {text_field!r} values")
    return out


def _load_dataset_dir(path: str, text_field: str | None) -> list[str]:
    try:
        import datasets  # noqa: PLC0415  (deferred: optional dependency, only for saved dataset dirs)
    except ImportError:
        raise DataError(
            f"{path}: reading a saved dataset directory needs the `datasets` package: "
            "install datasets (pip install datasets)"
        ) from None
    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError:
        raise DataError(f"{path}: directory is not a dataset written by save_to_disk") from None
    if not hasattr(ds, "column_names") or isinstance(ds.column_names, dict):
        splits = sorted(getattr(ds, "keys", lambda: [])())
        example = os.path.join(path, splits[0] if splits else "train")
        raise DataError(f"{path}: holds several splits {splits}; pass one split's directory, e.g. {example}")
    field = text_field or "text"
    if field not in ds.column_names:
        raise DataError(f"{path}: dataset has no column {field!r} (columns: {ds.column_names})")
    out = [t for t in ds[field] if isinstance(t, str) and t.strip()]
    if not out:
        raise DataError(f"{path}: column {field!r} holds no non-empty strings")
    return out


def tokenize_and_pack(
    texts: Sequence[str],
    tokenizer,
    *,
    seq_len: int,
    num_samples: int | None,
    seed: int = 0,
    max_positions: int | None = None,
    add_bos: bool | None = None,
) -> Int[np.ndarray, "n seq_len"]:
    """[n, seq_len] int32 blocks (module docstring); `add_bos=None` means "if the tokenizer has BOS"."""
    if seq_len < 2:
        raise DataError(f"seq_len must be >= 2, got {seq_len}")
    if max_positions is not None and seq_len > max_positions:
        raise DataError(f"seq_len {seq_len} exceeds the model's maximum of {max_positions} positions")
    if num_samples is not None and num_samples < 1:
        raise DataError(f"num_samples must be >= 1 or None (all blocks), got {num_samples}")
    texts = list(texts)
    if not texts:
        raise DataError("calibration corpus is empty")
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise DataError(f"document {bad} is {type(texts[bad]).__name__}, expected a string")
    bos = tokenizer.bos_token_id
    if add_bos is None:
        add_bos = bos is not None
    elif add_bos and bos is None:
        raise DataError("add_bos=True but the tokenizer has no BOS token")
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
        stream.extend(ids)
        if eos is not None:
            stream.append(eos)
    body = seq_len - 1 if add_bos else seq_len
    n = len(stream) // body
    if n == 0:
        raise DataError(f"corpus has {len(stream)} tokens, fewer than one block of {seq_len}")
    blocks = np.asarray(stream[: n * body], np.int32).reshape(n, body)
    if add_bos:
        blocks = np.concatenate([np.full((n, 1), bos, np.int32), blocks], axis=1)
    if num_samples is None:
        return blocks
    if num_samples > n:
        raise DataError(f"asked for {num_samples} blocks of {seq_len} tokens; the corpus has only {n}")
    idx = np.sort(np.random.default_rng(seed).choice(n, size=num_samples, replace=False))
    return blocks[idx]


def _sha256_of(path: str) -> str:
    """sha256 of a file, or of a directory's files (names and bytes, sorted)."""
    h = hashlib.sha256()
    files = (
        [path]
        if os.path.isfile(path)
        else sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names)
    )
    for name in files:
        h.update(os.path.relpath(name, path).encode() if name != path else b"")
        with open(name, "rb") as f:
            for chunk in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Calibration (or evaluation) text and how it becomes token blocks: files (None: the shipped
    public-domain sample), the JSONL/dataset text field, block length, number of blocks and the seed
    that picks them."""

    paths: tuple[str, ...] | None = None
    text_field: str | None = None
    seq_len: int = 128
    num_samples: int | None = 64
    seed: int = 0

    def check(self) -> None:
        """Cheap checks (before any model is loaded): files exist, numbers make sense."""
        for path in self.paths or ():
            if not os.path.exists(path):
                raise DataError(f"{path}: file not found (--data)")
        if isinstance(self.seq_len, bool) or not isinstance(self.seq_len, int) or self.seq_len < 2:
            raise DataError(f"--seq-len must be an integer >= 2, got {self.seq_len!r}")
        if self.num_samples is not None and (not isinstance(self.num_samples, int) or self.num_samples < 1):
            raise DataError(f"--num-samples must be an integer >= 1, got {self.num_samples!r}")

    def record(self, *, heldout: bool = False) -> dict[str, Any]:
        """What statistics and recipes record of the data: every field plus each file's sha256."""
        if self.paths:
            files = [{"path": os.path.abspath(p), "sha256": _sha256_of(p)} for p in self.paths]
        else:
            name = HELDOUT_ASSET if heldout else CALIBRATION_ASSET
            text = _asset(name).encode("utf-8")
            files = [{"path": f"grape_jax/assets/{name} (shipped)", "sha256": hashlib.sha256(text).hexdigest()}]
        return {
            "files": files,
            "text_field": self.text_field,
            "seq_len": self.seq_len,
            "num_samples": self.num_samples,
            "seed": self.seed,
        }

    def blocks(
        self, tokenizer: PreTrainedTokenizerBase, *, max_positions: int, heldout: bool = False
    ) -> Int[np.ndarray, "n seq_len"]:
        """Tokenise and pack the text into [n, seq_len] int32 blocks (`heldout`: the shipped held-out
        sample when no paths are given)."""
        if self.paths:
            texts = load_texts(list(self.paths), text_field=self.text_field)
        else:
            texts = default_heldout_texts() if heldout else default_calibration_texts()
        return tokenize_and_pack(
            texts,
            tokenizer,
            seq_len=self.seq_len,
            num_samples=self.num_samples,
            seed=self.seed,
            max_positions=max_positions,
        )


def load_tokenizer(model_dir: str | os.PathLike) -> PreTrainedTokenizerBase:
    """The tokenizer saved in a model directory, offline and without running any code from it."""
    try:
        return AutoTokenizer.from_pretrained(os.fspath(model_dir), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise DataError(
            f"{model_dir}: no usable tokenizer files ({str(e).splitlines()[0]}); calibration and "
            f"evaluation tokenise text with the model's own tokenizer"
        ) from None
