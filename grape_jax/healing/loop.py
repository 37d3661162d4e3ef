"""The healing loop around the jitted step: batches in a fixed order, validation and the best step,
periodic saves through Orbax (`resume.Progress`), the time budget, Ctrl-C, and a non-finite loss.

Saved in `DIR/last`: the carry (trained parameters, optimizer state, step count) with the loop position,
the schedule's horizon, the time spent and the curves; in `DIR/best`: the trained parameters at the
lowest validation loss. Data order depends only on (seed, step) and nothing else is random, so a resumed
run continues exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from grape_jax.healing.distill import HealError, batch_rows
from grape_jax.healing.options import HealOptions
from grape_jax.healing.step import TrainStep
from grape_jax.passes.engine import Batches, stream_pass
from grape_jax.passes.resume import Progress


def budget_horizon(
    done: int, timings: list[float], *, seconds_left: float, val_batches: int, val_every: int, warmup: int
) -> tuple[int, float]:
    """(horizon, seconds per step): after `done` steps timed as `timings`, the schedule's last step for the
    time left, at 95% of it. The first step is left out when there are others: it carries one-off costs
    (buffer allocation, thread start-up; horizons from the first step alone used 44% and 67% of 10-minute
    budgets on CPU-2, demo model and gcide-moe-22m). A validation batch (forward only) counts as a third
    of a training step, `val_batches` of them every `val_every` steps. At least one step after the warm-up."""
    seconds = float(np.mean(timings[1:] if len(timings) > 1 else timings))
    per_step = seconds * (1.0 + val_batches / val_every / 3.0)
    return max(done + 1 + int(0.95 * seconds_left / per_step), warmup + 1), seconds


_clock = time.monotonic  # when periodic saves are due (a seam for tests)
TIMED_STEPS = 5  # a time budget's horizon is fixed after min(warmup, this) steps: their rate ignores the horizon


class HealInterrupted(KeyboardInterrupt):
    """Ctrl-C during healing; `saved` is the number of steps whose state is saved (0: nothing)."""

    def __init__(self, saved: int, directory: str | None):
        super().__init__(saved, directory)
        self.saved, self.directory = saved, directory


def padded(rows: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """`rows` padded to `count` rows with masked filler rows: (tokens, mask)."""
    tokens = np.zeros((count, rows.shape[1]), np.int32)
    mask = np.zeros((count, rows.shape[1]), bool)
    tokens[: len(rows)], mask[: len(rows)] = rows, True
    return tokens, mask


class TrainLoop:
    """The training loop: batches, steps, validation, saves, the time budget and interruptions."""

    def __init__(
        self,
        step: TrainStep,
        blocks,
        train_rows,
        val_rows,
        cached: np.ndarray | None,
        options: HealOptions,
        fingerprint: str,
        resume_dir,
        progress: bool,
        say,
    ):
        self.step, self.blocks, self.train_rows, self.val_rows = step, blocks, train_rows, val_rows
        self.cached, self.options, self.progress, self.say = cached, options, progress, say
        self.carry = step.init_carry()
        self.done, self.horizon = 0, options.steps
        self.elapsed, self.tokens_per_second = 0.0, 0.0
        self.curves: dict[str, list] = {"loss": [], "kl": [], "nll": [], "grad_norm": [], "val": []}
        self.best_step, self.best_loss, self.best_params = 0, math.inf, None
        self.last = self.best = self.root = None
        if resume_dir is not None:
            self.root = os.path.abspath(os.fspath(resume_dir))
            self.last = Progress(os.path.join(self.root, "last"), fingerprint=fingerprint)
            self.best = Progress(os.path.join(self.root, "best"), fingerprint=fingerprint)

    def batch(self, rows: np.ndarray) -> tuple[jax.Array, jax.Array, jax.Array | None]:
        tokens, mask = padded(self.blocks[rows], self.step.rows)
        ctx = self.step.ctx
        logits = None
        if self.cached is not None:
            logits = np.zeros((self.step.rows, *self.cached.shape[1:]), np.float32)
            logits[: len(rows)] = self.cached[rows]
            logits = ctx.put_batch(logits)
        return ctx.put_batch(tokens), ctx.put_batch(mask), logits

    def go(self) -> None:
        try:
            self._restore()
            self._train()
            if len(self.val_rows) == 0:
                self.best_step = self.done
        finally:
            resumable = self.last is not None and self.last.latest is not None
            for p in (self.last, self.best):
                if p is not None:
                    empty = p.latest is None
                    p.close()
                    if empty or not resumable:  # nothing to resume: leave nothing that looks like progress
                        shutil.rmtree(p.directory, ignore_errors=True)
            if self.last is not None and os.path.isdir(self.root) and not os.listdir(self.root):
                os.rmdir(self.root)

    def _restore(self) -> None:
        if self.last is None:
            return
        restored = self.last.restore(self.carry)
        if restored is None:
            return
        self.carry, self.done, extra = restored
        horizon = extra["horizon"]  # None: saved before the time budget fixed it (timed again)
        self.horizon, self.elapsed = None if horizon is None else int(horizon), float(extra["elapsed"])
        self.curves = {k: list(v) for k, v in extra["curves"].items()}
        self.best_step, self.best_loss = int(extra["best_step"]), float(extra["best_loss"])
        if self.best.latest is not None:
            self.best_params, _, _ = self.best.restore(self.step.params_part(self.carry))
        of = f"of {self.horizon}" if self.horizon is not None else "(its horizon not fixed yet: timed again)"
        self.say(f"resuming healing after step {self.done} {of} (saved in {self.root})")

    def _save(self) -> None:
        """Save the carry at the position its own step counter holds (so a Ctrl-C between updating the
        carry and the loop's counters can never mislabel it), with the curves up to there."""
        if self.last is None:
            return
        n = self.step.count(self.carry)
        curves = {k: v[:n] for k, v in self.curves.items() if k != "val"}
        curves["val"] = [v for v in self.curves["val"] if v[0] <= n]
        extra = {
            "horizon": self.horizon,
            "elapsed": self.elapsed,
            "curves": curves,
            "best_step": self.best_step,
            "best_loss": self.best_loss,
        }
        self.last.save(self.carry, n, extra=extra)
        self.saved_at, self.saved_clock = n, _clock()

    def _budget_left(self) -> float:
        if self.options.max_minutes is None:
            return math.inf
        return self.options.max_minutes * 60.0 - self.elapsed

    def _rows(self, step: int) -> np.ndarray:
        """The training blocks of `step` (a pure function of seed and step, whatever the mesh)."""
        o = self.options
        return self.train_rows[batch_rows(step, num_rows=len(self.train_rows), batch_size=o.batch_size, seed=o.seed)]

    def _train(self) -> None:
        o = self.options
        started, base = time.perf_counter(), self.elapsed
        self.saved_at, self.saved_clock = self.done, _clock()
        if self.horizon is not None and self.done >= self.horizon:
            return
        compiled = self.step.compile(self.carry, self.batch(self._rows(self.done)), ahead=self.horizon is None)
        if self.done == 0 and len(self.val_rows):
            self._validate()  # the unhealed model is a candidate too: healing never exports a worse one
        self.elapsed = base + time.perf_counter() - started
        bar = tqdm(total=self.horizon, initial=self.done, unit="step", desc="heal", disable=not self.progress)
        tokens, first, t_first = 0, self.done, time.perf_counter()
        timings: list[float] = []
        try:
            while self.horizon is None or self.done < self.horizon:
                batch = self.batch(self._rows(self.done))
                t0 = time.perf_counter()
                new, metrics = compiled(self.carry, *batch, np.int32(self.horizon or 1))
                metrics = jax.device_get(metrics)
                if not bool(metrics["ok"]):
                    self.carry = new  # the state before the step (the step kept it)
                    self._stop_non_finite(metrics)
                for k in ("loss", "kl", "nll", "grad_norm"):
                    self.curves[k].append(float(metrics[k]))
                self.carry = new
                self.done += 1
                self.elapsed = base + time.perf_counter() - started
                if self.horizon is None:
                    timings.append(time.perf_counter() - t0)
                    if self.done >= min(max(o.warmup, 1), TIMED_STEPS):
                        self._fix_horizon(timings)
                        bar.reset(total=self.horizon)
                        bar.update(self.done - 1)
                tokens += int(metrics["tokens"])
                speed = tokens / max(time.perf_counter() - t_first, 1e-9)
                bar.set_postfix(loss=f"{float(metrics['loss']):.4f}", tok_s=f"{speed:,.0f}")
                bar.update(1)
                stop = (self.horizon is not None and self.done >= self.horizon) or self._budget_left() <= 0
                if len(self.val_rows) and (stop or self.done % o.val_every == 0):
                    self._validate()
                self.elapsed = base + time.perf_counter() - started
                due = (o.checkpoint_seconds and _clock() - self.saved_clock >= o.checkpoint_seconds) or (
                    o.checkpoint_every and self.done % o.checkpoint_every == 0
                )
                if stop or due:
                    self._save()
                if stop:
                    break
        except KeyboardInterrupt:
            bar.close()
            self._save_after_interrupt()
            raise HealInterrupted(self.saved_at if self.last is not None else 0, self.root) from None
        bar.close()
        if self.horizon is None:  # the budget ran out while the first steps were timed
            self.horizon = self.done
        self.tokens_per_second = tokens / max(time.perf_counter() - t_first, 1e-9)
        if self.done > first and self.done < self.horizon:
            self.say(f"stopped by the time budget after {self.done} of {self.horizon} steps")

    def _fix_horizon(self, timings: list[float]) -> None:
        o = self.options
        self.horizon, seconds = budget_horizon(
            self.done,
            timings,
            seconds_left=self._budget_left(),
            val_batches=math.ceil(len(self.val_rows) / self.step.rows),
            val_every=o.val_every,
            warmup=o.warmup,
        )
        self.say(f"time budget {o.max_minutes} min: {seconds:.2f} s per step, so {self.horizon} steps")

    def _validate(self) -> None:
        rows = self.step.rows
        batches = Batches.of(self.blocks[self.val_rows], rows)

        def one_batch(sums: tuple[float, float], i: int) -> tuple[float, float]:
            loss_sum, tokens = jax.device_get(
                self.step.validate(self.carry, self.batch(self.val_rows[i * rows : (i + 1) * rows]))
            )
            return sums[0] + float(loss_sum), sums[1] + float(tokens)

        total, count = stream_pass(one_batch, (0.0, 0.0), batches, desc="validate")
        loss = total / max(count, 1.0)
        self.curves["val"].append([self.done, loss])
        if loss < self.best_loss:
            self.best_step, self.best_loss = self.done, loss
            self.best_params = jax.tree.map(jnp.copy, self.step.params_part(self.carry))
            if self.best is not None:
                self.best.save(self.best_params, self.done)

    def _stop_non_finite(self, metrics: Mapping[str, Any]) -> None:
        where = (
            f"non-finite loss at step {self.done} (loss {float(metrics['loss'])}, gradient norm "
            f"{float(metrics['grad_norm'])}); healing stopped"
        )
        if self.done == 0:
            raise HealError(f"{where}; no step succeeded, nothing was saved")
        if self.last is None:
            raise HealError(f"{where}; nothing was saved (no resume directory)")
        self._save()
        raise HealError(f"{where}; the last good state (after step {self.done}) is kept in {self.root}")

    def _save_after_interrupt(self) -> None:
        if self.last is None:
            return
        try:
            self._save()
        except (RuntimeError, ValueError):  # the interrupted step had taken (donated) the state
            pass
