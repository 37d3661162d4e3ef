"""Normalised routing entropy of the top-k slots: hand-computed cases, and the script on the shipped
demo model against the routing of the PyTorch `transformers` Mixtral (an independent forward)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import transformers

import grape_jax as gj
from grape_jax.calibration.stats import LayerStats, StatsError, routing_entropy
from scripts.routing_entropy import main as routing_entropy_main
from scripts.routing_entropy import measure


def _layer(freq, top_k=2) -> LayerStats:
    freq = np.asarray(freq, np.float64)
    e = freq.shape[0]
    return LayerStats(0, 10, top_k, freq, freq / top_k, freq, {"cka": np.eye(e)})


def test_routing_entropy_hand_computed():
    # shares 1/2, 1/4, 1/4, 0: H = 1/2 ln 2 + 2 * 1/4 ln 4 = 3/2 ln 2; / ln 4 = 3/4
    assert routing_entropy(_layer([1.0, 0.5, 0.5, 0.0])) == pytest.approx(0.75, abs=1e-12)
    assert routing_entropy(_layer([0.5, 0.5, 0.5, 0.5])) == pytest.approx(1.0, abs=1e-12)
    # collapsed onto 2 of 8 experts (every token picks the same pair): ln 2 / ln 8 = 1/3
    assert routing_entropy(_layer([1, 1, 0, 0, 0, 0, 0, 0])) == pytest.approx(1 / 3, abs=1e-12)
    # top-1 over 3 experts with shares 0.5, 0.3, 0.2
    expected = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2)) / math.log(3)
    assert routing_entropy(_layer([0.5, 0.3, 0.2], top_k=1)) == pytest.approx(expected, abs=1e-12)


def test_routing_entropy_refuses_non_distributions():
    with pytest.raises(StatsError, match="distribution"):
        routing_entropy(_layer([1.0, 1.0, 1.0, 0.0]))
    with pytest.raises(StatsError, match="at least 2 experts"):
        routing_entropy(_layer([1.0], top_k=1))


def _torch_topk_entropy(model_dir: str, blocks: np.ndarray) -> list[float]:
    """Per MoE layer: entropy of the top-k expert counts of the transformers model's own router logits."""
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(torch.tensor(blocks, dtype=torch.long), output_router_logits=True)
    k, result = model.config.num_experts_per_tok, []
    for logits in out.router_logits:
        e = logits.shape[-1]
        top = torch.topk(logits.reshape(-1, e), k, dim=-1).indices.numpy()
        share = np.bincount(top.ravel(), minlength=e) / top.size
        share = share[share > 0]
        result.append(float(-(share * np.log(share)).sum() / math.log(e)))
    return result


def test_script_matches_transformers_routing():
    model_dir = gj.demo_model_path()
    result = measure(model_dir, data=None, num_samples=16, seq_len=128, seed=1)
    blocks = gj.token_blocks(model_dir, None, seq_len=128, num_samples=16, seed=1, heldout=True)
    ours = [result["routing_entropy"][layer] for layer in sorted(result["routing_entropy"])]
    np.testing.assert_allclose(ours, _torch_topk_entropy(model_dir, blocks), atol=2e-3)
    assert result["min_routing_entropy"] == min(ours)


def test_shipped_demo_model_routes_in_balance(tmp_path, capsys):
    """The requirement on the shipped model: every layer >= 0.8 on 200 held-out blocks (seed 1)."""
    out = tmp_path / "entropy.json"
    assert routing_entropy_main([gj.demo_model_path(), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["num_samples"] == 200 and len(result["routing_entropy"]) == 4
    assert result["min_routing_entropy"] >= 0.8, result["routing_entropy"]
    assert f"min routing entropy {result['min_routing_entropy']:.4f}" in printed


def test_script_bad_input_is_one_line(tmp_path, capsys):
    assert routing_entropy_main([gj.demo_model_path(), "--data", str(tmp_path / "missing.txt")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("routing_entropy: ") and "missing.txt" in err and "\n" not in err
