"""What a Hugging Face directory says without reading a weight: its config.json, its family, and the
provenance (fingerprinted) of loading it, including the records a grape-jax export keeps in recipe.json;
and whether its tensors are what config.json implies (`check_bindings`), with readers of their slices."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from conversion.families import get_family
from conversion.families.base import Binding, ConversionError, Family
from conversion.fingerprint import source_fingerprint
from conversion.safetensors_dtypes import numpy_to_dtype
from conversion.safetensors_io import CheckpointIndex


def read_hf_config(model_dir: str | os.PathLike) -> dict[str, Any]:
    path = os.path.join(model_dir, "config.json")
    if not os.path.isdir(model_dir):
        raise ConversionError(f"{model_dir}: not a directory")
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: missing; expected a Hugging Face model directory")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: invalid JSON ({e})") from None


def load_record(model_dir: str | os.PathLike, dtype: Any = None) -> dict[str, Any]:
    """The provenance record of loading `model_dir` (cast to `dtype`): its fingerprint combines the
    source's (`conversion.fingerprint`) with the cast, since a cast changes the weights."""
    cast = None if dtype is None else str(np.dtype(dtype))
    fingerprint = hashlib.sha256(json.dumps([source_fingerprint(model_dir), cast]).encode()).hexdigest()
    return {"stage": "load", "source": os.path.abspath(model_dir), "dtype": cast, "fingerprint": fingerprint}


def recorded_provenance(model_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The provenance records a grape-jax export keeps in its `recipe.json` (what was done to make it),
    so a model re-loaded from an export still knows where it came from; [] for other directories
    (no recipe.json, or one that is not ours: JSON only, anything unexpected is ignored)."""
    path = os.path.join(model_dir, "recipe.json")
    try:
        with open(path) as f:
            recipe = json.load(f)
    except (OSError, ValueError):
        return []
    records = recipe.get("provenance") if isinstance(recipe, dict) else None
    if not isinstance(records, list) or not all(
        isinstance(r, dict) and isinstance(r.get("stage"), str) for r in records
    ):
        return []
    return records


def provenance_of(model_dir: str | os.PathLike, dtype: Any = None) -> list[dict[str, Any]]:
    """The provenance of the model `load_hf(model_dir, dtype=dtype)` returns: the export's recorded
    records (if any), then the record of this load."""
    return [*recorded_provenance(model_dir), load_record(model_dir, dtype)]


def family_of(hf_config: dict[str, Any], *, source: str) -> Family:
    """The family of a config.json (our pruned exports name theirs in `base_model_type`)."""
    model_type = hf_config.get("model_type")
    if isinstance(model_type, str) and model_type.startswith("grape_pruned_"):
        model_type = hf_config.get("base_model_type")
    return get_family(model_type, source=source)


def normalise_index(index: tuple, shape: tuple[int, ...]) -> tuple[slice, ...]:
    """`index` as one contiguous slice per axis of `shape` (a strided read is refused)."""
    out = []
    for dim, s in zip(shape, tuple(index) + (slice(None),) * (len(shape) - len(index)), strict=True):
        start, stop, step = s.indices(dim)
        if step != 1:
            raise ConversionError(f"strided read {s} is not supported")
        out.append(slice(start, stop))
    return tuple(out)


def binding_reader(ckpt: CheckpointIndex, binding: Binding):
    """`read(index) -> np.ndarray` of our layout for one parameter, reading only that slice."""

    def open_key(key: str):
        return lambda idx: ckpt.read_slice(key, idx)

    def read(index: tuple) -> np.ndarray:
        return binding.read(open_key, normalise_index(index, binding.spec.shape))

    return read


def check_bindings(ckpt: CheckpointIndex, bindings: Mapping[str, Binding], model_dir: str) -> None:
    """Every HF tensor exists with the shape (and, for decoding transforms, the dtype) config.json
    implies (else a one-line error)."""
    for b in bindings.values():
        dtypes = b.transform.source_dtypes() if hasattr(b.transform, "source_dtypes") else None
        for i, (key, want) in enumerate(b.hf_sources().items()):
            if key not in ckpt:
                raise ConversionError(f"{model_dir}: tensor {key!r} is missing (needed for {b.name} by config.json)")
            info = ckpt.info(key)
            if tuple(info.shape) != tuple(want):
                raise ConversionError(
                    f"{info.file}: tensor {key!r} has shape {tuple(info.shape)}, but config.json implies {tuple(want)}"
                )
            allowed = None if dtypes is None else dtypes[i % len(dtypes)]
            if allowed is not None and numpy_to_dtype(info.dtype) not in allowed:
                raise ConversionError(
                    f"{info.file}: tensor {key!r} has dtype {numpy_to_dtype(info.dtype)}, but config.json's "
                    f"quantization_config implies one of {list(allowed)}"
                )
