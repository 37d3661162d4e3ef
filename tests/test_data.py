"""Text loading, tokenizer and packing."""

from __future__ import annotations

import json

import numpy as np
import pytest

from grape_jax.data import DataError, default_calibration_texts, default_heldout_texts, load_texts, tokenize_and_pack
from grape_jax.tokenizer import default_tokenizer, train_tokenizer


def test_shipped_texts_are_disjoint_and_sized():
    cal, held = default_calibration_texts(), default_heldout_texts()
    assert 250_000 < sum(map(len, cal)) < 450_000 and 60_000 < sum(map(len, held)) < 150_000
    assert not set(cal) & set(held)
    assert cal[0].startswith("In the beginning God created")


def test_tokenizer_is_deterministic_and_round_trips():
    a = train_tokenizer(default_calibration_texts()[:40], vocab_size=300)
    b = train_tokenizer(default_calibration_texts()[:40], vocab_size=300)
    assert a.get_vocab() == b.get_vocab() and len(a) == 300
    text = "And God said, Let there be light: and there was light."
    ids = default_tokenizer()(text, add_special_tokens=False)["input_ids"]
    assert default_tokenizer().decode(ids) == text


def test_pack_is_deterministic_and_exact():
    tok = default_tokenizer()
    texts = default_heldout_texts()
    a = tokenize_and_pack(texts, tok, seq_len=32, num_samples=10, seed=3)
    b = tokenize_and_pack(texts, tok, seq_len=32, num_samples=10, seed=3)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (10, 32) and a.dtype == np.int32
    everything = tokenize_and_pack(texts, tok, seq_len=32, num_samples=None)
    stream = []
    for t in texts:
        stream += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    np.testing.assert_array_equal(everything.ravel(), stream[: everything.size])
    assert {tuple(r) for r in a} <= {tuple(r) for r in everything}


def test_loaders_and_errors(tmp_path):
    (tmp_path / "a.txt").write_text("one para\n\nsecond para\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "hello"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    assert load_texts([tmp_path / "a.txt"]) == ["one para", "second para"]
    with pytest.raises(DataError, match=r"b\.jsonl:2: field 'text' missing"):
        load_texts([tmp_path / "b.jsonl"], text_field="text")
    with pytest.raises(DataError, match="needs --text-field"):
        load_texts([tmp_path / "b.jsonl"])
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match=r"empty\.txt: file holds no text"):
        load_texts([tmp_path / "empty.txt"])
    with pytest.raises(DataError, match="not found"):
        load_texts([tmp_path / "nope.txt"])
    tok = default_tokenizer()
    with pytest.raises(DataError, match="exceeds the model's maximum of 64"):
        tokenize_and_pack(["x"], tok, seq_len=128, num_samples=1, max_positions=64)
    with pytest.raises(DataError, match="corpus is empty"):
        tokenize_and_pack([], tok, seq_len=8, num_samples=1)
    with pytest.raises(DataError, match="has only"):
        tokenize_and_pack(["a b c"], tok, seq_len=2, num_samples=50)
