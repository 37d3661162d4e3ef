"""The fit operator against float64 NumPy references: slot targets, the ridge solve, cross-validation, and
a merge of identical experts that must come back unchanged."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from grape_jax.core import transformer
from grape_jax.core.config import MoEConfig
from grape_jax.core.model import model_from_arrays, param_view
from grape_jax.core.params import init_params
from grape_jax.core.sharding import RunContext, make_mesh
from grape_jax.fit.accumulate import slot_targets
from grape_jax.fit.check import calibration_nll, checked_steps
from grape_jax.fit.operator import FitError, FitOptions, fit_inputs, fit_overrides
from grape_jax.fit.solve import RIDGE_GRID, ridge_fit
from grape_jax.merge import state as merge
from grape_jax.merge.state import MergeError, MergeInputs
from grape_jax.pipeline import apply_plan, check_plan_request
from grape_jax.planners.plan import LayerPlan, Plan, PlanError

CFG = MoEConfig(
    family="mixtral",
    vocab_size=64,
    hidden_size=16,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    head_dim=8,
    moe_intermediate_size=12,
    num_experts=(5, 5),
    top_k=2,
    max_position_embeddings=64,
)


# ------------------------------------------------------------------------------------ references


def np_slot_targets(orig_idx, orig_w, y_sel, new_idx, new_w, assign, num_new):
    """The docstring's rule, token by token: own group if selected, else orphans to free slots by rank."""
    t, k, d = y_sel.shape
    target = np.zeros((t, num_new, d))
    gates = np.zeros((t, num_new))
    for n in range(t):
        groups = [int(assign[i]) for i in orig_idx[n]]
        chosen = [int(e) for e in new_idx[n]]
        orphans = sorted((j for j in range(k) if groups[j] < 0 or groups[j] not in chosen), key=lambda j: -orig_w[n, j])
        free = sorted((s for s in range(k) if chosen[s] not in groups), key=lambda s: -new_w[n, s])
        assert len(orphans) <= len(free)
        for j in range(k):
            if j not in orphans:
                target[n, groups[j]] += orig_w[n, j] * y_sel[n, j]
        for j, s in zip(orphans, free):
            target[n, chosen[s]] += orig_w[n, j] * y_sel[n, j]
        for s in range(k):
            gates[n, chosen[s]] = new_w[n, s]
    return target, gates


def np_route(x, router, k):
    """Mixtral routing in float64: softmax, top-k, renormalised (ids in decreasing weight)."""
    z = x @ router
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    idx = np.argsort(-p, axis=1, kind="stable")[:, :k]
    w = np.take_along_axis(p, idx, 1)
    return idx, w / w.sum(1, keepdims=True)


def silu(a):
    return a / (1.0 + np.exp(-a))


def moe_inputs(params, cfg, blocks):
    """Every MoE layer's input over `blocks` (float64 [n*t, d]) and each token's block index."""
    rec = {}

    def moe_fn(prefix, h, m):
        rec[int(prefix.split(".")[1])] = np.asarray(h, np.float64)
        return transformer.moe_block(params, prefix, cfg, h)[0]

    tokens = jnp.asarray(blocks)
    mask = jnp.ones(tokens.shape, bool)
    x = transformer.embed(params, tokens)
    for layer in range(cfg.num_layers):
        x = transformer.decoder_layer(params, cfg, layer, x, transformer.default_positions(mask), mask, moe_fn=moe_fn)
    return rec, np.repeat(np.arange(blocks.shape[0]), blocks.shape[1])


def np_fit_layer(params, cfg, layer, lp, x, block_of, rho):
    """Fitted w_down of one layer in float64 from raw per-token features and targets."""
    p = f"layers.{layer}.mlp."
    w = {k: np.asarray(params[p + k], np.float64) for k in ("router", "w_gate", "w_up", "w_down")}
    k = cfg.top_k
    idx, gw = np_route(x, w["router"], k)
    y = np.stack([silu(x @ w["w_gate"][e]) * (x @ w["w_up"][e]) @ w["w_down"][e] for e in range(w["router"].shape[1])])
    y_sel = np.stack([y[idx[:, j], np.arange(len(x))] for j in range(k)], axis=1)
    dom = list(lp.dominant)
    new_idx, new_w = np_route(x, w["router"][:, dom], k)
    assign = np.full(lp.num_experts_before, -1)
    for g, members in enumerate(lp.groups):
        assign[list(members)] = g
    target, gates = np_slot_targets(idx, gw, y_sel, new_idx, new_w, assign, len(dom))
    out = []
    for g, e in enumerate(dom):
        h = silu(x @ w["w_gate"][e]) * (x @ w["w_up"][e])
        a, b = gates[:, g : g + 1] * h, target[:, g]
        folds = [block_of % 2 == f for f in (0, 1)]
        gram = np.stack([a[m].T @ a[m] for m in folds])
        cross = np.stack([a[m].T @ b[m] for m in folds])
        tsq = np.array([np.sum(b[m] ** 2) for m in folds])
        out.append(np_ridge_cv(gram, cross, tsq, w["w_down"][e], rho, raw=[(a[m], b[m]) for m in folds]))
    return np.stack(out)


def np_ridge_cv(gram, cross, tsq, w0, rho, raw):
    """Ridge towards w0 (λ = ρ tr(G)/f); ρ 'cv': brute-force 2-fold choice scored on the raw held-out rows."""

    def solve(g, c, r):
        scale = np.trace(g) / g.shape[0]
        if math.isinf(r) or scale <= 0:
            return w0
        return np.linalg.solve(g + r * scale * np.eye(len(g)), c + r * scale * w0)

    if rho == "cv":
        scores = [
            sum(np.sum((raw[f][1] - raw[f][0] @ solve(gram[1 - f], cross[1 - f], r)) ** 2) for f in (0, 1))
            for r in RIDGE_GRID
        ]
        rho = RIDGE_GRID[int(np.argmin(scores))]
    return solve(gram.sum(0), cross.sum(0), rho)


def _model(cfg=CFG, arrays=None, ctx=RunContext()):
    return model_from_arrays(cfg, arrays or init_params(cfg, seed=3, scale=0.4), ctx=ctx)


def _blocks(seed=1, n=6, t=12):
    return np.random.default_rng(seed).integers(0, CFG.vocab_size, size=(n, t), dtype=np.int32)


def _plan(groups_per_layer, dominant_per_layer, num_experts=5):
    lps = []
    for layer, (groups, dom) in enumerate(zip(groups_per_layer, dominant_per_layer, strict=True)):
        covered = sorted(e for g in groups for e in g)
        dropped = tuple(e for e in range(num_experts) if e not in covered)
        weights = tuple(tuple(1.0 if e == d else 0.0 for e in g) for g, d in zip(groups, dom, strict=True))
        lps.append(LayerPlan(layer, num_experts, tuple(map(tuple, groups)), weights, tuple(dom), dropped))
    plan = Plan(tuple(lps), method="test", budget=sum(num_experts - len(g) for g in groups_per_layer), operator="fit")
    plan.validate()
    return plan


# ----------------------------------------------------------------------------------------- tests


def test_slot_targets_match_the_rule_and_add_up_to_the_original_output():
    rng = np.random.default_rng(0)
    t, k, d, e_old, e_new = 200, 3, 4, 7, 4
    assign = np.array([0, 0, 1, -1, 2, 3, 3])
    orig_idx = np.stack([rng.permutation(e_old)[:k] for _ in range(t)])
    orig_w = np.sort(rng.random((t, k)), axis=1)[:, ::-1]
    new_idx = np.stack([rng.permutation(e_new)[:k] for _ in range(t)])
    new_w = np.sort(rng.random((t, k)), axis=1)[:, ::-1]
    y_sel = rng.normal(size=(t, k, d))
    got_t, got_g = jax.jit(slot_targets, static_argnums=6)(
        jnp.asarray(orig_idx),
        jnp.asarray(orig_w, jnp.float32),
        jnp.asarray(y_sel, jnp.float32),
        jnp.asarray(new_idx),
        jnp.asarray(new_w, jnp.float32),
        jnp.asarray(assign),
        e_new,
    )
    ref_t, ref_g = np_slot_targets(orig_idx, orig_w, y_sel, new_idx, new_w, assign, e_new)
    np.testing.assert_allclose(np.asarray(got_t), ref_t, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got_g), ref_g, atol=1e-6)
    np.testing.assert_allclose(ref_t.sum(1), np.einsum("tj,tjd->td", orig_w, y_sel), atol=1e-12)


@pytest.mark.parametrize("rho", [0.05, "cv"])
def test_fit_equals_float64_least_squares(rho):
    model = _model()
    params = param_view(model)
    blocks = _blocks()
    plan = _plan([[[0, 3], [1], [2, 4]], [[0], [1, 2, 4]]], [[3, 1, 2], [0, 4]])
    got, diag = fit_overrides(
        model, plan, blocks, options=FitOptions(ridge=rho, batch_size=4, token_chunk=20, steps=())
    )
    assert set(got) == {"layers.0.mlp.w_down", "layers.1.mlp.w_down"}
    inputs, block_of = moe_inputs(params, CFG, blocks)
    for lp in plan.layers:
        ref = np_fit_layer(params, CFG, lp.layer, lp, inputs[lp.layer], block_of, rho)
        np.testing.assert_allclose(got[f"layers.{lp.layer}.mlp.w_down"], ref, rtol=2e-3, atol=2e-4)
        d = diag[lp.layer]
        assert d["relative_residual_after"] <= d["relative_residual_before"] + 1e-9
        assert sum(d["tokens_per_expert"]) == blocks.size * CFG.top_k


def test_identical_experts_come_back_unchanged():
    """Top-1 routing, expert 3 a bit-identical copy of expert 0: the copies tie, the lower id wins, and the
    merged expert serves exactly the same tokens with gate 1; the fit must return expert 0's own down
    projection (whatever the ridge) and the merged model the original logits."""
    cfg = dataclasses.replace(CFG, top_k=1)
    params = init_params(cfg, seed=4, scale=0.4)
    p = "layers.1.mlp."
    for k in ("w_gate", "w_up", "w_down"):
        params[p + k][3] = params[p + k][0]
    params[p + "router"][:, 3] = params[p + "router"][:, 0]
    model = model_from_arrays(cfg, params)
    blocks = _blocks(seed=2)
    plan = _plan([[[0], [1], [2], [3], [4]], [[0, 3], [1], [2], [4]]], [[0, 1, 2, 3, 4], [0, 1, 2, 4]])
    for rho in ("cv", 1e-2, 1.0):
        merged = apply_plan(model, plan, blocks=blocks, fit_options=FitOptions(ridge=rho))
        np.testing.assert_allclose(
            np.asarray(param_view(merged)[p + "w_down"]), params[p + "w_down"][[0, 1, 2, 4]], atol=1e-5
        )
        np.testing.assert_allclose(np.asarray(merged(blocks)), np.asarray(model(blocks)), atol=1e-4)


def test_cross_validation_keeps_w0_on_noise_and_fits_clean_data():
    rng = np.random.default_rng(5)
    n, f, d = 400, 6, 3
    w0, w_true = rng.normal(size=(f, d)), rng.normal(size=(f, d))

    def stats(b_of):
        a = [rng.normal(size=(n, f)) for _ in range(2)]
        b = [b_of(x) for x in a]
        return (
            np.stack([x.T @ x for x in a]),
            np.stack([x.T @ y for x, y in zip(a, b)]),
            np.array([np.sum(y**2) for y in b]),
            list(zip(a, b)),
        )

    gram, cross, tsq, raw = stats(lambda x: x @ w_true)
    w, rho = ridge_fit(gram, cross, tsq, w0, "cv")
    assert rho == RIDGE_GRID[0]
    np.testing.assert_allclose(w, w_true, atol=1e-2)
    np.testing.assert_allclose(w, np_ridge_cv(gram, cross, tsq, w0, "cv", raw), atol=1e-10)
    gram, cross, tsq, raw = stats(lambda x: x @ w0 + 3.0 * rng.normal(size=(len(x), d)))
    w, rho = ridge_fit(gram, cross, tsq, w0, "cv")
    assert rho >= 10.0  # pure noise around w0: the fit stays (close) to w0
    np.testing.assert_allclose(w, np_ridge_cv(gram, cross, tsq, w0, "cv", raw), atol=1e-10)


def test_loss_check_picks_the_best_step_and_keeps_the_base_merge_when_the_fit_hurts():
    """One merged layer: the chosen step is the brute-force argmin of the calibration NLL over {0} ∪ steps;
    a fit that only hurts (a large random change) is refused (no override: the base merge stays)."""
    model = _model()
    blocks = _blocks()
    plan = _plan([[[0], [1], [2], [3], [4]], [[0], [1, 2, 4], [3]]], [[0, 1, 2, 3, 4], [0, 4, 3]])
    base = apply_plan(model, dataclasses.replace(plan, operator="dominant"), inputs=MergeInputs())
    merged, ctx = param_view(base), base.ctx
    fitted, _ = fit_overrides(model, plan, blocks, options=FitOptions(steps=()))
    name = "layers.1.mlp.w_down"
    w0 = np.asarray(merged[name], np.float64)

    def nll(w):
        return calibration_nll({**merged, name: jnp.asarray(w, merged[name].dtype)}, base.cfg, ctx, blocks)

    steps = (0.25, 0.5, 1.0)
    diag = {}
    got = checked_steps(merged, base.cfg, ctx, fitted, blocks, steps=steps, diagnostics=diag)
    losses = [nll(w0 + a * (fitted[name] - w0)) for a in (0.0, *steps)]
    best = (0.0, *steps)[int(np.argmin(losses))]
    assert diag[1]["step"] == best
    if best:
        np.testing.assert_allclose(got[name], w0 + best * (fitted[name] - w0), rtol=1e-6, atol=1e-7)
    assert diag[1]["calibration_nll_after"] == pytest.approx(min(losses), rel=1e-6)
    bad = {name: (w0 + 50.0 * np.random.default_rng(0).normal(size=w0.shape)).astype(np.float32)}
    assert checked_steps(merged, base.cfg, ctx, bad, blocks, steps=steps) == {}


def test_fit_needs_data_and_valid_options():
    model = _model()
    plan = _plan([[[0, 3], [1], [2, 4]], [[0], [1, 2, 4]]], [[3, 1, 2], [0, 4]])
    with pytest.raises(FitError, match="needs the calibration blocks"):
        apply_plan(model, plan)
    with pytest.raises(MergeError, match="operator 'fit' needs the calibration blocks"):
        merge.merge_model(model, plan)
    with pytest.raises(FitError, match="calibration blocks must be a non-empty"):
        fit_inputs(model, plan, np.zeros((0, 8), np.int32))
    for bad, msg in (
        ({"ridge": 0.0}, "ridge: expected 'cv' or a number > 0"),
        ({"outputs": "some"}, "outputs: 'some' unknown"),
        ({"steps": (0.0,)}, r"steps: expected a tuple of numbers in \(0, 1\]"),
        ({"batch_size": 0}, "batch_size: expected an integer >= 1"),
        ({"compute_dtype": "int8"}, "compute_dtype: 'int8' unknown"),
    ):
        with pytest.raises(FitError, match=msg):
            FitOptions(**bad)


def test_fit_on_a_mesh_equals_one_device():
    """Parameters sharded over experts/fsdp, batches over data: the same fitted down projections."""
    blocks = _blocks()
    plan = _plan([[[0, 3], [1], [2, 4]], [[0], [1, 2, 4]]], [[3, 1, 2], [0, 4]])
    options = FitOptions(ridge=0.1, steps=())
    ref, _ = fit_overrides(_model(), plan, blocks, options=options)
    sharded = _model(ctx=RunContext(make_mesh("data=2,fsdp=2,expert=2")))
    got, _ = fit_overrides(sharded, plan, blocks, options=options)
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], rtol=1e-4, atol=1e-6)
    merged = apply_plan(sharded, plan, inputs=MergeInputs(overrides=got))
    w = param_view(merged)["layers.0.mlp.w_down"]
    assert w.sharding.spec == param_view(sharded)["layers.0.mlp.w_down"].sharding.spec


def test_biased_experts_fit_their_bias_and_identical_ones_come_back_unchanged():
    """GPT-OSS-style experts (gate/up/down biases, clamped SwiGLU) with a shared expert: b_down is fitted as
    the weight of a constant feature, so a bit-identical copy merged into its original returns both its
    w_down and its b_down, and the merged model the original logits."""
    cfg = dataclasses.replace(
        CFG, top_k=1, expert_bias=True, activation="gptoss_clamped_swiglu", shared_expert_intermediate_size=8
    )
    params = init_params(cfg, seed=5, scale=0.4)
    rng = np.random.default_rng(0)
    p = "layers.1.mlp."
    for layer in (0, 1):
        for k in ("b_gate", "b_up", "b_down"):
            name = f"layers.{layer}.mlp.{k}"
            params[name] = rng.normal(scale=0.3, size=params[name].shape).astype(np.float32)
    for k in ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down"):
        params[p + k][3] = params[p + k][0]
    params[p + "router"][:, 3] = params[p + "router"][:, 0]
    model = model_from_arrays(cfg, params)
    blocks = _blocks(seed=2)
    plan = _plan([[[0], [1], [2], [3], [4]], [[0, 3], [1], [2], [4]]], [[0, 1, 2, 3, 4], [0, 1, 2, 4]])
    got, _ = fit_overrides(model, plan, blocks, options=FitOptions(ridge=1e-2, steps=()))
    assert set(got) == {p + "w_down", p + "b_down"}
    np.testing.assert_allclose(got[p + "w_down"], params[p + "w_down"][[0, 1, 2, 4]], atol=1e-5)
    np.testing.assert_allclose(got[p + "b_down"], params[p + "b_down"][[0, 1, 2, 4]], atol=1e-5)
    merged = apply_plan(model, plan, inputs=MergeInputs(overrides=got))
    np.testing.assert_allclose(np.asarray(merged(blocks)), np.asarray(model(blocks)), atol=1e-4)


def test_grape_l_without_gradients_is_refused_from_the_config_alone():
    check_plan_request(CFG, method="grape-l", budget=None, per_layer=1, options={}, gradients=True)
    with pytest.raises(PlanError) as err:
        check_plan_request(CFG, method="grape-l", budget=None, per_layer=1, options={}, gradients=False)
    # the message names the flag and the way out, not internal fields or classes
    assert str(err.value).startswith("--no-gradients (gradients=False): grape-l plans from the gradient")
    assert "sens_" not in str(err.value) and "CalibrationOptions" not in str(err.value)
    check_plan_request(CFG, method="grape", budget=None, per_layer=1, options={}, gradients=False)


def test_fit_is_refused_for_input_scaling_routers_before_loading():
    """Llama-4's router scales the experts' input: the default (operator fit) is refused from the config,
    naming the way out; another operator passes."""
    cfg = dataclasses.replace(CFG, top_k=1, router_scales_input=True)
    with pytest.raises(FitError, match="operator=dominant"):
        check_plan_request(cfg, method="grape-l", budget=None, per_layer=1, options={})
    check_plan_request(cfg, method="grape-l", budget=None, per_layer=1, options={"operator": "dominant"})
    with pytest.raises(FitError, match="scale the experts' input"):
        fit_inputs(
            _model(cfg),
            _plan([[[0], [1], [2], [3], [4]], [[0, 3], [1], [2], [4]]], [[0, 1, 2, 3, 4], [0, 1, 2, 4]]),
            _blocks(),
        )
