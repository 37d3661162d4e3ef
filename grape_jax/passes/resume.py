"""Resumable long loops (calibration, healing): a pytree carry saved with its loop position through
Orbax's `CheckpointManager`, restored after a kill.

Each save is one Orbax step (`DIR/<next unit>/`: the carry in `state`, {fingerprint, next, extra} in
`meta`); Orbax writes a step into a temporary directory and renames it when complete, and keeps the last
`keep` complete steps, so a run killed at any point resumes from the last completed save, never from a
half-written one. The fingerprint names the job (data, model, options): progress of another job is
refused, never mixed in.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class ResumeError(ValueError):
    """Saved progress that belongs to another run."""


class Progress:
    """A directory of resumable progress for one job (`fingerprint`)."""

    def __init__(self, directory: str | os.PathLike, *, fingerprint: str, keep: int = 1):
        self.directory = os.path.abspath(os.fspath(directory))
        self.fingerprint = fingerprint
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "meta"))

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._manager.close()

    @property
    def latest(self) -> int | None:
        """The loop position of the last complete save, or None."""
        return self._manager.latest_step()

    def save(self, carry: Any, next_unit: int, *, extra: dict[str, Any] | None = None) -> None:
        """Save `carry` as the state after `next_unit` units (replacing an older save)."""
        if self.latest == next_unit:
            return
        meta = {"fingerprint": self.fingerprint, "next": int(next_unit), "extra": dict(extra or {})}
        self._manager.save(
            next_unit, args=ocp.args.Composite(state=ocp.args.StandardSave(carry), meta=ocp.args.JsonSave(meta))
        )
        self._manager.wait_until_finished()

    def meta(self) -> dict[str, Any] | None:
        """The metadata of the last complete save (None when there is none); refuses another job's."""
        step = self.latest
        if step is None:
            return None
        meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if meta.get("fingerprint") != self.fingerprint:
            raise ResumeError(
                f"{self.directory}: holds progress of a different run (other data, model or options); "
                f"remove it or choose another output"
            )
        return meta

    def restore(self, template: Any) -> tuple[Any, int, dict[str, Any]] | None:
        """(carry shaped and placed like `template`, next unit, extra) from the last save, or None."""
        meta = self.meta()
        if meta is None:
            return None
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), template
        )
        restored = self._manager.restore(
            int(meta["next"]), args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )
        return restored["state"], int(meta["next"]), dict(meta.get("extra", {}))
