"""Converted models as Orbax checkpoints: `CKPT/state` (Orbax) + `CKPT/grape.json` (config, family).

Restore builds `ShapeDtypeStruct(shape, dtype, sharding=...)` for every leaf from the parameter table
and the target mesh, so Orbax places each shard directly on its device; nothing is gathered on a host.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh

from conversion.atomic import atomic_output_dir
from conversion.families import family_by_name
from conversion.families.base import ConversionError, Family
from grape_jax.config import MoEConfig
from grape_jax.params import param_specs
from grape_jax.sharding import DEFAULT_RULES, ShardingRules, param_shardings

META_FILE = "grape.json"
STATE_DIR = "state"
FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A restored checkpoint: config, flat parameters, family, and the HF config it came from."""

    cfg: MoEConfig
    params: dict[str, jax.Array]
    family: Family
    hf_config: dict[str, Any]
    source_dir: str | None
    extra: dict[str, Any]


def save_checkpoint(
    path: str | os.PathLike,
    params: Mapping[str, jax.Array],
    cfg: MoEConfig,
    family: Family,
    *,
    hf_config: Mapping[str, Any],
    source_dir: str | None = None,
    extra: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> str:
    """Write params + metadata; the directory appears only once complete."""
    missing = sorted(set(param_specs(cfg)) ^ set(params))
    if missing:
        raise ConversionError(f"save_checkpoint: parameters do not match the config: {missing[:5]}")
    path = os.path.abspath(os.fspath(path))
    meta = {
        "format_version": FORMAT_VERSION,
        "family": family.name,
        "config": cfg.to_dict(),
        "hf_config": dict(hf_config),
        "source_dir": None if source_dir is None else os.path.abspath(source_dir),
        "dtypes": {k: str(np.dtype(v.dtype)) for k, v in params.items()},
        "extra": dict(extra or {}),
    }
    with atomic_output_dir(path, overwrite=overwrite) as tmp:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, STATE_DIR), dict(params))
        with open(os.path.join(tmp, META_FILE), "w") as f:
            json.dump(meta, f, indent=1)
    return path


def read_checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        raise ConversionError(f"{meta_path}: missing; {path} is not a grape-jax checkpoint")
    with open(meta_path) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConversionError(
            f"{meta_path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    return meta


def restore_checkpoint(
    path: str | os.PathLike, *, mesh: Mesh | None = None, rules: ShardingRules = DEFAULT_RULES
) -> Checkpoint:
    """Restore with every leaf placed directly on its target sharding (single device if no mesh)."""
    path = os.path.abspath(os.fspath(path))
    meta = read_checkpoint_meta(path)
    cfg = MoEConfig.from_dict(meta["config"])
    specs = param_specs(cfg)
    shardings = param_shardings(specs, mesh, rules)
    abstract = {
        n: jax.ShapeDtypeStruct(s.shape, np.dtype(meta["dtypes"][n]), sharding=shardings[n])
        for n, s in specs.items()
    }
    with ocp.StandardCheckpointer() as ckptr:
        params = ckptr.restore(os.path.join(path, STATE_DIR), abstract)
    return Checkpoint(
        cfg=cfg,
        params=dict(params),
        family=family_by_name(meta["family"]),
        hf_config=meta["hf_config"],
        source_dir=meta.get("source_dir"),
        extra=meta.get("extra", {}),
    )
