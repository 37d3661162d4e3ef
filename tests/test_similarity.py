"""Streaming expert statistics (grape_jax.calibration.similarity) against float64 NumPy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from grape_jax.calibration import similarity as S

E, T, D = 4, 24, 6
update = jax.jit(S.update_accumulators)
combine = jax.jit(S.combine)


# ---------------------------------------------------------------- float64 references (independent of S)
def ref_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Linear CKA by its definition, on column-centred float64 data."""
    x = x - x.mean(0)
    y = y - y.mean(0)
    return np.linalg.norm(x.T @ y) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


def ref_hsic1(k: np.ndarray, l: np.ndarray) -> float:
    """Unbiased HSIC_1 exactly as Song et al. (2012) write it."""
    n = k.shape[0]
    k, l = k.copy(), l.copy()
    np.fill_diagonal(k, 0)
    np.fill_diagonal(l, 0)
    one = np.ones(n)
    return (
        np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2)) - 2 / (n - 2) * one @ k @ l @ one
    ) / (n * (n - 3))


def ref_minibatch_cka(batches: list[np.ndarray]) -> np.ndarray:
    """Nguyen et al. minibatch CKA: summed HSIC_1 over minibatches, each [E, n, d] of valid tokens."""
    h = np.zeros((E, E))
    for y in batches:
        y = y.astype(np.float64)
        grams = [y[i] @ y[i].T for i in range(y.shape[0])]
        h += np.array([[ref_hsic1(grams[i], grams[j]) for j in range(E)] for i in range(E)])
    return h / np.sqrt(np.outer(np.diag(h), np.diag(h)))


def make_inputs(seed=0, t=T, e=E, d=D, k=2, offset=0.0):
    """Random expert outputs and a softmax top-k routing (renormalised) like Mixtral's."""
    rng = np.random.default_rng(seed)
    y = (rng.normal(size=(e, t, d)) + offset).astype(np.float32)
    logits = rng.normal(size=(t, e)).astype(np.float32)
    top = np.argsort(-logits, axis=1)[:, :k]
    selected = np.zeros((t, e), bool)
    np.put_along_axis(selected, top, True, axis=1)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    gates = np.where(selected, probs, 0).astype(np.float32)
    gates /= gates.sum(1, keepdims=True)
    return y, gates, selected, logits


def run(chunks, mode, *, chunk=0, e=E, d=D):
    acc = S.init_accumulators(e, d, cka=mode, chunk=chunk)
    for c in chunks:
        acc = update(acc, *c)
    return S.finalize(acc)


def full(inputs, t=T):
    return (*inputs, np.ones(t, bool))


def assert_stats_close(a, b, rtol=1e-5, atol=1e-6):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=k)


# ---------------------------------------------------------------- values
def test_exact_statistics_match_float64_brute_force():
    y, g, s, l = make_inputs()
    out = run([full((y, g, s, l))], "exact")
    y64, g64 = y.astype(np.float64), g.astype(np.float64)
    cka = np.array([[ref_cka(y64[i], y64[j]) for j in range(E)] for i in range(E)])
    m = np.array([[sum(g64[t, i] * y64[i, t] @ y64[j, t] for t in range(T)) for j in range(E)] for i in range(E)])
    n = np.array([[sum(g64[t, i] * y64[j, t] @ y64[j, t] for t in range(T)) for j in range(E)] for i in range(E)])
    norms = np.linalg.norm(y64, axis=-1).T  # [T, E]
    mean = y64.mean(1)
    cos = mean @ mean.T / np.outer(np.linalg.norm(mean, axis=1), np.linalg.norm(mean, axis=1))
    np.testing.assert_allclose(out["cka"], cka, rtol=1e-5)
    np.testing.assert_allclose(out["routed_m"], m, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["routed_n"], n, rtol=1e-5)
    np.testing.assert_allclose(out["freq"], s.mean(0), rtol=1e-12)
    np.testing.assert_allclose(out["freq"].sum(), 2.0, rtol=1e-12)  # top-2
    np.testing.assert_allclose(out["gate_mass"], g64.mean(0), rtol=1e-6)
    np.testing.assert_allclose(out["reap"], (g64 * norms).sum(0) / s.sum(0), rtol=1e-5)
    np.testing.assert_allclose(out["cos_mean"], cos, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(out["router"], np.corrcoef(l.astype(np.float64).T), rtol=1e-5, atol=1e-6)
    assert out["num_tokens"] == T
    assert all(v.dtype == np.float64 for v in out.values())


def test_gradient_sensitivities_match_float64_and_stream():
    """sens_* from per-token output gradients: float64 brute force; two chunks == one; padding adds nothing."""
    y, g, s, l = make_inputs(seed=3)
    grad = np.random.default_rng(4).normal(size=(T, D)).astype(np.float32)
    mask = np.ones(T, bool)
    mask[-3:] = False
    one = S.finalize(update(S.init_accumulators(E, D), y, g, s, l, mask, grad))
    acc = S.init_accumulators(E, D)
    for part in (slice(0, 10), slice(10, T)):
        acc = update(acc, y[:, part], g[part], s[part], l[part], mask[part], grad[part])
    two = S.finalize(acc)
    keep = mask
    u = np.einsum("etd,td->et", y.astype(np.float64)[:, keep], grad.astype(np.float64)[keep])
    g64 = g.astype(np.float64)[keep].T  # [E, T']
    ref = {
        "sens_m": np.einsum("it,it,jt->ij", g64**2, u, u),
        "sens_n": np.einsum("it,jt->ij", g64**2, u**2),
        "sens_g": np.einsum("it,jt->ij", g64, u),
    }
    for name, r in ref.items():
        np.testing.assert_allclose(one[name], r, rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(two[name], r, rtol=1e-5, atol=1e-6, err_msg=name)
    cost = np.diag(one["sens_n"])[:, None] + one["sens_n"] - 2 * one["sens_m"]
    brute = np.array([[np.sum(g64[i] ** 2 * (u[i] - u[j]) ** 2) for j in range(E)] for i in range(E)])
    np.testing.assert_allclose(cost, brute, rtol=1e-4, atol=1e-5)
    without = S.finalize(update(S.init_accumulators(E, D), y, g, s, l, mask))
    assert not np.any(without["sens_m"]) and not np.any(without["sens_g"])
    with pytest.raises(ValueError, match=r"out_grad must be \[tokens, embed\]"):
        S.update_accumulators(S.init_accumulators(E, D), y, g, s, l, mask, grad[:, :2])


def test_exact_cka_with_large_mean_offset():
    """Raw-moment centring in fp32 still gives CKA to ~1e-4 when means are 3x the spread."""
    y, g, s, l = make_inputs(seed=11, t=64, offset=3.0)
    out = run([full((y, g, s, l), 64)], "exact")
    y64 = y.astype(np.float64)
    cka = np.array([[ref_cka(y64[i], y64[j]) for j in range(E)] for i in range(E)])
    np.testing.assert_allclose(out["cka"], cka, rtol=1e-4, atol=1e-5)


def test_minibatch_cka_matches_song_hsic_summed_over_updates():
    chunks = [make_inputs(seed) for seed in (1, 2)]
    out = run([full(c) for c in chunks], "minibatch")
    np.testing.assert_allclose(out["cka"], ref_minibatch_cka([c[0] for c in chunks]), rtol=1e-5, atol=1e-6)


def test_minibatch_cka_is_invariant_to_mean_shift_and_robust_in_fp32():
    y, g, s, l = make_inputs(seed=12, offset=0.0)
    shifted = y + np.float32(5.0) * np.arange(1, D + 1, dtype=np.float32)
    a = run([full((y, g, s, l))], "minibatch")["cka"]
    b = run([full((shifted, g, s, l))], "minibatch")["cka"]
    np.testing.assert_allclose(b, ref_minibatch_cka([y]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", S.CKA_MODES)
def test_cka_invariances_and_identical_experts(mode):
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, D))
    q, _ = np.linalg.qr(rng.normal(size=(D, D)))
    y = np.stack([x, x @ q, 3.7 * x, rng.normal(size=(64, D))]).astype(np.float32)
    _, g, s, l = make_inputs(t=64)
    out = run([full((y, g, s, l), 64)], mode)
    np.testing.assert_allclose(out["cka"][0, 1:3], 1.0, rtol=1e-5)  # orthogonal map, isotropic scale
    np.testing.assert_allclose(out["cka"][1:3, 0], 1.0, rtol=1e-5)
    np.testing.assert_allclose(out["cka"], out["cka"].T, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(np.diag(out["cka"]), 1.0)
    assert out["cka"][0, 3] < 0.9
    y[1] = y[0]
    out = run([full((y, g, s, l), 64)], mode)
    np.testing.assert_allclose(out["cka"][0, 1], 1.0, rtol=1e-6)


# ---------------------------------------------------------------- streaming, combining, masks
def test_exact_streaming_equals_one_shot_and_combine():
    y, g, s, l = make_inputs(seed=4, t=3 * T)
    one = run([full((y, g, s, l), 3 * T)], "exact")
    parts = [(y[:, a : a + T], g[a : a + T], s[a : a + T], l[a : a + T], np.ones(T, bool)) for a in (0, T, 2 * T)]
    assert_stats_close(run(parts, "exact"), one)
    # per-host partial sums: accumulate two halves separately and add
    a = update(S.init_accumulators(E, D), *parts[0])
    b = update(update(S.init_accumulators(E, D), *parts[1]), *parts[2])
    assert_stats_close(S.finalize(combine(a, b)), one)


def test_minibatch_streaming_equals_chunked_one_shot():
    """k updates of c tokens == one update of k*c tokens with chunk=c == the mean-over-chunks definition."""
    y, g, s, l = make_inputs(seed=9, t=3 * T)
    parts = [(y[:, a : a + T], g[a : a + T], s[a : a + T], l[a : a + T], np.ones(T, bool)) for a in (0, T, 2 * T)]
    streamed = run(parts, "minibatch", chunk=T)
    one_shot = run([full((y, g, s, l), 3 * T)], "minibatch", chunk=T)
    assert_stats_close(streamed, one_shot)
    np.testing.assert_allclose(one_shot["cka"], ref_minibatch_cka([p[0] for p in parts]), rtol=1e-5, atol=1e-6)
    a = update(S.init_accumulators(E, D, cka="minibatch", chunk=T), *parts[0])
    b = update(update(S.init_accumulators(E, D, cka="minibatch", chunk=T), *parts[1]), *parts[2])
    assert_stats_close(S.finalize(combine(a, b)), one_shot)


def test_exact_masked_tokens_are_ignored_even_when_not_finite():
    y, g, s, l = make_inputs(seed=5, t=2 * T)
    kept = np.random.default_rng(0).permutation(2 * T) < T  # T kept tokens, interleaved with padding
    ref = run([full((y[:, kept], g[kept], s[kept], l[kept]))], "exact")
    y, g, l = y.copy(), g.copy(), l.copy()
    y[:, ~kept], g[~kept], l[~kept] = np.nan, np.inf, -np.inf
    s = s | ~kept[:, None]
    assert_stats_close(run([(y, g, s, l, kept)], "exact"), ref)


def test_minibatch_masked_tokens_match_dropping_them():
    y, g, s, l = make_inputs(seed=6, t=2 * T)
    mask = np.random.default_rng(1).random(2 * T) < 0.7
    mask[T : T + T - 3] = False  # the second minibatch keeps 3 tokens: too few for HSIC_1, adds nothing
    y = np.where(mask[None, :, None], y, 1e3).astype(np.float32)
    out = run([(y, g, s, l, mask)], "minibatch", chunk=T)
    first = y[:, :T][:, mask[:T]]
    np.testing.assert_allclose(out["cka"], ref_minibatch_cka([first]), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["freq"], s[mask].mean(0), rtol=1e-12)
    assert out["num_tokens"] == mask.sum()


def test_minibatch_chunk_need_not_divide_tokens():
    """T=24 with chunk=10: minibatches of 10, 10 and 4 tokens (the last padded with masked rows)."""
    y, g, s, l = make_inputs(seed=13)
    out = run([full((y, g, s, l))], "minibatch", chunk=10)
    ref = ref_minibatch_cka([y[:, :10], y[:, 10:20], y[:, 20:]])
    np.testing.assert_allclose(out["cka"], ref, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- sharding
@pytest.mark.parametrize("mode", S.CKA_MODES)
def test_sharded_over_8_devices_equals_single_device(mode):
    mesh = jax.make_mesh((4, 2), ("expert", "data"), axis_types=(AxisType.Auto, AxisType.Auto))
    inputs = make_inputs(seed=7)
    mask = np.ones(T, bool)
    mask[[3, 17]] = False
    single = run([(*inputs, mask)], mode, chunk=12)
    y, g, s, l = inputs
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
    acc = S.init_accumulators(E, D, cka=mode, chunk=12)
    with jax.set_mesh(mesh):
        args = (
            put(y, P("expert", "data", None)),
            put(g, P("data", "expert")),
            put(s, P("data", "expert")),
            put(l, P("data", None)),
            put(mask, P("data")),
        )
        acc = update(acc, *args)
        acc = update(acc, *args)
    assert len(acc.cka_sum.sharding.device_set) == 8  # computed on the mesh, not pulled to one device
    twice = run([(*inputs, mask)] * 2, mode, chunk=12)
    assert_stats_close(S.finalize(acc), twice)
    np.testing.assert_allclose(twice["cka"], single["cka"], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- routed substitution moments
def test_routed_cost_is_zero_for_identical_and_never_routed_experts():
    y, g, s, l = make_inputs(seed=6)
    y[1] = y[0]
    g[:, 3] = 0.0
    s[:, 3] = False
    out = run([full((y, g, s, l))], "exact")
    m, n = out["routed_m"], out["routed_n"]
    cost = np.diag(n)[:, None] + n - 2 * m  # C[i, j] = N_ii + N_ij - 2 M_ij
    assert abs(cost[0, 1]) < 1e-5 * n[0, 0] and abs(cost[1, 0]) < 1e-5 * n[1, 1]
    assert cost[0, 2] > 0.1 * n[0, 0]
    np.testing.assert_array_equal(cost[3], 0.0)
    assert out["reap"][3] == 0.0 and out["freq"][3] == 0.0 and out["gate_mass"][3] == 0.0


# ---------------------------------------------------------------- weights, memory, pytree, errors
def test_weight_cosine_matches_numpy_and_accepts_bf16():
    rng = np.random.default_rng(8)
    wg, wu = rng.normal(size=(2, 3, 4, 5))
    wd = rng.normal(size=(3, 5, 4))
    wg[1], wu[1], wd[1] = 2 * wg[0], 2 * wu[0], 2 * wd[0]
    flat = np.concatenate([wg.reshape(3, -1), wu.reshape(3, -1), wd.reshape(3, -1)], 1)
    ref = flat @ flat.T / np.outer(np.linalg.norm(flat, axis=1), np.linalg.norm(flat, axis=1))
    f32 = [jnp.asarray(w, jnp.float32) for w in (wg, wu, wd)]
    np.testing.assert_allclose(np.asarray(S.weight_cosine(*f32)), ref, rtol=1e-5)
    bf = [w.astype(jnp.bfloat16) for w in f32]
    out = S.weight_cosine(*bf)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), ref, atol=2e-2)
    with pytest.raises(ValueError, match="weight_cosine: expected w_gate"):
        S.weight_cosine(f32[0], f32[1], f32[1])


def test_memory_formula_and_donation_keep_the_pytree():
    for mode in S.CKA_MODES:
        acc = S.init_accumulators(E, D, cka=mode)
        nbytes = sum(x.nbytes for x in jax.tree.leaves(acc))
        small = nbytes - acc.cka_sum.nbytes - acc.y_sum.nbytes
        if mode == "exact":
            assert acc.cka_sum.nbytes + acc.y_sum.nbytes == S.exact_cka_bytes(E, D) == 4 * (10 * 36 + 24)
        else:
            assert acc.cka_sum.shape == (E, E)
        assert small < 4 * 8 * E * E  # 8 [E, E] sums (logits, routed, sensitivities) + vectors
        donated = jax.jit(S.update_accumulators, donate_argnums=0)
        new = donated(acc, *full(make_inputs()))
        assert jax.tree.structure(new) == jax.tree.structure(acc)
        assert [(x.shape, x.dtype) for x in jax.tree.leaves(new)] == [
            (x.shape, x.dtype) for x in jax.tree.leaves(S.init_accumulators(E, D, cka=mode))
        ]


def test_bad_options_and_shapes_raise_clear_errors():
    with pytest.raises(ValueError, match=r"cka mode 'fast' unknown; expected one of \('exact', 'minibatch'\)"):
        S.init_accumulators(2, 2, cka="fast")
    with pytest.raises(ValueError, match="chunk must be an int >= 0"):
        S.init_accumulators(2, 2, cka="minibatch", chunk=-1)
    y, g, s, l = make_inputs()
    acc = S.init_accumulators(E, D)
    ok = np.ones(T, bool)
    with pytest.raises(ValueError, match=r"gates must be \[tokens, experts\]=\(24, 4\), got \(24, 2\)"):
        S.update_accumulators(acc, y, g[:, :2], s, l, ok)
    with pytest.raises(ValueError, match="selected must be"):
        S.update_accumulators(acc, y, g, s[:5], l, ok)
    with pytest.raises(ValueError, match="router_logits must be"):
        S.update_accumulators(acc, y, g, s, l.T, ok)
    with pytest.raises(ValueError, match=r"mask must be \[tokens\]"):
        S.update_accumulators(acc, y, g, s, l, ok[:-1])
    with pytest.raises(ValueError, match=r"y must be \[experts=4, tokens, embed=6\], got \(4, 24, 5\)"):
        S.update_accumulators(acc, y[..., :5], g, s, l, ok)
    with pytest.raises(ValueError, match="combine: modes differ"):
        S.combine(acc, S.init_accumulators(E, D, cka="minibatch"))
    with pytest.raises(ValueError, match="no calibration tokens"):
        S.finalize(acc)


@pytest.mark.parametrize("mode", S.CKA_MODES)
def test_non_finite_statistics_raise_naming_the_statistic(mode):
    y, g, s, l = make_inputs()
    ok = np.ones(T, bool)
    bad_y = y.copy()
    bad_y[2, 5, 1] = np.nan
    with pytest.raises(ValueError, match="statistic 'cka' is not finite"):
        S.finalize(update(S.init_accumulators(E, D, cka=mode), bad_y, g, s, l, ok))
    bad_g = g.copy()
    bad_g[4, 0] = np.inf
    with pytest.raises(ValueError, match="statistic 'gate_mass' is not finite"):
        S.finalize(update(S.init_accumulators(E, D, cka=mode), y, bad_g, s, l, ok))
    bad_l = l.copy()
    bad_l[0, 0] = np.nan
    with pytest.raises(ValueError, match="statistic 'router' is not finite"):
        S.finalize(update(S.init_accumulators(E, D, cka=mode), y, g, s, bad_l, ok))
