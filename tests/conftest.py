"""Test set-up: 8 simulated CPU devices, fp32 matmuls, shared tiny models.

`jax_num_cpu_devices` must be set before any backend is initialised, so it is done at import time
of this conftest, which pytest loads before any test module.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
jax.config.update("jax_default_matmul_precision", "highest")


import dataclasses  # noqa: E402

import pytest  # noqa: E402


@dataclasses.dataclass
class SavedModel:
    """A tiny random HF model and the directory it was saved to."""

    model: object
    path: str


@pytest.fixture(scope="session")
def tiny_mixtral(tmp_path_factory) -> SavedModel:
    from tests.hf_models import build_model, save_model, tiny_mixtral_config

    model = build_model(tiny_mixtral_config(), seed=0)
    return SavedModel(model, save_model(model, tmp_path_factory.mktemp("tiny_mixtral")))


@pytest.fixture(scope="session")
def tiny_mixtral_tok(tmp_path_factory) -> SavedModel:
    """A tiny Mixtral (8 experts, top-2) with a real tokenizer in its directory, for pipelines."""
    from grape_jax.data.text import default_calibration_texts
    from grape_jax.data.tokenizer import train_tokenizer
    from tests.hf_models import build_model, save_model, tiny_mixtral_config

    tok = train_tokenizer(default_calibration_texts()[:60], vocab_size=300)
    model = build_model(tiny_mixtral_config(vocab_size=len(tok), num_local_experts=8, num_hidden_layers=3), seed=5)
    path = save_model(model, tmp_path_factory.mktemp("tiny_mixtral_tok") / "hf")
    tok.save_pretrained(path)
    return SavedModel(model, path)
