"""GLM-4.5, ERNIE-4.5, MiniMax-M2, Phi-3.5-MoE and Llama-4: routing decisions equal to transformers' own
router modules, config translation, Llama-4's multimodal checkpoints (read for the language model,
exported as the text model) and the refusals. Logit parity and round trips are in test_families.py."""

from __future__ import annotations

import dataclasses
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from conversion.export import export_hf
from conversion.families import get_family
from conversion.families.base import ConversionError
from conversion.load import load_hf
from grape_jax.core.model import param_view
from grape_jax.core.routing import route
from tests.family_configs import NEW_CONFIGS, build_llama4_multimodal
from tests.hf_models import TINY, build_model, random_tokens, save_model, torch_logits
from tests.test_model_parity import assert_close_logits

MOE_LAYER = {"glm4_moe": 1, "ernie4_5_moe": 1, "minimax_m2": 0, "phimoe": 1, "llama4_text": 1}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    built = {}

    def get(name: str):
        if name not in built:
            model = build_model(NEW_CONFIGS[name](), seed=2)
            gen = torch.Generator().manual_seed(1)
            with torch.no_grad():  # selection biases that change the choice (also negative)
                for module in model.modules():
                    if hasattr(module, "e_score_correction_bias"):
                        b = module.e_score_correction_bias
                        b.copy_(0.4 * torch.randn(b.shape, generator=gen) - 0.1)
            path = save_model(model, tmp_path_factory.mktemp(name))
            built[name] = (model, load_hf(path))
        return built[name]

    return get


def _hf_gates(name: str, model, x: torch.Tensor) -> np.ndarray:
    """Dense [T, E] routing weights from the family's own transformers router module."""
    layer = model.model.layers[MOE_LAYER[name]]
    with torch.no_grad():
        if name == "llama4_text":
            return layer.feed_forward.router(x)[0].numpy()  # sigmoid scores, 0 where not chosen
        if name == "minimax_m2":
            _, w, i = layer.mlp.gate(x, layer.mlp.e_score_correction_bias)
        elif name == "phimoe":
            _, w, i = layer.mlp.router(x)
        else:
            _, w, i = layer.mlp.gate(x)
        dense = torch.zeros(x.shape[0], _num_experts(layer), dtype=w.dtype)
        return dense.scatter(1, i, w).numpy()


def _num_experts(layer) -> int:
    mlp = layer.feed_forward if hasattr(layer, "feed_forward") else layer.mlp
    return mlp.experts.num_experts


@pytest.mark.parametrize("name", sorted(NEW_CONFIGS))
def test_routing_matches_transformers_router(saved, name):
    model, loaded = saved(name)
    p = f"layers.{MOE_LAYER[name]}.mlp."
    x = 2.0 * torch.randn(256, TINY["hidden_size"], generator=torch.Generator().manual_seed(3))
    want = _hf_gates(name, model, x)
    router = np.asarray(param_view(loaded)[p + "router"])
    bias = param_view(loaded).get(p + "router_bias")
    ours = route(jnp.asarray(x.numpy() @ router), loaded.cfg, bias=bias)
    np.testing.assert_allclose(np.asarray(ours.gates), want, rtol=2e-6, atol=1e-7)
    assert (np.asarray(ours.selected) == (want > 0)).all()
    chosen = (want > 0).sum(axis=1)
    assert (chosen == loaded.cfg.top_k).all()
    if bias is not None:  # the bias changes some decisions, so it is really exercised
        unbiased = route(jnp.asarray(x.numpy() @ router), loaded.cfg)
        assert (np.asarray(unbiased.selected) != np.asarray(ours.selected)).any()


def test_sparsemixer_threshold_changes_weights(saved):
    """Phi-3.5-MoE's jitter eps decides which logits share the softmax: a second threshold, same oracle."""
    model, loaded = saved("phimoe")
    router = model.model.layers[1].mlp.router
    x = torch.randn(128, TINY["hidden_size"], generator=torch.Generator().manual_seed(4))
    logits_ = jnp.asarray(x.numpy() @ np.asarray(param_view(loaded)["layers.1.mlp.router"]))
    before = np.asarray(route(logits_, loaded.cfg).gates)
    router.router_jitter_noise = 0.01
    try:
        want = _hf_gates("phimoe", model, x)
    finally:
        router.router_jitter_noise = 0.2
    ours = np.asarray(route(logits_, dataclasses.replace(loaded.cfg, router_jitter_eps=0.01)).gates)
    np.testing.assert_allclose(ours, want, rtol=2e-6, atol=1e-7)
    assert np.abs(ours - before).max() > 1e-3


def test_config_translation(saved):
    glm = saved("glm4_moe")[1].cfg
    assert (glm.head_dim, glm.rotary_dim, glm.num_experts, glm.shared_expert_intermediate_size) == (12, 6, (0, 8), 32)
    assert glm.qk_norm and not glm.qk_norm_full and glm.attention_bias and glm.routed_scaling_factor == 2.5
    ernie = saved("ernie4_5_moe")[1]
    assert ernie.cfg.num_experts == (0, 8, 8) and ernie.cfg.tie_word_embeddings and ernie.cfg.rope_interleave
    assert param_view(ernie)["layers.1.mlp.router_bias"].shape == (8,)  # stored [1, 8]
    mm = saved("minimax_m2")[1].cfg
    assert (mm.head_dim, mm.rotary_dim, mm.qk_norm_full, mm.n_group) == (16, 6, True, 1)
    phi = saved("phimoe")[1]
    assert phi.cfg.norm == "layer" and phi.cfg.rope_type == "longrope" and phi.cfg.lm_head_bias
    assert {"final_norm_bias", "lm_head_bias", "layers.0.attn.o_bias"} <= set(param_view(phi))
    l4 = saved("llama4_text")[1].cfg
    assert l4.num_experts == (0, 4) and l4.rope_layers == (True, False) and l4.rope_type == "llama3"
    assert l4.layer_types == ("chunked_attention", "full_attention") and l4.router_scales_input
    assert l4.dense_intermediate_size == 40 and l4.shared_expert_intermediate_size == 16


def test_llama4_multimodal_reads_language_model_and_exports_text_model(tmp_path):
    model = build_llama4_multimodal(seed=5)
    src = save_model(model, tmp_path / "mm")
    tokens = random_tokens(TINY["vocab_size"], batch=2, seq=12, seed=6)
    loaded = load_hf(src)
    assert loaded.info.family == "llama4" and loaded.cfg.family == "llama4_text"
    assert_close_logits(loaded(tokens), torch_logits(model, tokens))
    out = export_hf(loaded, tmp_path / "text")
    with open(os.path.join(out, "config.json")) as f:
        config = json.load(f)
    assert config["model_type"] == "llama4_text" and config["architectures"] == ["Llama4ForCausalLM"]
    with (
        safe_open(os.path.join(src, "model.safetensors"), "np") as a,
        safe_open(os.path.join(out, "model.safetensors"), "np") as b,
    ):
        text = sorted(k for k in a.keys() if k.startswith("language_model."))  # noqa: SIM118 (safe_open)
        assert sorted(b.keys()) == sorted(k.removeprefix("language_model.") for k in text)
        for key in text:
            assert a.get_tensor(key).tobytes() == b.get_tensor(key.removeprefix("language_model.")).tobytes(), key
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(reloaded).__name__ == "Llama4ForCausalLM"
    np.testing.assert_array_equal(torch_logits(reloaded, tokens), torch_logits(model, tokens))
    assert load_hf(out).cfg == loaded.cfg


@pytest.mark.parametrize(
    ("name", "change", "message"),
    [
        ("ernie4_5_moe", {"use_bias": True}, "use_bias=true is not supported"),
        ("ernie4_5_moe", {"moe_layer_start_index": [1, 2]}, "moe_layer_start_index=.* is not supported"),
        ("phimoe", {"num_experts_per_tok": 3}, "num_experts_per_tok=3 is not supported for phimoe"),
        ("phimoe", {"rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "rope_type 'yarn' is not supported"),
        ("llama4_text", {"attention_chunk_size": None}, "attention_chunk_size is required"),
        (
            "glm4_moe",
            {"partial_rotary_factor": 0.3, "rope_parameters": {"rope_type": "default"}},
            "partial_rotary_factor=0.3 gives 3 rotary dims",
        ),
    ],
)
def test_unsupported_fields_are_named(saved, name, change, message):
    hf = {**saved(name)[0].config.to_dict(), **change}
    with pytest.raises(ConversionError, match=message):
        get_family(hf["model_type"]).config_from_hf(hf)
