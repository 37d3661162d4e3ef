"""Merge: one pure function of the state (jit/eval_shape), exact where it must be, a NumPy reference
elsewhere, shardings from the new config's table."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from grape_jax.core.config import MoEConfig
from grape_jax.core.model import ModelInfo, abstract_model, init_model, model_from_arrays, param_view, state_shardings
from grape_jax.core.params import init_params
from grape_jax.core.sharding import RunContext, make_mesh
from grape_jax.merge.alignment import align_and_average
from grape_jax.merge.state import MergeError, MergeInputs, merge_inputs, merge_model, merge_state
from grape_jax.planners.plan import LayerPlan, Plan

BASE = MoEConfig(
    family="mixtral",
    vocab_size=64,
    hidden_size=16,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=8,
    moe_intermediate_size=24,
    num_experts=(4, 4),
    top_k=2,
    max_position_embeddings=64,
)


def _model(cfg=BASE, arrays=None, ctx=RunContext()):
    return model_from_arrays(cfg, arrays or init_params(cfg, seed=0, scale=0.3), ctx=ctx)


def _tokens():
    return np.random.default_rng(0).integers(0, BASE.vocab_size, size=(2, 10), dtype=np.int32)


def _layer(layer, groups, weights=None, dominant=None, n=4, dropped=()):
    groups = [tuple(g) for g in groups]
    weights = weights or [[1.0 / len(g)] * len(g) for g in groups]
    dominant = dominant or [g[0] for g in groups]
    order = sorted(range(len(groups)), key=lambda k: min(groups[k]))
    return LayerPlan(
        layer,
        n,
        tuple(tuple(sorted(groups[k])) for k in order),
        tuple(tuple(w for _, w in sorted(zip(groups[k], weights[k]))) for k in order),
        tuple(dominant[k] for k in order),
        tuple(dropped),
    )


def _plan(*layers, operator="freq", rule="dominant", made_from=None):
    removed = sum(lp.num_experts_before - lp.num_kept for lp in layers)
    return Plan(
        layers=tuple(layers),
        method="test",
        budget=removed,
        operator=operator,
        router_rule=rule,
        made_from=made_from or {},
    )


def _ident(layer, n=4):
    return _layer(layer, [[e] for e in range(n)], n=n)


def test_identity_plan_is_bit_identical():
    model = _model()
    merged = merge_model(model, _plan(_ident(0), _ident(1), operator="drop"))
    assert merged.cfg == BASE
    for name, value in param_view(model).items():
        assert np.asarray(param_view(merged)[name]).tobytes() == np.asarray(value).tobytes(), name


def test_merge_state_is_pure_under_eval_shape_and_jit():
    """eval_shape gives the pruned shapes without computing; jit of the same function equals merge_model."""
    model = _model()
    plan = _plan(
        _layer(0, [[0, 1], [2], [3]], [[0.3, 0.7], [1.0], [1.0]], [1, 2, 3]),
        _layer(1, [[0], [1], [3]], n=4, dropped=(2,)),
    )
    _, state = nnx.split(model)
    shapes = jax.eval_shape(lambda s: merge_state(s, plan), state)
    flat = {".".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(shapes)}
    assert all(isinstance(v, jax.ShapeDtypeStruct) for v in flat.values())
    assert flat["layers.0.mlp.w_gate"].shape == (3, 16, 24) and flat["layers.1.mlp.router"].shape == (16, 3)
    assert flat["layers.0.attn.q_proj"].shape == (16, 16)
    jitted = jax.jit(lambda s: merge_state(s, plan))(state)
    merged = merge_model(model, plan)
    assert merged.cfg.num_experts == (3, 3)
    got = {".".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(jitted)}
    for name, value in param_view(merged).items():
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(value), err_msg=name)
    # metadata travels: the merged state's Params still carry their logical axes and roles
    var = dict(nnx.to_flat_state(jitted))[("layers", 0, "mlp", "router")]
    assert var.get_metadata()["out_sharding"] == ("embed", "experts") and var.get_metadata()["merge_role"] == "router"


def test_merging_identical_experts_keeps_logits():
    """With top-1 routing (renormalised), two bit-identical experts tie and the lower id wins; their
    merge is selected for exactly the same tokens with the same output. (With k >= 2 both duplicates
    are chosen together, and a merge frees a slot for another expert: logits change by design.)"""
    cfg = dataclasses.replace(BASE, top_k=1)
    arrays = init_params(cfg, seed=0, scale=0.3)
    p = "layers.1.mlp."
    for k in ("w_gate", "w_up", "w_down"):
        arrays[p + k][2] = arrays[p + k][0]
    arrays[p + "router"][:, 2] = arrays[p + "router"][:, 0]
    model = _model(cfg, arrays)
    merged = merge_model(model, _plan(_ident(0), _layer(1, [[0, 2], [1], [3]], [[0.5, 0.5], [1.0], [1.0]])))
    assert merged.cfg.num_experts == (4, 3)
    tokens = _tokens()
    np.testing.assert_allclose(np.asarray(merged(tokens)), np.asarray(model(tokens)), atol=1e-5, rtol=1e-5)


def test_dropping_a_never_selected_expert_keeps_logits():
    """A router bias of -1e4 means expert 1 is never selected (top-k of biased logits, GPT-OSS style)."""
    cfg = dataclasses.replace(BASE, router="topk_softmax", router_bias=True)
    arrays = init_params(cfg, seed=0, scale=0.3)
    arrays["layers.0.mlp.router_bias"][1] = -1e4
    model = _model(cfg, arrays)
    merged = merge_model(model, _plan(_layer(0, [[0], [2], [3]], dropped=(1,)), _ident(1), operator="drop"))
    assert merged.layers[0].mlp.router_bias.get_value().shape == (3,)
    tokens = _tokens()
    np.testing.assert_allclose(np.asarray(merged(tokens)), np.asarray(model(tokens)), atol=1e-6, rtol=1e-6)
    np.testing.assert_array_equal(
        np.asarray(merged.layers[0].mlp.w_up.get_value()), arrays["layers.0.mlp.w_up"][[0, 2, 3]]
    )


@pytest.mark.parametrize("rule", ["dominant", "mean"])
def test_merged_weights_match_numpy_reference(rule):
    model = _model()
    params = param_view(model)
    groups, weights, dominant = [[0, 3], [1, 2]], [[0.25, 0.75], [0.6, 0.4]], [3, 1]
    merged = merge_model(model, _plan(_ident(0), _layer(1, groups, weights, dominant), rule=rule))
    assert merged.cfg.num_experts == (4, 2)
    out = param_view(merged)
    p = "layers.1.mlp."
    for k in ("w_gate", "w_up", "w_down"):
        w = np.asarray(params[p + k], np.float64)
        ref = np.stack([sum(a * w[e] for e, a in zip(g, al)) for g, al in zip(groups, weights)])
        np.testing.assert_allclose(np.asarray(out[p + k]), ref, rtol=1e-6, atol=1e-7)
    r = np.asarray(params[p + "router"], np.float64)
    if rule == "dominant":
        ref = r[:, dominant]
    else:
        ref = np.stack([sum(a * r[:, e] for e, a in zip(g, al)) for g, al in zip(groups, weights)], 1)
    np.testing.assert_allclose(np.asarray(out[p + "router"]), ref, rtol=1e-6, atol=1e-7)
    for name in params:  # layer 0 untouched
        if name.startswith("layers.0."):
            np.testing.assert_array_equal(np.asarray(out[name]), np.asarray(params[name]))


def test_shardings_follow_the_new_table_on_an_8_device_mesh():
    ctx = RunContext(make_mesh("fsdp=2,expert=4"))
    cfg = BASE.with_num_experts((8, 8))
    model = init_model(cfg, ctx=ctx)
    plan = _plan(_layer(0, [[0, 1], [2, 3], [4], [5], [6], [7]], n=8), _layer(1, [[0, 4], [1, 5], [2, 6], [3, 7]], n=8))
    merged = merge_model(model, plan)
    assert merged.cfg.num_experts == (6, 4) and merged.ctx == ctx
    _, want = nnx.split(abstract_model(merged.cfg, ctx=ctx))
    shardings = {".".join(map(str, k)): v for k, v in nnx.to_flat_state(state_shardings(want, ctx))}
    before = param_view(model)
    for name, arr in param_view(merged).items():
        assert arr.sharding == shardings[name], name
        if name.startswith("layers.0.mlp.w_"):  # 6 experts do not divide the expert axis: replicated there
            assert "expert" not in str(arr.sharding.spec) and "expert" in str(before[name].sharding.spec)


def test_plan_for_another_model_is_refused():
    model = _model()
    with pytest.raises(MergeError, match="plan is for 5 experts, the model has 4"):
        merge_model(model, _plan(_layer(0, [[e] for e in range(5)], n=5), _ident(1)))
    with pytest.raises(MergeError, match="keeps 1 experts; needs at least 2"):
        merge_model(model, _plan(_layer(0, [[0, 1, 2, 3]]), _ident(1)))
    with pytest.raises(MergeError, match=r"covers MoE layers \[0\]"):
        merge_model(model, _plan(_ident(0)))


def test_plan_made_from_another_models_statistics_is_refused():
    info = ModelInfo.create(provenance=[{"stage": "load", "fingerprint": "a" * 64}])
    model = model_from_arrays(BASE, init_params(BASE, seed=0), info=info)
    other = {"model_fingerprint": "b" * 64, "model_source": "/models/B"}
    with pytest.raises(MergeError, match="made from statistics of model bbbb.*but this model is "):
        merge_model(model, _plan(_ident(0), _ident(1), made_from=other))
    same = {"model_fingerprint": info.fingerprint}
    assert merge_model(model, _plan(_ident(0), _ident(1), made_from=same)).cfg == BASE


def _permuted_copy(cfg):
    """Expert 2 of layer 1 is expert 0 with its intermediate neurons permuted (the same function)."""
    arrays = init_params(cfg, seed=0, scale=0.3)
    p = "layers.1.mlp."
    perm = np.random.default_rng(0).permutation(cfg.moe_intermediate_size)
    arrays[p + "w_gate"][2] = arrays[p + "w_gate"][0][:, perm]
    arrays[p + "w_up"][2] = arrays[p + "w_up"][0][:, perm]
    arrays[p + "w_down"][2] = arrays[p + "w_down"][0][perm, :]
    arrays[p + "router"][:, 2] = arrays[p + "router"][:, 0]
    return arrays


def test_aligned_merge_of_a_permuted_copy_keeps_logits():
    """Aligned averaging recovers expert 0 exactly; plain averaging of the unaligned weights does not."""
    cfg = dataclasses.replace(BASE, top_k=1)
    model = _model(cfg, _permuted_copy(cfg))
    layer1 = _layer(1, [[0, 2], [1], [3]], [[0.5, 0.5], [1.0], [1.0]], [0, 1, 3])
    merged = merge_model(model, _plan(_ident(0), layer1, operator="aligned"))
    np.testing.assert_allclose(
        np.asarray(merged.layers[1].mlp.w_up.get_value()[0]),
        np.asarray(model.layers[1].mlp.w_up.get_value()[0]),
        rtol=1e-6,
    )
    tokens = _tokens()
    ref = np.asarray(model(tokens))
    np.testing.assert_allclose(np.asarray(merged(tokens)), ref, atol=1e-5, rtol=1e-5)
    plain = merge_model(model, _plan(_ident(0), layer1, operator="freq"))
    assert np.abs(np.asarray(plain(tokens)) - ref).max() > 1e-3


def test_aligned_merge_needs_its_permutations():
    model = _model()
    plan = _plan(_layer(0, [[0, 1], [2], [3]]), _ident(1), operator="aligned")
    inputs = merge_inputs(model, plan)
    assert set(inputs.permutations) == {"layers.0.mlp."} and inputs.permutations["layers.0.mlp."].shape == (4, 24)
    _, state = nnx.split(model)
    with pytest.raises(MergeError, match="needs neuron permutations for layers.0.mlp."):
        merge_state(state, plan)
    assert jax.eval_shape(lambda s, i: merge_state(s, plan, i), state, inputs) is not None


def test_overrides_replace_whole_leaves():
    model = _model()
    plan = _plan(_layer(0, [[0, 1], [2], [3]]), _ident(1))
    w_down = np.random.default_rng(1).normal(size=(3, 24, 16)).astype(np.float32)
    merged = merge_model(model, plan, inputs=MergeInputs(overrides={"layers.0.mlp.w_down": w_down}))
    np.testing.assert_array_equal(np.asarray(merged.layers[0].mlp.w_down.get_value()), w_down)
    with pytest.raises(
        MergeError, match=r"override for layers.0.mlp.w_down: shape \(4, 24, 16\), expected \(3, 24, 16\)"
    ):
        merge_model(model, plan, inputs=MergeInputs(overrides={"layers.0.mlp.w_down": np.zeros((4, 24, 16))}))


@pytest.mark.parametrize("mesh_spec", [None, "expert=2,tensor=2,fsdp=2"])
def test_aligned_merge_equals_host_reference(mesh_spec):
    """Permutations from one group at a time, applied and mixed on the devices, equal
    `alignment.align_and_average` on the host; shardings follow the new expert counts."""
    ctx = RunContext(None if mesh_spec is None else make_mesh(mesh_spec))
    model = _model(ctx=ctx)
    p = "layers.1.mlp."
    groups, weights = [[0, 1, 3], [2]], [[0.5, 0.3, 0.2], [1.0]]
    merged = merge_model(model, _plan(_ident(0), _layer(1, groups, weights, [1, 2]), operator="aligned"))
    host = {k: np.asarray(param_view(model)[p + k]) for k in ("w_gate", "w_up", "w_down")}
    want = align_and_average(host, groups[0], weights[0], anchor=1)
    for k in ("w_gate", "w_up", "w_down"):
        got = param_view(merged)[p + k]
        np.testing.assert_allclose(np.asarray(got[0]), want[k], rtol=1e-6, atol=1e-7)
        np.testing.assert_array_equal(np.asarray(got[1]), host[k][2])
        assert got.sharding == ctx.sharding(
            got.shape, ("experts", *(("embed", "mlp") if k != "w_down" else ("mlp", "embed")))
        ), k


def test_a_fit_plan_without_the_fits_inputs_is_refused():
    """Never merged as 'dominant' silently: no inputs, or empty ones, name the way (gj.fit_inputs)."""
    model = _model()
    base = _plan(_layer(0, [[0, 1], [2], [3]], weights=[[1.0, 0.0], [1.0], [1.0]]), _ident(1), operator="dominant")
    plan = dataclasses.replace(base, operator="fit")  # the fit's weights are the dominant operator's
    _, state = nnx.split(model)
    for inputs in (None, MergeInputs()):
        with pytest.raises(MergeError, match=r"pass inputs=gj\.fit_inputs\(model, plan, blocks\)"):
            merge_state(state, plan, inputs)
        with pytest.raises(MergeError, match="operator 'fit'"):
            merge_model(model, plan, inputs=inputs)
    kept = MergeInputs(made_by='{"operator": "fit"}')  # a fit that kept every layer's base merge
    dominant = merge_model(model, base, inputs=MergeInputs())
    merged = merge_model(model, plan, inputs=kept)
    for name, value in param_view(dominant).items():
        np.testing.assert_array_equal(np.asarray(param_view(merged)[name]), np.asarray(value), err_msg=name)
