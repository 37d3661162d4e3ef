"""The JAX decoder reproduces transformers' Mixtral, on one device and on a simulated 8-device mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from conversion.load import load_hf
from grape_jax.core import transformer
from grape_jax.core.model import abstract_model, param_view
from grape_jax.core.params import param_specs
from grape_jax.core.sharding import make_mesh
from tests.hf_models import random_tokens, torch_logits


def assert_close_logits(ours, ref, tol=1e-4):
    """max |diff| <= tol * max(1, max |ref|): the bound scales with the logit magnitude."""
    ours, ref = np.asarray(ours), np.asarray(ref)
    scale = max(1.0, float(np.abs(ref).max()))
    err = float(np.abs(ours - ref).max())
    assert err <= tol * scale, f"max |diff| {err:.3e} > {tol * scale:.3e}"


@pytest.fixture(scope="module")
def tokens(tiny_mixtral):
    return random_tokens(tiny_mixtral.model.config.vocab_size, batch=2, seq=12, seed=1)


def test_single_device_logits_match_transformers(tiny_mixtral, tokens):
    model = load_hf(tiny_mixtral.path)
    assert isinstance(model, nnx.Module)
    assert_close_logits(model(tokens), torch_logits(tiny_mixtral.model, tokens))


def test_padded_batch_matches_transformers(tiny_mixtral, tokens):
    model = load_hf(tiny_mixtral.path)
    mask = np.ones(tokens.shape, bool)
    mask[1, 7:] = False
    ours = np.asarray(model(tokens, mask))
    ref = torch_logits(tiny_mixtral.model, tokens, mask)
    assert_close_logits(ours[mask], ref[mask])


def test_mesh_logits_and_shardings(tiny_mixtral, tokens):
    mesh = make_mesh("fsdp=2,expert=4")
    assert dict(mesh.shape) == {"data": 1, "fsdp": 2, "expert": 4, "tensor": 1}
    model = load_hf(tiny_mixtral.path, mesh=mesh)
    params = param_view(model)
    w_gate = params["layers.0.mlp.w_gate"]
    assert w_gate.sharding.spec == P("expert", "fsdp")
    assert model.layers[0].mlp.w_gate.get_value() is w_gate
    assert params["layers.1.mlp.w_down"].sharding.spec == P("expert", None, "fsdp")
    assert params["layers.0.mlp.router"].sharding.spec == P("fsdp", "expert")
    assert params["embed"].sharding.spec == P(None, "fsdp")
    # each device holds 1/8 of the stacked experts
    shard = w_gate.addressable_shards[0].data
    assert shard.shape == (w_gate.shape[0] // 4, w_gate.shape[1] // 2, w_gate.shape[2])
    ours = model(tokens)
    assert_close_logits(ours, torch_logits(tiny_mixtral.model, tokens))
    single = load_hf(tiny_mixtral.path)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(single(tokens)), atol=1e-5, rtol=1e-5)


def test_nnx_model_is_the_parameter_table(tiny_mixtral, tokens):
    """State paths are the table's names; every Param carries its logical axes and merge role;
    split/merge round-trips; the module's submodules compute with the same pure functions."""
    model = load_hf(tiny_mixtral.path)
    graphdef, state = nnx.split(model)
    specs = param_specs(model.cfg)
    flat = {".".join(map(str, path)): var for path, var in nnx.to_flat_state(state)}
    assert set(flat) == set(specs)
    for name, var in flat.items():
        assert isinstance(var, nnx.Param)
        assert var.get_metadata()["out_sharding"] == specs[name].axes, name
        assert var.get_metadata()["merge_role"] == specs[name].role, name
    restored = nnx.merge(graphdef, state)
    np.testing.assert_array_equal(np.asarray(restored(tokens)), np.asarray(model(tokens)))
    x = np.random.default_rng(0).normal(size=(5, model.cfg.hidden_size)).astype(np.float32)
    block = model.layers[1].mlp
    np.testing.assert_allclose(
        np.asarray(block(jnp.asarray(x))),
        np.asarray(transformer.moe_block(param_view(model), "layers.1.mlp.", model.cfg, x)[0]),
        rtol=1e-6,
        atol=1e-6,
    )


def test_wrong_shapes_fail_at_the_entry_of_the_jitted_forward(tiny_mixtral, tokens):
    model = load_hf(tiny_mixtral.path)
    with pytest.raises(AssertionError, match="shapes"):
        model(tokens, np.ones((2, 5), bool))
    with pytest.raises(AssertionError, match="rank"):
        model(tokens[0])


def test_abstract_model_allocates_nothing(tiny_mixtral):
    model = abstract_model(load_hf(tiny_mixtral.path).cfg)
    leaves = jax.tree.leaves(nnx.state(model))
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)


def _moe_reference(x, router, w_gate, w_up, w_down, top_k):
    """float64 NumPy Mixtral MoE block: softmax, top-k, renormalise, SwiGLU experts."""
    x = x.astype(np.float64)
    logits_ = x @ router.astype(np.float64)
    probs = np.exp(logits_ - logits_.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        top = np.argsort(-probs[t])[:top_k]
        w = probs[t, top] / probs[t, top].sum()
        for weight, e in zip(w, top):
            g = x[t] @ w_gate[e].astype(np.float64)
            u = x[t] @ w_up[e].astype(np.float64)
            out[t] += weight * ((g / (1 + np.exp(-g)) * u) @ w_down[e].astype(np.float64))
    return out


@pytest.mark.parametrize("num_experts", [4, 3, 2])
def test_moe_block_with_any_expert_count_matches_float64_reference(tiny_mixtral, num_experts):
    """Pruned layers keep fewer experts: the block is exact for any count (here a subset of experts)."""
    model = load_hf(tiny_mixtral.path)
    params = param_view(model)
    p = "layers.1.mlp."
    keep = np.arange(num_experts)
    sub = {
        p + "router": np.asarray(params[p + "router"])[:, keep],
        **{p + k: np.asarray(params[p + k])[keep] for k in ("w_gate", "w_up", "w_down")},
    }
    x = np.random.default_rng(0).normal(size=(10, model.cfg.hidden_size)).astype(np.float32)
    cfg = model.cfg.with_num_experts((4, num_experts))
    out, routing, y_all = jax.jit(transformer.moe_block, static_argnums=(1, 2))(
        {k: jnp.asarray(v) for k, v in sub.items()}, p, cfg, jnp.asarray(x)
    )
    ref = _moe_reference(x, sub[p + "router"], sub[p + "w_gate"], sub[p + "w_up"], sub[p + "w_down"], cfg.top_k)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-6)
    assert y_all.shape == (num_experts, 10, model.cfg.hidden_size)
    np.testing.assert_allclose(np.asarray(routing.gates).sum(-1), 1.0, rtol=1e-6)
