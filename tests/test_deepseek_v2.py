"""DeepSeek-V2 (`DeepseekV2ForCausalLM`): logits parity with transformers on 1 device and on the
simulated mesh for both `topk_method`s, routing exactness, bit-identical HF -> JAX -> HF round trips,
and grape pruning -> export -> reload in transformers."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import torch
import transformers

from conversion.export import export_hf
from conversion.families import family_by_name, get_family
from conversion.families.base import ConversionError
from conversion.load import load_hf
from grape_jax.calibration.calibrate import calibrate
from grape_jax.calibration.options import CalibrationOptions
from grape_jax.core.config import ConfigError
from grape_jax.core.model import param_view
from grape_jax.core.routing import route
from grape_jax.core.sharding import make_mesh
from grape_jax.merge.state import merge_model
from grape_jax.pipeline import save_hf
from grape_jax.planners import make_plan
from grape_jax.planners.plan import PlanError
from tests.hf_models import TINY, build_model, random_tokens, save_model, torch_logits
from tests.test_families import _assert_same_tensors
from tests.test_model_parity import assert_close_logits

BASE = {**TINY, "num_hidden_layers": 3, "num_key_value_heads": 4, "max_position_embeddings": 256}

CONFIGS = {
    # V2-Lite-style: no q LoRA, plain top-k, YaRN with mscale_all_dim, norm_topk_prob ignored by HF
    "greedy": lambda: transformers.DeepseekV2Config(
        **BASE,
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        topk_method="greedy",
        first_k_dense_replace=1,
        q_lora_rank=None,
        kv_lora_rank=8,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=6,
        n_shared_experts=2,
        routed_scaling_factor=1.5,
        norm_topk_prob=True,
        rope_parameters=dict(
            rope_type="yarn",
            rope_theta=10000.0,
            factor=8.0,
            original_max_position_embeddings=32,
            beta_fast=32,
            beta_slow=1,
            mscale=0.707,
            mscale_all_dim=1.0,
        ),
    ),
    # V2-style: q LoRA, group-limited greedy (3 of 4 groups of 2), attention biases
    "group_limited_greedy": lambda: transformers.DeepseekV2Config(
        **BASE,
        n_routed_experts=8,
        num_experts_per_tok=3,
        moe_intermediate_size=16,
        topk_method="group_limited_greedy",
        n_group=4,
        topk_group=3,
        first_k_dense_replace=1,
        q_lora_rank=16,
        kv_lora_rank=8,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=8,
        n_shared_experts=1,
        routed_scaling_factor=2.0,
        attention_bias=True,
    ),
}


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return random_tokens(TINY["vocab_size"], batch=2, seq=12, seed=1)


@pytest.fixture(scope="module")
def cases(tmp_path_factory, tokens):
    built = {}

    def get(name):
        if name not in built:
            model = build_model(CONFIGS[name](), seed=0)
            path = save_model(model, tmp_path_factory.mktemp(name))
            built[name] = (path, model, torch_logits(model, tokens), load_hf(path))
        return built[name]

    return get


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_single_device_logits_match_transformers(cases, tokens, name):
    path, _, ref, loaded = cases(name)
    assert loaded.info.family == "deepseek_v2"
    cfg = loaded.cfg
    assert cfg.num_experts == (0, 8, 8) and cfg.router == "softmax_group_topk" and not cfg.norm_topk_prob
    assert (cfg.n_group, cfg.topk_group) == ((1, 1) if name == "greedy" else (4, 3))
    assert_close_logits(loaded(tokens), ref)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_mesh_logits_match_transformers(cases, tokens, name):
    path, _, ref, _ = cases(name)
    mesh = make_mesh("fsdp=2,expert=4")
    loaded = load_hf(path, mesh=mesh)
    assert param_view(loaded)["layers.1.mlp.w_up"].sharding.spec[0] == "expert"
    with jax.set_mesh(mesh):
        ours = loaded(tokens)
    assert_close_logits(ours, ref)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_router_matches_transformers(cases, name):
    _, model, _, loaded = cases(name)
    gate = model.model.layers[1].mlp.gate
    x = torch.randn(64, TINY["hidden_size"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        _, ref_w, ref_i = gate(x)
        logits_ = torch.nn.functional.linear(x, gate.weight).numpy()
    ours = route(jax.numpy.asarray(logits_), loaded.cfg)
    dense_ref = np.zeros((64, 8), np.float32)
    np.put_along_axis(dense_ref, ref_i.numpy(), ref_w.numpy(), axis=1)
    np.testing.assert_allclose(np.asarray(ours.gates), dense_ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_round_trip_is_bit_identical(cases, tmp_path, tokens, name):
    src, _, ref, loaded = cases(name)
    out = export_hf(loaded, tmp_path / "export")
    _assert_same_tensors(src, out)
    assert any(
        ".mlp.experts.0.gate_proj.weight" in k
        for k in open(os.path.join(out, "model.safetensors"), "rb").read(1 << 16).decode("latin-1").split('"')
    )  # per-expert keys on disk, as save_pretrained
    source_cfg = json.load(open(os.path.join(src, "config.json")))
    exported_cfg = json.load(open(os.path.join(out, "config.json")))
    assert {k: exported_cfg.get(k) for k in source_cfg} == source_cfg
    assert family_by_name(loaded.info.family).config_from_hf(exported_cfg) == loaded.cfg
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    np.testing.assert_array_equal(torch_logits(reloaded, tokens), ref)


def test_grape_prune_export_reload_uneven_counts(cases, tmp_path):
    src, _, _, loaded = cases("greedy")
    cfg = loaded.cfg
    blocks = random_tokens(cfg.vocab_size, batch=4, seq=12, seed=2)
    stats = calibrate(loaded, blocks, options=CalibrationOptions(batch_size=4, token_chunk=48), progress=False)
    total = sum(cfg.num_experts)
    plan = make_plan(stats, method="grape", budget=total // 4, guard="none", operator="freq")
    merged = merge_model(loaded, plan)
    new_cfg = merged.cfg
    assert sum(new_cfg.num_experts) == total - total // 4
    out = save_hf(merged, str(tmp_path / "out"))
    config = json.load(open(os.path.join(out, "config.json")))
    assert ("auto_map" in config) == (not new_cfg.is_uniform)
    model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=not new_cfg.is_uniform).eval()
    tokens = random_tokens(cfg.vocab_size, batch=2, seq=12, seed=3)
    assert_close_logits(merged(tokens), torch_logits(model, tokens))
    again = load_hf(out)
    assert again.cfg == new_cfg
    for name, arr in param_view(merged).items():
        assert np.asarray(arr).tobytes() == np.asarray(param_view(again)[name]).tobytes(), name


def test_group_limited_prune_keeps_group_multiples(cases, tmp_path):
    """Statistics carry the router's granularity; the global planner keeps every count a multiple of
    n_group = 4 (top_k 3 from 3 groups: at least 1 per group, so 4 is the floor)."""
    src, _, _, loaded = cases("group_limited_greedy")
    cfg = loaded.cfg
    assert cfg.expert_count_multiple == 4 and cfg.min_routable_experts == 4
    with pytest.raises(ConfigError, match=r"MoE layer 1 keeps 6 experts; needs at least 4 .* and a multiple of 4"):
        cfg.with_num_experts((0, 6, 8))
    stats = calibrate(
        loaded,
        random_tokens(cfg.vocab_size, batch=4, seq=12, seed=2),
        options=CalibrationOptions(batch_size=4, token_chunk=48),
        progress=False,
    )
    assert [(ls.count_multiple, ls.min_count) for ls in stats.layers] == [(4, 4), (4, 4)]
    with pytest.raises(PlanError, match=r"multiple of 4.*nearest: 4 or 8"):
        make_plan(stats, method="grape", budget=6, guard="none")
    plan = make_plan(stats, method="grape", budget=4, guard="none", operator="dominant")
    merged = merge_model(loaded, plan)
    new_cfg = merged.cfg
    assert sorted(new_cfg.num_experts) == [0, 4, 8]
    out = save_hf(merged, str(tmp_path / "out"))
    model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    tokens = random_tokens(cfg.vocab_size, batch=2, seq=12, seed=3)
    assert_close_logits(merged(tokens), torch_logits(model, tokens))


def test_unsupported_configs_are_refused():
    family = get_family("deepseek_v2")
    hf = CONFIGS["greedy"]().to_dict()
    with pytest.raises(ConversionError, match="topk_method='noaux_tc'"):
        family.config_from_hf({**hf, "topk_method": "noaux_tc"})
    with pytest.raises(ConversionError, match="moe_layer_freq"):
        family.config_from_hf({**hf, "moe_layer_freq": 2})
    with pytest.raises(ConversionError, match="required field 'n_group'"):
        family.config_from_hf({**hf, "topk_method": "group_limited_greedy", "n_group": None})
