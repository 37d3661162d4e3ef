"""Merge: exact where it must be, a NumPy reference elsewhere, shardings kept."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grape_jax.config import MoEConfig
from grape_jax.merge import MergeError, layer_mix, merge_params
from grape_jax.model import logits
from grape_jax.params import init_params, param_specs
from grape_jax.sharding import make_mesh, param_shardings

BASE = MoEConfig(
    family="mixtral", vocab_size=64, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1,
    head_dim=8, moe_intermediate_size=24, num_experts=(4, 4), top_k=2, max_position_embeddings=64,
)


def _params(cfg, seed=0):
    return init_params(cfg, jax.random.key(seed), scale=0.3)


def _tokens():
    return np.random.default_rng(0).integers(0, BASE.vocab_size, size=(2, 10), dtype=np.int32)


def _mix(layer, groups, weights=None, dominant=None, rule="dominant", n=4):
    weights = weights or [[1.0 / len(g)] * len(g) for g in groups]
    dominant = dominant or [g[0] for g in groups]
    return layer_mix(layer=layer, num_experts=n, groups=groups, weights=weights, dominant=dominant,
                     router_rule=rule)


def test_identity_plan_is_bit_identical():
    params = _params(BASE)
    mixes = [_mix(l, [[0], [1], [2], [3]]) for l in (0, 1)]
    out, cfg = merge_params(params, BASE, mixes)
    assert cfg == BASE
    for name in params:
        assert out[name] is params[name]


def test_merging_identical_experts_keeps_logits():
    """With top-1 routing (renormalised), two bit-identical experts tie and the lower id wins; their
    merge is selected for exactly the same tokens with the same output. (With k >= 2 both duplicates
    are chosen together, and a merge frees a slot for another expert: logits change by design.)"""
    cfg = dataclasses.replace(BASE, top_k=1)
    params = dict(_params(cfg))
    p = "layers.1.mlp."
    for k in ("w_gate", "w_up", "w_down"):
        params[p + k] = params[p + k].at[2].set(params[p + k][0])
    params[p + "router"] = params[p + "router"].at[:, 2].set(params[p + "router"][:, 0])
    merged, new_cfg = merge_params(params, cfg, [_mix(1, [[0, 2], [1], [3]], [[0.5, 0.5], [1.0], [1.0]])])
    assert new_cfg.num_experts == (4, 3)
    tokens = _tokens()
    np.testing.assert_allclose(np.asarray(logits(merged, new_cfg, tokens)),
                               np.asarray(logits(params, cfg, tokens)), atol=1e-5, rtol=1e-5)


def test_dropping_a_never_selected_expert_keeps_logits():
    """A router bias of -1e4 means expert 1 is never selected (top-k of biased logits, GPT-OSS style)."""
    cfg = dataclasses.replace(BASE, router="topk_softmax", router_bias=True)
    params = dict(_params(cfg))
    params["layers.0.mlp.router_bias"] = params["layers.0.mlp.router_bias"].at[1].set(-1e4)
    merged, new_cfg = merge_params(params, cfg, [_mix(0, [[0], [2], [3]])])
    assert merged["layers.0.mlp.router_bias"].shape == (3,)
    tokens = _tokens()
    np.testing.assert_allclose(np.asarray(logits(merged, new_cfg, tokens)),
                               np.asarray(logits(params, cfg, tokens)), atol=1e-6, rtol=1e-6)
    # pruning is a gather: kept experts are bit-identical
    np.testing.assert_array_equal(np.asarray(merged["layers.0.mlp.w_up"]),
                                  np.asarray(params["layers.0.mlp.w_up"])[[0, 2, 3]])


@pytest.mark.parametrize("rule", ["dominant", "mean"])
def test_merged_weights_match_numpy_reference(rule):
    params = _params(BASE)
    groups, weights, dominant = [[0, 3], [1, 2]], [[0.25, 0.75], [0.6, 0.4]], [3, 1]
    merged, new_cfg = merge_params(params, BASE, [_mix(1, groups, weights, dominant, rule)])
    assert new_cfg.num_experts == (4, 2)
    p = "layers.1.mlp."
    for k in ("w_gate", "w_up", "w_down"):
        w = np.asarray(params[p + k], np.float64)
        ref = np.stack([sum(a * w[e] for e, a in zip(g, al)) for g, al in zip(groups, weights)])
        np.testing.assert_allclose(np.asarray(merged[p + k]), ref, rtol=1e-6, atol=1e-7)
    r = np.asarray(params[p + "router"], np.float64)
    if rule == "dominant":
        ref = r[:, dominant]
    else:
        ref = np.stack([sum(a * r[:, e] for e, a in zip(g, al)) for g, al in zip(groups, weights)], 1)
    np.testing.assert_allclose(np.asarray(merged[p + "router"]), ref, rtol=1e-6, atol=1e-7)
    for name in params:  # layer 0 untouched
        if name.startswith("layers.0."):
            assert merged[name] is params[name]


def test_shardings_are_kept_on_an_8_device_mesh():
    mesh = make_mesh("fsdp=2,expert=4")
    cfg = BASE.with_num_experts((8, 8))
    params = init_params(cfg, jax.random.key(0), shardings=param_shardings(param_specs(cfg), mesh))
    mixes = [_mix(0, [[0, 1], [2, 3], [4], [5], [6], [7], ], n=8),
             _mix(1, [[0, 4], [1, 5], [2, 6], [3, 7]], n=8)]
    merged, new_cfg = merge_params(params, cfg, mixes)
    assert new_cfg.num_experts == (6, 4)
    for name, arr in merged.items():
        before = params[name].sharding.spec
        after = arr.sharding.spec
        if name.startswith("layers.0.") and "mlp" in name and arr.shape != params[name].shape:
            # 6 experts do not divide the expert axis (4): that dimension is replicated, the rest kept
            kept = [None if a == "expert" else a for a in before]
            while kept and kept[-1] is None:  # specs are written without trailing replicated dims
                kept.pop()
            assert after == type(before)(*kept)
        else:
            assert after == before, name
        assert arr.sharding.mesh == mesh


def test_plan_for_another_model_is_refused():
    params = _params(BASE)
    with pytest.raises(MergeError, match="model has 4"):
        merge_params(params, BASE, [_mix(0, [[0], [1], [2], [3], [4]], n=5)])
    with pytest.raises(MergeError, match="fewer than top_k"):
        merge_params(params, BASE, [_mix(0, [[0, 1, 2, 3]])])


def test_aligned_merge_of_a_permuted_copy_keeps_logits():
    """Expert 2 is expert 0 with its intermediate neurons permuted (the same function). Aligned
    averaging recovers expert 0 exactly; plain averaging of the unaligned weights does not."""
    cfg = dataclasses.replace(BASE, top_k=1)
    params = dict(_params(cfg))
    p = "layers.1.mlp."
    perm = np.random.default_rng(0).permutation(cfg.moe_intermediate_size)
    params[p + "w_gate"] = params[p + "w_gate"].at[2].set(params[p + "w_gate"][0][:, perm])
    params[p + "w_up"] = params[p + "w_up"].at[2].set(params[p + "w_up"][0][:, perm])
    params[p + "w_down"] = params[p + "w_down"].at[2].set(params[p + "w_down"][0][perm, :])
    params[p + "router"] = params[p + "router"].at[:, 2].set(params[p + "router"][:, 0])
    groups, weights = [[0, 2], [1], [3]], [[0.5, 0.5], [1.0], [1.0]]
    aligned = layer_mix(layer=1, num_experts=4, groups=groups, weights=weights, dominant=[0, 1, 3],
                        router_rule="dominant", align=True)
    merged, new_cfg = merge_params(params, cfg, [aligned])
    np.testing.assert_allclose(np.asarray(merged[p + "w_up"][0]), np.asarray(params[p + "w_up"][0]), rtol=1e-6)
    tokens = _tokens()
    ref = np.asarray(logits(params, cfg, tokens))
    np.testing.assert_allclose(np.asarray(logits(merged, new_cfg, tokens)), ref, atol=1e-5, rtol=1e-5)
    plain, _ = merge_params(params, cfg, [_mix(1, groups, weights, [0, 1, 3])])
    assert np.abs(np.asarray(logits(plain, new_cfg, tokens)) - ref).max() > 1e-3


def test_aligned_operator_through_a_plan():
    from grape_jax.merge import mixes_from_plan
    from grape_jax.plan import build_plan
    from grape_jax.stats import LayerStats, ModelStats

    s = np.eye(4)
    layers = tuple(LayerStats(l, 10, 2, np.full(4, 0.5), np.full(4, 0.25), np.ones(4), {"cka": s}) for l in (0, 1))
    plan = build_plan(ModelStats(layers), [[[0, 1], [2], [3]], [[0], [1], [2], [3]]], method="test", budget=1,
                      operator="aligned")
    mixes = mixes_from_plan(plan)
    assert mixes[0].aligns and not mixes[1].aligns
    merged, new_cfg = merge_params(_params(BASE), BASE, mixes)
    assert new_cfg.num_experts == (3, 4) and merged["layers.0.mlp.w_gate"].shape == (3, 16, 24)


@pytest.mark.parametrize("mesh_spec", [None, "expert=2,tensor=2,fsdp=2"])
def test_aligned_merge_equals_host_reference(mesh_spec):
    """Permutations from one group at a time, applied and mixed on the devices, equal
    `alignment.align_and_average` on the host; shardings follow the new expert counts."""
    from grape_jax.alignment import align_and_average
    from grape_jax.params import param_specs
    from grape_jax.sharding import make_mesh, param_shardings

    params = dict(_params(BASE))
    mesh = None if mesh_spec is None else make_mesh(mesh_spec)
    if mesh is not None:
        shardings = param_shardings(param_specs(BASE), mesh)
        params = {k: jax.device_put(v, shardings[k]) for k, v in params.items()}
    p = "layers.1.mlp."
    groups, weights = [[0, 1, 3], [2]], [[0.5, 0.3, 0.2], [1.0]]
    aligned = layer_mix(layer=1, num_experts=4, groups=groups, weights=weights, dominant=[1, 2],
                        router_rule="dominant", align=True)
    merged, new_cfg = merge_params(params, BASE, [aligned])
    host = {k: np.asarray(params[p + k]) for k in ("w_gate", "w_up", "w_down")}
    want = align_and_average(host, groups[0], weights[0], anchor=1)
    for k in ("w_gate", "w_up", "w_down"):
        got = merged[p + k]
        np.testing.assert_allclose(np.asarray(got[0]), want[k], rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(np.asarray(got[1]), host[k][2])
        if mesh is not None:
            assert got.sharding.spec == param_shardings(param_specs(new_cfg), mesh)[p + k].spec, k
