"""Multi-host export: one writer process, the others only take part in its gathers.

`load_hf` needs nothing extra on several hosts (each process is asked only for the slices its own
devices hold). Export does: an HF tensor (one expert of one layer, or a whole parameter) may live on
devices of other processes, so every process calls `grape_jax.base.multihost.gather_slice` for the same
tensors in the same order: `follow_export` replays the writer's order (`write_checkpoint`'s, less the
shards a resumed writer skips) on the other processes without touching the file system.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import jax

from conversion.families.base import ConversionError
from conversion.safetensors_write import plan_shards
from grape_jax.base.multihost import WRITER, broadcast_flags, gather_slice


def shard_gathers(shard, sources: Mapping) -> list[tuple[str, int | None]]:
    """(parameter, expert) of every `gather_slice` the export of one planned shard makes, in order."""
    return [(binding.name, expert) for entry in shard.entries for binding, expert in sources[entry.name].parts]


def follow_export(
    params: Mapping[str, jax.Array],
    entries: Sequence,
    sources: Mapping,
    *,
    max_shard_bytes: int,
    skip: Sequence[bool] | None = None,
) -> None:
    """On a non-writer process: take part in every `gather_slice` of the writer's export, in its
    order, and write nothing (`entries`/`sources` as `conversion.export.hf_entries` returns them;
    `skip[i]`: the writer resumes with shard i already written, so nothing of it is gathered).

    After each shard, and once the output is in place, the writer says whether that step succeeded
    (`finish_shard`); if not, this raises instead of waiting in collectives for a writer that stopped."""
    shards = plan_shards(entries, max_shard_bytes=max_shard_bytes)
    skip = [False] * len(shards) if skip is None else skip
    for shard, done in zip(shards, skip, strict=True):
        if done:
            continue
        gather_shard(params, shard, sources)
        if not finish_shard(False):
            raise ConversionError(
                f"export failed on the writer process (process {WRITER}) while writing "
                f"{shard.filename}; its error says why"
            )
    if not finish_shard(False):
        raise ConversionError(
            f"export failed on the writer process (process {WRITER}) after its last shard "
            f"(side files or moving the output into place); its error says why"
        )


def finish_shard(written: bool) -> bool:
    """The writer's word after each shard of a multi-host export: `written` on the writer, a
    placeholder elsewhere; every process returns the writer's value."""
    return broadcast_flags([written])[0]


def gather_shard(params: Mapping[str, jax.Array], shard, sources: Mapping, *, start: int = 0) -> None:
    """Take part in one shard's gathers from the `start`-th on, keeping nothing: the other processes
    all of them; a writer that failed after `start` of them the rest, so that the others reach the end
    of the shard (where `finish_shard(False)` tells them to stop)."""
    for name, expert in shard_gathers(shard, sources)[start:]:
        gather_slice(params[name], () if expert is None else (expert,))
