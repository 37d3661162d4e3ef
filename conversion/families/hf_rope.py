"""Rotary-embedding fields of HF configs -> MoEConfig: `rope_parameters` (transformers 5) or the older
`rope_scaling`/`rope_theta`, default RoPE, YaRN, Phi-3.5-MoE's LongRoPE and partial rotary dims."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from conversion.families.base import ConversionError, require
from grape_jax.core.rope import yarn_mscale


def rope_params(hf: Mapping[str, Any]) -> dict[str, Any]:
    """`rope_parameters` (transformers 5) or `rope_scaling` (older configs), with `rope_theta`."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def rope_theta(hf: Mapping[str, Any], default: float = 10000.0) -> float:
    """`rope_theta` lives in `rope_parameters` in transformers 5 configs, at top level before."""
    params = rope_params(hf)
    if params["rope_type"] not in ("default", None):
        raise ConversionError(f"config.json: rope_type {params['rope_type']!r} is not supported yet (only 'default')")
    return float(params.get("rope_theta", hf.get("rope_theta", default)))


def rope_fields(hf: Mapping[str, Any], default_theta: float = 10000.0, *, longrope: bool = False) -> dict[str, Any]:
    """MoEConfig rope fields for default RoPE or YaRN (as `transformers.modeling_rope_utils`), and with
    `longrope` Phi-3.5-MoE's LongRoPE (short factors at every length, short/long mscale)."""
    params = rope_params(hf)
    theta = float(params.get("rope_theta", hf.get("rope_theta", default_theta)))
    kind = params["rope_type"] or "default"
    if kind == "default":
        return {"rope_theta": theta}
    if kind == "longrope" and longrope:
        return {
            "rope_theta": theta,
            "rope_type": "longrope",
            "rope_ext_factors": tuple(float(f) for f in require(params, "short_factor")),
            "rope_attention_factor": float(require(params, "short_mscale")),
            "rope_long_mscale": float(require(params, "long_mscale")),
            "rope_original_max_position": int(require(params, "original_max_position_embeddings")),
        }
    if kind == "llama3":
        return {
            "rope_theta": theta,
            "rope_type": "llama3",
            "rope_factor": float(require(params, "factor")),
            "rope_original_max_position": int(require(params, "original_max_position_embeddings")),
            "rope_low_freq_factor": float(require(params, "low_freq_factor")),
            "rope_high_freq_factor": float(require(params, "high_freq_factor")),
        }
    if kind != "yarn":
        supported = "default, yarn, llama3" + (", longrope" if longrope else "")
        raise ConversionError(f"config.json: rope_type {kind!r} is not supported (supported: {supported})")
    original = int(require(params, "original_max_position_embeddings"))
    factor = params.get("factor")
    factor = float(hf["max_position_embeddings"] / original if factor is None else factor)
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
        attention_factor = (
            yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
            if mscale and mscale_all
            else yarn_mscale(factor)
        )
    return {
        "rope_theta": theta,
        "rope_type": "yarn",
        "rope_factor": factor,
        "rope_original_max_position": original,
        "rope_beta_fast": float(params.get("beta_fast") or 32),
        "rope_beta_slow": float(params.get("beta_slow") or 1),
        "rope_truncate": bool(params.get("truncate", True)),
        "rope_attention_factor": float(attention_factor),
    }


def partial_rotary_dim(hf: Mapping[str, Any], head_dim: int, *, default_factor: float = 1.0) -> int:
    """`rotary_dim` for MoEConfig: `int(head_dim * partial_rotary_factor)` (transformers reads the factor
    from `rope_parameters`, then the top level, then the family's default), 0 when the whole head rotates."""
    factor = rope_params(hf).get("partial_rotary_factor", hf.get("partial_rotary_factor", default_factor))
    dim = int(head_dim * float(factor))
    if dim <= 0 or dim > head_dim or dim % 2:
        raise ConversionError(
            f"config.json: partial_rotary_factor={factor} gives {dim} rotary dims of head_dim="
            f"{head_dim}; expected an even count in (0, head_dim]"
        )
    return 0 if dim == head_dim else dim
