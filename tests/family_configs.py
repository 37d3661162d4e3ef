"""Tiny transformers configs of the newer families, with unusual shapes that exercise what sets each apart
(partial RoPE, odd head dims, biases, group limits, shared experts, NoPE / chunked layers, LongRoPE,
Llama-3 RoPE scaling), and Llama-4's multimodal wrapper."""

from __future__ import annotations

import torch
import transformers

from tests.hf_models import TINY

# 12-token test inputs: Phi's LongRoPE switches to long_mscale past 8 tokens, Llama-4's temperature
# tuning changes the NoPE query scale every 3 tokens and its chunked layer sees 5-token chunks.
_LONGROPE = {
    "rope_type": "longrope",
    "rope_theta": 10000.0,
    "short_factor": [1.6, 1.25, 1.05, 1.0],
    "long_factor": [2.8, 2.9, 2.6, 2.7],
    "short_mscale": 1.1,
    "long_mscale": 1.3,
    "original_max_position_embeddings": 8,
}
_LLAMA3 = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}
_LLAMA4_TEXT = dict(
    TINY,
    intermediate_size=16,
    intermediate_size_mlp=40,
    head_dim=8,
    num_local_experts=4,
    num_experts_per_tok=2,
    moe_layers=[1],
    no_rope_layers=[1, 0],
    attention_chunk_size=5,
    floor_scale=3,
    attn_scale=0.3,
    attention_bias=True,
    rope_parameters=_LLAMA3,
)

_GLM = dict(
    TINY,
    head_dim=12,
    partial_rotary_factor=0.5,
    n_routed_experts=8,
    num_experts_per_tok=3,
    moe_intermediate_size=16,
    n_group=2,
    topk_group=1,
    first_k_dense_replace=1,
    n_shared_experts=2,
    use_qk_norm=True,
    attention_bias=True,
    routed_scaling_factor=2.5,
)
_ERNIE = dict(TINY, num_hidden_layers=3, moe_num_experts=8, moe_k=3, moe_intermediate_size=12, moe_num_shared_experts=2)
_MINIMAX = dict(TINY, intermediate_size=20, num_local_experts=8, num_experts_per_tok=2, head_dim=16, rotary_dim=6)
_PHI = dict(
    TINY,
    num_local_experts=4,
    num_experts_per_tok=2,
    attention_bias=True,
    lm_head_bias=True,
    sliding_window=5,
    router_jitter_noise=0.2,
    rope_parameters=_LONGROPE,
)


def _config(cls, defaults):
    return lambda **overrides: cls(**{**defaults, **overrides})


# name -> (**overrides) -> config
NEW_CONFIGS = {
    # head_dim 12 with half of it rotary (6), q/k norm, qkv bias, 2 groups of 4, top-3, 2 shared experts
    "glm4_moe": _config(transformers.Glm4MoeConfig, _GLM),
    # three layers (0 dense), 8 experts top-3, 2 shared experts, tied embeddings (the default)
    "ernie4_5_moe": _config(transformers.Ernie4_5_MoeConfig, _ERNIE),
    # head_dim 16 of which 6 rotary (rotary_dim), q/k norm over the whole projection
    "minimax_m2": _config(transformers.MiniMaxM2Config, _MINIMAX),
    # LayerNorm, q/k/v/o and lm_head biases, sliding window 5, LongRoPE, a wide sparsemixer threshold
    "phimoe": _config(transformers.PhimoeConfig, _PHI),
    # layer 0 dense + RoPE + chunked, layer 1 MoE (top-2, shared expert) + NoPE + full attention
    "llama4_text": _config(transformers.Llama4TextConfig, _LLAMA4_TEXT),
}


def llama4_multimodal_config() -> transformers.Llama4Config:
    vision = {
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "intermediate_size": 32,
        "image_size": 28,
        "patch_size": 14,
        "vision_output_dim": 32,
        "projector_input_dim": 32,
        "projector_output_dim": 32,
    }
    return transformers.Llama4Config(text_config=_LLAMA4_TEXT, vision_config=vision)


def build_llama4_multimodal(seed: int = 0) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    model = transformers.Llama4ForConditionalGeneration(llama4_multimodal_config()).eval()
    with torch.no_grad():  # non-trivial norms, as tests.hf_models.build_model
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return model
