"""Neuron alignment of SwiGLU experts before averaging (pure NumPy, host side).

An expert `y = act(x W_g + b_g, x W_u + b_u) W_d (+ b_d)` computes the same function under any
permutation P of its f intermediate neurons (columns of W_g/W_u, entries of b_g/b_u, rows of W_d), so
averaging two experts neuron-by-neuron mixes unrelated neurons. Before α-averaging a group we permute
every member so its neurons match the anchor's (Git Re-Basin-style matching, Ainsworth et al., 2023):
`perm = argmax_P Σ_n sim(anchor_n, member_P(n))`, a linear assignment on the [f, f] similarity of
per-neuron feature vectors:

  weights      feature_n = [W_g[:, n], W_u[:, n], W_d[n, :], b_g[n], b_u[n]]   (length 3d (+2))
  activations  feature_n = act(X W_g[:, n] + b_g[n], X W_u[:, n] + b_u[n])      over calibration X [T, d]

`similarity='correlation'` centres each feature vector before normalising (Pearson correlation),
`'cosine'` only normalises. A neuron whose feature vector is constant (or zero) has similarity 0.

Cost: features O(f·k) with k = 3d (weights) or T (activations; plus the O(T·d·f) forward), the
similarity matrix one fp32 GEMM of O(f²·k) flops. The exact assignment (`scipy.optimize.
linear_sum_assignment`, float64 [f, f] copy, O(f³) worst case) measured 0.06 s at f=1024, 0.4 s at
2048, 2.6 s at 4096 on one CPU core and grows ~f^2.7 (minutes and 3.2 GB at f=20k). Above
`max_exact` neurons the matching is greedy instead (`_greedy_match`): similarities are streamed in
row chunks keeping each row's `top_k` candidates (memory O(f·top_k + chunk·f), never [f, f]), the
candidate edges are taken best-first when both ends are free, and rounds repeat on the unmatched
neurons until at most `max_exact` remain, which are solved exactly. Greedy is a 1/2-approximation of
the optimum in general and exact when every neuron has a distinct best match that is mutual (e.g. a
permuted copy). Measured: f=8192, k=256, greedy down to 2048 then exact: 2.2 s, all matches of a
noisy permuted copy recovered.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import numpy as np
from jaxtyping import Float, Int
from scipy.optimize import linear_sum_assignment
from scipy.special import expit

Method = Literal["weights", "activations"]
Similarity = Literal["correlation", "cosine"]
Activation = Callable[[np.ndarray, np.ndarray], np.ndarray]

METHODS = ("weights", "activations")
SIMILARITIES = ("correlation", "cosine")
EXPERT_KEYS = ("w_gate", "w_up", "w_down")
NEURON_BIAS_KEYS = ("b_gate", "b_up")
DEFAULT_MAX_EXACT = 4096


def silu_glu(gate: Float[np.ndarray, "t f"], up: Float[np.ndarray, "t f"]) -> Float[np.ndarray, "t f"]:
    """SiLU(gate) * up (the default gated activation; pass the family's own via `activation=`)."""
    return gate * expit(gate) * up


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}: expected one of {', '.join(map(repr, allowed))}")


def _check_expert(ex: Mapping[str, np.ndarray | None], what: str) -> tuple[int, int]:
    """Shapes of one expert: w_gate/w_up [d, f], w_down [f, d], b_gate/b_up [f] when given."""
    for k in EXPERT_KEYS:
        if ex.get(k) is None or np.ndim(ex[k]) != 2:
            raise ValueError(f"{what}: {k} must be a 2-D array, got shape {np.shape(ex.get(k))}")
    d, f = np.shape(ex["w_gate"])
    expected = {"w_gate": (d, f), "w_up": (d, f), "w_down": (f, d), "b_gate": (f,), "b_up": (f,)}
    for k, shape in expected.items():
        if ex.get(k) is not None and np.shape(ex[k]) != shape:
            raise ValueError(f"{what}: {k} has shape {np.shape(ex[k])}, expected {shape} (d={d}, f={f})")
    if (ex.get("b_gate") is None) != (ex.get("b_up") is None):
        raise ValueError(f"{what}: b_gate and b_up must be given together")
    return d, f


def neuron_features(
    expert: Mapping[str, np.ndarray | None],
    *,
    method: Method = "weights",
    inputs: np.ndarray | None = None,
    activation: Activation | None = None,
) -> Float[np.ndarray, "f k"]:
    """Per-neuron feature vectors of one expert, fp32 [f, k] (see the module docstring).

    `expert` maps w_gate [d, f], w_up [d, f], w_down [f, d] and optionally b_gate [f], b_up [f];
    `inputs` [T, d] is required for method 'activations'.
    """
    _check_choice("method", method, METHODS)
    d, f = _check_expert(expert, "expert")
    g, u, w_d = (np.asarray(expert[k], np.float32) for k in EXPERT_KEYS)
    bg, bu = (None if expert.get(k) is None else np.asarray(expert[k], np.float32) for k in NEURON_BIAS_KEYS)
    if method == "weights":
        cols = [g.T, u.T, w_d] + ([bg[:, None], bu[:, None]] if bg is not None else [])
        return np.concatenate(cols, axis=1)
    if inputs is None or np.ndim(inputs) != 2 or np.shape(inputs)[1] != d:
        raise ValueError(f"method 'activations' needs inputs of shape [T, {d}], got {np.shape(inputs)}")
    x = np.asarray(inputs, np.float32)
    gate, up = x @ g, x @ u
    if bg is not None:
        gate, up = gate + bg, up + bu
    return np.ascontiguousarray((activation or silu_glu)(gate, up).T, dtype=np.float32)


def _normalise(feat: np.ndarray, similarity: Similarity) -> np.ndarray:
    """Rows centred (correlation) and scaled to unit norm; all-constant rows become 0."""
    feat = np.asarray(feat, np.float32)
    if similarity == "correlation":
        feat = feat - feat.mean(axis=1, keepdims=True)
    norm = np.linalg.norm(feat, axis=1, keepdims=True)
    tiny = np.finfo(np.float32).tiny ** 0.5
    return np.where(norm > tiny, feat / np.maximum(norm, tiny), 0.0).astype(np.float32)


def _exact_match(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """perm[i] = column of b matched to row i of a, maximising Σ a_i·b_perm[i]."""
    rows, cols = linear_sum_assignment(a @ b.T, maximize=True)
    perm = np.empty(a.shape[0], np.int64)
    perm[rows] = cols
    return perm


def _greedy_match(a: np.ndarray, b: np.ndarray, *, max_exact: int, top_k: int, chunk: int) -> np.ndarray:
    """Greedy rounds on streamed top-k candidates until <= max_exact remain, then exact (see module doc)."""
    f = a.shape[0]
    perm = np.full(f, -1, np.int64)
    rows, cols = np.arange(f), np.arange(f)  # unmatched anchor / member neurons
    while rows.size > max_exact:
        k = min(top_k, cols.size)
        b_free = b[cols]
        cand = np.empty((rows.size, k), np.int64)
        score = np.empty((rows.size, k), np.float32)
        for s in range(0, rows.size, chunk):
            sim = a[rows[s : s + chunk]] @ b_free.T
            idx = np.argpartition(-sim, k - 1, axis=1)[:, :k]
            cand[s : s + chunk], score[s : s + chunk] = idx, np.take_along_axis(sim, idx, axis=1)
        row_free = np.ones(rows.size, bool)
        col_free = np.ones(cols.size, bool)
        for e in np.argsort(-score, axis=None, kind="stable"):  # best edge first: >= 1 match per round
            i, c = e // k, cand.flat[e]
            if row_free[i] and col_free[c]:
                perm[rows[i]] = cols[c]
                row_free[i] = col_free[c] = False
        rows, cols = rows[row_free], cols[col_free]
    if rows.size:
        perm[rows] = cols[_exact_match(a[rows], b[cols])]
    return perm


def match_features(
    anchor: Float[np.ndarray, "f k"],
    member: Float[np.ndarray, "f k"],
    *,
    similarity: Similarity = "correlation",
    max_exact: int | None = DEFAULT_MAX_EXACT,
    top_k: int = 8,
    chunk: int = 1024,
) -> Int[np.ndarray, " f"]:
    """Permutation [f] matching member feature rows to anchor feature rows ([f, k] each).

    Exact assignment when f <= `max_exact` (None: always exact), else greedy (module docstring).
    """
    _check_choice("similarity", similarity, SIMILARITIES)
    if anchor.shape != member.shape or anchor.ndim != 2:
        raise ValueError(f"features must be equal-shape [f, k] arrays, got {anchor.shape} and {member.shape}")
    if max_exact is not None and max_exact < 0 or top_k < 1 or chunk < 1:
        raise ValueError(f"need max_exact >= 0 (or None), top_k >= 1, chunk >= 1; got {max_exact}, {top_k}, {chunk}")
    a, b = _normalise(anchor, similarity), _normalise(member, similarity)
    if max_exact is None or anchor.shape[0] <= max_exact:
        return _exact_match(a, b)
    return _greedy_match(a, b, max_exact=max_exact, top_k=top_k, chunk=chunk)


def neuron_permutation(
    anchor: Mapping[str, np.ndarray | None],
    member: Mapping[str, np.ndarray | None],
    *,
    method: Method = "weights",
    inputs: np.ndarray | None = None,
    similarity: Similarity = "correlation",
    activation: Activation | None = None,
    max_exact: int | None = DEFAULT_MAX_EXACT,
    top_k: int = 8,
) -> Int[np.ndarray, " f"]:
    """Permutation `perm` [f] (int64) of the member's neurons that best matches the anchor's.

    Experts are mappings w_gate [d, f], w_up [d, f], w_down [f, d], optional b_gate/b_up [f]. Member
    neuron perm[n] is matched to anchor neuron n, so `permute_expert(member, perm)` is aligned with
    the anchor. If the member is `permute_expert(anchor, p)`, perm is the inverse of p.
    """
    _check_choice("method", method, METHODS)
    _check_choice("similarity", similarity, SIMILARITIES)
    sa, sm = _check_expert(anchor, "anchor"), _check_expert(member, "member")
    if sa != sm or (anchor.get("b_gate") is None) != (member.get("b_gate") is None):
        raise ValueError(f"anchor (d, f)={sa} and member (d, f)={sm} must match, with biases in both or neither")
    kw = dict(method=method, inputs=inputs, activation=activation)
    fa, fm = neuron_features(anchor, **kw), neuron_features(member, **kw)
    return match_features(fa, fm, similarity=similarity, max_exact=max_exact, top_k=top_k)


def permute_expert(
    w_gate: Float[np.ndarray, "d f"],
    w_up: Float[np.ndarray, "d f"],
    w_down: Float[np.ndarray, "f d"],
    perm: Int[np.ndarray, " f"],
    *,
    b_gate: Float[np.ndarray, " f"] | None = None,
    b_up: Float[np.ndarray, " f"] | None = None,
) -> dict[str, np.ndarray]:
    """The same expert with neurons reordered: w_gate/w_up [d, f] columns, w_down [f, d] rows, b_gate/b_up [f].

    Returns {'w_gate', 'w_up', 'w_down'} (+ 'b_gate', 'b_up' when given); new neuron n is old neuron
    perm[n]. The function computed is identical (exactly: only the summation order over neurons changes).
    """
    _, f = _check_expert({"w_gate": w_gate, "w_up": w_up, "w_down": w_down, "b_gate": b_gate, "b_up": b_up}, "expert")
    perm = np.asarray(perm)
    if perm.shape != (f,) or not np.array_equal(np.sort(perm), np.arange(f)):
        raise ValueError(f"perm must be a permutation of range({f}), got shape {perm.shape}")
    out = {"w_gate": w_gate[:, perm], "w_up": w_up[:, perm], "w_down": w_down[perm, :]}
    if b_gate is not None:
        out |= {"b_gate": b_gate[perm], "b_up": b_up[perm]}
    return out


def align_and_average(
    weights: Mapping[str, np.ndarray],
    group: Sequence[int],
    alphas: Sequence[float],
    *,
    anchor: int,
    method: Method = "weights",
    inputs: np.ndarray | None = None,
    similarity: Similarity = "correlation",
    activation: Activation | None = None,
    max_exact: int | None = DEFAULT_MAX_EXACT,
    top_k: int = 8,
) -> dict[str, np.ndarray]:
    """One merged expert Σ α_i P_i(W_i) of a layer's stacked experts, members aligned to `anchor`.

    `weights`: w_gate/w_up [E, d, f], w_down [E, f, d], optional b_gate/b_up [E, f], b_down [E, d].
    `anchor` is an expert id in `group` and is not permuted; b_down is averaged as is. Alphas are used
    as given (sum to 1 for a mean). Sums in fp32 and casts back to each input's dtype; returns the
    same keys without the expert axis. Holds a few one-expert copies at a time.
    """
    missing = [k for k in EXPERT_KEYS if k not in weights]
    unknown = sorted(set(weights) - set(EXPERT_KEYS) - set(NEURON_BIAS_KEYS) - {"b_down"})
    if missing or unknown:
        raise ValueError(
            f"weights need keys {EXPERT_KEYS} (+ optional b_gate, b_up, b_down); missing {missing}, unknown {unknown}"
        )
    group, alphas = [int(i) for i in group], [float(a) for a in alphas]
    n_exp = np.shape(weights["w_gate"])[0]
    if not group or len(alphas) != len(group):
        raise ValueError(
            f"need a non-empty group and one alpha per member, got {len(group)} members, {len(alphas)} alphas"
        )
    if len(set(group)) != len(group) or not all(0 <= i < n_exp for i in group):
        raise ValueError(f"group members must be distinct expert ids in [0, {n_exp}), got {group}")
    if anchor not in group:
        raise ValueError(f"anchor {anchor} must be one of the group's members {group}")
    for k, v in weights.items():
        if np.shape(v)[0] != n_exp:
            raise ValueError(f"{k} has {np.shape(v)[0]} experts on axis 0, expected {n_exp} (from w_gate)")

    def expert(i: int) -> dict[str, np.ndarray]:
        return {k: weights[k][i] for k in (*EXPERT_KEYS, *NEURON_BIAS_KEYS) if k in weights}

    ref = expert(anchor)
    kw = dict(method=method, inputs=inputs, activation=activation)
    anchor_feat = neuron_features(ref, **kw)
    acc = {k: np.zeros(np.shape(v)[1:], np.float32) for k, v in weights.items()}
    for i, alpha in zip(group, alphas, strict=True):
        ex = expert(i)
        if i != anchor:
            perm = match_features(
                anchor_feat, neuron_features(ex, **kw), similarity=similarity, max_exact=max_exact, top_k=top_k
            )
            ex = permute_expert(
                ex["w_gate"], ex["w_up"], ex["w_down"], perm, b_gate=ex.get("b_gate"), b_up=ex.get("b_up")
            )
        if "b_down" in weights:
            ex["b_down"] = weights["b_down"][i]
        for k, v in ex.items():
            acc[k] += np.float32(alpha) * np.asarray(v, np.float32)
    return {k: acc[k].astype(np.asarray(weights[k]).dtype) for k in acc}
