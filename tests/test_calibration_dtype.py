"""Calibration in the model's dtype (bf16 experts and statistics matmuls, fp32 sums) against the fp32
reference on bf16 test checkpoints.

Tolerances, and why: bf16 keeps 8 significant bits, so an expert output is rounded by up to 2^-9
(about 2e-3) relative. Routing in the first MoE layer sees the same fp32 input in both modes and must be
identical; later layers see residual streams that differ by that rounding of earlier expert outputs, so a
token may switch experts only where the fp32 reference has a near-tie: we require every switched
decision to have a top-k probability margin below 2e-3 (the median margin here is ~0.03). CKA is a
ratio of sums over all tokens in which the roundings average out: measured |ΔCKA| <= 9e-4 (exact and
minibatch, five families); we require 2e-3, one bf16 rounding step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conversion.load import load_hf
from grape_jax.calibration import similarity
from grape_jax.calibration.calibrate import calibrate, cast_for_compute
from grape_jax.calibration.options import CalibrationOptions, resolve_compute_dtype
from grape_jax.core import transformer
from grape_jax.core.model import param_view
from tests.hf_models import build_model, random_tokens, save_model, tiny_mixtral_config
from tests.test_families import HF_CONFIGS

CKA_TOL = 2e-3
TIE_MARGIN = 2e-3
MODELS = {
    "mixtral": lambda: tiny_mixtral_config(num_local_experts=8),
    "olmoe": HF_CONFIGS["olmoe"],
    "deepseek_v3": HF_CONFIGS["deepseek_v3"],
}


@pytest.fixture(scope="module")
def bf16_models(tmp_path_factory):
    built = {}

    def get(name):
        if name not in built:
            path = save_model(build_model(MODELS[name](), seed=0, dtype=torch.bfloat16), tmp_path_factory.mktemp(name))
            built[name] = load_hf(path)
        return built[name]

    return get


@pytest.fixture(scope="module")
def blocks():
    return random_tokens(128, batch=8, seq=32, seed=11)


def routings(loaded, blocks, dtype: str):
    """Per MoE layer, the routing of every token in the calibration forward computed in `dtype`."""
    cfg = loaded.cfg

    @jax.jit
    def forward(params, tokens):
        params = cast_for_compute(params, cfg, jnp.dtype(dtype))
        recorded = []

        def moe_fn(p, h, m):
            out, routing, _ = transformer.moe_block(params, p, cfg, h, expert_dtype=jnp.dtype(dtype))
            recorded.append(routing)
            return out

        mask = jnp.ones(tokens.shape, bool)
        x = transformer.embed(params, tokens)
        for layer in range(cfg.num_layers):
            x = transformer.decoder_layer(
                params, cfg, layer, x, transformer.default_positions(mask), mask, moe_fn=moe_fn
            )
        return recorded

    return forward(param_view(loaded), jnp.asarray(blocks))


@pytest.mark.parametrize("name", ["mixtral", "olmoe", pytest.param("deepseek_v3", marks=pytest.mark.slow)])
def test_bf16_routing_is_the_fp32_routing_up_to_near_ties(bf16_models, blocks, name):
    loaded = bf16_models(name)
    assert str(param_view(loaded)[f"layers.{loaded.cfg.moe_layers[0]}.mlp.w_up"].dtype) == "bfloat16"
    ref, low = routings(loaded, blocks, "float32"), routings(loaded, blocks, "bfloat16")
    k = loaded.cfg.top_k
    for i, (a, b) in enumerate(zip(ref, low, strict=True)):
        switched = np.flatnonzero((np.asarray(a.selected) != np.asarray(b.selected)).any(axis=1))
        if i == 0:
            assert switched.size == 0
            np.testing.assert_array_equal(np.asarray(a.logits), np.asarray(b.logits))
            continue
        assert loaded.cfg.router == "softmax_topk"  # the margin below is of softmax probabilities
        ranked = np.sort(np.asarray(jax.nn.softmax(a.logits, -1)), axis=-1)[:, ::-1]
        margin = ranked[:, k - 1] - ranked[:, k]
        assert switched.size <= 0.02 * ranked.shape[0], switched.size
        assert (margin[switched] < TIE_MARGIN).all(), margin[switched]


@pytest.mark.parametrize(
    "name,cka",
    [("mixtral", "exact"), ("olmoe", "minibatch"), pytest.param("deepseek_v3", "exact", marks=pytest.mark.slow)],
)
def test_bf16_statistics_within_tolerance(bf16_models, blocks, name, cka):
    loaded = bf16_models(name)
    stats = {
        dt: calibrate(
            loaded,
            blocks,
            progress=False,
            options=CalibrationOptions(batch_size=4, token_chunk=64, cka=cka, compute_dtype=dt),
        )
        for dt in ("float32", "bfloat16")
    }
    ref, low = stats["float32"], stats["bfloat16"]
    assert low.meta["calibration"]["compute_dtype"] == "bfloat16"
    for i, (a, b) in enumerate(zip(ref.layers, low.layers, strict=True)):
        np.testing.assert_allclose(b.sim["cka"], a.sim["cka"], atol=CKA_TOL, err_msg=f"{name} layer {a.layer}")
        if i == 0:
            np.testing.assert_array_equal(b.freq, a.freq)
            np.testing.assert_allclose(b.gate_mass, a.gate_mass, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(b.reap, a.reap, rtol=2e-2, atol=2e-2 * np.abs(a.reap).max())


def test_bf16_outputs_accumulate_exactly_in_fp32():
    """The statistics of bf16 expert outputs equal those of the same values passed as fp32: bf16 only
    changes the matmuls' input type, every sum is fp32 (products of bf16 are exact in fp32; the
    minibatch Gram of centred values is a split bf16 product, ~2^-16 relative)."""
    rng = np.random.default_rng(0)
    e, t, d = 4, 40, 16
    y = jnp.asarray(rng.standard_normal((e, t, d)) + 2.0, jnp.bfloat16)
    logits = jnp.asarray(rng.standard_normal((t, e)), jnp.float32)
    gates = jax.nn.softmax(logits, -1)
    selected = gates > 0.25
    mask = jnp.asarray(rng.random(t) > 0.1)
    update = jax.jit(similarity.update_accumulators)
    for cka in ("exact", "minibatch"):
        acc = similarity.init_accumulators(e, d, cka=cka, chunk=16)
        low = update(acc, y, gates, selected, logits, mask)
        ref = update(acc, y.astype(jnp.float32), gates, selected, logits, mask)
        for field in ("cka_sum", "y_sum", "routed_m", "routed_n", "reap_sum"):
            a, b = np.asarray(getattr(low, field)), np.asarray(getattr(ref, field))
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max(), err_msg=f"{cka} {field}")
            assert getattr(low, field).dtype == jnp.float32


def test_compute_dtype_default_and_errors(bf16_models):
    loaded = bf16_models("mixtral")
    assert resolve_compute_dtype(param_view(loaded), CalibrationOptions()) == "float32"  # CPU devices
    assert resolve_compute_dtype(param_view(loaded), CalibrationOptions(compute_dtype="bfloat16")) == "bfloat16"
    with pytest.raises(ValueError, match="compute_dtype: 'int8' unknown; expected one of"):
        resolve_compute_dtype(param_view(loaded), CalibrationOptions(compute_dtype="int8"))
    cast = cast_for_compute(param_view(loaded), loaded.cfg, jnp.dtype("bfloat16"))
    assert cast["layers.0.mlp.w_down"].dtype == jnp.bfloat16 and cast["layers.0.mlp.router"].dtype == jnp.float32
    assert cast["layers.0.attn.q_proj"].dtype == jnp.float32 and cast["embed"].dtype == jnp.float32
