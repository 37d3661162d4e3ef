"""The family-neutral model description every part of grape-jax works from.

`MoEConfig` is frozen and hashable, so it can be a static argument of jitted functions. Per-layer expert
counts are a tuple because pruned models keep different numbers of experts in different layers; a count
of 0 marks a dense (non-MoE) layer.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

from grape_jax.base import jsonio

ROUTERS = (
    "softmax_topk",
    "topk_softmax",
    "sigmoid_group_topk",
    "softmax_group_topk",
    "softmax_bias_topk",
    "sparsemixer",
    "topk_sigmoid",
)
GROUP_ROUTERS = ("sigmoid_group_topk", "softmax_group_topk")
SCORE_BIAS_ROUTERS = ("sigmoid_group_topk", "softmax_bias_topk")  # a per-expert selection bias
ACTIVATIONS = ("silu", "gptoss_clamped_swiglu")
ATTENTIONS = ("gqa", "mla")
ROPE_TYPES = ("default", "yarn", "longrope", "llama3")
NORMS = ("rms", "layer")
LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")


class ConfigError(ValueError):
    """A configuration that grape-jax cannot represent or that contradicts itself."""


@dataclasses.dataclass(frozen=True)
class ExpertCountRule:
    """Which expert counts one MoE layer's router can run: the single statement of that rule, used by
    the config, statistics, planners, plans, merge and export alike.

    top_k     experts each token is routed to
    least     fewest experts the router can use: `top_k`, more for group-limited routers (enough per
              group that `topk_group` groups hold `top_k` experts)
    multiple  the count must be a multiple of this (group-limited routers split the experts into
              `n_group` equal groups; 1 otherwise)
    """

    top_k: int
    least: int
    multiple: int = 1

    def floor(self, min_experts: int = 0) -> int:
        """Fewest experts a layer may keep: max(least, min_experts, 1) rounded up to `multiple`."""
        need = max(self.top_k, self.least, int(min_experts), 1)
        return -(-need // self.multiple) * self.multiple

    def problem(self, count: int, *, min_experts: int = 0) -> str | None:
        """None when `count` experts can be routed, else what is wrong (for an error message)."""
        floor = self.floor(min_experts)
        if count < floor or count % self.multiple:
            extra = f" and a multiple of {self.multiple} (n_group)" if self.multiple > 1 else ""
            why = f"max(top_k={self.top_k}, router minimum={self.least}, min_experts={min_experts})"
            return f"keeps {count} experts; needs at least {floor} ({why}){extra}"
        return None


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """Architecture of a decoder-only MoE transformer.

    Router kinds (the family's own routing, used for the forward pass *and* for statistics):
      softmax_topk        softmax over all experts, top-k, renormalise if `norm_topk_prob`
                          (Mixtral, Qwen-MoE, Qwen3-MoE, OLMoE, DeepSeek-MoE);
      topk_softmax        top-k of (logits + router bias), softmax over the k chosen (GPT-OSS);
      sigmoid_group_topk  sigmoid scores, selection by scores + `score_bias` restricted to the best
                          `topk_group` of `n_group` groups, weights from the plain scores, optional
                          renormalisation, times `routed_scaling_factor` (DeepSeek-V3);
      softmax_group_topk  softmax scores, top-k restricted to the best `topk_group` of `n_group`
                          groups (group score: the group's max; `n_group` 1: plain top-k), optional
                          renormalisation, times `routed_scaling_factor` (DeepSeek-V2);
      softmax_bias_topk   softmax over all experts, selection by probabilities + `score_bias`, weights
                          the plain probabilities renormalised by max(sum, `router_norm_min`) (ERNIE-4.5);
      sparsemixer         Phi-3.5-MoE's eval-mode sparsemixer: top-1 and top-2 by logit, each weighted by
                          a softmax over the logits within `2 * router_jitter_eps` (relative) of it;
      topk_sigmoid        top-k of the logits, weights sigmoid(logit), no renormalisation (Llama-4); with
                          `router_scales_input` the weight scales the expert's input, not its output.
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    moe_intermediate_size: int
    num_experts: tuple[int, ...]
    top_k: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    router: str = "softmax_topk"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1
    router_bias: bool = False
    expert_bias: bool = False
    activation: str = "silu"
    shared_expert_intermediate_size: int = 0
    shared_expert_gate: bool = False
    dense_intermediate_size: int = 0
    attention_bias: bool = False
    attention_out_bias: bool = False
    qk_norm: bool = False
    attention_sinks: bool = False
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702
    # q/k RMSNorm over the whole projection ([heads*head_dim], OLMoE) instead of per head (Qwen3).
    qk_norm_full: bool = False
    clip_qkv: float | None = None  # OLMoE: clamp the q/k/v projections to [-clip, clip]
    attention_scale: float | None = None  # softmax scale; None: (q/k head dim) ** -0.5
    # Multi-head latent attention (DeepSeek-V2/V3, `grape_jax.core.mla`); q_lora_rank 0 = plain q_proj.
    attention: str = "gqa"
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    # Rotary embedding (`grape_jax.core.rope`): HF's default or YaRN; cos/sin scaled by the attention factor.
    rope_type: str = "default"
    rope_factor: float = 1.0
    rope_original_max_position: int = 0
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_truncate: bool = True
    rope_attention_factor: float = 1.0
    rope_interleave: bool = False  # DeepSeek-V3: rotary pairs are (x0, x1), (x2, x3), ...
    # Llama-3-style frequency scaling (`rope_type` "llama3", Llama-4): `rope_factor`,
    # `rope_original_max_position` and these two.
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    # Partial RoPE (GLM-4.5, MiniMax-M2): only the first `rotary_dim` dims of each head rotate; 0 = all.
    rotary_dim: int = 0
    # LongRoPE as transformers' Phi-3.5-MoE applies it: inverse frequencies divided by `rope_ext_factors`
    # (the short factors) at every length; cos/sin scaled by `rope_attention_factor` (short mscale) up
    # to `rope_original_max_position` tokens and by `rope_long_mscale` beyond.
    rope_ext_factors: tuple[float, ...] | None = None
    rope_long_mscale: float = 1.0
    # Norms: RMSNorm, or LayerNorm with a bias (Phi-3.5-MoE; eps `rms_norm_eps`); lm_head bias.
    norm: str = "rms"
    lm_head_bias: bool = False
    # Router details of the newer families (see the router kinds above).
    router_norm_min: float = 0.0
    router_jitter_eps: float = 0.0
    router_scales_input: bool = False
    # Llama-4 attention: per-layer RoPE (False = NoPE layer), weightless L2 q/k norm after RoPE on RoPE
    # layers, query temperature `1 + attn_scale * log1p(floor((pos + 1) / attn_floor_scale))` on NoPE
    # layers, and chunked attention (`layer_types` "chunked_attention": keys in the query's chunk).
    rope_layers: tuple[bool, ...] | None = None
    qk_l2_norm: bool = False
    attn_temperature_tuning: bool = False
    attn_floor_scale: float = 8192.0
    attn_scale: float = 0.1
    attention_chunk_size: int | None = None

    def __post_init__(self) -> None:
        if len(self.num_experts) != self.num_layers:
            raise ConfigError(f"num_experts has {len(self.num_experts)} entries, expected num_layers={self.num_layers}")
        if self.router not in ROUTERS:
            raise ConfigError(f"router {self.router!r} unknown; expected one of {ROUTERS}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"activation {self.activation!r} unknown; expected one of {ACTIVATIONS}")
        if self.attention not in ATTENTIONS:
            raise ConfigError(f"attention {self.attention!r} unknown; expected one of {ATTENTIONS}")
        if self.rope_type not in ROPE_TYPES:
            raise ConfigError(f"rope_type {self.rope_type!r} unknown; expected one of {ROPE_TYPES}")
        if self.norm not in NORMS:
            raise ConfigError(f"norm {self.norm!r} unknown; expected one of {NORMS}")
        if self.rotary_dim < 0 or self.rotary_dim > self.head_dim or self.rotary_dim % 2:
            raise ConfigError(f"rotary_dim={self.rotary_dim} must be even and within head_dim={self.head_dim}")
        if self.router == "sparsemixer" and self.top_k != 2:
            raise ConfigError(f"the sparsemixer router always picks 2 experts; top_k={self.top_k}")
        if self.rope_layers is not None and len(self.rope_layers) != self.num_layers:
            raise ConfigError(f"rope_layers has {len(self.rope_layers)} entries, expected {self.num_layers}")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}")
        for layer, e in enumerate(self.num_experts):
            if e < 0:
                raise ConfigError(f"layer {layer}: {e} experts (expected 0 for a dense layer, or a routable count)")
            problem = self.expert_rule.problem(e) if e > 0 else None
            if problem:
                raise ConfigError(f"num_experts: MoE layer {layer} {problem}")
            if e == 0 and self.dense_intermediate_size <= 0:
                raise ConfigError(f"layer {layer} is dense but dense_intermediate_size is not set")
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_layers:
                raise ConfigError(f"layer_types has {len(self.layer_types)} entries, expected {self.num_layers}")
            unknown = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if unknown:
                raise ConfigError(f"layer_types {unknown} unknown; expected some of {LAYER_TYPES}")
            if "chunked_attention" in self.layer_types and not self.attention_chunk_size:
                raise ConfigError("chunked_attention layers need attention_chunk_size")

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Indices of the decoder layers that hold routed experts."""
        return tuple(i for i, e in enumerate(self.num_experts) if e > 0)

    @property
    def is_uniform(self) -> bool:
        counts = {e for e in self.num_experts if e > 0}
        return len(counts) <= 1

    @property
    def has_router_bias(self) -> bool:
        """Whether MoE layers carry a per-expert router bias: GPT-OSS's logit bias, or the score
        correction bias of the sigmoid/softmax + bias routers (selection only)."""
        return self.router_bias or self.router in SCORE_BIAS_ROUTERS

    def layer_uses_rope(self, layer: int) -> bool:
        return self.rope_layers is None or self.rope_layers[layer]

    @property
    def expert_count_multiple(self) -> int:
        """Every MoE layer's expert count must be a multiple of this: a group-limited router splits the
        experts into `n_group` equal groups (1 for the other routers)."""
        return self.n_group if self.router in GROUP_ROUTERS else 1

    @property
    def min_routable_experts(self) -> int:
        """Fewest experts an MoE layer can keep and still route: `top_k`, and for group-limited routers
        enough per group that `topk_group` groups hold `top_k` experts (DeepSeek-V3 also ranks groups
        by their top-2 scores, so at least 2 per group)."""
        if self.router not in GROUP_ROUTERS:
            return self.top_k
        per_group = -(-self.top_k // self.topk_group)
        if self.router == "sigmoid_group_topk":
            per_group = max(per_group, 2)
        return max(self.top_k, self.n_group * per_group)

    @property
    def expert_rule(self) -> ExpertCountRule:
        """The expert counts every MoE layer of this architecture can keep."""
        return ExpertCountRule(self.top_k, self.min_routable_experts, self.expert_count_multiple)

    def with_num_experts(self, num_experts: tuple[int, ...]) -> MoEConfig:
        """The same architecture with new per-layer expert counts (after a merge)."""
        return dataclasses.replace(self, num_experts=tuple(int(e) for e in num_experts))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MoEConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields)
        if unknown:
            raise ConfigError(f"unknown MoEConfig fields {unknown}")
        d = dict(d)
        d["num_experts"] = tuple(d["num_experts"])
        for key in ("layer_types", "rope_ext_factors", "rope_layers"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)

    def to_json(self) -> str:
        return jsonio.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> MoEConfig:
        return cls.from_dict(json.loads(text))
