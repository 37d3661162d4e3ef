"""vLLM model classes for grape exports with per-layer expert counts, built on first use.

`ModelRegistry` imports `grape_vllm.models:<architecture>` lazily; this module's `__getattr__` then
subclasses vLLM's own class for the family (found through vLLM's registry, so the installed version's
class is used) with a constructor that builds layer i with `num_experts_per_layer[i]` experts.
Everything else (attention, routing, weight loading, kernels) is vLLM's.
"""

from __future__ import annotations

import contextlib
import functools

import torch

from grape_vllm.families import SERVED, GrapeServeError, ServedFamily, layer_counts
from grape_vllm.per_layer import check_built, check_parallel, per_layer_counts


def stock_class(family: ServedFamily) -> type[torch.nn.Module]:
    """vLLM's own model class for `family`, or a one-line error when this vLLM lacks it."""
    from vllm import __version__  # noqa: PLC0415 - vLLM is imported only when a model is built
    from vllm.model_executor.models import ModelRegistry  # noqa: PLC0415

    if family.vllm_architecture not in ModelRegistry.get_supported_archs():
        raise GrapeServeError(
            f"{family.architecture}: vLLM {__version__} has no {family.vllm_architecture}, so grape_vllm cannot "
            f"serve {family.base_model_type} exports with it"
        )
    return ModelRegistry.models[family.vllm_architecture].load_model_cls()


@functools.cache
def pruned_class(architecture: str) -> type[torch.nn.Module]:
    """The plugin's class for a grape architecture name (`PrunedMixtralForCausalLM`, ...)."""
    family = SERVED[architecture]
    stock = stock_class(family)

    def __init__(self: torch.nn.Module, *, vllm_config: object, prefix: str = "") -> None:
        model_config = vllm_config.model_config
        counts = layer_counts(model_config.hf_config, family)
        check_parallel(vllm_config, counts, family)
        # layers read either the HF config or vLLM's text view of it (a separate object for some families)
        configs = {id(c): c for c in (model_config.hf_config, model_config.hf_text_config)}
        with contextlib.ExitStack() as stack:
            for config in configs.values():
                stack.enter_context(per_layer_counts(config, family.count_field, counts))
            stock.__init__(self, vllm_config=vllm_config, prefix=prefix)
        check_built(self, counts, family)

    doc = f"vLLM's {stock.__name__} with `num_experts_per_layer[i]` experts in decoder layer i (grape export)."
    return type(architecture, (stock,), {"__init__": __init__, "__doc__": doc, "__module__": __name__})


def __getattr__(name: str) -> type[torch.nn.Module]:
    if name in SERVED:
        return pruned_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
