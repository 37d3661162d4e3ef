"""Neuron alignment: permutations keep the function, permuted copies are recovered, hand-checked matching."""

from __future__ import annotations

import numpy as np
import pytest

from grape_jax.merge.alignment import align_and_average, match_features, neuron_permutation, permute_expert

D, F = 12, 40


def _expert(rng, *, d=D, f=F, bias=False, dtype=np.float32):
    ex = {
        "w_gate": rng.standard_normal((d, f)),
        "w_up": rng.standard_normal((d, f)),
        "w_down": rng.standard_normal((f, d)) / np.sqrt(f),
    }
    if bias:
        ex |= {"b_gate": rng.standard_normal(f), "b_up": rng.standard_normal(f)}
    return {k: v.astype(dtype) for k, v in ex.items()}


def _forward64(ex, x):
    """float64 SwiGLU expert: (silu(x Wg + bg) * (x Wu + bu)) Wd."""
    w = {k: np.asarray(v, np.float64) for k, v in ex.items()}
    g, u = x @ w["w_gate"], x @ w["w_up"]
    if "b_gate" in w:
        g, u = g + w["b_gate"], u + w["b_up"]
    return (g / (1.0 + np.exp(-g)) * u) @ w["w_down"]


def _permuted(ex, p):
    return permute_expert(ex["w_gate"], ex["w_up"], ex["w_down"], p, b_gate=ex.get("b_gate"), b_up=ex.get("b_up"))


def _stack(*experts):
    return {k: np.stack([e[k] for e in experts]) for k in experts[0]}


@pytest.mark.parametrize("bias", [False, True])
def test_permuting_neurons_keeps_each_expert_function(bias):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((64, D))
    for _ in range(4):
        ex = _expert(rng, bias=bias)
        p = rng.permutation(F)
        out = _permuted(ex, p)
        assert set(out) == set(ex)
        assert not np.array_equal(out["w_gate"], ex["w_gate"])
        np.testing.assert_allclose(_forward64(out, x), _forward64(ex, x), rtol=1e-12, atol=1e-12)
        np.testing.assert_array_equal(out["w_down"], ex["w_down"][p])


@pytest.mark.parametrize("method", ["weights", "activations"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("max_exact", [None, 0, 8])  # exact; greedy only; greedy then exact
def test_permuted_copy_is_recovered(method, bias, max_exact):
    rng = np.random.default_rng(1)
    anchor = _expert(rng, bias=bias)
    p = rng.permutation(F)
    member = _permuted(anchor, p)
    inputs = rng.standard_normal((96, D)).astype(np.float32) if method == "activations" else None
    perm = neuron_permutation(anchor, member, method=method, inputs=inputs, max_exact=max_exact)
    np.testing.assert_array_equal(perm, np.argsort(p))  # the inverse of p
    for k, v in _permuted(member, perm).items():
        np.testing.assert_array_equal(v, anchor[k])


@pytest.mark.parametrize("method", ["weights", "activations"])
@pytest.mark.parametrize("similarity", ["correlation", "cosine"])
def test_noisy_permuted_copy_is_recovered(method, similarity):
    rng = np.random.default_rng(2)
    anchor = _expert(rng, f=200)
    p = rng.permutation(200)
    member = {
        k: v + 0.1 * rng.standard_normal(v.shape).astype(np.float32) * v.std() for k, v in _permuted(anchor, p).items()
    }
    inputs = rng.standard_normal((256, D)).astype(np.float32)
    for max_exact in (None, 20):
        perm = neuron_permutation(
            anchor, member, method=method, inputs=inputs, similarity=similarity, max_exact=max_exact
        )
        np.testing.assert_array_equal(perm, np.argsort(p))


@pytest.mark.parametrize("method", ["weights", "activations"])
def test_align_and_average_of_permuted_copy_returns_anchor(method):
    rng = np.random.default_rng(3)
    anchor = _expert(rng, bias=True)
    other = _expert(rng, bias=True)
    member = _permuted(anchor, rng.permutation(F))
    layer = _stack(other, member, anchor)
    layer["b_down"] = np.stack([rng.standard_normal(D).astype(np.float32)] * 3)
    inputs = rng.standard_normal((64, D)).astype(np.float32)
    for a in (0.5, 0.1, 0.77):
        merged = align_and_average(layer, [1, 2], [a, 1 - a], anchor=2, method=method, inputs=inputs)
        assert set(merged) == set(layer)
        for k in anchor:
            assert merged[k].dtype == np.float32 and merged[k].shape == anchor[k].shape
            np.testing.assert_allclose(merged[k], anchor[k], rtol=1e-6, atol=1e-7)
            plain = a * layer[k][1] + (1 - a) * layer[k][2]
            assert np.abs(plain - anchor[k]).max() > 0.1 * np.abs(anchor[k]).max()
        np.testing.assert_allclose(merged["b_down"], layer["b_down"][0], rtol=1e-6)
    # anchor listed first, a singleton group and a three-member group
    merged = align_and_average(layer, [2, 1], [0.3, 0.7], anchor=2, method=method, inputs=inputs)
    np.testing.assert_allclose(merged["w_down"], anchor["w_down"], rtol=1e-6, atol=1e-7)
    single = align_and_average(layer, [0], [1.0], anchor=0, method=method, inputs=inputs)
    for k in layer:
        np.testing.assert_array_equal(single[k], layer[k][0])
    # three members: 0.8 of the result is the anchor, the rest a consistent permutation of expert 0
    three = align_and_average(layer, [0, 1, 2], [0.2, 0.3, 0.5], anchor=2, method=method, inputs=inputs)
    resid = {k: (three[k] - 0.8 * anchor[k]) / 0.2 for k in ("w_gate", "w_up", "w_down")}
    dist = ((resid["w_gate"][:, :, None] - other["w_gate"][:, None, :]) ** 2).sum(0)
    q = dist.argmin(1)
    assert sorted(q.tolist()) == list(range(F))
    for k, v in _permuted(other, q).items():
        if k in resid:
            np.testing.assert_allclose(resid[k], v, rtol=1e-4, atol=1e-4)


def test_align_and_average_bfloat16_accumulates_in_fp32():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rng = np.random.default_rng(4)
    anchor = _expert(rng, dtype=ml_dtypes.bfloat16)
    member = _permuted(anchor, rng.permutation(F))
    merged = align_and_average(_stack(anchor, member), [0, 1], [0.5, 0.5], anchor=0)
    for k in anchor:
        assert merged[k].dtype == anchor[k].dtype
        np.testing.assert_array_equal(merged[k].astype(np.float32), anchor[k].astype(np.float32))


def test_hand_checked_three_neurons():
    # d = 1: neuron n's weight feature is (w_gate[0, n], w_up[0, n], w_down[n, 0]).
    anchor = {"w_gate": np.array([[1.0, 0, 0]]), "w_up": np.array([[0, 1.0, 0]]), "w_down": np.eye(3)[:, 2:]}
    # member features, unit norm: m0 = (0, .6, .8), m1 = (.8, .6, 0), m2 = (.6, 0, .8), so the cosine
    # similarity S[n, m] = m_n = [[0, .8, .6], [.6, .6, 0], [.8, 0, .8]].
    member = {
        "w_gate": np.array([[0, 0.8, 0.6]]),
        "w_up": np.array([[0.6, 0.6, 0]]),
        "w_down": np.array([[0.8], [0], [0.8]]),
    }
    # totals: [1,0,2] .8+.6+.8 = 2.2 (best), [2,1,0] 2.0, [1,2,0] 1.6, [0,1,2] 1.4, [2,0,1] 1.2, [0,2,1] 0.
    perm = neuron_permutation(anchor, member, similarity="cosine")
    np.testing.assert_array_equal(perm, [1, 0, 2])
    # greedy takes the .8 edges (0,1) and (2,0) first, leaving (1,2) = 0: total 1.6
    greedy = neuron_permutation(anchor, member, similarity="cosine", max_exact=0, top_k=3)
    np.testing.assert_array_equal(greedy, [1, 2, 0])
    # correlation on the same features: centred rows n = e_n - 1/3, m = m - mean(m)
    cen = lambda v: (v - v.mean()) / np.linalg.norm(v - v.mean())  # noqa: E731
    feats_m = [np.array(v) for v in ([0, 0.6, 0.8], [0.8, 0.6, 0], [0.6, 0, 0.8])]
    s = np.array([[cen(np.eye(3)[n]) @ cen(m) for m in feats_m] for n in range(3)])
    best = max(
        ([0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]),
        key=lambda q: sum(s[n, q[n]] for n in range(3)),
    )
    np.testing.assert_array_equal(neuron_permutation(anchor, member), best)


def test_match_features_handles_constant_rows_and_large_f_greedy():
    rng = np.random.default_rng(5)
    a = rng.standard_normal((600, 16)).astype(np.float32)
    a[:3] = 1.0  # constant rows: similarity 0 to everything under correlation
    p = rng.permutation(600)
    perm = match_features(a, a[p], max_exact=100, top_k=4, chunk=128)
    assert sorted(perm.tolist()) == list(range(600))
    np.testing.assert_array_equal(perm[3:], np.argsort(p)[3:])


def test_errors_name_expected_values():
    rng = np.random.default_rng(6)
    anchor = _expert(rng)
    with pytest.raises(ValueError, match=r"unknown method 'weight'.*'weights', 'activations'"):
        neuron_permutation(anchor, anchor, method="weight")
    with pytest.raises(ValueError, match=r"unknown similarity 'cos'.*'correlation', 'cosine'"):
        neuron_permutation(anchor, anchor, similarity="cos")
    with pytest.raises(ValueError, match=rf"inputs of shape \[T, {D}\]"):
        neuron_permutation(anchor, anchor, method="activations")
    with pytest.raises(ValueError, match=rf"\(d, f\)=\({D}, {F}\).*\(d, f\)=\({D}, {F - 1}\)"):
        neuron_permutation(anchor, _expert(rng, f=F - 1))
    bad = dict(anchor, w_down=anchor["w_down"].T)
    with pytest.raises(ValueError, match=rf"w_down has shape \({D}, {F}\), expected \({F}, {D}\)"):
        neuron_permutation(anchor, bad)
    with pytest.raises(ValueError, match=rf"b_gate has shape \(3,\), expected \({F},\)"):
        neuron_permutation(anchor, dict(anchor, b_gate=np.zeros(3), b_up=np.zeros(F)))
    with pytest.raises(ValueError, match=rf"permutation of range\({F}\)"):
        permute_expert(anchor["w_gate"], anchor["w_up"], anchor["w_down"], np.zeros(F, int))
    layer = _stack(anchor, anchor)
    with pytest.raises(ValueError, match=r"anchor 0 must be one of the group's members \[1\]"):
        align_and_average(layer, [1], [1.0], anchor=0)
    with pytest.raises(ValueError, match="one alpha per member"):
        align_and_average(layer, [0, 1], [1.0], anchor=0)
    with pytest.raises(ValueError, match=r"expert ids in \[0, 2\)"):
        align_and_average(layer, [0, 2], [0.5, 0.5], anchor=0)
    with pytest.raises(ValueError, match=r"unknown \['w_gate_proj'\]"):
        align_and_average(dict(layer, w_gate_proj=layer["w_gate"]), [0], [1.0], anchor=0)
    with pytest.raises(ValueError, match=r"b_up has 3 experts on axis 0, expected 2"):
        align_and_average(dict(layer, b_gate=np.zeros((2, F)), b_up=np.zeros((3, F))), [0], [1.0], anchor=0)
