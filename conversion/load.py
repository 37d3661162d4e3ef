"""Hugging Face directory -> sharded parameters, streamed tensor by tensor and slice by slice.

Every leaf is assembled from the slices this process's devices own (`_make_leaf`, the shape of
`jax.make_array_from_callback` with replicas read once), and `read` pulls exactly those bytes from the safetensors files
(per-expert HF tensors are read one expert at a time and stacked only for the requested slice). The
whole model is never held on the host; on several hosts each reads only its own shards.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from conversion.families import get_family
from conversion.families.base import Binding, ConversionError, Family, bind
from conversion.safetensors_io import CheckpointIndex
from grape_jax.config import MoEConfig
from grape_jax.params import param_specs
from grape_jax.sharding import DEFAULT_RULES, ShardingRules, param_shardings


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """What `load_hf` returns: config, flat sharded parameters, family and the raw HF config."""

    cfg: MoEConfig
    params: dict[str, jax.Array]
    family: Family
    hf_config: dict[str, Any]
    source_dir: str


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


def _normalise(index: tuple, shape: tuple[int, ...]) -> tuple[slice, ...]:
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
        return binding.read(open_key, _normalise(index, binding.spec.shape))

    return read


def check_bindings(ckpt: CheckpointIndex, bindings: Mapping[str, Binding], model_dir: str) -> None:
    """Every HF tensor exists with the shape config.json implies (else a one-line error)."""
    for b in bindings.values():
        for key, want in b.hf_sources().items():
            if key not in ckpt:
                raise ConversionError(
                    f"{model_dir}: tensor {key!r} is missing (needed for {b.name} by config.json)"
                )
            info = ckpt.info(key)
            if tuple(info.shape) != tuple(want):
                raise ConversionError(
                    f"{info.file}: tensor {key!r} has shape {tuple(info.shape)}, but config.json "
                    f"implies {tuple(want)}"
                )


def _make_leaf(shape: tuple[int, ...], sharding, callback) -> jax.Array:
    """Like `jax.make_array_from_callback`, but each distinct shard is read once (replicas share the
    host copy) and host copies are dropped as soon as the leaf is assembled. Only this process's
    devices are visited, so on several hosts each reads only its own slices."""
    cache, arrays = {}, []
    for device, index in sharding.addressable_devices_indices_map(shape).items():
        key = tuple(s.indices(d)[:2] for s, d in zip(index, shape, strict=True))
        if key not in cache:
            cache[key] = callback(index)
        arrays.append(jax.device_put(cache[key], device))
    return jax.make_array_from_single_device_arrays(shape, sharding, arrays)


def load_hf(
    model_dir: str | os.PathLike,
    *,
    mesh: Mesh | None = None,
    rules: ShardingRules = DEFAULT_RULES,
    dtype: Any = None,
) -> LoadedModel:
    """Convert an HF MoE checkpoint into flat sharded parameters (see module docstring).

    dtype None keeps each tensor's stored dtype (bit-identical round trips); otherwise leaves are cast.
    """
    model_dir = os.fspath(model_dir)
    hf = read_hf_config(model_dir)
    model_type = hf.get("model_type")
    if isinstance(model_type, str) and model_type.startswith("grape_pruned_"):
        model_type = hf.get("base_model_type")  # our own export with per-layer expert counts
    family = get_family(model_type, source=os.path.join(model_dir, "config.json"))
    cfg = family.config_from_hf(hf)
    ckpt = CheckpointIndex.open(model_dir)
    bindings = bind(family, cfg, hf_config=hf)
    check_bindings(ckpt, bindings, model_dir)
    specs = param_specs(cfg)
    shardings = param_shardings(specs, mesh, rules)
    params = {}
    for name, b in bindings.items():
        stored = b.value_dtype(ckpt.info(next(iter(b.hf_sources()))).dtype)
        target = stored if dtype is None else np.dtype(dtype)
        read = binding_reader(ckpt, b)

        def callback(index, read=read, target=target):
            return read(index).astype(target, copy=False)

        params[name] = _make_leaf(b.spec.shape, shardings[name], callback)
    return LoadedModel(cfg=cfg, params=params, family=family, hf_config=hf, source_dir=model_dir)

