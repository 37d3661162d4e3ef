"""Per family: prune 25% of the routed experts with grape, export, load in PyTorch, compare logits.

Each family flows through calibration, planning, merge and export with no family-specific code outside
its own module; exports with per-layer counts load through the remote-code modeling file."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import transformers

from conversion.load import load_hf
from grape_jax.calibration.calibrate import calibrate
from grape_jax.calibration.options import CalibrationOptions
from grape_jax.core.model import param_view
from grape_jax.merge.state import merge_model
from grape_jax.pipeline import save_hf
from grape_jax.planners import make_plan
from grape_jax.planners.plan import build_plan
from tests.family_configs import NEW_CONFIGS
from tests.hf_models import TINY, build_model, random_tokens, save_model, tiny_mixtral_config, torch_logits
from tests.test_families import HF_CONFIGS
from tests.test_model_parity import assert_close_logits

CONFIGS = {
    "mixtral": lambda: tiny_mixtral_config(num_local_experts=8),
    "qwen2_moe": HF_CONFIGS["qwen2_moe"],
    "qwen3_moe": HF_CONFIGS["qwen3_moe"],
    "olmoe": HF_CONFIGS["olmoe"],
    "gpt_oss": HF_CONFIGS["gpt_oss"],
    **{name: HF_CONFIGS[name] for name in NEW_CONFIGS},
    # group-limited routing (2 groups): the planner keeps every count a multiple of 2, >= 2 per group
    "deepseek_v3": lambda: transformers.DeepseekV3Config(
        **{**TINY, "num_key_value_heads": 4},
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        n_group=2,
        topk_group=1,
        first_k_dense_replace=1,
        q_lora_rank=None,
        kv_lora_rank=8,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=6,
        n_shared_experts=1,
        norm_topk_prob=True,
        routed_scaling_factor=1.5,
    ),
}


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_prune_quarter_export_and_reload(family, tmp_path):
    src = save_model(build_model(CONFIGS[family](), seed=1), tmp_path / "src")
    loaded = load_hf(src)
    cfg = loaded.cfg
    blocks = random_tokens(cfg.vocab_size, batch=4, seq=12, seed=2)
    stats = calibrate(loaded, blocks, options=CalibrationOptions(batch_size=4, token_chunk=48), progress=False)
    total = sum(cfg.num_experts)
    budget = total // 4
    plan = make_plan(stats, method="grape", budget=budget, guard="none", operator="freq")
    merged = merge_model(loaded, plan)
    new_cfg = merged.cfg
    assert sum(new_cfg.num_experts) == total - budget
    assert all(e % cfg.expert_count_multiple == 0 for e in new_cfg.num_experts)
    out = save_hf(merged, str(tmp_path / "out"))
    config = json.load(open(os.path.join(out, "config.json")))
    assert ("auto_map" in config) == (not new_cfg.is_uniform)
    assert "quantization_config" not in config
    model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=not new_cfg.is_uniform).eval()
    tokens = random_tokens(cfg.vocab_size, batch=2, seq=12, seed=3)
    assert_close_logits(merged(tokens), torch_logits(model, tokens))
    again = load_hf(out)
    assert again.cfg == new_cfg
    for name, arr in param_view(merged).items():
        assert np.asarray(arr).tobytes() == np.asarray(param_view(again)[name]).tobytes(), name


@pytest.mark.parametrize("source_code", ["files", "auto_map_only", "none"])
def test_deepseek_moe_uniform_prune_matches_float64_reference(tmp_path, source_code):
    """DeepSeek-MoE has no transformers class. A uniform export keeps the published layout and config
    (`auto_map` included) and copies the modeling files it names when the source has them; a source
    config naming no code (a re-export of a pruned export) gets our remote-code file so it still loads.
    Logits: float64 reference on the exported tensors, and PyTorch where it can load."""
    from safetensors.numpy import load_file

    from tests import deepseek_reference as dsref

    hf_cfg = dsref.tiny_deepseek_config()
    if source_code == "none":
        del hf_cfg["auto_map"]
    src = dsref.save_checkpoint(str(tmp_path / "src"), hf_cfg, dsref.random_weights(hf_cfg, seed=4))
    if source_code == "files":
        for name in ("configuration_deepseek.py", "modeling_deepseek.py"):
            with open(os.path.join(src, name), "w") as f:
                f.write(f"# stand-in for the published {name}\n")
    loaded = load_hf(src)
    stats = calibrate(
        loaded,
        random_tokens(loaded.cfg.vocab_size, batch=4, seq=12, seed=5),
        options=CalibrationOptions(batch_size=4, token_chunk=48),
        progress=False,
    )
    plan = make_plan(stats, method="local", budget=len(stats.layers), operator="dominant")
    merged = merge_model(loaded, plan)
    new_cfg = merged.cfg
    out = save_hf(merged, str(tmp_path / "out"))
    exported_cfg = json.load(open(os.path.join(out, "config.json")))
    assert exported_cfg["n_routed_experts"] == hf_cfg["n_routed_experts"] - 1
    tokens = random_tokens(loaded.cfg.vocab_size, batch=2, seq=12, seed=6)
    if source_code != "none":
        assert exported_cfg["model_type"] == "deepseek" and "num_experts_per_layer" not in exported_cfg
        assert exported_cfg["auto_map"] == hf_cfg["auto_map"]
        for name in ("configuration_deepseek.py", "modeling_deepseek.py"):
            copied = os.path.join(out, name)
            assert (
                open(copied).read() == open(os.path.join(src, name)).read()
                if source_code == "files"
                else not os.path.exists(copied)
            )
    else:
        assert exported_cfg["model_type"] == "deepseek" and "num_experts_per_layer" in exported_cfg
        assert not os.path.exists(os.path.join(out, "modeling_deepseek.py"))
        model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
        assert_close_logits(merged(tokens), torch_logits(model, tokens))
    weights = load_file(os.path.join(out, "model.safetensors"))
    assert set(weights) == {
        k
        for k in load_file(os.path.join(src, "model.safetensors"))
        if ".experts." not in k or int(k.split(".experts.")[1].split(".")[0]) < exported_cfg["n_routed_experts"]
    }
    ref = dsref.reference_logits(exported_cfg, weights, tokens)
    assert_close_logits(merged(tokens), ref)
    again = load_hf(out)
    assert again.cfg == new_cfg


def test_deepseek_v3_counts_must_be_multiples_of_n_group(tmp_path):
    """The one expert-count rule (`MoEConfig.expert_rule`) refuses counts the group-limited router cannot
    run: a config with them cannot even be built, so no merge or export can produce one."""
    from grape_jax.core.config import ConfigError

    cfg = transformers.DeepseekV3Config(
        **{**TINY, "num_key_value_heads": 4},
        n_routed_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=16,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        q_lora_rank=None,
        kv_lora_rank=8,
        qk_nope_head_dim=8,
        qk_rope_head_dim=4,
        v_head_dim=6,
    )
    src = save_model(build_model(cfg, seed=1), tmp_path / "src")
    loaded = load_hf(src)
    assert loaded.cfg.expert_rule.floor() == 8
    with pytest.raises(ConfigError, match=r"MoE layer 1 keeps 6 experts; needs at least 8 .* and a multiple of 4"):
        loaded.cfg.with_num_experts((0, 6))


# Two or more MoE layers, so that one loses experts while the others keep theirs.
NON_UNIFORM = {
    "glm4_moe": dict(num_hidden_layers=3),
    "ernie4_5_moe": {},
    "minimax_m2": {},
    "phimoe": {},
    "llama4_text": dict(num_hidden_layers=3, moe_layers=[1, 2], no_rope_layers=[1, 0, 1]),
}


@pytest.mark.parametrize("family", sorted(NON_UNIFORM))
def test_non_uniform_prune_exports_load_through_remote_code(family, tmp_path):
    """The first MoE layer merges pairs (as many experts as its router's count multiple), the others keep
    all: the export needs the per-layer modeling file, and PyTorch gives the JAX model's logits."""
    src = save_model(build_model(NEW_CONFIGS[family](**NON_UNIFORM[family]), seed=3), tmp_path / "src")
    loaded = load_hf(src)
    cfg = loaded.cfg
    stats = calibrate(
        loaded,
        random_tokens(cfg.vocab_size, batch=2, seq=12, seed=4),
        options=CalibrationOptions(batch_size=2, token_chunk=24),
        progress=False,
    )
    groups = []
    for i, ls in enumerate(stats.layers):
        merged = cfg.expert_count_multiple if i == 0 else 0
        groups.append([[2 * k, 2 * k + 1] for k in range(merged)] + [[e] for e in range(2 * merged, ls.num_experts)])
    plan = build_plan(stats, groups, method="hand", budget=cfg.expert_count_multiple, operator="freq")
    merged = merge_model(loaded, plan)
    new_cfg = merged.cfg
    assert not new_cfg.is_uniform
    out = save_hf(merged, tmp_path / "out")
    model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(model).__name__.startswith("Pruned")
    tokens = random_tokens(cfg.vocab_size, batch=2, seq=12, seed=5)
    assert_close_logits(merged(tokens), torch_logits(model, tokens))
    assert load_hf(out).cfg == new_cfg
