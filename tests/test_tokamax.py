"""The tokamax grouped matmul (`dispatch="tokamax_*"`, `grape_jax.core.dispatch`) against the dense path:
its `xla` implementation (the one that runs on CPU) in fp32 for families with shared experts, expert biases
and clamped SwiGLU, per layer and in the logits, on 1 and 8 simulated devices, and its VJP; the masking of
rows in no group; and the pure rule that picks a grouped kind per platform and device (what `auto` and
`routed` run, healing's training step included)."""

from __future__ import annotations

import importlib.util
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grape_jax.core import dispatch, transformer
from grape_jax.core.sharding import make_mesh
from tests.test_dispatch import assert_close, family_cfg, logits, mesh_scope, moe_case, moe_fn, random_params, shard

needs_tokamax = pytest.mark.skipif(
    importlib.util.find_spec("tokamax") is None, reason="tokamax not installed (pip install -e '.[test]')"
)
KIND = "tokamax_xla"
FAMILIES = ("mixtral", "gpt_oss", "deepseek_v3", "qwen2_moe")  # plain, biases + clamp, shared + sigmoid, shared gate


# ----------------------------------------------------------------------------- selection rule (pure)


@pytest.mark.parametrize(
    "platform,capability,tokamax,fast,expected",
    [
        ("gpu", "9.0", True, False, "tokamax_mosaic"),  # H100 / H200
        ("gpu", "9.0", True, True, "tokamax_mosaic"),  # tokamax before jax's own GPU lowering
        ("gpu", "10.0", True, False, "tokamax_triton"),  # B200: no Mosaic weight-gradient kernel in 0.0.12
        ("gpu", "8.0", True, False, "tokamax_triton"),  # A100
        ("gpu", "12.0", True, False, "tokamax_triton"),  # consumer Blackwell: no Mosaic kernel in tokamax
        ("gpu", None, True, False, "tokamax_triton"),
        ("gpu", "9.0", False, True, "ragged_dot"),
        ("gpu", "9.0", False, False, "batched"),
        ("tpu", None, True, False, "ragged_dot"),
        ("cpu", None, True, False, "blocked"),
        ("cpu", None, False, False, "blocked"),
    ],
)
def test_grouped_kind_rule(platform, capability, tokamax, fast, expected):
    assert dispatch.select_grouped_kind(platform, capability, tokamax=tokamax, fast_ragged_dot=fast) == expected


def test_tokamax_kind_per_device():
    assert dispatch.tokamax_kind("gpu", "9.0") == "tokamax_mosaic"
    assert dispatch.tokamax_kind("gpu", "9.0a") == "tokamax_mosaic"
    assert dispatch.tokamax_kind("gpu", "10.0") == "tokamax_triton"
    assert dispatch.tokamax_kind("gpu", "8.9") == "tokamax_triton"
    assert dispatch.tokamax_kind("cpu", None) == dispatch.tokamax_kind("tpu", None) == "tokamax_xla"
    assert dispatch.TOKAMAX_IMPLEMENTATIONS["tokamax_mosaic"][0] == "mosaic"


def test_auto_on_gpu_takes_tokamax_when_installed(monkeypatch):
    """Healing's `model_logits` runs dispatch='auto': on a Hopper GPU with tokamax importable that is the
    mosaic kernel (and its VJP) at every shape; without tokamax the earlier GPU choice."""
    shape = {"num_experts": 4, "top_k": 2, "tokens": 24, "hidden": 32, "ffn": 48}
    monkeypatch.setattr(dispatch, "compute_capability", lambda platform: "9.0" if platform == "gpu" else None)
    monkeypatch.setattr(dispatch, "fast_gpu_ragged_dot", lambda: False)
    monkeypatch.setattr(dispatch, "tokamax_module", lambda: types.SimpleNamespace())
    assert dispatch.choose("auto", **shape, platform="gpu") == "tokamax_mosaic"
    assert dispatch.choose("routed", **shape, platform="gpu") == "tokamax_mosaic"
    assert dispatch.choose("tokamax", **shape, platform="gpu") == "tokamax_mosaic"
    assert dispatch.choose("auto", **{**shape, "tokens": 10**5}, platform="cpu") == "blocked"
    assert dispatch.choose("tokamax", **shape, platform="cpu") == "tokamax_xla"
    monkeypatch.setattr(dispatch, "tokamax_module", lambda: None)
    assert dispatch.choose("auto", **shape, platform="gpu") == "batched"


def test_missing_tokamax_is_one_line(monkeypatch):
    monkeypatch.setattr(dispatch, "tokamax_module", lambda: None)
    cfg, p, params, x = moe_case("mixtral")
    with pytest.raises(dispatch.DispatchError, match=r"^dispatch 'tokamax_triton' needs the optional package tokamax"):
        moe_fn(cfg, p, "tokamax_triton")(params, x)
    with pytest.raises(dispatch.DispatchError, match="dispatch 'tokamax_mosaic' needs") as err:
        logits(random_params(cfg), cfg, np.zeros((1, 4), np.int32), dispatch="tokamax_mosaic")
    assert "\n" not in str(err.value)


def test_rows_in_no_group_reach_neither_output_nor_gradient(monkeypatch):
    """A kernel may leave rows past the groups unwritten (expert-sharded: the rows of experts held
    elsewhere): a stand-in that fills them with NaN still gives the dense output and gradients."""

    def garbage_ragged_dot(lhs, rhs, group_sizes, *, implementation):
        y = jax.lax.ragged_dot(lhs, rhs, group_sizes)
        past = jnp.arange(lhs.shape[0]) >= jnp.sum(group_sizes)
        return jnp.where(past[:, None], jnp.nan, y)

    monkeypatch.setattr(dispatch, "tokamax_module", lambda: types.SimpleNamespace(ragged_dot=garbage_ragged_dot))
    cfg, p, params, x = moe_case("gpt_oss", seed=11)
    probe = jnp.asarray(np.random.default_rng(12).standard_normal(x.shape, np.float32))
    mesh = make_mesh("expert=2,tensor=2,data=2")
    sharded = shard(params, cfg, mesh)

    def grads(kind, params):
        loss = lambda params, x: jnp.sum(transformer.moe_output(params, p, cfg, x, dispatch=kind) * probe)
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)

    ref_loss, (ref_params, ref_x) = grads("dense", params)
    with jax.set_mesh(mesh):
        out_loss, (g_params, g_x) = grads("tokamax_triton", sharded)
    assert_close(out_loss, ref_loss, rtol=1e-5)
    assert_close(g_x, ref_x, rtol=1e-4)
    for key, ref in ref_params.items():
        assert_close(g_params[key], ref, rtol=1e-4)


# ----------------------------------------------------------------------------- tokamax's xla implementation


@needs_tokamax
@pytest.mark.parametrize("name", FAMILIES)
def test_tokamax_equals_dense_per_layer_and_logits(name):
    cfg = family_cfg(name)
    params = random_params(cfg, seed=13)
    tokens = jnp.asarray(np.random.default_rng(14).integers(0, cfg.vocab_size, (2, 16)).astype(np.int32))
    mask = jnp.ones(tokens.shape, bool)

    def run(kind):
        def fn(params):
            positions = transformer.default_positions(mask)
            x, outs = transformer.embed(params, tokens), []
            for layer in range(cfg.num_layers):
                x = transformer.decoder_layer(params, cfg, layer, x, positions, mask, dispatch=kind)
                outs.append(x)
            return outs, transformer.head(params, cfg, x)

        return jax.jit(fn)(params)

    (dense_layers, dense_logits), (tk_layers, tk_logits) = run("dense"), run(KIND)
    assert len(dense_layers) == cfg.num_layers and any(cfg.num_experts)
    for ours, ref in zip(tk_layers, dense_layers, strict=True):
        assert_close(ours, ref)
    assert_close(tk_logits, dense_logits)
    assert_close(logits(params, cfg, tokens, dispatch=KIND), dense_logits)


@needs_tokamax
@pytest.mark.parametrize("name", ["gpt_oss", "deepseek_v3", "qwen2_moe"])
def test_tokamax_gradients_match_dense(name):
    """d(loss)/d(every MoE parameter) and d(loss)/dx through tokamax's VJP; the loss weights each output
    differently."""
    cfg, p, params, x = moe_case(name, seed=2)
    probe = jnp.asarray(np.random.default_rng(3).standard_normal(x.shape, np.float32))

    def grads(kind):
        loss = lambda params, x: jnp.sum(transformer.moe_output(params, p, cfg, x, dispatch=kind) * probe)
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

    (ref_params, ref_x), (g_params, g_x) = grads("dense"), grads(KIND)
    assert_close(g_x, ref_x, rtol=1e-4)
    assert set(g_params) == set(ref_params)
    for key, ref in ref_params.items():
        assert_close(g_params[key], ref, rtol=1e-4)


@needs_tokamax
@pytest.mark.parametrize(
    "mesh_spec,name",
    [
        ("expert=4", "deepseek_v3"),  # 8 experts on 4 devices, shared experts
        ("expert=8", "gpt_oss"),  # 4 experts do not divide 8: replicated, routed per device
        ("expert=2,data=4", "qwen2_moe"),  # tokens split 4 ways, shared expert gate
        ("expert=2,tensor=4", "gpt_oss"),  # MLP width split over tensor: biases, b_down added once
    ],
)
def test_tokamax_on_mesh_equals_dense(mesh_spec, name):
    cfg, p, params, x = moe_case(name, seed=4)
    dense = moe_fn(cfg, p, "dense")(params, x)
    mesh = make_mesh(mesh_spec)
    with jax.set_mesh(mesh):
        assert_close(moe_fn(cfg, p, KIND)(shard(params, cfg, mesh), x), dense)


@needs_tokamax
@pytest.mark.slow
def test_tokamax_forward_and_training_gradient_on_a_mesh():
    """The whole forward on expert=4,data=2 (one layer sharded, one replicated), and a training loss's
    gradient on expert=4,fsdp=2, through tokamax's VJP inside the shard_map."""
    cfg = family_cfg("mixtral").with_num_experts((8, 6))
    params = random_params(cfg, seed=5)
    tokens = np.random.default_rng(6).integers(0, cfg.vocab_size, (4, 10)).astype(np.int32)
    dense = logits(params, cfg, tokens, dispatch="dense")
    assert_close(logits(shard(params, cfg, make_mesh("expert=4,data=2")), cfg, tokens, dispatch="tokamax"), dense)

    sharded = shard(params, cfg, make_mesh("expert=4,fsdp=2"))
    loss = lambda params, kind: jnp.sum(transformer.forward(params, cfg, jnp.asarray(tokens), dispatch=kind) ** 2)
    value_and_grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    ref = value_and_grad(params, "dense")
    with mesh_scope(sharded):
        out = value_and_grad(sharded, KIND)
    assert_close(out[0], ref[0], rtol=1e-5)
    for key, g in ref[1].items():
        assert_close(out[1][key], g, rtol=1e-4)
