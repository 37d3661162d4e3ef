"""Perplexity against transformers' logits; multiple choice against a hand computation."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conversion.load import load_hf
from grape_jax.evaluate import Example, jax_logits_fn, multiple_choice, perplexity, score_requests
from grape_jax.tasks import TASKS, TaskError, load_task, sample_task_path
from grape_jax.tokenizer import default_tokenizer
from tests.hf_models import random_tokens


def test_perplexity_equals_transformers_nll(tiny_mixtral):
    loaded = load_hf(tiny_mixtral.path)
    blocks = random_tokens(128, batch=5, seq=12, seed=2)
    result = perplexity(jax_logits_fn(loaded.params, loaded.cfg), blocks, batch_size=2)
    with torch.no_grad():
        logits = tiny_mixtral.model(input_ids=torch.as_tensor(blocks, dtype=torch.long)).logits.double()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, torch.as_tensor(blocks[:, 1:, None], dtype=torch.long))
    nll = -logp.sum().item()
    assert result.num_tokens == 5 * 11
    np.testing.assert_allclose(result.nll_sum, nll, rtol=1e-5)
    np.testing.assert_allclose(result.ppl, np.exp(nll / 55), rtol=1e-5)


@pytest.fixture(scope="module")
def bigram():
    """A random bigram 'model': logits of the next token depend only on the current token."""
    tok = default_tokenizer()
    table = np.random.default_rng(0).normal(size=(len(tok), len(tok))).astype(np.float32)
    fn = lambda tokens, mask: jnp.asarray(table)[tokens]  # noqa: E731
    return tok, table, fn


def _hand_score(tok, table, context, continuation):
    ids = [tok.bos_token_id] + tok(context, add_special_tokens=False)["input_ids"]
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    seq = ids + cont
    logp = table.astype(np.float64)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    return sum(logp[seq[p - 1], seq[p]] for p in range(len(ids), len(seq)))


@pytest.mark.parametrize("task", sorted(TASKS))
def test_multiple_choice_matches_hand_computation(bigram, task):
    tok, table, fn = bigram
    examples = load_task(task, sample_task_path(task))
    got = multiple_choice(fn, tok, examples, batch_size=4)
    acc = acc_norm = 0
    for ex in examples:
        s = np.array([_hand_score(tok, table, c, t) for c, t in ex.requests])
        lens = np.array([len(t.encode()) for _, t in ex.requests])
        acc += int(np.argmax(s) == ex.label)
        acc_norm += int(np.argmax(s / lens) == ex.label)
    assert got["acc"] == acc / len(examples) and got["acc_norm"] == acc_norm / len(examples)


def test_padding_never_changes_a_score(bigram, tiny_mixtral):
    tok, _, _ = bigram
    loaded = load_hf(tiny_mixtral.path)
    fn = jax_logits_fn(loaded.params, loaded.cfg)
    small = lambda t, m: fn(jnp.minimum(t, 127), m)  # noqa: E731  (the tiny model has 128 tokens)
    reqs = [("In the beginning", " God"), ("And the earth was without form, and void;", " and darkness")]
    alone = [score_requests(small, tok, [r], batch_size=1)[0] for r in reqs]
    batched = score_requests(small, tok, reqs * 3, batch_size=4)
    np.testing.assert_allclose(batched[:2], alone, rtol=2e-5)
    np.testing.assert_allclose(batched[4:6], alone, rtol=2e-5)


def test_task_errors(tmp_path):
    bad = tmp_path / "piqa.jsonl"
    bad.write_text('{"goal": "x", "sol1": "a", "label": 0}\n')
    with pytest.raises(TaskError, match=r"piqa\.jsonl:1: piqa example lacks a required field"):
        load_task("piqa", bad)
    with pytest.raises(TaskError, match="task 'squad' unknown"):
        load_task("squad", bad)
    assert isinstance(load_task("winogrande", sample_task_path("winogrande"))[0], Example)
