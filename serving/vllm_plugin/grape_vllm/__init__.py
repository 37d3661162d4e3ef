"""grape_vllm: a vLLM plugin that serves grape-jax exports whose MoE layers keep different expert counts.

Installed into a vLLM environment, it is found through the `vllm.general_plugins` entry point, and
`register()` (run by vLLM in every process it starts) registers one model class per served family
under grape's architecture names (`PrunedMixtralForCausalLM`, ...), plus a config check that runs
before the engine starts, so a bad export or an unsupported setting fails with one line.
"""

from __future__ import annotations

from grape_vllm.families import REFUSED, SERVED, GrapeServeError, ServedFamily, is_uniform, layer_counts

__all__ = ["SERVED", "REFUSED", "GrapeServeError", "register", "check_config"]
__version__ = "0.1.0"


def check_config(vllm_config: object, family: ServedFamily) -> None:
    """Front-end check of a grape export against vLLM's settings (raises `GrapeServeError`)."""
    from grape_vllm.models import stock_class  # noqa: PLC0415 - imports vLLM
    from grape_vllm.per_layer import check_parallel  # noqa: PLC0415 - imports torch

    stock_class(family)
    counts = layer_counts(vllm_config.model_config.hf_config, family)
    if not is_uniform(counts):
        check_parallel(vllm_config, counts, family)


def _verifier(family: ServedFamily, base: type) -> type:
    """A `VerifyAndUpdateConfig` for `family` that runs grape's checks, then the stock class's own."""

    def verify_and_update_config(vllm_config: object) -> None:
        check_config(vllm_config, family)
        base.verify_and_update_config(vllm_config)

    return type(
        f"{family.architecture}Config",
        (base,),
        {"verify_and_update_config": staticmethod(verify_and_update_config)},
    )


def register() -> None:
    """Register grape's architectures with vLLM (idempotent; vLLM may call it in several processes)."""
    from vllm.model_executor.models import ModelRegistry  # noqa: PLC0415 - the plugin is loaded by vLLM
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP, VerifyAndUpdateConfig  # noqa: PLC0415

    for architecture, family in SERVED.items():
        ModelRegistry.register_model(architecture, f"grape_vllm.models:{architecture}")
        base = MODELS_CONFIG_MAP.get(family.vllm_architecture, VerifyAndUpdateConfig)
        MODELS_CONFIG_MAP[architecture] = _verifier(family, base)
