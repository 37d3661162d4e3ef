"""A cheap fingerprint of a Hugging Face model directory: what statistics, plans and exports record as
the model they were made from.

It hashes config.json (canonical JSON), every tensor's name, dtype and shape, and the tensor's bytes at
fixed places: up to `WINDOW` bytes at its start, middle and end. Headers alone would not do: two
models of the same architecture (a base model and its fine-tune, two seeds) have identical headers, and
reusing one's statistics for the other is exactly the mistake this guards against. Training changes
every weight, so the sampled windows differ between any two trained models; hashing whole tensors
instead would read the entire checkpoint (minutes for hundreds of GB) before any work starts, while
this reads 3 windows per tensor (milliseconds to a second). Where files and offsets lie does not
count, so the same weights in another shard layout fingerprint the same.
"""

from __future__ import annotations

import hashlib
import json
import os

from conversion.safetensors_io import CheckpointIndex

WINDOW = 4096


def source_fingerprint(model_dir: str | os.PathLike) -> str:
    """sha256 hex digest of config.json and sampled tensor bytes (module docstring)."""
    model_dir = os.fspath(model_dir)
    with open(os.path.join(model_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    h = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    ckpt = CheckpointIndex.open(model_dir)
    handles: dict[str, object] = {}
    try:
        for key in sorted(ckpt.keys()):
            info = ckpt.info(key)
            h.update(json.dumps([key, str(info.dtype), list(info.shape)]).encode())
            f = handles.get(info.file) or handles.setdefault(info.file, open(info.file, "rb"))  # noqa: SIM115
            for start in sorted({0, max(info.nbytes // 2 - WINDOW // 2, 0), max(info.nbytes - WINDOW, 0)}):
                f.seek(info.offset + start)
                h.update(f.read(min(WINDOW, info.nbytes - start)))
    finally:
        for f in handles.values():
            f.close()
    return h.hexdigest()
