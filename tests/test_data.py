"""Shipped text, tokenizer, text loading and packing."""

from __future__ import annotations

import json
import re
import sys
import types

import numpy as np
import pytest
from transformers import AutoTokenizer

from grape_jax.data.text import (
    DataError,
    default_calibration_texts,
    default_heldout_texts,
    load_texts,
    tokenize_and_pack,
)
from grape_jax.data.tokenizer import default_tokenizer, train_tokenizer


def test_shipped_texts_are_disjoint_and_sized():
    cal, held = default_calibration_texts(), default_heldout_texts()
    assert 300_000 < sum(map(len, cal)) < 400_000 and 70_000 < sum(map(len, held)) < 130_000
    assert (len(cal), len(held)) == (50 + 40, 16 + 4)  # chapters of Genesis+Exodus, Mark+Ruth
    assert cal[0].startswith("In the beginning God created") and held[0].startswith("The beginning of the gospel")
    assert not any(re.search(r"\d+:\d+", doc) for doc in cal + held)  # verse labels stripped
    sentences = lambda docs: {s.strip() for d in docs for s in d.split(".") if len(s.strip()) > 60}  # noqa: E731
    assert not sentences(cal) & sentences(held)


def test_tokenizer_is_deterministic_round_trips_and_saves(tmp_path):
    texts = default_calibration_texts()[:40]
    a, b = train_tokenizer(texts, vocab_size=300), train_tokenizer(texts, vocab_size=300)
    assert a.get_vocab() == b.get_vocab() and len(a) == 300
    assert [a.bos_token_id, a.eos_token_id, a.pad_token_id, a.unk_token_id] == [0, 1, 2, 3]
    tok = default_tokenizer()
    assert tok is default_tokenizer() and len(tok) == 1024 and tok.model_max_length == 2048
    for text in ["And God said, Let there be light: and there was light.", "  naïve café — 東京 \n\ttabs", "x"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text and tok.unk_token_id not in ids
    assert len(tok("And God said unto Moses")["input_ids"]) < len("And God said unto Moses") / 2  # merges learned
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert loaded.get_vocab() == tok.get_vocab() and loaded.bos_token == "<s>" and loaded.eos_token == "</s>"
    text = "Moses went up unto God."
    assert loaded(text)["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]


def test_tokenizer_errors():
    with pytest.raises(ValueError, match="vocab_size must be >= 260"):
        train_tokenizer(["abc"], vocab_size=100)
    with pytest.raises(ValueError, match="at least one non-empty text"):
        train_tokenizer([""])


def _stream(tok, texts):
    out = []
    for t in texts:
        out += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return out


def test_pack_with_bos_is_exact_and_deterministic():
    tok = default_tokenizer()
    texts = default_heldout_texts()
    everything = tokenize_and_pack(texts, tok, seq_len=32, num_samples=None)
    stream = _stream(tok, texts)
    assert everything.dtype == np.int32 and everything.shape == (len(stream) // 31, 32)
    np.testing.assert_array_equal(everything[:, 0], tok.bos_token_id)
    np.testing.assert_array_equal(everything[:, 1:].ravel(), stream[: everything.shape[0] * 31])
    a = tokenize_and_pack(texts, tok, seq_len=32, num_samples=10, seed=3)
    np.testing.assert_array_equal(a, tokenize_and_pack(texts, tok, seq_len=32, num_samples=10, seed=3))
    assert a.shape == (10, 32)
    rows = [int(np.flatnonzero((everything == r).all(1))[0]) for r in a]  # drawn blocks, corpus order, distinct
    assert rows == sorted(set(rows))
    c = tokenize_and_pack(texts, tok, seq_len=32, num_samples=10, seed=4)
    assert not np.array_equal(a, c)
    assert tokenize_and_pack(texts, tok, seq_len=32, num_samples=len(everything), seed=1).shape == everything.shape


def test_pack_without_bos():
    tok = default_tokenizer()
    texts = default_heldout_texts()[:3]
    got = tokenize_and_pack(texts, tok, seq_len=16, num_samples=None, add_bos=False)
    stream = _stream(tok, texts)
    np.testing.assert_array_equal(got.ravel(), stream[: len(stream) // 16 * 16])

    class NoBos:  # the same tokenizer, but without a BOS token (like Qwen's)
        bos_token_id, eos_token_id = None, tok.eos_token_id

        def __call__(self, texts, **kw):
            return tok(texts, **kw)

    no_bos = NoBos()
    np.testing.assert_array_equal(tokenize_and_pack(texts, no_bos, seq_len=16, num_samples=None), got)
    with pytest.raises(DataError, match="has no BOS token"):
        tokenize_and_pack(texts, no_bos, seq_len=16, num_samples=None, add_bos=True)


def test_loaders(tmp_path):
    (tmp_path / "a.txt").write_text("one para\nstill one\n\n\nsecond para\n")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "hello", "id": 1})
        + "\n\n"
        + json.dumps({"text": " "})
        + "\n"
        + json.dumps({"text": "world"})
        + "\n"
    )
    assert load_texts([tmp_path / "a.txt"]) == ["one para\nstill one", "second para"]
    assert load_texts([tmp_path / "a.txt", tmp_path / "b.jsonl"], text_field="text") == [
        "one para\nstill one",
        "second para",
        "hello",
        "world",
    ]


def test_saved_dataset_dir(tmp_path, monkeypatch):
    (tmp_path / "ds").mkdir()
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(DataError, match=r"ds: .*install datasets"):
        load_texts([tmp_path / "ds"])

    class FakeDataset:  # what `datasets.load_from_disk` returns for one split
        column_names = ["text", "id"]

        def __getitem__(self, key):
            return {"text": ["first doc", "", "second doc"], "id": [1, 2, 3]}[key]

    fake = types.ModuleType("datasets")
    fake.load_from_disk = lambda path: FakeDataset()
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert load_texts([tmp_path / "ds"]) == ["first doc", "second doc"]
    with pytest.raises(DataError, match=r"ds: dataset has no column 'body'"):
        load_texts([tmp_path / "ds"], text_field="body")

    class FakeDatasetDict(dict):  # several splits saved together
        column_names = {"train": ["text"], "test": ["text"]}

    fake.load_from_disk = lambda path: FakeDatasetDict(train=None, test=None)
    with pytest.raises(DataError, match=r"ds: holds several splits \['test', 'train'\]; pass one split's directory"):
        load_texts([tmp_path / "ds"])

    def not_saved(path):
        raise FileNotFoundError(path)

    fake.load_from_disk = not_saved
    with pytest.raises(DataError, match=r"ds: directory is not a dataset written by save_to_disk"):
        load_texts([tmp_path / "ds"])


def test_errors(tmp_path):
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "hello"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r"b\.jsonl:2: field 'text' missing"):
        load_texts([tmp_path / "b.jsonl"], text_field="text")
    with pytest.raises(DataError, match=r"b\.jsonl: JSONL input needs --text-field"):
        load_texts([tmp_path / "b.jsonl"])
    (tmp_path / "c.jsonl").write_text('{"text": 3}\n{"text": "ok"\n')
    with pytest.raises(DataError, match=r"c\.jsonl:1: field 'text' is int, expected a string"):
        load_texts([tmp_path / "c.jsonl"], text_field="text")
    (tmp_path / "d.jsonl").write_text('{"text": "ok"}\n{"text": "ok"\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: invalid JSON"):
        load_texts([tmp_path / "d.jsonl"], text_field="text")
    (tmp_path / "empty.txt").write_text("\n\n  \n")
    with pytest.raises(DataError, match=r"empty\.txt: file holds no text"):
        load_texts([tmp_path / "empty.txt"])
    with pytest.raises(DataError, match=r"nope\.txt: file not found"):
        load_texts([tmp_path / "nope.txt"])
    with pytest.raises(DataError, match="corpus is empty"):
        load_texts([])
    tok = default_tokenizer()
    with pytest.raises(DataError, match="seq_len 128 exceeds the model's maximum of 64"):
        tokenize_and_pack(["x"], tok, seq_len=128, num_samples=1, max_positions=64)
    with pytest.raises(DataError, match="corpus is empty"):
        tokenize_and_pack([], tok, seq_len=8, num_samples=1)
    with pytest.raises(DataError, match="asked for 50 blocks of 2 tokens; the corpus has only"):
        tokenize_and_pack(["a b c"], tok, seq_len=2, num_samples=50)
    with pytest.raises(DataError, match="fewer than one block of 64"):
        tokenize_and_pack(["a b c"], tok, seq_len=64, num_samples=None)
    with pytest.raises(DataError, match="document 1 is bytes"):
        tokenize_and_pack(["a", b"b"], tok, seq_len=8, num_samples=None)
