"""The embedded demo model: a small Mixtral trained by `scripts/train_tiny_moe.py` on the shipped text.

It is shipped in `grape_jax/assets/demo_model/` (an ordinary HF Mixtral directory, bf16); when absent
(e.g. deleted to retrain), `ensure_demo_model` trains it and caches it under ~/.cache/grape-jax.
"""

from __future__ import annotations

import os
from importlib import resources

import jax.numpy as jnp
import numpy as np
import transformers

from conversion.export import export_hf
from grape_jax.core.config import MoEConfig
from grape_jax.core.model import ModelInfo, model_from_arrays
from grape_jax.data.text import default_calibration_texts, tokenize_and_pack
from grape_jax.data.tokenizer import default_tokenizer
from grape_jax.demo.train import TrainOptions, train

DEMO_CONFIG = MoEConfig(
    family="mixtral",
    vocab_size=1024,
    hidden_size=128,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    moe_intermediate_size=256,
    num_experts=(8, 8, 8, 8),
    top_k=2,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=512,
)
SEQ_LEN = 128


def shipped_path() -> str:
    return str(resources.files("grape_jax").joinpath("assets", "demo_model"))


def mixtral_hf_config(cfg: MoEConfig) -> dict:
    """A stock transformers Mixtral config.json for `cfg` (uniform expert counts)."""
    return transformers.MixtralConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.moe_intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        num_local_experts=cfg.num_experts[0],
        num_experts_per_tok=cfg.top_k,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    ).to_dict()


def train_demo_model(out: str, *, steps: int = 300, seed: int = 0, log=print) -> str:
    """Train the demo model from scratch and write it as an HF directory (with tokenizer)."""
    tok = default_tokenizer(DEMO_CONFIG.vocab_size)
    blocks = tokenize_and_pack(default_calibration_texts(), tok, seq_len=SEQ_LEN, num_samples=None)
    log(f"training on {blocks.shape[0]} blocks of {SEQ_LEN} tokens")
    params, curve = train(DEMO_CONFIG, blocks, options=TrainOptions(steps=steps, seed=seed), log=log)
    hf = mixtral_hf_config(DEMO_CONFIG)
    hf["dtype"] = "bfloat16"
    hf["bos_token_id"], hf["eos_token_id"], hf["pad_token_id"] = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    info = ModelInfo.create(family="mixtral", source="grape_jax demo training", hf_config=hf)
    model = model_from_arrays(DEMO_CONFIG, {k: v.astype(jnp.bfloat16) for k, v in params.items()}, info=info)
    export_hf(model, out, overwrite=True, extra_files={"TRAINING.md": _training_card(steps, seed, curve)})
    tok.save_pretrained(out)
    return out


def _training_card(steps: int, seed: int, curve: list[float]) -> str:
    tail = float(np.mean(curve[-20:]))
    return (
        f"# grape-jax demo MoE\n\nMixtral architecture, {DEMO_CONFIG.num_layers} layers x "
        f"{DEMO_CONFIG.num_experts[0]} experts (top-{DEMO_CONFIG.top_k}), d={DEMO_CONFIG.hidden_size}, trained "
        f"from scratch by `scripts/train_tiny_moe.py` for {steps} steps (seed {seed}) on the shipped KJV "
        f"calibration text (public domain). Final training NLL (mean of last 20 steps): {tail:.3f}.\n"
    )


def ensure_demo_model(log=print) -> str:
    """Path of the demo model: the shipped one, else a cached trained one (trained on first use)."""
    path = shipped_path()
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    cache = os.path.join(os.path.expanduser(os.environ.get("GRAPE_CACHE", "~/.cache/grape-jax")), "demo_model")
    if not os.path.isfile(os.path.join(cache, "config.json")):
        log(f"demo model not shipped; training it once into {cache} (a few minutes)")
        train_demo_model(cache, log=log)
    return cache
