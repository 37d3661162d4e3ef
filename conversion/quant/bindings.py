"""The bindings a checkpoint is read through: the family's table with the checkpoint's quantisation
applied (FP8 block scales where the checkpoint stores them; MXFP4 tables come from the family)."""

from __future__ import annotations

from collections.abc import Container, Mapping
from typing import Any

from conversion.families.base import Binding, Family, bind, quant_method
from conversion.quant.fp8 import fp8_bindings
from grape_jax.core.config import MoEConfig


def read_bindings(
    family: Family, cfg: MoEConfig, hf_config: Mapping[str, Any], stored: Container[str] | None
) -> dict[str, Binding]:
    """Every parameter of `cfg` bound to the checkpoint's stored tensors (`stored`: their names, which an
    FP8 checkpoint needs to see which weights carry scales)."""
    bindings = bind(family, cfg, hf_config=hf_config)
    if quant_method(hf_config) == "fp8":
        return fp8_bindings(bindings, hf_config["quantization_config"], stored)
    return bindings
