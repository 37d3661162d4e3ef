"""DeepSeek-MoE (HF `model_type: deepseek`, remote code, not in transformers): tiny checkpoints in the
published layout and a float64 NumPy forward written from the published architecture
(deepseek-ai/deepseek-moe-16b-base `modeling_deepseek.py`): Llama attention with rotate-half RoPE,
layer `l` MoE iff `l >= first_k_dense_replace and l % moe_layer_freq == 0`, softmax gate, top-k,
renormalised only if `norm_topk_prob` (+1e-20), SwiGLU experts, ungated shared experts
(`n_shared_experts * moe_intermediate_size` wide) added to the routed output.
"""

from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import save_file


def tiny_deepseek_config(**overrides) -> dict:
    """A config.json like deepseek-moe-16b-base's, at test size."""
    cfg = {
        "architectures": ["DeepseekForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "auto_map": {
            "AutoConfig": "configuration_deepseek.DeepseekConfig",
            "AutoModel": "modeling_deepseek.DeepseekModel",
            "AutoModelForCausalLM": "modeling_deepseek.DeepseekForCausalLM",
        },
        "aux_loss_alpha": 0.001,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "first_k_dense_replace": 1,
        "hidden_act": "silu",
        "hidden_size": 32,
        "initializer_range": 0.02,
        "intermediate_size": 40,
        "max_position_embeddings": 128,
        "model_type": "deepseek",
        "moe_intermediate_size": 12,
        "moe_layer_freq": 1,
        "n_routed_experts": 8,
        "n_shared_experts": 2,
        "norm_topk_prob": False,
        "num_attention_heads": 4,
        "num_experts_per_tok": 3,
        "num_hidden_layers": 3,
        "num_key_value_heads": 4,
        "pretraining_tp": 1,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 10000,
        "scoring_func": "softmax",
        "seq_aux": True,
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
        "transformers_version": "4.36.0",
        "use_cache": True,
        "vocab_size": 128,
    }
    cfg.update(overrides)
    return cfg


def is_moe_layer(cfg: dict, layer: int) -> bool:
    return layer >= cfg["first_k_dense_replace"] and layer % cfg["moe_layer_freq"] == 0


def random_weights(cfg: dict, seed: int = 0, scale: float = 0.15) -> dict[str, np.ndarray]:
    """Published key layout, HF `[out, in]` linear weights, non-trivial norms."""
    rng = np.random.default_rng(seed)
    d, v = cfg["hidden_size"], cfg["vocab_size"]
    hd = d // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd

    def w(*shape):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    def norm():
        return (1.0 + 0.2 * rng.standard_normal(d)).astype(np.float32)

    def mlp(prefix, f):
        return {
            prefix + "gate_proj.weight": w(f, d),
            prefix + "up_proj.weight": w(f, d),
            prefix + "down_proj.weight": w(d, f),
        }

    out = {"model.embed_tokens.weight": w(v, d), "model.norm.weight": norm(), "lm_head.weight": w(v, d)}
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out.update(
            {
                p + "input_layernorm.weight": norm(),
                p + "post_attention_layernorm.weight": norm(),
                p + "self_attn.q_proj.weight": w(d, d),
                p + "self_attn.k_proj.weight": w(kv, d),
                p + "self_attn.v_proj.weight": w(kv, d),
                p + "self_attn.o_proj.weight": w(d, d),
            }
        )
        if is_moe_layer(cfg, layer):
            f = cfg["moe_intermediate_size"]
            out[p + "mlp.gate.weight"] = w(cfg["n_routed_experts"], d)
            for e in range(cfg["n_routed_experts"]):
                out.update(mlp(p + f"mlp.experts.{e}.", f))
            if cfg["n_shared_experts"]:
                out.update(mlp(p + "mlp.shared_experts.", f * cfg["n_shared_experts"]))
        else:
            out.update(mlp(p + "mlp.", cfg["intermediate_size"]))
    return out


def save_checkpoint(path: str | os.PathLike, cfg: dict, weights: dict[str, np.ndarray]) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    save_file(weights, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    return os.fspath(path)


def _rms(x, w, eps):
    return w * (x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps))


def _silu(x):
    return x / (1.0 + np.exp(-x))


def _rope(x, theta):  # x [b, h, t, hd], rotate-half
    hd, t = x.shape[-1], x.shape[-2]
    inv = 1.0 / theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
    ang = np.arange(t, dtype=np.float64)[:, None] * inv
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    rot = np.concatenate([-x[..., hd // 2 :], x[..., : hd // 2]], -1)
    return x * cos + rot * sin


def reference_logits(cfg: dict, weights: dict[str, np.ndarray], tokens: np.ndarray) -> np.ndarray:
    """float64 logits of the published DeepSeek-MoE architecture for full (unpadded) sequences."""
    W = {k: v.astype(np.float64) for k, v in weights.items()}
    eps, theta = cfg["rms_norm_eps"], float(cfg["rope_theta"])
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    b, t = tokens.shape
    hd = cfg["hidden_size"] // heads
    x = W["model.embed_tokens.weight"][tokens]

    def mlp(prefix, h):
        g, u = h @ W[prefix + "gate_proj.weight"].T, h @ W[prefix + "up_proj.weight"].T
        return (_silu(g) * u) @ W[prefix + "down_proj.weight"].T

    causal = np.tril(np.ones((t, t), bool))
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        h = _rms(x, W[p + "input_layernorm.weight"], eps)
        q = (h @ W[p + "self_attn.q_proj.weight"].T).reshape(b, t, heads, hd).transpose(0, 2, 1, 3)
        k = (h @ W[p + "self_attn.k_proj.weight"].T).reshape(b, t, kv_heads, hd).transpose(0, 2, 1, 3)
        v = (h @ W[p + "self_attn.v_proj.weight"].T).reshape(b, t, kv_heads, hd).transpose(0, 2, 1, 3)
        q, k = _rope(q, theta), _rope(k, theta)
        k, v = np.repeat(k, heads // kv_heads, 1), np.repeat(v, heads // kv_heads, 1)
        s = np.where(causal, q @ k.transpose(0, 1, 3, 2) / np.sqrt(hd), -np.inf)
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = (a @ v).transpose(0, 2, 1, 3).reshape(b, t, heads * hd)
        x = x + o @ W[p + "self_attn.o_proj.weight"].T
        h = _rms(x, W[p + "post_attention_layernorm.weight"], eps)
        if not is_moe_layer(cfg, layer):
            x = x + mlp(p + "mlp.", h)
            continue
        flat = h.reshape(b * t, -1)
        logits = flat @ W[p + "mlp.gate.weight"].T
        scores = np.exp(logits - logits.max(-1, keepdims=True))
        scores /= scores.sum(-1, keepdims=True)
        out = np.zeros_like(flat)
        for i in range(flat.shape[0]):
            top = np.argsort(-scores[i], kind="stable")[: cfg["num_experts_per_tok"]]
            wts = scores[i, top]
            if cfg["num_experts_per_tok"] > 1 and cfg["norm_topk_prob"]:
                wts = wts / (wts.sum() + 1e-20)
            for wt, e in zip(wts, top):
                out[i] += wt * mlp(p + f"mlp.experts.{e}.", flat[i])
        if cfg["n_shared_experts"]:
            out = out + mlp(p + "mlp.shared_experts.", flat)
        x = x + out.reshape(b, t, -1)
    x = _rms(x, W["model.norm.weight"], eps)
    return x @ W["lm_head.weight"].T
