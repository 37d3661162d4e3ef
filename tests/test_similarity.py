"""Streaming expert statistics against float64 NumPy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from grape_jax import similarity as S
from grape_jax.sharding import make_mesh

E, T, D = 4, 24, 6
update = jax.jit(S.update_accumulators)


def ref_cka(x, y):
    x = x - x.mean(0)
    y = y - y.mean(0)
    return np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def ref_hsic1(k, l):
    n = k.shape[0]
    k, l = k.copy(), l.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    one = np.ones(n)
    return (np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
            - 2 / (n - 2) * one @ k @ l @ one) / (n * (n - 3))


def make_inputs(seed=0, t=T, e=E, d=D, k=2):
    rng = np.random.default_rng(seed)
    y = rng.normal(size=(e, t, d)).astype(np.float32)
    logits = rng.normal(size=(t, e)).astype(np.float32)
    top = np.argsort(-logits, axis=1)[:, :k]
    selected = np.zeros((t, e), bool)
    np.put_along_axis(selected, top, True, axis=1)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    gates = np.where(selected, probs, 0).astype(np.float32)
    gates /= gates.sum(1, keepdims=True)
    return y, gates, selected, logits


def run(chunks, mode, e=E, d=D):
    acc = S.init_accumulators(e, d, cka=mode, chunk=chunks[0][0].shape[1])
    for y, g, s, l, m in chunks:
        acc = update(acc, y, g, s, l, m)
    return S.finalize(acc)


def test_exact_statistics_match_float64_reference():
    y, g, s, l = make_inputs()
    out = run([(y, g, s, l, np.ones(T, bool))], "exact")
    y64, g64 = y.astype(np.float64), g.astype(np.float64)
    for i in range(E):
        for j in range(E):
            np.testing.assert_allclose(out["cka"][i, j], ref_cka(y64[i], y64[j]), rtol=1e-5)
            np.testing.assert_allclose(out["routed_m"][i, j], np.sum(g64[:, i] * np.sum(y64[i] * y64[j], -1)), rtol=1e-5)
            np.testing.assert_allclose(out["routed_n"][i, j], np.sum(g64[:, i] * np.sum(y64[j] ** 2, -1)), rtol=1e-5)
    np.testing.assert_allclose(out["freq"], s.mean(0), rtol=1e-6)
    np.testing.assert_allclose(out["freq"].sum(), 2.0, rtol=1e-6)
    np.testing.assert_allclose(out["gate_mass"], g64.mean(0), rtol=1e-6)
    norms = np.linalg.norm(y64, axis=-1).T
    np.testing.assert_allclose(out["reap"], (g64 * norms).sum(0) / s.sum(0), rtol=1e-5)
    mean = y64.mean(1)
    cos = mean @ mean.T / np.outer(np.linalg.norm(mean, axis=1), np.linalg.norm(mean, axis=1))
    np.testing.assert_allclose(out["cos_mean"], cos, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out["router"], np.corrcoef(l.astype(np.float64).T), rtol=1e-5, atol=1e-6)


def test_minibatch_cka_matches_hsic_reference():
    chunks = [make_inputs(seed) for seed in (1, 2)]
    out = run([(*c, np.ones(T, bool)) for c in chunks], "minibatch")
    h = np.zeros((E, E))
    for y, *_ in chunks:
        grams = [y[i].astype(np.float64) @ y[i].astype(np.float64).T for i in range(E)]
        h += np.array([[ref_hsic1(grams[i], grams[j]) for j in range(E)] for i in range(E)])
    ref = h / np.sqrt(np.outer(np.diag(h), np.diag(h)))
    np.testing.assert_allclose(out["cka"], ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", S.CKA_MODES)
def test_cka_invariances_and_identical_experts(mode):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, D))
    q, _ = np.linalg.qr(rng.normal(size=(D, D)))
    y = np.stack([x, x @ q, 3.7 * x, rng.normal(size=(64, D))]).astype(np.float32)
    _, g, s, l = make_inputs(t=64)
    out = run([(y, g, s, l, np.ones(64, bool))], mode)
    np.testing.assert_allclose(out["cka"][0, 1:3], 1.0, rtol=1e-5)
    assert out["cka"][0, 3] < 0.9


def test_streaming_equals_one_shot_and_masks_ignore_tokens():
    y, g, s, l = make_inputs(seed=4, t=2 * T)
    one = run([(y, g, s, l, np.ones(2 * T, bool))], "exact")
    two = run([(y[:, :T], g[:T], s[:T], l[:T], np.ones(T, bool)),
               (y[:, T:], g[T:], s[T:], l[T:], np.ones(T, bool))], "exact")
    for k in one:
        np.testing.assert_allclose(two[k], one[k], rtol=2e-5, atol=1e-6, err_msg=k)
    # appending padding tokens with garbage values changes nothing
    pad = lambda a, axis: np.concatenate([a, 100 * np.ones_like(a)], axis=axis)  # noqa: E731
    mask = np.r_[np.ones(2 * T, bool), np.zeros(2 * T, bool)]
    padded = run([(pad(y, 1), pad(g, 0), pad(s, 0), pad(l, 0), mask)], "exact")
    for k in one:
        np.testing.assert_allclose(padded[k], one[k], rtol=2e-5, atol=1e-6, err_msg=k)


def test_minibatch_mask_equals_dropping_tokens():
    y, g, s, l = make_inputs(seed=5, t=T)
    mask = np.ones(T, bool)
    mask[-5:] = False
    masked = run([(y, g, s, l, mask)], "minibatch")
    grams = [y[i, :-5].astype(np.float64) @ y[i, :-5].astype(np.float64).T for i in range(E)]
    h = np.array([[ref_hsic1(grams[i], grams[j]) for j in range(E)] for i in range(E)])
    np.testing.assert_allclose(masked["cka"], h / np.sqrt(np.outer(np.diag(h), np.diag(h))), rtol=1e-5, atol=1e-6)


def test_routed_cost_is_zero_for_identical_and_unrouted_experts():
    y, g, s, l = make_inputs(seed=6)
    y[1] = y[0]
    g[:, 3] = 0.0
    s[:, 3] = False
    out = run([(y, g, s, l, np.ones(T, bool))], "exact")
    m, n = out["routed_m"], out["routed_n"]
    cost = np.diag(n)[:, None] + n - 2 * m
    assert abs(cost[0, 1]) < 1e-4 * n[0, 0] and abs(cost[1, 0]) < 1e-4 * n[1, 1]
    np.testing.assert_allclose(cost[3], 0.0, atol=1e-7)
    assert out["reap"][3] == 0.0


def test_sharded_equals_single_device():
    mesh = make_mesh("expert=4,data=2")
    y, g, s, l = make_inputs(seed=7)
    mask = np.ones(T, bool)
    single = run([(y, g, s, l, mask)], "exact")
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
    acc = S.init_accumulators(E, D, cka="exact")
    with jax.set_mesh(mesh):
        acc = update(acc, put(y, P("expert", "data", None)), put(g, P("data", None)),
                     put(s, P("data", None)), put(l, P("data", None)), put(mask, P("data")))
    sharded = S.finalize(acc)
    for k in single:
        np.testing.assert_allclose(sharded[k], single[k], rtol=1e-5, atol=1e-6, err_msg=k)


def test_weight_cosine_and_errors():
    rng = np.random.default_rng(8)
    wg, wu = rng.normal(size=(2, 3, 4, 5))
    wd = rng.normal(size=(3, 5, 4))
    wg[1], wu[1], wd[1] = 2 * wg[0], 2 * wu[0], 2 * wd[0]
    cos = np.asarray(S.weight_cosine(jnp.asarray(wg), jnp.asarray(wu), jnp.asarray(wd)))
    flat = np.concatenate([wg.reshape(3, -1), wu.reshape(3, -1), wd.reshape(3, -1)], 1)
    ref = flat @ flat.T / np.outer(np.linalg.norm(flat, axis=1), np.linalg.norm(flat, axis=1))
    np.testing.assert_allclose(cos, ref, rtol=1e-5)
    assert abs(cos[0, 1] - 1) < 1e-6
    with pytest.raises(ValueError, match="cka mode 'fast' unknown"):
        S.init_accumulators(2, 2, cka="fast")
    y, g, s, l = make_inputs()
    with pytest.raises(ValueError, match="expected gates"):
        S.update_accumulators(S.init_accumulators(E, D), y, g[:, :2], s, l, np.ones(T, bool))
    acc = update(S.init_accumulators(E, D), y * np.nan, g, s, l, np.ones(T, bool))
    with pytest.raises(ValueError, match="is not finite"):
        S.finalize(acc)
