"""Perplexity and zero-shot multiple choice, for any causal LM given as `logits_fn(tokens, mask)`.

Perplexity: packed, non-overlapping blocks; within a block, tokens 1..T-1 are scored from their prefix
(the first token of each block is context only); token-weighted over all blocks: exp(Σ NLL / #tokens).

Multiple choice (lm-evaluation-harness conventions): for each choice, score = Σ log p(continuation
tokens | context); `acc` takes the argmax of the score, `acc_norm` the argmax of score / number of
UTF-8 bytes of the continuation text. Context and continuation are tokenised separately and
concatenated; when too long, the context is cut from the left. Batches are right-padded to a few fixed
lengths, so padding never changes a score and compiles stay few.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

LogitsFn = Callable[[jax.Array, jax.Array], jax.Array]


@jax.jit
def _token_logprobs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """log p(tokens[:, 1:] | prefix) as [B, T-1] in fp32."""
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]


@jax.jit
def _is_greedy(logits: jax.Array, tokens: jax.Array) -> jax.Array:
    """Whether each of tokens[:, 1:] is the argmax prediction from its prefix, [B, T-1]."""
    return jnp.argmax(logits[:, :-1], axis=-1) == tokens[:, 1:]


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    nll_sum: float
    num_tokens: int

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / self.num_tokens)


def perplexity(logits_fn: LogitsFn, blocks: np.ndarray, *, batch_size: int = 8) -> PerplexityResult:
    """Token-weighted perplexity of [n, T] blocks (see module docstring)."""
    blocks = np.asarray(blocks, np.int32)
    if blocks.ndim != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise ValueError(f"perplexity needs [n, T>=2] blocks, got shape {blocks.shape}")
    nll, count = 0.0, 0
    for start in range(0, blocks.shape[0], batch_size):
        batch = blocks[start : start + batch_size]
        real = batch.shape[0]
        if real < batch_size:  # pad with masked rows so one compiled shape serves every batch
            batch = np.concatenate([batch, np.zeros((batch_size - real, batch.shape[1]), np.int32)])
        mask = np.zeros(batch.shape, bool)
        mask[:real] = True
        lp = np.asarray(_token_logprobs(logits_fn(jnp.asarray(batch), jnp.asarray(mask)), jnp.asarray(batch)))
        nll -= float(lp[:real].astype(np.float64).sum())
        count += real * (batch.shape[1] - 1)
    return PerplexityResult(nll, count)


@dataclasses.dataclass(frozen=True)
class Example:
    """One multiple-choice item: a (context, continuation) request per choice, and the right one.

    Most tasks share one context across choices; WinoGrande varies the context and shares the
    continuation (the harness's partial evaluation)."""

    requests: tuple[tuple[str, str], ...]
    label: int

    @classmethod
    def shared_context(cls, context: str, choices: Sequence[str], label: int) -> Example:
        return cls(tuple((context, c) for c in choices), int(label))


def _bucket(n: int, buckets: Sequence[int] = (32, 64, 128, 256, 512, 1024, 2048, 4096)) -> int:
    for b in buckets:
        if n <= b:
            return b
    return n


def score_requests(
    logits_fn: LogitsFn,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    *,
    batch_size: int = 8,
    max_length: int = 2048,
    with_greedy: bool = False,
) -> list[float] | list[tuple[float, bool]]:
    """Σ log p(continuation | context) for each (context, continuation) pair; with `with_greedy`,
    (score, whether every continuation token is the model's argmax) as lm-evaluation-harness wants."""
    encoded = []
    for context, continuation in requests:
        ctx = tokenizer(context, add_special_tokens=False, verbose=False)["input_ids"]
        if tokenizer.bos_token_id is not None:
            ctx = [tokenizer.bos_token_id] + ctx
        cont = tokenizer(continuation, add_special_tokens=False, verbose=False)["input_ids"]
        if not cont:
            raise ValueError(f"continuation {continuation!r} tokenises to nothing")
        seq = (ctx + cont)[-max_length:]
        if len(cont) >= len(seq):
            raise ValueError(f"continuation of {len(cont)} tokens does not fit max_length={max_length}")
        encoded.append((seq, len(cont)))
    scores = [0.0] * len(encoded)
    greedy = [False] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = _bucket(max(len(encoded[i][0]) for i in idx))
        tokens = np.zeros((batch_size, width), np.int32)
        mask = np.zeros((batch_size, width), bool)
        for row, i in enumerate(idx):
            seq = encoded[i][0]
            tokens[row, : len(seq)] = seq
            mask[row, : len(seq)] = True
        logits = logits_fn(jnp.asarray(tokens), jnp.asarray(mask))
        lp = np.asarray(_token_logprobs(logits, jnp.asarray(tokens)))
        hits = np.asarray(_is_greedy(logits, jnp.asarray(tokens))) if with_greedy else None
        for row, i in enumerate(idx):
            seq, n_cont = encoded[i]
            span = slice(len(seq) - n_cont - 1, len(seq) - 1)  # logprob of position p sits at p-1
            scores[i] = float(lp[row, span].astype(np.float64).sum())
            if with_greedy:
                greedy[i] = bool(hits[row, span].all())
    return list(zip(scores, greedy)) if with_greedy else scores


def multiple_choice(
    logits_fn: LogitsFn, tokenizer, examples: Sequence[Example], *, batch_size: int = 8, max_length: int = 2048
) -> dict[str, float]:
    """acc and acc_norm over examples (see module docstring)."""
    if not examples:
        raise ValueError("no examples to evaluate")
    requests = [r for ex in examples for r in ex.requests]
    scores = score_requests(logits_fn, tokenizer, requests, batch_size=batch_size, max_length=max_length)
    acc = acc_norm = 0
    pos = 0
    for ex in examples:
        s = np.asarray(scores[pos : pos + len(ex.requests)])
        lengths = np.asarray([len(cont.encode("utf-8")) for _, cont in ex.requests], np.float64)
        pos += len(ex.requests)
        acc += int(np.argmax(s) == ex.label)
        acc_norm += int(np.argmax(s / lengths) == ex.label)
    return {"acc": acc / len(examples), "acc_norm": acc_norm / len(examples), "n": len(examples)}


def jax_logits_fn(params, cfg) -> LogitsFn:
    """`logits_fn` of a grape-jax model (jitted; placed like the parameters)."""
    from grape_jax.model import forward_jit

    return lambda tokens, mask: forward_jit(params, cfg=cfg, tokens=tokens, mask=mask)
