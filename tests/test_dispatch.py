"""Routed MoE dispatch (`grape_jax.core.dispatch`) against the dense all-experts path as the oracle: every
family's router and expert features (shared experts and their gates, sigmoid + bias and group-limited
routers, GPT-OSS biases and clamped SwiGLU), both grouped matmuls, 1 device and the simulated 8-device
meshes with experts sharded (counts that divide the expert axis and counts that do not), gradients, and
the choice `dispatch="auto"` makes."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers
from flax import nnx

from conversion.families import get_family
from grape_jax.core import dispatch, transformer
from grape_jax.core.config import MoEConfig
from grape_jax.core.model import forward_jit, model_from_arrays
from grape_jax.core.params import init_params, param_specs
from grape_jax.core.sharding import RunContext, make_mesh
from grape_jax.demo.train import loss_fn
from tests import deepseek_reference as dsref
from tests.family_configs import NEW_CONFIGS
from tests.hf_models import TINY
from tests.test_deepseek_v2 import CONFIGS as DEEPSEEK_V2
from tests.test_families import HF_CONFIGS

KINDS = ("blocked", "batched", "ragged_dot")
TOKENS = 40


def _hf_configs() -> dict[str, dict]:
    out = {name: make().to_dict() for name, make in HF_CONFIGS.items()}
    out.update({f"deepseek_v2_{name}": make().to_dict() for name, make in DEEPSEEK_V2.items()})
    out["deepseek"] = dsref.tiny_deepseek_config()
    out["mixtral"] = transformers.MixtralConfig(**TINY, num_local_experts=8, num_experts_per_tok=2).to_dict()
    out.update({name: make().to_dict() for name, make in NEW_CONFIGS.items()})
    out["llama4_text_top1"] = NEW_CONFIGS["llama4_text"](num_experts_per_tok=1).to_dict()  # input-scaled, routed
    return out


HF = _hf_configs()
FAMILIES = sorted(HF)


def family_cfg(name: str) -> MoEConfig:
    return get_family(HF[name]["model_type"]).config_from_hf(HF[name])


def random_params(cfg: MoEConfig, seed: int = 0) -> dict[str, jax.Array]:
    """Random weights with every bias non-zero (router / score-correction biases of both signs), and
    GPT-OSS's gate/up scaled up so the SwiGLU clamp at `swiglu_limit` is active."""
    rng = np.random.default_rng(seed)
    params = {k: jnp.asarray(v) for k, v in init_params(cfg, seed=seed, scale=0.3).items()}
    out = {}
    for name, value in params.items():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("router_bias", "b_gate", "b_up", "b_down") or name.endswith("_bias"):
            value = jnp.asarray(0.5 * rng.standard_normal(value.shape), value.dtype)
        if cfg.activation == "gptoss_clamped_swiglu" and leaf in ("w_gate", "w_up"):
            value = value * 8.0
        out[name] = value
    return out


def moe_case(name: str, seed: int = 0):
    cfg = family_cfg(name)
    layer = cfg.moe_layers[0]
    params = random_params(cfg, seed)
    p = f"layers.{layer}.mlp."
    block = {k: v for k, v in params.items() if k.startswith(p)}
    x = jnp.asarray(np.random.default_rng(seed + 1).standard_normal((TOKENS, cfg.hidden_size), np.float32))
    return cfg, p, block, x


def moe_fn(cfg, p, kind):
    return jax.jit(lambda params, x: transformer.moe_output(params, p, cfg, x, dispatch=kind))


def assert_close(a, b, rtol=2e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * np.abs(b).max())


def shard(params, cfg, mesh):
    ctx, specs = RunContext(mesh), param_specs(cfg)
    return {k: jax.device_put(v, ctx.sharding(specs[k].shape, specs[k].axes)) for k, v in params.items()}


def mesh_scope(params):
    """`jax.set_mesh` of the mesh the parameters live on (none: no context), as `MoEModel` does."""
    for value in params.values():
        sharding = getattr(value, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding) and sharding.mesh.size > 1:
            return RunContext(sharding.mesh).scope()
    return RunContext().scope()


def logits(params, cfg, tokens, mask=None, *, dispatch="auto"):
    """The jitted forward on raw parameters, under their mesh."""
    tokens = jnp.asarray(tokens)
    mask = jnp.ones(tokens.shape, bool) if mask is None else jnp.asarray(mask)
    with mesh_scope(params):
        return forward_jit(dict(params), cfg=cfg, tokens=tokens, mask=mask, dispatch=dispatch)


@pytest.mark.parametrize("name", FAMILIES)
def test_routed_equals_dense_every_family(name):
    cfg, p, params, x = moe_case(name)
    if cfg.activation == "gptoss_clamped_swiglu":  # the clamp is exercised, on both sides
        gate = np.asarray(jnp.einsum("td,edf->etf", x, params[p + "w_gate"]))
        assert (gate > cfg.swiglu_limit).mean() > 0.05
    dense = moe_fn(cfg, p, "dense")(params, x)
    assert np.abs(np.asarray(dense)).max() > 0.1
    for kind in KINDS:
        assert_close(moe_fn(cfg, p, kind)(params, x), dense)


@pytest.mark.parametrize(
    "name",
    [
        "gpt_oss",
        "deepseek_v3",
        pytest.param("qwen2_moe", marks=pytest.mark.slow),
        pytest.param("deepseek_v2_group_limited_greedy", marks=pytest.mark.slow),
    ],
)
def test_routed_gradients_match_dense(name):
    """d(loss)/d(every MoE parameter) and d(loss)/dx agree; the loss weights each output differently."""
    cfg, p, params, x = moe_case(name, seed=2)
    probe = jnp.asarray(np.random.default_rng(3).standard_normal(x.shape, np.float32))

    def grads(kind):
        loss = lambda params, x: jnp.sum(transformer.moe_output(params, p, cfg, x, dispatch=kind) * probe)
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)

    ref_params, ref_x = grads("dense")
    for kind in ("blocked", "batched"):
        g_params, g_x = grads(kind)
        assert_close(g_x, ref_x, rtol=1e-4)
        for key, ref in ref_params.items():
            assert_close(g_params[key], ref, rtol=1e-4)
    g_params, g_x = grads("ragged_dot")
    assert_close(g_x, ref_x, rtol=1e-4)
    assert_close(g_params[p + "w_down"], ref_params[p + "w_down"], rtol=1e-4)


@pytest.mark.parametrize("kind", ["ragged_dot", "batched"])
def test_routed_input_gradient_on_expert_mesh(kind):
    """d(loss)/dx with experts and the MLP width sharded: each device gathers x's rows of its own experts,
    and the gradient scatters them back per device before the psum (it once added rows of different
    tokens on the ragged_dot path, jax typing indices from axis_index as the same on every device)."""
    cfg, p, params, x = moe_case("gpt_oss", seed=11)
    probe = jnp.asarray(np.random.default_rng(12).standard_normal(x.shape, np.float32))
    loss = lambda params, x, kind: jnp.sum(transformer.moe_output(params, p, cfg, x, dispatch=kind) * probe)
    value_and_grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), static_argnums=2)
    ref_loss, (ref_params, ref_x) = value_and_grad(params, x, "dense")
    mesh = make_mesh("expert=2,tensor=2,data=2")
    with jax.set_mesh(mesh):
        out_loss, (g_params, g_x) = value_and_grad(shard(params, cfg, mesh), x, kind)
    assert_close(out_loss, ref_loss, rtol=1e-5)
    assert_close(g_x, ref_x, rtol=1e-4)
    for key, ref in ref_params.items():
        assert_close(g_params[key], ref, rtol=1e-4)


MESH_CASES = [
    ("expert=4", "deepseek_v3"),  # 8 experts on 4 devices, group-limited sigmoid router, shared experts
    ("expert=8", "deepseek_v3"),  # one expert per device
    ("expert=8", "gpt_oss"),  # 4 experts do not divide 8: replicated, routed per device
    ("expert=2,data=4", "qwen2_moe"),  # tokens split 4 ways, experts 2 ways, shared expert gate
    ("expert=2,tensor=4", "gpt_oss"),  # MLP width split over tensor: biases, clamp, b_down added once
    pytest.param("expert=4", "deepseek_v2_group_limited_greedy", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("mesh_spec,name", MESH_CASES)
def test_routed_on_mesh_equals_dense(mesh_spec, name):
    cfg, p, params, x = moe_case(name, seed=4)
    dense = moe_fn(cfg, p, "dense")(params, x)
    mesh = make_mesh(mesh_spec)
    sharded = shard(params, cfg, mesh)
    with jax.set_mesh(mesh):
        for kind in KINDS:
            assert_close(moe_fn(cfg, p, kind)(sharded, x), dense)


def test_pruned_count_not_dividing_the_expert_axis():
    """Layers with 6 and 8 experts on expert=4: the 6-expert layer is replicated, the other sharded; the
    whole forward through `logits` (which sets the parameters' mesh) equals the dense forward."""
    cfg = family_cfg("mixtral").with_num_experts((8, 6))
    cfg = MoEConfig.from_dict({**cfg.to_dict(), "expert_bias": True})
    params = random_params(cfg, seed=5)
    tokens = np.random.default_rng(6).integers(0, cfg.vocab_size, (4, 10)).astype(np.int32)
    dense = logits(params, cfg, tokens, dispatch="dense")
    mesh = make_mesh("expert=4,data=2")
    sharded = shard(params, cfg, mesh)
    assert sharded["layers.1.mlp.w_gate"].sharding.spec == jax.sharding.PartitionSpec()
    assert sharded["layers.0.mlp.w_gate"].sharding.spec[0] == "expert"
    for kind in ("routed", "ragged_dot"):  # routed is blocked on CPU
        assert_close(logits(sharded, cfg, tokens, dispatch=kind), dense)


def test_sharded_routed_forward_keeps_experts_on_their_devices():
    """No all-gather of an expert weight in the compiled routed forward on expert=4 (a plain ragged_dot
    under GSPMD would gather all experts to every device)."""
    cfg = family_cfg("mixtral")
    params = shard(random_params(cfg), cfg, make_mesh("expert=4,data=2"))
    tokens = jnp.zeros((4, 8), jnp.int32)
    full = "f32[{},{},{}]".format(*params["layers.0.mlp.w_gate"].shape)
    with mesh_scope(params):
        hlo = forward_jit.lower(params, cfg=cfg, tokens=tokens, mask=tokens >= 0, dispatch="blocked").compile()
    gathered = re.findall(r"= (\S+) all-gather\(", hlo.as_text())
    assert not [g for g in gathered if g.startswith(full)], gathered


def test_model_and_training_loss_take_the_dispatch():
    cfg = family_cfg("qwen3_moe")
    params = random_params(cfg, seed=7)
    tokens = np.random.default_rng(8).integers(0, cfg.vocab_size, (2, 12)).astype(np.int32)
    model = model_from_arrays(cfg, params)
    assert_close(model(tokens, dispatch="blocked"), model(tokens, dispatch="dense"))

    def grads(kind):
        fn = jax.value_and_grad(lambda p: loss_fn(p, cfg, jnp.asarray(tokens), 0.1, dispatch=kind)[0])
        return jax.jit(fn)(params)

    (loss, g), (ref_loss, ref_g) = grads("routed"), grads("dense")
    assert_close(loss, ref_loss, rtol=1e-6)
    for key in ("layers.1.mlp.w_up", "layers.1.mlp.router", "layers.0.attn.q_proj", "embed"):
        assert_close(g[key], ref_g[key], rtol=1e-4)


def test_auto_choice_and_bad_modes():
    tiny = {"num_experts": 4, "top_k": 2, "tokens": 24, "hidden": 32, "ffn": 48}
    demo = {"num_experts": 8, "top_k": 2, "tokens": 1024, "hidden": 128, "ffn": 256}
    assert dispatch.choose("auto", **tiny, platform="cpu") == "dense"
    assert dispatch.choose("auto", **demo, platform="cpu") == "blocked"
    assert dispatch.choose("auto", **{**demo, "num_experts": 2}, platform="cpu") == "dense"  # E == k
    assert dispatch.choose("auto", **tiny, platform="tpu") == "ragged_dot"
    assert dispatch.choose("routed", **tiny, platform="cpu") == "blocked"
    gpu = {"tokamax": dispatch.tokamax_module() is not None, "fast_ragged_dot": dispatch.fast_gpu_ragged_dot()}
    assert dispatch.choose("auto", **tiny, platform="gpu") == dispatch.select_grouped_kind("gpu", None, **gpu)
    assert dispatch.choose("dense", **demo, platform="tpu") == "dense"
    with pytest.raises(dispatch.DispatchError, match="dispatch 'fast' unknown; expected one of"):
        dispatch.choose("fast", **tiny)
    cfg = family_cfg("mixtral")
    with pytest.raises(dispatch.DispatchError, match="dispatch 'sparse' unknown"):
        logits(random_params(cfg), cfg, np.zeros((1, 4), np.int32), dispatch="sparse")


def _numpy_reference(params, p, cfg, x, indices, weights) -> np.ndarray:
    """float64 Σ_j weights[t, j] · expert_{indices[t, j]}(x[t]), one token at a time."""
    w = {k[len(p) :]: np.asarray(v, np.float64) for k, v in params.items() if k.startswith(p)}
    x, out = np.asarray(x, np.float64), np.zeros(x.shape)
    for t in range(x.shape[0]):
        for e, g in zip(np.asarray(indices[t]), np.asarray(weights[t], np.float64), strict=True):
            gate, up = x[t] @ w["w_gate"][e] + w.get("b_gate", 0 * w["w_gate"][:, 0])[e], x[t] @ w["w_up"][e]
            up = up + (w["b_up"][e] if "b_up" in w else 0)
            h = np.asarray(transformer.swiglu(jnp.asarray(gate), jnp.asarray(up), cfg), np.float64)
            out[t] += g * (h @ w["w_down"][e] + (w["b_down"][e] if "b_down" in w else 0))
    return out


@pytest.mark.parametrize("name", ["mixtral", "gpt_oss"])
def test_skewed_routing_against_numpy(name):
    """Hand-made routings, including every token on the same two experts (one group holds all rows, the
    most padding the blocked layout can need), against a float64 NumPy reference."""
    cfg, p, params, x = moe_case(name, seed=9)
    e = params[p + "w_gate"].shape[0]
    rng = np.random.default_rng(10)
    weights = jnp.asarray(rng.uniform(0.1, 1.0, (TOKENS, 2)), jnp.float32)
    routings = [np.tile([e - 1, 1], (TOKENS, 1)), np.stack([np.arange(TOKENS) % e, (np.arange(TOKENS) + 1) % e], 1)]
    act = lambda gate, up: transformer.swiglu(gate, up, cfg)
    for indices in routings:
        indices = jnp.asarray(indices, jnp.int32)
        ref = _numpy_reference(params, p, cfg, x, indices, weights)
        for kind in KINDS:
            fn = jax.jit(
                lambda prm, x, i, w, kind=kind: dispatch.routed_experts(prm, p, cfg, x, i, w, kind=kind, activation=act)
            )
            assert_close(fn(params, x, indices, weights), ref, rtol=1e-5)


def test_block_rows():
    assert dispatch.block_rows(4096, 8) == 512 and dispatch.block_rows(16384, 128) == 128
    assert dispatch.block_rows(10, 8) == dispatch.MIN_BLOCK and dispatch.block_rows(10**7, 4) == dispatch.MAX_BLOCK


def test_routed_dispatch_under_jit_and_grad_on_a_mesh():
    """Training calls the model inside jit and grad: the routed path still sees the model's mesh there."""
    cfg = family_cfg("mixtral")
    ctx = RunContext(make_mesh("expert=4,fsdp=2"))
    model = model_from_arrays(cfg, random_params(cfg, seed=3), ctx=ctx)
    tokens = ctx.put_batch(np.random.default_rng(4).integers(0, cfg.vocab_size, (8, 12)).astype(np.int32))
    mask = ctx.put_batch(np.ones((8, 12), bool))
    graphdef, state = nnx.split(model)

    def loss(state, dispatch):
        return jnp.sum(nnx.merge(graphdef, state)(tokens, mask, dispatch=dispatch) ** 2) * 1e-3

    routed = jax.jit(jax.value_and_grad(lambda s: loss(s, "routed")))(state)
    dense = jax.jit(jax.value_and_grad(lambda s: loss(s, "dense")))(state)
    assert_close(routed[0], dense[0], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(routed[1]), jax.tree.leaves(dense[1]), strict=True):
        assert_close(a, b, rtol=1e-4)
