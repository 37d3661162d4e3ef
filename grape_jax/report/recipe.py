"""What travels with every export: `recipe.json` (how the model was made) and a README model card.

Both are built from the model's own provenance (`ModelInfo.provenance`: where it was loaded from with
that source's fingerprint, and every plan applied with the statistics, data and model it was made
from), so an export made stage by stage and one made by `grape prune` carry the same recipe, and a
recipe cannot disagree with the fingerprints it was built from.
"""

from __future__ import annotations

import importlib.metadata
import platform
from collections.abc import Mapping
from typing import Any

from grape_jax.core.model import ModelInfo, MoEModel
from grape_jax.core.params import count_params

PACKAGES = ("grape-jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "transformers", "numpy", "torch")


UNHEALED_LEVERS = (
    "Likely levers: train longer (more --steps or --max-minutes) or with a lower --learning-rate "
    "(HealOptions(steps=..., max_minutes=..., learning_rate=...))."
)


class RecipeError(ValueError):
    """Provenance that does not hold together (a plan applied to another model than it was made for)."""


def package_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def check_provenance(records: list[Mapping[str, Any]]) -> None:
    """Every merge record's plan was made for the model the records before it describe."""
    for n, record in enumerate(records):
        if record.get("stage") != "merge":
            continue
        made_for = (record.get("plan") or {}).get("made_from", {}).get("model_fingerprint")
        before = ModelInfo.create(provenance=records[:n]).fingerprint
        if made_for and before and made_for != before:
            raise RecipeError(
                f"provenance record {n}: the plan applied here was made from model {made_for[:12]}, "
                f"but was applied to model {before[:12]}"
            )


def build_recipe(model: MoEModel) -> dict[str, Any]:
    """recipe.json of `model` (see module docstring)."""
    records = model.info.provenance
    check_provenance(records)
    load = next((r for r in records if r.get("stage") == "load"), {})
    merges = [r for r in records if r.get("stage") == "merge"]
    plan = merges[-1].get("plan", {}) if merges else {}
    made_from = plan.get("made_from", {})
    first_counts = list(model.cfg.num_experts)
    if merges:
        first_plan = merges[0].get("plan", {})
        before = {lp["layer"]: lp["num_experts_before"] for lp in first_plan.get("layers", [])}
        first_counts = [before.get(layer, e) for layer, e in enumerate(model.cfg.num_experts)]
    cfg_before = model.cfg.with_num_experts(tuple(first_counts))
    return {
        "source_model": {"path": load.get("source", model.info.source), "fingerprint": load.get("fingerprint")},
        "model_fingerprint": model.info.fingerprint,
        "method": plan.get("method"),
        "budget": plan.get("budget"),
        "operator": plan.get("operator"),
        "router_rule": plan.get("router_rule"),
        "options": plan.get("options", {}),
        "seed": plan.get("seed"),
        "num_experts_before": first_counts,
        "num_experts_after": list(model.cfg.num_experts),
        "params_before": count_params(cfg_before),
        "params_after": count_params(model.cfg),
        "calibration": {
            "data": made_from.get("data"),
            "run": made_from.get("calibration"),
            "stats_fingerprint": made_from.get("stats_fingerprint"),
            "model_fingerprint": made_from.get("model_fingerprint"),
        },
        "plan": plan,
        "merge_inputs": merges[-1].get("inputs") if merges else None,
        "healing": [{k: v for k, v in r.items() if k != "stage"} for r in records if r.get("stage") == "heal"],
        "provenance": records,
        "versions": package_versions(),
    }


def model_card(recipe: Mapping[str, Any], *, uniform: bool) -> str:
    """A short README.md for the exported directory."""
    before, after = recipe["num_experts_before"], recipe["num_experts_after"]
    rows = "\n".join(
        f"| {layer} | {b} | {a} | {b - a} |" for layer, (b, a) in enumerate(zip(before, after, strict=True)) if b > 0
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
        "`trust_remote_code=True` and works offline. The tokenizer loads without it."
    )
    data = (recipe.get("calibration") or {}).get("data") or {}
    files = ", ".join(f"`{f['path']}` (sha256 {f['sha256'][:12]})" for f in data.get("files", [])) or "unknown"
    source = recipe["source_model"]
    fingerprint = (source.get("fingerprint") or "unknown")[:16]
    stages = ", ".join(stages_done(recipe.get("provenance", [])))
    seed = "" if recipe.get("seed") is None else f", planner seed {recipe['seed']}"
    healing = "".join(f"\n{_healing_sentence(h)}\n" for h in recipe.get("healing") or [])
    return f"""# {source["path"]} pruned with grape-jax ({recipe["method"]})

Experts removed in total: **{sum(before) - sum(after)}** (budget {recipe["budget"]}), method
`{recipe["method"]}`, operator `{recipe["operator"]}`{seed}. Parameters: {pb:,} -> {pa:,}
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

## How it was made

Source model fingerprint `{fingerprint}`; calibration data {files}
({data.get("num_samples")} blocks of {data.get("seq_len")} tokens, seed {data.get("seed")}); stages: {stages}.
`recipe.json` records the plan (which original experts were merged or dropped in each layer), the
fingerprints of the source model, the statistics and the data, and the package versions.
{healing}"""


def stages_done(records: list[Mapping[str, Any]]) -> list[str]:
    """What was done to the model, in order, from its provenance: a merge record stands for the
    calibration its plan was made from, the planning, the fit (when its inputs were fitted) and the merge."""
    out = []
    for r in records:
        stage = str(r.get("stage", "?"))
        if stage != "merge":
            out.append(stage)
            continue
        made_from = (r.get("plan") or {}).get("made_from") or {}
        if made_from.get("stats_fingerprint"):
            out.append("calibrate")
        out.append("plan")
        if (r.get("inputs") or {}).get("operator") == "fit":
            out.append("fit")
        out.append("merge")
    return out


def _healing_sentence(h: Mapping[str, Any]) -> str:
    """One paragraph of the model card for one healing (distillation fine-tune) of the model."""
    data, held = h.get("data") or {}, h.get("heldout") or {}
    files = ", ".join(f"`{f['path']}`" for f in data.get("files", [])) or "token blocks"
    ppl = (
        f" Held-out perplexity {held['ppl_before']:.3f} before healing, {held['ppl_after']:.3f} after"
        + (f" (original model {held['ppl_teacher']:.3f})." if held.get("ppl_teacher") is not None else ".")
        if held.get("ppl_before") is not None and held.get("ppl_after") is not None
        else ""
    )
    if h.get("best_step") == 0:
        return (
            f"Healing after pruning kept the unhealed model: {h.get('steps')} steps of distillation from the "
            f"original model (`{(h.get('teacher') or {}).get('fingerprint', '')[:16]}`) on {data.get('num_blocks')} "
            f"blocks of {files} never validated better than step 0, the pruned model as it was. {UNHEALED_LEVERS}"
            f"{ppl}"
        )
    return (
        f"Healed after pruning: {h.get('steps')} steps of distillation from the original model "
        f"(`{(h.get('teacher') or {}).get('fingerprint', '')[:16]}`), training `{h.get('trained')}` "
        f"({h.get('trained_params', 0):,} parameters) on {data.get('num_blocks')} blocks of {data.get('seq_len')} "
        f"tokens of {files} (sha256 {str(data.get('blocks_sha256'))[:12]}); kept step {h.get('best_step')}, "
        f"training loss {_num(h.get('loss_first'))} -> {_num(h.get('loss_last'))}.{ppl}"
    )


def _num(x: Any) -> str:
    return "?" if x is None else f"{x:.4f}"
