"""What travels with every export: `recipe.json` (how it was made) and a README model card."""

from __future__ import annotations

import importlib.metadata
import json
import platform
from collections.abc import Mapping
from typing import Any

from grape_jax.config import MoEConfig
from grape_jax.params import count_params, param_specs

PACKAGES = ("grape-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "numpy", "torch")


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def expert_param_count(cfg: MoEConfig) -> int:
    """Parameters that scale with the number of routed experts (experts, router columns, biases)."""
    total = 0
    for spec in param_specs(cfg).values():
        if spec.expert_axis is not None:
            n = 1
            for s in spec.shape:
                n *= s
            total += n
    return total


def build_recipe(
    *,
    plan: Mapping[str, Any],
    before: MoEConfig,
    after: MoEConfig,
    source: str,
    stats_meta: Mapping[str, Any] | None = None,
    calibration: Mapping[str, Any] | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    return {
        "source_model": source,
        "method": plan.get("method"),
        "budget": plan.get("budget"),
        "seed": seed if seed is not None else plan.get("seed"),
        "num_experts_before": list(before.num_experts),
        "num_experts_after": list(after.num_experts),
        "params_before": count_params(before),
        "params_after": count_params(after),
        "calibration": dict(calibration or {}),
        "stats": dict(stats_meta or {}),
        "plan": dict(plan),
        "versions": package_versions(),
    }


def model_card(recipe: Mapping[str, Any], *, uniform: bool) -> str:
    """A short README.md for the exported directory."""
    before, after = recipe["num_experts_before"], recipe["num_experts_after"]
    rows = "\n".join(
        f"| {layer} | {b} | {a} | {b - a} |"
        for layer, (b, a) in enumerate(zip(before, after, strict=True))
        if b > 0
    )
    pb, pa = recipe["params_before"], recipe["params_after"]
    load = (
        'model = AutoModelForCausalLM.from_pretrained("PATH")'
        if uniform
        else 'model = AutoModelForCausalLM.from_pretrained("PATH", trust_remote_code=True)'
    )
    note = (
        "Every MoE layer keeps the same number of experts, so the stock transformers class loads it."
        if uniform
        else "Layers keep different numbers of experts (`num_experts_per_layer` in config.json); the "
        "small modeling file shipped here (registered through `auto_map`) reuses the stock "
        "transformers classes and only sets each layer's expert count, so loading needs "
        "`trust_remote_code=True` and works offline."
    )
    return f"""# {recipe['source_model']} pruned with grape-jax ({recipe['method']})

Experts removed in total: **{sum(before) - sum(after)}** (budget {recipe['budget']}), method
`{recipe['method']}`, seed {recipe['seed']}. Parameters: {pb:,} -> {pa:,}
({100.0 * (pb - pa) / pb:.1f}% fewer).

| layer | experts before | after | removed |
|---|---|---|---|
{rows}

## Loading

```python
from transformers import AutoModelForCausalLM
{load}
```

{note}

`recipe.json` records the plan (which original experts were merged or dropped in each layer), the
calibration data specification, statistics summary and package versions.
"""


def dumps(recipe: Mapping[str, Any]) -> str:
    return json.dumps(recipe, indent=1, sort_keys=True, default=str)
