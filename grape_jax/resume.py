"""Resumable long runs: save a pytree carry plus a progress counter, restore it after a kill.

Layout: `DIR/progress.json` ({fingerprint, next, state}) names the last complete Orbax state directory
`DIR/state-<next>`. The JSON is replaced atomically only after its state is fully written, so a run
killed at any point resumes from the last completed unit, never from a half-written one.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import orbax.checkpoint as ocp

PROGRESS = "progress.json"


class ResumeError(ValueError):
    """Saved progress that belongs to another run."""


def save_progress(directory: str | os.PathLike, carry: Any, next_unit: int, *, fingerprint: str) -> None:
    directory = os.path.abspath(os.fspath(directory))
    os.makedirs(directory, exist_ok=True)
    state_name = f"state-{next_unit}"
    state_dir = os.path.join(directory, state_name)
    if os.path.exists(state_dir):
        shutil.rmtree(state_dir)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(state_dir, carry)
    previous = _read(directory)
    tmp = os.path.join(directory, PROGRESS + ".tmp")
    with open(tmp, "w") as f:
        json.dump({"fingerprint": fingerprint, "next": next_unit, "state": state_name}, f)
    os.replace(tmp, os.path.join(directory, PROGRESS))
    if previous and previous["state"] != state_name:
        shutil.rmtree(os.path.join(directory, previous["state"]), ignore_errors=True)


def _read(directory: str) -> dict[str, Any] | None:
    path = os.path.join(directory, PROGRESS)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def load_progress(
    directory: str | os.PathLike, template: Any, *, fingerprint: str
) -> tuple[Any, int] | None:
    """(carry, next unit) from the last completed save, or None when there is none yet."""
    directory = os.path.abspath(os.fspath(directory))
    progress = _read(directory)
    if progress is None:
        return None
    if progress["fingerprint"] != fingerprint:
        raise ResumeError(
            f"{directory}: holds progress of a different run (other data, model or options); "
            f"remove it or choose another output"
        )
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), template
    )
    with ocp.StandardCheckpointer() as ckptr:
        carry = ckptr.restore(os.path.join(directory, progress["state"]), abstract)
    return carry, int(progress["next"])
