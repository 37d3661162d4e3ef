"""The pass engine's progress bar counts finished work only: a step's carry is waited for before its
tokens are counted, so the bar (and its ETA) never runs ahead of the device."""

from __future__ import annotations

import numpy as np

from grape_jax.passes import engine


class Pending:
    """A carry whose result is not ready until `block_until_ready` waits for it (as a dispatched
    jax.Array is not), recording when it was waited for."""

    def __init__(self, index: int, log: list[tuple[str, int]]):
        self.index, self.log, self.ready = index, log, False

    def block_until_ready(self) -> Pending:
        self.ready = True
        self.log.append(("finished", self.index))
        return self


def test_progress_never_counts_a_step_before_it_finished(monkeypatch):
    log: list[tuple[str, int]] = []
    carries: list[Pending] = []

    class Bar:
        def __init__(self, *, total, initial, **kwargs):
            self.n, self.total = initial, total

        def update(self, tokens: int) -> None:
            assert carries and carries[-1].ready, "the bar counted a step whose carry was not finished"
            finished = sum(c.ready for c in carries)
            self.n += tokens
            assert self.n <= finished * 8 * 4, "the bar counted more tokens than finished steps hold"
            log.append(("counted", carries[-1].index))

        def close(self) -> None:
            pass

    monkeypatch.setattr(engine, "tqdm", Bar)

    def step(carry, i):
        carries.append(Pending(i, log))
        return carries[-1]

    batches = engine.Batches.of(np.ones((10, 8), np.int32), 4)  # 3 batches, the last with 2 filler rows
    engine.stream_pass(step, None, batches, progress=True)
    assert log == [(what, i) for i in range(3) for what in ("finished", "counted")]
