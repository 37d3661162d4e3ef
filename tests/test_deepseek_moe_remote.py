"""DeepSeek-MoE (`model_type: deepseek`, no transformers class) pruned to per-layer expert counts:
grape plan -> export -> load in PyTorch through the remote-code file (`PrunedDeepseekForCausalLM`,
Llama blocks + DeepSeek-MoE layers) -> logits equal to the JAX pruned model and to the float64
reference forward (`tests/deepseek_reference.py`, written from the published modeling_deepseek.py)
evaluated on the exported tensors, each layer with its own expert count."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file

from conversion.load import load_hf
from conversion.remote_code import modeling_pruned_moe as pruned
from conversion.remote_code_export import write_remote_code
from grape_jax.calibration.calibrate import calibrate
from grape_jax.calibration.options import CalibrationOptions
from grape_jax.core.model import param_view
from grape_jax.merge.state import merge_model
from grape_jax.pipeline import save_hf
from grape_jax.planners import make_plan
from tests import deepseek_reference as dsref
from tests.hf_models import random_tokens, torch_logits
from tests.test_model_parity import assert_close_logits

# 4 layers, layer 0 dense; 8 routed experts, 2 shared, top-2. Weight seed 0 with a grape budget of 6
# keeps (0, 8, 6, 4) experts: one layer unpruned, the others pruned by different amounts.
LAYERS, WEIGHT_SEED, BUDGET = 4, 0, 6


def _tiny_config(**overrides) -> dict:
    return dsref.tiny_deepseek_config(num_hidden_layers=LAYERS, num_experts_per_tok=2, **overrides)


def _exported_weights(out: str) -> dict[str, np.ndarray]:
    weights = {}
    for path in sorted(glob.glob(os.path.join(out, "*.safetensors"))):
        weights.update(load_file(path))
    return weights


@pytest.fixture(scope="module", params=[False, True], ids=["norm_topk_prob=False", "norm_topk_prob=True"])
def export(request, tmp_path_factory):
    """A grape-pruned DeepSeek-MoE export with uneven per-layer counts, and what produced it."""
    root = tmp_path_factory.mktemp(f"deepseek_norm{int(request.param)}")
    hf_cfg = _tiny_config(norm_topk_prob=request.param)
    src = dsref.save_checkpoint(str(root / "src"), hf_cfg, dsref.random_weights(hf_cfg, seed=WEIGHT_SEED))
    loaded = load_hf(src)
    stats = calibrate(
        loaded,
        random_tokens(loaded.cfg.vocab_size, batch=4, seq=12, seed=5),
        options=CalibrationOptions(batch_size=4, token_chunk=48),
        progress=False,
    )
    plan = make_plan(stats, method="grape", budget=BUDGET, guard="none", operator="freq")
    merged = merge_model(loaded, plan)
    out = save_hf(merged, root / "out")
    return dict(hf_cfg=hf_cfg, merged=merged, cfg=merged.cfg, out=out)


def test_grape_plan_gives_uneven_counts_and_remote_code_config(export):
    counts = list(export["cfg"].num_experts)
    moe_counts = [c for c in counts if c]
    assert counts[0] == 0 and len(moe_counts) == LAYERS - 1
    assert len(set(moe_counts)) > 1, counts  # really per-layer
    assert sum(moe_counts) == (LAYERS - 1) * 8 - BUDGET
    config = json.load(open(os.path.join(export["out"], "config.json")))
    assert config["model_type"] == "deepseek" and config["base_model_type"] == "deepseek"
    assert config["num_experts_per_layer"] == counts and config["n_routed_experts"] == max(counts)
    assert config["norm_topk_prob"] == export["hf_cfg"]["norm_topk_prob"]
    assert config["architectures"] == ["PrunedDeepseekForCausalLM"]
    assert config["auto_map"] == {
        "AutoConfig": "modeling_pruned_moe.PrunedDeepseekConfig",
        "AutoModelForCausalLM": "modeling_pruned_moe.PrunedDeepseekForCausalLM",
    }
    assert os.path.isfile(os.path.join(export["out"], "modeling_pruned_moe.py"))


def test_remote_code_logits_match_jax_and_float64_reference(export, tmp_path):
    out, counts = export["out"], list(export["cfg"].num_experts)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, trust_remote_code=True, dtype=torch.float32, output_loading_info=True
    )
    model.eval()
    assert type(model).__name__ == "PrunedDeepseekForCausalLM"
    assert type(model).__module__.startswith("transformers_modules")  # the copy in the export dir
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info[key], (key, info[key])
    assert [len(layer.mlp.experts) if hasattr(layer.mlp, "experts") else 0 for layer in model.model.layers] == counts

    tokens = random_tokens(export["cfg"].vocab_size, batch=2, seq=12, seed=6)
    got = torch_logits(model, tokens)
    assert np.abs(got).max() > 0.1  # not a degenerate comparison
    assert_close_logits(got, export["merged"](tokens))
    weights = _exported_weights(out)
    config = json.load(open(os.path.join(out, "config.json")))
    for layer, count in enumerate(counts):  # the reference reads each layer's count off its gate
        gate = weights.get(f"model.layers.{layer}.mlp.gate.weight")
        assert (0 if gate is None else gate.shape[0]) == count
    assert_close_logits(got, dsref.reference_logits(config, weights, tokens))

    # save_pretrained keeps the published key layout and reloads to the same logits.
    model.save_pretrained(str(tmp_path / "resaved"))
    resaved = _exported_weights(str(tmp_path / "resaved"))
    assert set(resaved) == set(weights)
    for key, value in weights.items():
        np.testing.assert_array_equal(resaved[key], value, err_msg=key)
    again = transformers.AutoModelForCausalLM.from_pretrained(
        str(tmp_path / "resaved"), trust_remote_code=True, dtype=torch.float32
    )
    np.testing.assert_array_equal(torch_logits(again.eval(), tokens), got)


def test_load_hf_round_trip_is_bit_identical(export):
    again = load_hf(export["out"])
    assert again.info.family == "deepseek"
    assert again.cfg == export["cfg"]
    assert set(param_view(again)) == set(param_view(export["merged"]))
    for name, arr in param_view(export["merged"]).items():
        assert np.asarray(arr).tobytes() == np.asarray(param_view(again)[name]).tobytes(), name


def _pruned_config(counts, **overrides) -> pruned.PrunedDeepseekConfig:
    fields = {k: v for k, v in _tiny_config(**overrides).items() if k not in ("model_type", "auto_map")}
    return pruned.PrunedDeepseekConfig(**fields, num_experts_per_layer=counts)


def test_from_config_matches_float64_reference():
    """Randomly initialised remote-code model vs the reference on its own weights (no grape involved)."""
    torch.manual_seed(0)
    counts = [0, 5, 2, 7]
    model = pruned.PrunedDeepseekForCausalLM(_pruned_config(counts, norm_topk_prob=True)).eval()
    layers = model.model.layers
    assert layers[0].mlp.gate_proj.weight.shape == (40, 32)  # dense: intermediate_size
    assert layers[3].mlp.gate.weight.shape == (7, 32)
    assert layers[3].mlp.experts[6].down_proj.weight.shape == (32, 12)
    assert layers[3].mlp.shared_experts.up_proj.weight.shape == (24, 32)  # 2 shared x 12
    weights = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    assert all(np.isfinite(v).all() and v.std() > 0 for k, v in weights.items() if k.endswith("proj.weight"))
    tokens = random_tokens(128, batch=2, seq=10, seed=1)
    assert_close_logits(
        torch_logits(model, tokens), dsref.reference_logits(_tiny_config(norm_topk_prob=True), weights, tokens)
    )


def test_no_shared_experts():
    model = pruned.PrunedDeepseekForCausalLM(_pruned_config([0, 3, 4, 2], n_shared_experts=0))
    assert all(layer.mlp.shared_experts is None for layer in model.model.layers[1:])
    assert not any("shared_experts" in k for k in model.state_dict())


def test_bad_counts_are_refused(tmp_path):
    with pytest.raises(ValueError, match="layer 2 keeps 1 experts, fewer than num_experts_per_tok=2"):
        _pruned_config([0, 4, 1, 3])
    with pytest.raises(ValueError, match="3 entries for 4 decoder layers"):
        _pruned_config([0, 4, 3])
    with pytest.raises(ValueError, match="layer 0 is a dense layer in deepseek"):
        _pruned_config([4, 4, 3, 3])
    with pytest.raises(ValueError, match="layer 2 is an MoE layer in deepseek"):
        _pruned_config([0, 4, 0, 3])
    with pytest.raises(ValueError, match="layer 1 is a dense layer"):  # moe_layer_freq=2: layers 0, 2 are MoE
        _pruned_config([3, 3, 3, 3], first_k_dense_replace=0, moe_layer_freq=2)
    assert _pruned_config([3, 0, 5, 0], first_k_dense_replace=0, moe_layer_freq=2).num_experts_per_layer == [3, 0, 5, 0]
    with pytest.raises(ValueError, match="scoring_func='sigmoid' is not supported"):
        _pruned_config([0, 4, 3, 3], scoring_func="sigmoid")
    with pytest.raises(ValueError, match="no num_experts_per_layer"):
        pruned.PrunedDeepseekForCausalLM(_pruned_config(None))
    with pytest.raises(ValueError, match="fewer than num_experts_per_tok"):
        write_remote_code(tmp_path, _tiny_config(), family="deepseek", num_experts_per_layer=[0, 4, 1, 3])
    assert not os.path.exists(tmp_path / "modeling_pruned_moe.py")  # nothing written for refused counts


def test_deepseek_names_in_the_remote_code_table():
    assert pruned.class_names("deepseek") == ("PrunedDeepseekConfig", "PrunedDeepseekForCausalLM")
    assert pruned.count_field("deepseek") == "n_routed_experts"
