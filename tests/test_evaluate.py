"""Perplexity and multiple choice against float64 hand computations with a random bigram "model"
(and against transformers for a real tiny MoE); harness prompt formats; padding invariance; errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import grape_jax.evaluation.scoring as ev
from conversion.load import load_hf
from grape_jax.data.text import default_heldout_texts, tokenize_and_pack
from grape_jax.data.tokenizer import default_tokenizer
from grape_jax.evaluation.scoring import Example, multiple_choice, perplexity, score_requests
from grape_jax.evaluation.tasks import TASKS, TaskError, evaluate_tasks, load_task, sample_task_path
from tests.hf_models import random_tokens


@pytest.fixture(scope="module")
def bigram():
    """Logits of the next token depend only on the current one: an exact float64 oracle is a table."""
    tok = default_tokenizer()
    table = np.random.default_rng(0).normal(scale=2.0, size=(len(tok), len(tok))).astype(np.float32)
    t64 = table.astype(np.float64)
    logp = t64 - np.log(np.exp(t64 - t64.max(1, keepdims=True)).sum(1, keepdims=True)) - t64.max(1, keepdims=True)
    fn = jax.jit(lambda tokens, mask: jnp.where(mask[..., None], jnp.asarray(table)[tokens], jnp.nan))
    return tok, logp, fn


def _enc(tok, s):
    return tok(s, add_special_tokens=False)["input_ids"]


def _hand_score(tok, logp, context, continuation, *, add_bos=True, max_length=None):
    """The harness's encoding, then Σ log p of the continuation tokens, in float64."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    ctx = _enc(tok, context)
    cont = _enc(tok, context + continuation)[len(ctx) :]
    seq = ([tok.bos_token_id] if add_bos else []) + ctx + cont
    seq = seq[-max_length:] if max_length else seq
    return sum(logp[seq[p - 1], seq[p]] for p in range(len(seq) - len(cont), len(seq)))


def test_perplexity_equals_float64_bigram_nll(bigram):
    tok, logp, fn = bigram
    blocks = tokenize_and_pack(default_heldout_texts(), tok, seq_len=24, num_samples=7, seed=0)
    nll = -sum(logp[b[t - 1], b[t]] for b in blocks for t in range(1, 24))
    for batch_size in (3, 64):  # 3: last batch padded with masked (NaN-logit) rows
        got = perplexity(fn, blocks, batch_size=batch_size)
        assert got.num_tokens == 7 * 23
        np.testing.assert_allclose(got.nll_sum, nll, rtol=1e-6)
        np.testing.assert_allclose(got.ppl, np.exp(nll / (7 * 23)), rtol=1e-6)


@pytest.fixture(scope="module")
def mixtral_fn(tiny_mixtral):
    return load_hf(tiny_mixtral.path)  # the module is itself a logits_fn


def test_perplexity_equals_transformers_nll(tiny_mixtral, mixtral_fn):
    blocks = random_tokens(128, batch=5, seq=12, seed=2)
    result = perplexity(mixtral_fn, blocks, batch_size=2)
    with torch.no_grad():
        logits = tiny_mixtral.model(input_ids=torch.as_tensor(blocks, dtype=torch.long)).logits.double()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, torch.as_tensor(blocks[:, 1:, None], dtype=torch.long))
    nll = -logp.sum().item()
    assert result.num_tokens == 5 * 11
    np.testing.assert_allclose(result.nll_sum, nll, rtol=1e-5)


def test_perplexity_errors(bigram):
    _, _, fn = bigram
    with pytest.raises(ValueError, match=r"needs \[n, T>=2\] token blocks, got shape \(4,\)"):
        perplexity(fn, np.zeros(4, np.int32))
    with pytest.raises(ValueError, match="integer token ids"):
        perplexity(fn, np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        perplexity(fn, np.zeros((2, 4), np.int32), batch_size=0)


FIRST_REQUESTS = {  # the harness's prompt templates, written out by hand for the first sample of each task
    "arc_easy": (
        [("Question: Which object sinks in water?\nAnswer:", c) for c in (" a cork", " a stone", " a leaf")],
        1,
    ),
    "boolq": (
        [
            (
                "The river flows north to the sea and freezes in the coldest months.\nQuestion: does the river flow "
                "north?\nAnswer:",
                c,
            )
            for c in (" no", " yes")
        ],
        1,
    ),
    "hellaswag": (
        [
            ("Cooking: A man cracks two eggs into a bowl. He", c)
            for c in (
                " whisks them with a fork.",
                " paints the bowl blue.",
                " throws the bowl into a lake.",
                " reads a newspaper upside down.",
            )
        ],
        0,
    ),
    "openbookqa": (
        [
            ("Heat from the sun mostly reaches the earth by", c)
            for c in (" radiation", " plumbing", " conversation", " magnets")
        ],
        0,
    ),
    "piqa": (
        [
            ("Question: To keep bread fresh longer,\nAnswer:", c)
            for c in (" store it in a sealed bag.", " leave it in the rain.")
        ],
        0,
    ),
    "rte": (
        [
            (
                "The committee approved the new budget on Monday.\nQuestion: The budget was approved. True or False?"
                "\nAnswer:",
                c,
            )
            for c in (" True", " False")
        ],
        0,
    ),
    "winogrande": (
        [("The trophy did not fit in the suitcase because the " + o, " was too big.") for o in ("trophy", "suitcase")],
        0,
    ),
    "mmlu": (
        [("What is 7 multiplied by 6?\nA. 36\nB. 42\nC. 48\nD. 56\nAnswer:", c) for c in (" A", " B", " C", " D")],
        1,
    ),
}


@pytest.mark.parametrize("task", sorted(FIRST_REQUESTS))
def test_task_prompts_follow_the_harness(task):
    first = load_task(task, sample_task_path(task))[0]
    requests, label = FIRST_REQUESTS[task]
    assert first == Example(tuple(requests), label)


def test_hellaswag_split_context():
    second = load_task("hellaswag", sample_task_path("hellaswag"))[1]
    assert second.requests[1] == ("Gardening: A woman kneels by a flower bed. She", " pulls out the weeds.")


def _choice_texts(task, row):
    """Choice strings as the harness's doc_to_choice gives them (no delimiter), from the raw JSON."""
    if task in ("arc_easy", "arc_challenge", "openbookqa"):
        return row["choices"]["text"]
    if task == "winogrande":  # shared continuation: equal lengths, so acc_norm == acc (module docstring)
        return [row["sentence"][row["sentence"].index("_") + 1 :].strip()] * 2
    return {
        "boolq": ["no", "yes"],
        "rte": ["True", "False"],
        "mmlu": list("ABCD"),
        "piqa": [row.get("sol1"), row.get("sol2")],
        "hellaswag": [e.strip() for e in row.get("endings", [])],
    }[task]


@pytest.mark.parametrize("task", sorted(TASKS))
def test_multiple_choice_matches_hand_computation(bigram, task):
    tok, logp, fn = bigram
    examples = load_task(task, sample_task_path(task))
    with open(sample_task_path(task)) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    requests = [r for ex in examples for r in ex.requests]
    hand = [_hand_score(tok, logp, c, t) for c, t in requests]
    np.testing.assert_allclose(score_requests(fn, tok, requests, batch_size=3), hand, rtol=1e-5)
    acc = acc_norm = 0
    pos = 0
    for ex, row in zip(examples, rows, strict=True):
        s = np.array(hand[pos : pos + len(ex.requests)])
        pos += len(ex.requests)
        lengths = np.array([len(c) for c in _choice_texts(task, row)], np.float64)
        acc += int(np.argmax(s) == ex.label)
        acc_norm += int(np.argmax(s / lengths) == ex.label)
    got = multiple_choice(fn, tok, examples, batch_size=4)
    assert got == {"acc": acc / len(examples), "acc_norm": acc_norm / len(examples), "n": len(examples)}


def test_acc_norm_divides_by_characters_without_the_delimiter(monkeypatch):
    """Scores -2 and -4.5 for " a" and " bbb": per character (1 and 3) the second wins; per byte
    with the space (2 and 4) the first would."""
    monkeypatch.setattr(ev, "score_requests", lambda *a, **k: [-2.0, -4.5, -1.0, -9.0])
    examples = [Example.shared_context("Q:", [" a", " bbb"], 1), Example.shared_context("Q:", [" é", " ü"], 0)]
    assert multiple_choice(None, None, examples) == {"acc": 0.5, "acc_norm": 1.0, "n": 2}


def test_encoding_truncation_and_bos(bigram):
    tok, logp, fn = bigram
    context, cont = " ".join(default_heldout_texts()[0].split()[:60]), " and the Spirit"
    assert len(_enc(tok, context)) > 40
    for kw in ({}, {"max_length": 16}, {"max_length": 33}, {"add_bos": False}):
        got = score_requests(fn, tok, [(context, cont), ("", " Amen."), ("And he said: ", "Go")], **kw)
        want = [
            _hand_score(tok, logp, context, cont, **kw),
            _hand_score(tok, logp, "", " Amen.", add_bos=True, max_length=kw.get("max_length")),
            _hand_score(tok, logp, "And he said: ", "Go", **kw),
        ]
        np.testing.assert_allclose(got, want, rtol=1e-5)  # empty context: BOS is the prefix either way
    moved = score_requests(fn, tok, [("Answer: ", "yes"), ("Answer:", " yes")])
    np.testing.assert_allclose(moved[0], moved[1], rtol=1e-6)
    with pytest.raises(ValueError, match="does not fit max_length=4"):
        score_requests(fn, tok, [("x", " and the Spirit of God moved")], max_length=4)
    with pytest.raises(ValueError, match="tokenises to nothing"):
        score_requests(fn, tok, [("x", "")])


def _row_model(vocab, *, respect_mask=True):
    """Position t sees the masked mean embedding of tokens 0..t plus the mean embedding of its row's real
    tokens (not causal, but a function of the real tokens only, so it notices a wrong mask). With
    `respect_mask=False` the row mean includes padding: a model that reads padding."""
    rng = np.random.default_rng(1)
    emb = jnp.asarray(rng.normal(size=(vocab, 8)), jnp.float32)
    out = jnp.asarray(rng.normal(size=(8, vocab)), jnp.float32)

    @jax.jit
    def fn(tokens, mask):
        e = emb[tokens] * mask[..., None]
        prefix = jnp.cumsum(e, 1) / jnp.maximum(jnp.cumsum(mask, 1), 1)[..., None]
        row = (
            e.sum(1, keepdims=True) / jnp.maximum(mask.sum(1), 1)[:, None, None]
            if respect_mask
            else (emb[tokens].mean(1, keepdims=True))
        )
        return (prefix + row) @ out

    return fn


def test_padding_never_changes_a_score(bigram):
    """An example scored alone (one row, narrow) equals the same example in a padded batch (other rows,
    a wider bucket); the real models' attention masks are tested against transformers elsewhere."""
    tok = bigram[0]
    reqs = [("In the beginning", " God"), ("And the earth was without form, and void;", " and darkness")]
    long = (" ".join(default_heldout_texts()[1].split()[:20]), " and he went")  # forces a wider bucket
    fn = _row_model(len(tok))
    alone = [score_requests(fn, tok, [r], batch_size=1)[0] for r in reqs]
    batched = score_requests(fn, tok, [long] + reqs * 3, batch_size=4)
    for k in range(3):
        np.testing.assert_allclose(batched[1 + 2 * k : 3 + 2 * k], alone, rtol=1e-6)
    leaky = _row_model(len(tok), respect_mask=False)  # the comparison above detects a model that reads padding
    alone = score_requests(leaky, tok, reqs[:1], batch_size=1)[0]
    assert not np.isclose(score_requests(leaky, tok, [long] + reqs, batch_size=4)[1], alone, rtol=1e-3)


def test_batches_use_few_fixed_shapes(bigram):
    tok, _, fn = bigram
    shapes = set()

    def recording(tokens, mask):
        shapes.add(tokens.shape)
        return fn(tokens, mask)

    examples = [ex for t in sorted(TASKS) for ex in load_task(t, sample_task_path(t))]
    multiple_choice(recording, tok, examples, batch_size=4, max_length=48)
    assert shapes <= {(4, 16), (4, 32), (4, 48)} and len(shapes) >= 2


def test_evaluate_tasks_and_errors(bigram, tmp_path):
    tok, _, fn = bigram
    files = {t: sample_task_path(t) for t in ("piqa", "winogrande", "arc_challenge")}
    got = evaluate_tasks(fn, tok, files, batch_size=4, max_length=256)
    assert got == {t: multiple_choice(fn, tok, load_task(t, p), batch_size=4, max_length=256) for t, p in files.items()}
    bad = tmp_path / "piqa.jsonl"
    bad.write_text('{"goal": "x", "sol1": "a", "sol2": "b", "label": 1}\n{"goal": "x", "sol1": "a", "label": 0}\n')
    with pytest.raises(TaskError, match=r"piqa\.jsonl:2: piqa example lacks a required field or value \('sol2'\)"):
        evaluate_tasks(fn, tok, {"piqa": bad})
    bad.write_text('{"goal": "x", "sol1": "a", "sol2": "b", "label": 2}\n')
    with pytest.raises(TaskError, match=r"piqa\.jsonl:1: .*label 2 out of range for 2 choices"):
        evaluate_tasks(fn, tok, {"piqa": bad})
    with pytest.raises(TaskError, match=r"task 'squad' unknown; expected one of \['arc_challenge'"):
        evaluate_tasks(fn, tok, {"squad": bad})
    with pytest.raises(TaskError, match=r"nope\.jsonl: task file not found"):
        evaluate_tasks(fn, tok, {"rte": tmp_path / "nope.jsonl"})
    with pytest.raises(ValueError, match="no task files given"):
        evaluate_tasks(fn, tok, {})
    with pytest.raises(ValueError, match="no examples to evaluate"):
        multiple_choice(fn, tok, [])


def test_mmlu_subject_header(tmp_path):
    from grape_jax.evaluation.tasks import load_task

    path = tmp_path / "mmlu.jsonl"
    path.write_text(
        '{"question": "2+2?", "choices": ["1", "2", "3", "4"], "answer": 3, "subject": "elementary_mathematics"}\n'
    )
    (ex,) = load_task("mmlu", path)
    context = ex.requests[0][0]
    assert context == (
        "The following are multiple choice questions (with answers) about elementary mathematics.\n\n"
        "2+2?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer:"
    )
    assert ex.label == 3 and [c for _, c in ex.requests] == [" A", " B", " C", " D"]
