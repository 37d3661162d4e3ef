"""Per-layer expert counts for vLLM's own MoE model classes (no vLLM source is copied).

vLLM's MoE model files build every decoder layer from one shared HF config and read the family's
expert-count field (`num_local_experts`, `num_experts`, `n_routed_experts`, ...) while building each
layer's router and `FusedMoE`; each layer's weights are then loaded per expert. A pruned model only
needs that read to answer `num_experts_per_layer[i]` inside layer i. `per_layer_counts` does that for
the duration of the stock constructor: the config's class is swapped for a subclass in which the
count field is a property, and the property finds the layer under construction from the `prefix`
argument that vLLM passes to every module it builds (`model.layers.<i>` or below). Anywhere else
(model-level code, weight-name mappings) it answers the largest count, the value in config.json, so
expert-name mappings cover every kept expert. The constructed model is checked against the counts
afterwards (`check_built`), so a vLLM version whose layers are built differently fails loudly.
"""

from __future__ import annotations

import contextlib
import re
import sys
from collections.abc import Iterator

import torch

from grape_vllm.families import GrapeServeError, ServedFamily

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.|$)")
# Expert tensors of vLLM's FusedMoE, first dimension = the layer's (local) expert count.
_EXPERT_PARAM = re.compile(r"(?:^|\.)layers\.(\d+)\..*\.(w13_weight|w2_weight)$")


def layer_under_construction(max_depth: int = 64) -> int | None:
    """Index of the decoder layer whose modules are being built, or None outside a decoder layer.

    Read from the nearest calling frame that has a string `prefix` local (every vLLM module's
    constructor takes one): `...layers.<i>...` -> i; any other prefix (the model, the LM head) -> None.
    """
    frame = sys._getframe(2)
    for _ in range(max_depth):
        if frame is None:
            return None
        prefix = frame.f_locals.get("prefix")
        if isinstance(prefix, str):
            match = _LAYER.search(prefix)
            return int(match.group(1)) if match else None
        frame = frame.f_back
    return None


@contextlib.contextmanager
def per_layer_counts(config: object, field: str, counts: list[int]) -> Iterator[None]:
    """While active, `config.<field>` reads `counts[i]` inside decoder layer i's construction (dense
    layers, count 0, and everything outside layers read the config's own value)."""
    stock_cls = type(config)
    # transformers configs may store the count under another name and alias the family's usual one
    # (Qwen3-MoE: `num_experts` -> `num_local_experts` in some versions): the stored name is the one to wrap
    field = getattr(stock_cls, "attribute_map", {}).get(field, field)
    full = getattr(config, field)

    def get(self: object) -> int:
        layer = layer_under_construction()
        if layer is not None and 0 <= layer < len(counts) and counts[layer] > 0:
            return counts[layer]
        return full

    def refuse(self: object, value: object) -> None:
        raise GrapeServeError(f"{field} is fixed per layer by num_experts_per_layer while the model is built")

    view = type(stock_cls.__name__, (stock_cls,), {field: property(get, refuse), "__module__": stock_cls.__module__})
    object.__setattr__(config, "__class__", view)
    try:
        yield
    finally:
        object.__setattr__(config, "__class__", stock_cls)


def check_parallel(vllm_config: object, counts: list[int], family: ServedFamily) -> None:
    """Refuse expert parallelism and EPLB: both shard or rebalance one expert count shared by all layers."""
    parallel = vllm_config.parallel_config
    if getattr(parallel, "enable_eplb", False):
        raise GrapeServeError(
            f"{family.architecture}: EPLB (enable_eplb) needs one expert count in every layer; this export keeps "
            f"{counts} (serve without --enable-eplb)"
        )
    if getattr(parallel, "enable_expert_parallel", False):
        raise GrapeServeError(
            f"{family.architecture}: expert parallelism needs one expert count in every layer; this export keeps "
            f"{counts} (serve with tensor parallelism instead of --enable-expert-parallel)"
        )


def built_counts(model: torch.nn.Module) -> dict[int, int]:
    """Layer index -> number of experts in that layer's FusedMoE weights, as constructed."""
    found: dict[int, int] = {}
    for name, param in model.named_parameters():
        match = _EXPERT_PARAM.search(name)
        if match:
            found[int(match.group(1))] = int(param.shape[0])
    return found


def check_built(model: torch.nn.Module, counts: list[int], family: ServedFamily) -> None:
    """The constructed model has `counts[i]` experts in every MoE layer i it holds (pipeline stages hold some)."""
    built = built_counts(model)
    held = {int(m.group(1)) for name, _ in model.named_parameters() if (m := _LAYER.search(name))}
    wrong = {layer: n for layer, n in built.items() if layer >= len(counts) or counts[layer] != n}
    wrong.update({layer: 0 for layer in held - set(built) if layer < len(counts) and counts[layer] > 0})
    if wrong:
        raise GrapeServeError(
            f"{family.architecture}: vLLM built {wrong} (layer: experts) but num_experts_per_layer is {counts}; "
            f"this vLLM version builds its layers in a way grape_vllm does not know"
        )
