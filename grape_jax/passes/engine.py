"""The one engine for passes over token blocks: calibration, the fit's pass, perplexity, the teacher's
logits and healing's validation all run through `stream_pass`.

A pass is a carry (accumulators, a loss sum, ...) threaded through one step per batch of blocks. The
engine owns what every pass needs and nothing a pass computes: the batches (blocks padded with masked
filler rows to a multiple of the data-parallel size), the mesh in context while a step is traced, a
progress bar that counts *finished* work (each step's carry is waited for before it is counted, so the
bar and its ETA never run ahead of the accelerator), periodic saves of the carry for resuming
(`resume.Progress`), and Ctrl-C: the carry of the last finished step is saved and the caller's
exception says how much.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from typing import TypeVar

import jax
import numpy as np
from jaxtyping import Bool, Int
from tqdm.auto import tqdm

from grape_jax.core.sharding import RunContext
from grape_jax.passes.resume import Progress

Carry = TypeVar("Carry")
_clock = time.monotonic  # when periodic saves are due (a seam for tests)


@dataclasses.dataclass(frozen=True)
class Batches:
    """[n, T] blocks as `count` batches of `rows` rows: `tokens` and `mask` [count, rows, T], the last
    batch padded with masked filler rows (token 0)."""

    tokens: Int[np.ndarray, "k rows t"]
    mask: Bool[np.ndarray, "k rows t"]
    num_blocks: int

    @classmethod
    def of(cls, blocks: Int[np.ndarray, "n t"], batch_size: int, *, data_parallel: int = 1) -> Batches:
        """Batches of `batch_size` rows rounded up to a multiple of `data_parallel` (so every batch splits
        evenly over the data axes)."""
        blocks = np.asarray(blocks)
        rows = -(-batch_size // data_parallel) * data_parallel
        n, t = blocks.shape
        count = -(-n // rows)
        tokens = np.zeros((count * rows, t), np.int32)
        mask = np.zeros((count * rows, t), bool)
        tokens[:n], mask[:n] = blocks, True
        return cls(tokens.reshape(count, rows, t), mask.reshape(count, rows, t), n)

    @property
    def count(self) -> int:
        return self.tokens.shape[0]

    @property
    def rows(self) -> int:
        return self.tokens.shape[1]

    def real_rows(self, i: int) -> int:
        """How many rows of batch `i` are blocks (the rest are filler)."""
        return max(0, min(self.rows, self.num_blocks - i * self.rows))

    def tokens_in(self, i: int) -> int:
        return int(self.mask[i].sum())


@dataclasses.dataclass(frozen=True)
class Saves:
    """Resumable progress of a pass: save the carry into `progress` at most every `seconds` (0: never by
    time) and every `every` batches (0: never by count), and on Ctrl-C."""

    progress: Progress
    seconds: float = 60.0
    every: int = 0

    def due(self, done: int, last_save: float) -> bool:
        return bool((self.seconds and _clock() - last_save >= self.seconds) or (self.every and done % self.every == 0))


class PassInterrupted(KeyboardInterrupt):
    """Ctrl-C during a pass: `saved` batches are saved for resuming (0 when nothing could be saved)."""

    def __init__(self, saved: int, total: int):
        super().__init__(saved, total)
        self.saved, self.total = saved, total


def stream_pass(
    step: Callable[[Carry, int], Carry],
    carry: Carry,
    batches: Batches,
    *,
    ctx: RunContext | None = None,
    start: int = 0,
    saves: Saves | None = None,
    desc: str = "pass",
    progress: bool = False,
) -> Carry:
    """`carry = step(carry, i)` for every batch i from `start` (the step places batch i's arrays itself:
    a pass may need more than tokens and mask), with the mesh of `ctx` in context.

    Each step is waited for before the progress bar counts its tokens. With `saves`, the carry after
    batch i is saved (as `i + 1` batches done) when due and on Ctrl-C; Ctrl-C raises `PassInterrupted`
    with the number of batches whose carry is saved."""
    done = saved = start
    last_save = _clock()
    bar = tqdm(
        total=int(batches.mask.sum()),
        initial=int(batches.mask[:start].sum()),
        unit="tok",
        desc=desc,
        disable=not progress,
    )
    try:
        for i in range(start, batches.count):
            with ctx.scope() if ctx is not None else contextlib.nullcontext():
                carry = step(carry, i)
            jax.block_until_ready(carry)
            done = i + 1
            bar.update(batches.tokens_in(i))
            if saves is not None and done < batches.count and saves.due(done, last_save):
                saves.progress.save(carry, done)
                saved, last_save = done, _clock()
    except KeyboardInterrupt:
        bar.close()
        if saves is not None and done > saved:
            try:
                saves.progress.save(carry, done)
                saved = done
            except (RuntimeError, ValueError):  # the step it interrupted had taken (donated) the carry
                pass
        raise PassInterrupted(saved if saves is not None else 0, batches.count) from None
    bar.close()
    return carry
