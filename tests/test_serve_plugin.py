"""The grape_vllm plugin's pure-Python side, without vLLM (default suite): its table agrees with the
exports grape-jax writes and with `grape families`, and it refuses malformed `num_experts_per_layer`
in one line naming the field. Serving itself is tested in tests/test_serve_vllm.py (`-m serve`)."""

from __future__ import annotations

import os
import sys

import pytest

from conversion.families import FAMILIES, export_family
from conversion.remote_code import modeling_pruned_moe as pruned
from grape_jax.cli import models as cli_model

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "serving", "vllm_plugin"))
from grape_vllm.families import SERVED, GrapeServeError, is_uniform, layer_counts  # noqa: E402

MIXTRAL = SERVED["PrunedMixtralForCausalLM"]
GLM = SERVED["PrunedGlm4MoeForCausalLM"]


def test_plugin_architectures_are_the_names_exports_write():
    for architecture, family in SERVED.items():
        assert pruned.class_names(family.base_model_type)[1] == architecture
        assert pruned.count_field(family.base_model_type) == family.count_field


def test_grape_families_names_the_plugin_for_exactly_the_served_families():
    assert set(cli_model.VLLM_PER_LAYER) == {f.base_model_type for f in SERVED.values()}
    serve_lines, model_type = {}, None
    for line in cli_model.family_lines(FAMILIES):
        if not line.startswith(" "):
            model_type = line.split()[0]
        elif "serve:" in line:
            serve_lines[model_type] = line
    assert set(serve_lines) == set(FAMILIES)
    for model_type, family in FAMILIES.items():
        served = export_family(family).name in cli_model.VLLM_PER_LAYER
        assert ("grape_vllm" in serve_lines[model_type]) == served, (model_type, serve_lines[model_type])


def _config(**overrides):
    return {"num_hidden_layers": 3, "num_local_experts": 6, "num_experts_per_tok": 2, **overrides}


def test_good_counts_pass():
    assert layer_counts(_config(num_experts_per_layer=[6, 4, 5]), MIXTRAL) == [6, 4, 5]
    assert not is_uniform([6, 4, 5]) and is_uniform([0, 4, 4])


@pytest.mark.parametrize(
    "counts, says",
    [
        (None, "missing"),
        ("6,4,5", "expected a list"),
        ([6, 4], "2 entries for num_hidden_layers=3"),
        ([6, 4.5, 5], "expected integers"),
        ([6, True, 5], "expected integers"),
        ([6, -1, 5], ">= 0"),
        ([0, 0, 0], "at least one MoE layer"),
        ([6, 7, 5], "num_local_experts=6"),
        ([6, 1, 5], "fewer than top-k=2"),
    ],
)
def test_malformed_counts_are_one_line_errors_naming_the_field(counts, says):
    config = _config() if counts is None else _config(num_experts_per_layer=counts)
    with pytest.raises(GrapeServeError) as info:
        layer_counts(config, MIXTRAL)
    message = str(info.value)
    assert "num_experts_per_layer" in message and says in message and "\n" not in message


def test_group_limited_counts_need_whole_groups():
    config = {"num_hidden_layers": 2, "n_routed_experts": 8, "num_experts_per_tok": 2, "n_group": 2}
    assert layer_counts({**config, "num_experts_per_layer": [0, 6]}, GLM) == [0, 6]
    with pytest.raises(GrapeServeError, match="n_group=2"):
        layer_counts({**config, "num_experts_per_layer": [0, 5]}, GLM)
