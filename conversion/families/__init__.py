"""Registry of supported model families: `model_type` in config.json -> `Family`."""

from __future__ import annotations

from conversion.families import (
    deepseek_moe,
    deepseek_v2,
    deepseek_v3,
    ernie4_5_moe,
    glm4_moe,
    gpt_oss,
    llama4,
    minimax_m2,
    mixtral,
    olmoe,
    phimoe,
    qwen2_moe,
    qwen3_moe,
)
from conversion.families.base import ConversionError, Family

_FAMILIES: tuple[Family, ...] = (
    mixtral.FAMILY,
    qwen2_moe.FAMILY,
    qwen3_moe.FAMILY,
    olmoe.FAMILY,
    deepseek_moe.FAMILY,
    deepseek_v2.FAMILY,
    deepseek_v3.FAMILY,
    gpt_oss.FAMILY,
    glm4_moe.FAMILY,
    ernie4_5_moe.FAMILY,
    minimax_m2.FAMILY,
    phimoe.FAMILY,
    llama4.FAMILY,
    llama4.MULTIMODAL,
)

FAMILIES: dict[str, Family] = {t: f for f in _FAMILIES for t in f.model_types}


def get_family(model_type: str | None, *, source: str = "config.json") -> Family:
    """The family of an HF `model_type`, or an error that lists what is supported."""
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    supported = ", ".join(f"{t} ({FAMILIES[t].architectures[0]})" for t in sorted(FAMILIES))
    raise ConversionError(f"{source}: model_type {model_type!r} is not supported; supported: {supported}")


def family_by_name(name: str) -> Family:
    for f in _FAMILIES:
        if f.name == name:
            return f
    raise ConversionError(f"family {name!r} unknown; known: {[f.name for f in _FAMILIES]}")


def export_family(family: Family) -> Family:
    """The family an export of `family` is written as (itself, or its `export_as`)."""
    return family if family.export_as is None else family_by_name(family.export_as)
