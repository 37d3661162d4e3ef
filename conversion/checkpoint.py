"""Models as Orbax checkpoints: `CKPT/state` (the model's `nnx.State`, Orbax) + `CKPT/grape.json`
(config, family, source config.json, provenance, leaf dtypes).

Restore builds the abstract model (`nnx.eval_shape`) on the target run context, so Orbax places each
shard directly on its device from the parameters' logical axes; nothing is gathered on a host.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from conversion.families.base import ConversionError
from grape_jax.base import jsonio
from grape_jax.base.atomic import atomic_output_dir
from grape_jax.core.config import ConfigError, MoEConfig
from grape_jax.core.model import ModelInfo, MoEModel, abstract_model, param_view
from grape_jax.core.sharding import DEFAULT_RULES, RunContext, ShardingRules

META_FILE = "grape.json"
STATE_DIR = "state"
FORMAT_VERSION = 2


def save_checkpoint(path: str | os.PathLike, model: MoEModel, *, overwrite: bool = False) -> str:
    """Write the model's state and metadata; the directory appears only once complete."""
    path = os.path.abspath(os.fspath(path))
    info = model.info
    meta = {
        "format_version": FORMAT_VERSION,
        "config": model.cfg.to_dict(),
        "family": info.family,
        "source": info.source,
        "hf_config": info.hf_config,
        "provenance": info.provenance,
        "dtypes": {k: str(np.dtype(v.dtype)) for k, v in param_view(model).items()},
    }
    with atomic_output_dir(path, overwrite=overwrite) as tmp:
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(os.path.join(tmp, STATE_DIR), nnx.state(model, nnx.Param))
        with open(os.path.join(tmp, META_FILE), "w") as f:
            f.write(jsonio.dumps(meta, indent=1, sort_keys=True))
    return path


def read_checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a grape-jax checkpoint directory (one-line errors for anything else)."""
    meta_path = os.path.join(path, META_FILE)
    if not os.path.isfile(meta_path):
        raise ConversionError(f"{meta_path}: missing; {path} is not a grape-jax checkpoint")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ConversionError(f"{meta_path}: not readable JSON ({e})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise ConversionError(
            f"{meta_path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION} "
            f"(convert the HF model again with this version of grape-jax)"
        )
    return meta


def checkpoint_config(path: str | os.PathLike) -> MoEConfig:
    """The config of a checkpoint, from its metadata alone (no arrays read)."""
    meta = read_checkpoint_meta(path)
    try:
        return MoEConfig.from_dict(meta["config"])
    except (ConfigError, KeyError, TypeError) as e:
        raise ConversionError(f"{os.path.join(path, META_FILE)}: field 'config' is not valid ({e})") from None


def restore_checkpoint(
    path: str | os.PathLike, *, mesh: Mesh | None = None, rules: ShardingRules = DEFAULT_RULES
) -> MoEModel:
    """The saved model with every leaf placed directly on its sharding in `RunContext(mesh, rules)`."""
    path = os.path.abspath(os.fspath(path))
    meta = read_checkpoint_meta(path)
    cfg = checkpoint_config(path)
    ctx = RunContext(mesh, rules)
    info = ModelInfo.create(
        family=meta.get("family", ""),
        source=meta.get("source", ""),
        hf_config=meta.get("hf_config"),
        provenance=meta.get("provenance"),
    )
    graphdef, abstract = nnx.split(abstract_model(cfg, ctx=ctx, info=info))
    dtypes = meta.get("dtypes", {})
    target = []
    for key, var in nnx.to_flat_state(abstract):
        name = ".".join(str(k) for k in key)
        if name not in dtypes:
            raise ConversionError(f"{os.path.join(path, META_FILE)}: field 'dtypes' has no entry for {name}")
        spec = var.get_value()
        sharding = ctx.sharding(spec.shape, var.get_metadata()["out_sharding"])
        target.append((key, var.replace(jax.ShapeDtypeStruct(spec.shape, np.dtype(dtypes[name]), sharding=sharding))))
    with ocp.StandardCheckpointer() as ckptr:
        state = ckptr.restore(os.path.join(path, STATE_DIR), nnx.from_flat_state(target))
    return nnx.merge(graphdef, state)
