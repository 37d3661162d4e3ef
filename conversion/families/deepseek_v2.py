"""DeepSeek-V2 (`DeepseekV2ForCausalLM`, transformers-native; V2, V2-Lite, V2.5 configs): multi-head
latent attention exactly as DeepSeek-V3 (`grape_jax.core.mla`, `q_lora_rank: null` for V2-Lite) with
interleaved RoPE pairs (transformers rotates complex pairs (x0, x1), (x2, x3), ...; YaRN scales the
cos/sin by its attention factor and the softmax scale by mscale(mscale_all_dim)^2); softmax router
scores (no score-correction bias) with `topk_method` 'greedy' (plain top-k) or
'group_limited_greedy' (top-k within the best `topk_group` of `n_group` groups, group score = the
group's max score), weights times `routed_scaling_factor`; transformers' V2 never renormalises the
top-k weights, whatever `norm_topk_prob` says, so neither do we. Layers before
`first_k_dense_replace` are dense (`intermediate_size`); every later layer is MoE (transformers
ignores `moe_layer_freq`, so a value other than 1 is refused). `n_shared_experts` shared experts are
one MLP `n_shared_experts * moe_intermediate_size` wide.

On disk (`save_pretrained`): per-expert keys `mlp.experts.{e}.{gate,up,down}_proj.weight` (transformers
fuses them on load), `mlp.gate.weight`, `mlp.shared_experts.*` — the same layout as DeepSeek-V3 less
`e_score_correction_bias`.

Planners keep every MoE layer's expert count a multiple of `n_group` under group-limited routing
(`MoEConfig.expert_count_multiple`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from conversion.families.base import TRANSPOSE, ConversionError, Family, KeyRule, require
from conversion.families.common import (
    expert_counts,
    llama_fields,
    per_layer_mlp_rules,
    swiglu_rules,
    top_rules,
    update_counts,
)
from conversion.families.deepseek_v3 import mla_rules
from conversion.families.hf_rope import rope_params
from grape_jax.core.config import MoEConfig
from grape_jax.core.rope import yarn_mscale

TOPK_METHODS = ("greedy", "group_limited_greedy")


def _groups(hf: Mapping[str, Any]) -> tuple[int, int]:
    method = hf.get("topk_method") or "greedy"
    if method not in TOPK_METHODS:
        raise ConversionError(
            f"config.json: topk_method={method!r} is not supported (supported: {', '.join(TOPK_METHODS)})"
        )
    if method == "greedy":
        return 1, 1
    n_group, topk_group = int(require(hf, "n_group")), int(require(hf, "topk_group"))
    if not 1 <= topk_group <= n_group:
        raise ConversionError(f"config.json: topk_group={topk_group} must lie in [1, n_group={n_group}]")
    return n_group, topk_group


def config_from_hf(hf: Mapping[str, Any]) -> MoEConfig:
    if hf.get("scoring_func", "softmax") != "softmax":
        raise ConversionError(f"config.json: scoring_func={hf['scoring_func']!r} is not supported (only 'softmax')")
    if int(hf.get("moe_layer_freq") or 1) != 1:
        raise ConversionError(
            f"config.json: moe_layer_freq={hf['moe_layer_freq']!r} is not supported (transformers' "
            "DeepSeek-V2 makes every layer from first_k_dense_replace on an MoE layer)"
        )
    if hf.get("mlp_bias"):
        raise ConversionError("config.json: mlp_bias=true is not supported")
    n_group, topk_group = _groups(hf)
    rot, nope = int(require(hf, "qk_rope_head_dim")), int(require(hf, "qk_nope_head_dim"))
    base = llama_fields(hf, eps=1e-6)
    base["head_dim"] = nope + rot  # RoPE (and YaRN) runs over the qk_rope_head_dim part only
    base["num_kv_heads"] = base["num_heads"]  # MLA expands keys/values to every head
    scale = (nope + rot) ** -0.5
    params = rope_params(hf)
    if base.get("rope_type") == "yarn" and params.get("mscale_all_dim"):
        scale *= yarn_mscale(base["rope_factor"], params["mscale_all_dim"]) ** 2
    count, first_dense = int(require(hf, "n_routed_experts")), int(hf.get("first_k_dense_replace") or 0)
    moe_f = int(require(hf, "moe_intermediate_size"))
    return MoEConfig(
        family="deepseek_v2",
        **base,
        moe_intermediate_size=moe_f,
        num_experts=expert_counts(hf, base["num_layers"], lambda layer: layer >= first_dense, count),
        dense_intermediate_size=int(hf.get("intermediate_size") or 0),
        router="softmax_group_topk",
        norm_topk_prob=False,  # transformers' DeepseekV2TopkRouter ignores norm_topk_prob
        routed_scaling_factor=float(hf.get("routed_scaling_factor", 1.0)),
        n_group=n_group,
        topk_group=topk_group,
        shared_expert_intermediate_size=int(hf.get("n_shared_experts") or 0) * moe_f,
        attention_bias=bool(hf.get("attention_bias", False)),
        attention_scale=scale,
        attention="mla",
        q_lora_rank=int(hf.get("q_lora_rank") or 0),
        kv_lora_rank=int(require(hf, "kv_lora_rank")),
        qk_nope_head_dim=nope,
        qk_rope_head_dim=rot,
        v_head_dim=int(require(hf, "v_head_dim")),
        rope_interleave=True,
    )


def config_to_hf(cfg: MoEConfig, base: Mapping[str, Any]) -> dict[str, Any]:
    return update_counts(cfg, base, "n_routed_experts")


def rules(cfg: MoEConfig) -> list[KeyRule]:
    def moe_rules(ours: str, hf: str) -> list[KeyRule]:
        out = [KeyRule(ours + "router", hf + "gate.weight", TRANSPOSE), *swiglu_rules(ours, hf + "experts.{e}.")]
        if cfg.shared_expert_intermediate_size:
            out += swiglu_rules(ours + "shared.", hf + "shared_experts.")
        return out

    return [*top_rules(), *mla_rules(cfg), *per_layer_mlp_rules(cfg, moe_rules)]


FAMILY = Family(
    name="deepseek_v2",
    model_types=("deepseek_v2",),
    architectures=("DeepseekV2ForCausalLM",),
    config_from_hf=config_from_hf,
    config_to_hf=config_to_hf,
    rules=rules,
    experts_config_key="n_routed_experts",
    # only V2's group-limited softmax routing constrains counts (other families' configs give 1)
    routing="softmax, top-k (group-limited greedy when set), x routed_scaling_factor; + shared experts",
)
