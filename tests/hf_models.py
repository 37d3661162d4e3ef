"""Tiny random Hugging Face models for tests (no downloads): build, save, and run them in torch."""

from __future__ import annotations

import os

import numpy as np
import torch
import transformers

TINY = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    initializer_range=0.15,
)


def tiny_mixtral_config(**overrides) -> transformers.MixtralConfig:
    kw = dict(TINY, num_local_experts=4, num_experts_per_tok=2, rms_norm_eps=1e-5)
    kw.update(overrides)
    return transformers.MixtralConfig(**kw)


def build_model(config, seed: int = 0, dtype=torch.float32) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype).eval()
    with torch.no_grad():  # make norms non-trivial so a wrong norm weight shows up in logits
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return model


def save_model(model, path: str | os.PathLike) -> str:
    model.save_pretrained(path)
    return os.fspath(path)


def torch_logits(model, tokens: np.ndarray, mask: np.ndarray | None = None) -> np.ndarray:
    with torch.no_grad():
        t = torch.as_tensor(np.asarray(tokens), dtype=torch.long)
        m = None if mask is None else torch.as_tensor(np.asarray(mask), dtype=torch.long)
        return model(input_ids=t, attention_mask=m).logits.float().numpy()


def random_tokens(vocab: int, batch: int = 2, seq: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, seq), dtype=np.int32)
