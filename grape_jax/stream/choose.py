"""`--stream-layers auto|on|off`: whether a job holds the whole model on the mesh or streams it layer by
layer, and why (the reason is logged and recorded with the statistics, so recipes show it).

auto streams when the model does not fit: a resident prune holds the original weights, the merged copy
and the fit's base merge, plus activations, so it is chosen only while RESIDENT_FACTOR x the weights'
bytes fit the memory the run can use: the accelerators' free memory (`memory_stats`: limit - in use,
summed over the mesh's devices), or on CPU devices the host's available memory (MemAvailable).

On several processes each holds about its share of the weights (1/processes of them), and counts only
its own devices' memory (or its host's); the least of the processes' counts decides, so every process
takes the same decision (each process reads only its own slices either way, streamed or resident).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax

from grape_jax.base.multihost import every_process

MODES = ("auto", "on", "off")
RESIDENT_FACTOR = 3.0


class StreamModeError(ValueError):
    """A `--stream-layers` value or a request the streamed path cannot serve."""


def available_bytes(devices: Sequence[jax.Device]) -> tuple[int, str]:
    """Memory this process's part of a run on `devices` can use (host RAM for CPU devices), and where it
    is; on several processes the least of theirs (the same answer on every process)."""
    own = [d for d in devices if d.process_index == jax.process_index()] or list(devices)
    if all(d.platform == "cpu" for d in own):
        total, where = host_available_bytes(), "available host memory"
    else:
        total = 0
        for d in own:
            stats = d.memory_stats() or {}
            total += int(stats.get("bytes_limit", 0)) - int(stats.get("bytes_in_use", 0))
        where = f"free memory of {len(own)} {own[0].platform} device(s)"
    processes = jax.process_count()
    if processes > 1:
        total, where = min(every_process(total)), f"{where} (the least of {processes} processes)"
    return total, where


def host_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (else physical pages x page size)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def stream_or_not(
    mode: str,
    *,
    model_bytes: int,
    devices: Sequence[jax.Device],
    checkpoint: bool = False,
    processes: int = 1,
    available: tuple[int, str] | None = None,
) -> tuple[bool, str]:
    """(stream?, why) for `mode` and a model of `model_bytes` run on `devices` by `processes` processes
    (`available`: memory per process); `on` for a request the streamed path cannot serve (a grape
    checkpoint) is a one-line error, `auto` then keeps the model resident."""
    if mode not in MODES:
        raise StreamModeError(f"--stream-layers {mode!r}: expected one of {', '.join(MODES)}")
    unsupported = None
    if checkpoint:
        unsupported = "a grape checkpoint is restored whole (layer streaming reads Hugging Face directories)"
    if mode == "off":
        return False, "--stream-layers off"
    if unsupported is not None:
        if mode == "on":
            raise StreamModeError(f"--stream-layers on: {unsupported}")
        return False, f"auto: resident, {unsupported}"
    if mode == "on":
        return True, "--stream-layers on"
    free, where = available if available is not None else available_bytes(devices)
    need = RESIDENT_FACTOR * model_bytes / processes
    sizes = f"{RESIDENT_FACTOR:g} x {model_bytes / 1e9:.2f} GB of weights"
    if processes > 1:
        sizes += f" / {processes} processes"
    if need <= free:
        return False, f"auto: resident, {sizes} fit {free / 1e9:.2f} GB {where}"
    return True, f"auto: streamed, {sizes} exceed {free / 1e9:.2f} GB {where}"
