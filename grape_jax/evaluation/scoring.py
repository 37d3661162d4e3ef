"""Perplexity and zero-shot multiple choice, for any causal LM given as `logits_fn(tokens, mask)`.

The model is a callable `logits_fn(tokens [B, T] int32, mask [B, T] bool) -> logits [B, T, V]`:
causal LM logits for right-padded rows, `mask` True on real tokens. Rows made only of padding may give
any logits (even NaN): they are never read.

Perplexity: packed, non-overlapping blocks (`data.tokenize_and_pack`); within a block, tokens
1..T-1 are scored from their prefix (the first token of each block is context only, never scored);
token-weighted over all blocks: ppl = exp(Σ NLL / Σ scored tokens). Log-softmax in fp32; the
per-row NLL reduction is jitted; the last batch is padded with masked rows so one compiled shape
serves every batch; sums over rows and batches are taken in float64 on the host.

Multiple choice (lm-evaluation-harness conventions): a request is (context, continuation), the
continuation carrying the harness's leading " " target delimiter. Encoding as the harness does:
trailing whitespace moves from the context to the continuation, the continuation's tokens are
those of encode(context + continuation) after the first len(encode(context)), and the model sees
[BOS] + context tokens + continuation tokens (BOS when the tokenizer has one and `add_bos`; without
BOS an empty context is prefixed with EOS, as the harness's prefix token). Score = Σ log p of the
continuation tokens given everything before them. When the sequence is longer than `max_length`
tokens the context is cut from the left. `acc` = argmax of score; `acc_norm` = argmax of score /
number of *characters* of the choice text (the continuation without its leading delimiter space),
which is what the harness computes (`len(choice)` on Python strings; "byte length" in its docs is
the same for ASCII). For WinoGrande the choices differ in the context and share the continuation
(partial evaluation): the harness reports only `acc`, and our `acc_norm` equals `acc` there.
Requests are sorted by length and batched into `batch_size` rows, right-padded to the smallest of a
few fixed widths (16, 32, 64, ... capped at `max_length`), so padding never changes a score and few
shapes are compiled.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from grape_jax.passes.engine import Batches, stream_pass

LogitsFn = Callable[[Int[Array, "B T"], Bool[Array, "B T"]], Float[Array, "B T V"]]
_MIN_WIDTH = 16


@jax.jit
def _row_nll_and_greedy(
    logits: Float[Array, "B T V"], tokens: Int[Array, "B T"], scored: Bool[Array, "B T"]
) -> tuple[Float[Array, " B"], Bool[Array, " B"]]:
    """Per row: Σ -log p(tokens[p] | tokens[:p]) over positions p with scored[p] (p >= 1), in fp32,
    and whether every scored token is the argmax prediction from its prefix."""
    chex.assert_rank(logits, 3)
    chex.assert_equal_shape([tokens, scored])
    chex.assert_equal_shape_prefix([logits, tokens], 2)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    target = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]
    keep = scored[:, 1:]
    nll = -jnp.sum(jnp.where(keep, target, 0.0), axis=1)
    hit = jnp.argmax(logits[:, :-1], axis=-1) == tokens[:, 1:]
    return nll, jnp.all(jnp.where(keep, hit, True), axis=1)


@dataclasses.dataclass(frozen=True)
class PerplexityResult:
    """Total NLL (nats) over `num_tokens` scored tokens; `ppl` = exp(nll_sum / num_tokens)."""

    nll_sum: float
    num_tokens: int

    @property
    def ppl(self) -> float:
        return math.exp(self.nll_sum / self.num_tokens)


def perplexity(
    logits_fn: LogitsFn, blocks: Int[np.ndarray, "n T"], *, batch_size: int = 8, progress: bool = False
) -> PerplexityResult:
    """Token-weighted perplexity of packed [n, T] blocks (see module docstring). `logits_fn` may be a
    `MoEModel` itself (it is called as `model(tokens, mask)`)."""
    blocks = np.asarray(blocks)
    if blocks.ndim != 2 or blocks.shape[0] == 0 or blocks.shape[1] < 2:
        raise ValueError(f"perplexity needs [n, T>=2] token blocks, got shape {blocks.shape}")
    if not np.issubdtype(blocks.dtype, np.integer):
        raise ValueError(f"perplexity needs integer token ids, got dtype {blocks.dtype}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n, width = blocks.shape
    batches = Batches.of(blocks.astype(np.int32), min(batch_size, n))

    def one_batch(nll: float, i: int) -> float:
        tokens, mask = batches.tokens[i], batches.mask[i]
        row_nll, _ = _row_nll_and_greedy(logits_fn(tokens, mask), tokens, mask)
        return nll + float(np.asarray(row_nll)[: batches.real_rows(i)].astype(np.float64).sum())

    nll = stream_pass(one_batch, 0.0, batches, desc="perplexity", progress=progress)
    return PerplexityResult(nll, n * (width - 1))


@dataclasses.dataclass(frozen=True)
class Example:
    """One multiple-choice item: a (context, continuation) request per choice, and the right one.

    Most tasks share one context across choices; WinoGrande varies the context and shares the
    continuation (the harness's partial evaluation)."""

    requests: tuple[tuple[str, str], ...]
    label: int

    def __post_init__(self):
        if len(self.requests) < 2:
            raise ValueError(f"a multiple-choice example needs >= 2 choices, got {len(self.requests)}")
        if not 0 <= self.label < len(self.requests):
            raise ValueError(f"label {self.label} out of range for {len(self.requests)} choices")

    @classmethod
    def shared_context(cls, context: str, choices: Sequence[str], label: int) -> Example:
        return cls(tuple((context, c) for c in choices), int(label))


def choice_length(continuation: str) -> int:
    """Characters of the choice text: the continuation without the harness's leading " " delimiter."""
    return len(continuation[1:] if continuation.startswith(" ") else continuation)


def _bucket(n: int, max_length: int) -> int:
    width = _MIN_WIDTH
    while width < n:
        width *= 2
    return min(width, max_length)


def _encode(tokenizer, context: str, continuation: str, *, max_length: int, add_bos: bool) -> tuple[list[int], int]:
    """Harness-style (sequence ids, number of continuation tokens at its end)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    enc = lambda s: tokenizer(s, add_special_tokens=False, verbose=False)["input_ids"]  # noqa: E731
    ctx = enc(context)
    cont = enc(context + continuation)[len(ctx) :]
    if not cont:
        raise ValueError(f"continuation {continuation!r} tokenises to nothing after context {context[-40:]!r}")
    prefix = tokenizer.bos_token_id if add_bos else None
    if prefix is None and not ctx:
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if prefix is None:
            raise ValueError("empty context and the tokenizer has neither BOS nor EOS to condition on")
    seq = ([prefix] if prefix is not None else []) + ctx + cont
    if len(cont) >= max_length:
        raise ValueError(f"continuation of {len(cont)} tokens does not fit max_length={max_length} with any context")
    return seq[-max_length:], len(cont)


def score_requests(
    logits_fn: LogitsFn,
    tokenizer,
    requests: Sequence[tuple[str, str]],
    *,
    batch_size: int = 8,
    max_length: int = 2048,
    with_greedy: bool = False,
    add_bos: bool = True,
) -> list[float] | list[tuple[float, bool]]:
    """Σ log p(continuation | context) per (context, continuation) pair (see module docstring); with
    `with_greedy`, (score, whether every continuation token is the model's argmax) as the harness wants."""
    if batch_size < 1 or max_length < 2:
        raise ValueError(f"need batch_size >= 1 and max_length >= 2, got {batch_size}, {max_length}")
    encoded = [_encode(tokenizer, c, t, max_length=max_length, add_bos=add_bos) for c, t in requests]
    scores = [0.0] * len(encoded)
    greedy = [False] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = _bucket(len(encoded[idx[0]][0]), max_length)
        tokens = np.zeros((batch_size, width), np.int32)
        mask = np.zeros((batch_size, width), bool)
        scored = np.zeros((batch_size, width), bool)
        for row, i in enumerate(idx):
            seq, n_cont = encoded[i]
            tokens[row, : len(seq)] = seq
            mask[row, : len(seq)] = True
            scored[row, len(seq) - n_cont : len(seq)] = True
        nll, hit = _row_nll_and_greedy(logits_fn(tokens, mask), tokens, scored)
        nll, hit = np.asarray(nll), np.asarray(hit)
        for row, i in enumerate(idx):
            scores[i] = -float(nll[row])
            greedy[i] = bool(hit[row])
    return list(zip(scores, greedy)) if with_greedy else scores


def multiple_choice(
    logits_fn: LogitsFn,
    tokenizer,
    examples: Sequence[Example],
    *,
    batch_size: int = 8,
    max_length: int = 2048,
    add_bos: bool = True,
) -> dict[str, float]:
    """{"acc", "acc_norm", "n"} over `examples` (see module docstring)."""
    if not examples:
        raise ValueError("no examples to evaluate")
    requests = [r for ex in examples for r in ex.requests]
    scores = score_requests(
        logits_fn, tokenizer, requests, batch_size=batch_size, max_length=max_length, add_bos=add_bos
    )
    acc = acc_norm = 0
    pos = 0
    for ex in examples:
        s = np.asarray(scores[pos : pos + len(ex.requests)], np.float64)
        pos += len(ex.requests)
        lengths = np.asarray([max(choice_length(cont), 1) for _, cont in ex.requests], np.float64)
        acc += int(np.argmax(s) == ex.label)
        acc_norm += int(np.argmax(s / lengths) == ex.label)
    return {"acc": acc / len(examples), "acc_norm": acc_norm / len(examples), "n": len(examples)}
