"""Streaming accumulators of expert statistics (pure JAX; one set per MoE layer).

Per chunk of T tokens the calibration driver passes every expert's output `y [E, T, d]`, the model's own
routing (`gates [T, E]`, 0 where not routed; `selected [T, E]`), `router_logits [T, E]` and a token mask.
Everything accumulated is a sum over tokens, so chunks, devices and hosts combine by addition
(`combine`) and the result of k chunks equals one pass over their concatenation.

Linear CKA of expert outputs, two streaming forms:
  exact      keeps Σ_t y_i(t) y_j(t)ᵀ for every expert pair (E²·d² floats, `exact_cka_bytes`) and Σ y_i,
             from which the centred cross-covariance C_ij and CKA = ‖C_ij‖²_F / (‖C_ii‖_F ‖C_jj‖_F)
             follow exactly. For small E·d (tests, demo models) and as the reference.
  minibatch  unbiased HSIC_1 (Song et al., 2012) on each chunk's Gram matrices K_i = Y_i Y_iᵀ (padding
             tokens removed by zeroing their rows and columns and using the valid count), summed over
             chunks; CKA = ΣHSIC_ij / sqrt(ΣHSIC_ii ΣHSIC_jj) (Nguyen et al., 2021). E² floats; this is
             the scalable default for real models (d in the thousands).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float

HIGH = jax.lax.Precision.HIGHEST
CKA_MODES = ("exact", "minibatch")


def exact_cka_bytes(num_experts: int, embed: int) -> int:
    """Bytes of the fp32 pairwise cross-moments that exact CKA keeps for one layer."""
    return 4 * num_experts * num_experts * embed * embed


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Accumulators:
    """fp32 running sums of one MoE layer (see module docstring); `cka` and `chunk` are static."""

    num_tokens: jax.Array  # []
    count: jax.Array  # [E]   Σ selected
    gate_sum: jax.Array  # [E]   Σ gate
    reap_sum: jax.Array  # [E]   Σ gate * ||y||
    y_sum: jax.Array  # [E, d]
    logit_sum: jax.Array  # [E]
    logit_outer: jax.Array  # [E, E]
    routed_m: jax.Array  # [E, E]  Σ g_i <y_i, y_j>
    routed_n: jax.Array  # [E, E]  Σ g_i ||y_j||²
    cross: jax.Array  # exact: [E, E, d, d] Σ y_i y_jᵀ; minibatch: [E, E] Σ HSIC_ij
    cka: str = dataclasses.field(metadata=dict(static=True), default="exact")
    chunk: int = dataclasses.field(metadata=dict(static=True), default=0)


def init_accumulators(num_experts: int, embed: int, *, cka: str = "exact", chunk: int = 0) -> Accumulators:
    if cka not in CKA_MODES:
        raise ValueError(f"cka mode {cka!r} unknown; expected one of {CKA_MODES}")
    e, d = num_experts, embed
    z = lambda *s: jnp.zeros(s, jnp.float32)  # noqa: E731
    cross = z(e, e, d, d) if cka == "exact" else z(e, e)
    return Accumulators(z(), z(e), z(e), z(e), z(e, d), z(e), z(e, e), z(e, e), z(e, e), cross, cka, chunk)


def _hsic_unbiased(y: Float[Array, "e t d"], valid: Bool[Array, " t"]) -> Float[Array, "e e"]:
    """Unbiased HSIC_1 of every pair of linear-kernel Grams over the valid tokens of one chunk."""
    m = jnp.sum(valid).astype(jnp.float32)
    keep = valid.astype(jnp.float32)
    k = jnp.einsum("itd,isd->its", y, y, precision=HIGH)
    k = k * (keep[:, None] * keep[None, :]) * (1.0 - jnp.eye(y.shape[1], dtype=jnp.float32))
    trace = jnp.einsum("iab,jab->ij", k, k, precision=HIGH)
    sums = jnp.sum(k, axis=(1, 2))
    rows = jnp.sum(k, axis=2)
    cross = jnp.einsum("ia,ja->ij", rows, rows, precision=HIGH)
    safe = jnp.maximum(m, 4.0)
    hsic = (trace + jnp.outer(sums, sums) / ((safe - 1) * (safe - 2)) - 2.0 / (safe - 2) * cross) / (
        safe * (safe - 3)
    )
    return jnp.where(m >= 4, hsic, 0.0)


def update_accumulators(
    acc: Accumulators,
    y: Float[Array, "experts tokens embed"],
    gates: Float[Array, "tokens experts"],
    selected: Bool[Array, "tokens experts"],
    router_logits: Float[Array, "tokens experts"],
    mask: Bool[Array, " tokens"],
) -> Accumulators:
    """Add one chunk of tokens (masked tokens contribute nothing)."""
    e, t, d = y.shape
    if gates.shape != (t, e) or selected.shape != (t, e) or router_logits.shape != (t, e):
        raise ValueError(
            f"expected gates/selected/router_logits of shape {(t, e)}, got {gates.shape}, "
            f"{selected.shape}, {router_logits.shape}"
        )
    if mask.shape != (t,) or acc.y_sum.shape != (e, d):
        raise ValueError(f"mask {mask.shape} / accumulators {acc.y_sum.shape} do not fit y {y.shape}")
    keep = mask.astype(jnp.float32)
    y = y.astype(jnp.float32) * keep[None, :, None]
    g = gates.astype(jnp.float32) * keep[:, None]
    sel = selected.astype(jnp.float32) * keep[:, None]
    logits = router_logits.astype(jnp.float32) * keep[:, None]
    sq = jnp.sum(y * y, axis=-1)  # [E, T]
    inner = jnp.einsum("itd,jtd->tij", y, y, precision=HIGH)  # [T, E, E]
    if acc.cka == "exact":
        cross = acc.cross + jnp.einsum("itd,jtc->ijdc", y, y, precision=HIGH)
    else:
        cross = acc.cross + _hsic_unbiased(y, mask)
    return dataclasses.replace(
        acc,
        num_tokens=acc.num_tokens + jnp.sum(keep),
        count=acc.count + jnp.sum(sel, axis=0),
        gate_sum=acc.gate_sum + jnp.sum(g, axis=0),
        reap_sum=acc.reap_sum + jnp.sum(g * jnp.sqrt(sq).T, axis=0),
        y_sum=acc.y_sum + jnp.sum(y, axis=1),
        logit_sum=acc.logit_sum + jnp.sum(logits, axis=0),
        logit_outer=acc.logit_outer + jnp.einsum("ti,tj->ij", logits, logits, precision=HIGH),
        routed_m=acc.routed_m + jnp.einsum("ti,tij->ij", g, inner, precision=HIGH),
        routed_n=acc.routed_n + jnp.einsum("ti,jt->ij", g, sq, precision=HIGH),
        cross=cross,
    )


def combine(a: Accumulators, b: Accumulators) -> Accumulators:
    """Sum of two partial accumulators (chunks, devices or hosts)."""
    if (a.cka, a.chunk) != (b.cka, b.chunk):
        raise ValueError(f"cannot combine accumulators of modes {a.cka}/{a.chunk} and {b.cka}/{b.chunk}")
    return jax.tree.map(jnp.add, a, b)


def _normalise_gram(g: np.ndarray) -> np.ndarray:
    diag = np.sqrt(np.clip(np.diag(g), 0.0, None))
    denom = np.outer(diag, diag)
    out = np.divide(g, denom, out=np.zeros_like(g), where=denom > 0)
    np.fill_diagonal(out, 1.0)
    return out


def finalize(acc: Accumulators) -> dict[str, np.ndarray]:
    """Host float64 statistics: freq, gate_mass, reap, cka, cos_mean, router, routed_m, routed_n."""
    h = {f.name: np.asarray(getattr(acc, f.name), np.float64)
         for f in dataclasses.fields(acc) if f.name not in ("cka", "chunk")}
    n = float(h["num_tokens"])
    if n <= 0:
        raise ValueError("no calibration tokens were accumulated")
    out: dict[str, np.ndarray] = {"num_tokens": np.asarray(n)}
    out["freq"] = h["count"] / n
    out["gate_mass"] = h["gate_sum"] / n
    out["reap"] = np.divide(h["reap_sum"], h["count"], out=np.zeros_like(h["reap_sum"]), where=h["count"] > 0)
    mean = h["y_sum"] / n
    out["cos_mean"] = _normalise_gram(mean @ mean.T)
    cov = h["logit_outer"] / n - np.outer(h["logit_sum"], h["logit_sum"]) / n**2
    out["router"] = _normalise_gram(cov)
    if acc.cka == "exact":
        centred = h["cross"] - np.einsum("id,jc->ijdc", h["y_sum"], h["y_sum"]) / n
        gram = np.einsum("ijdc,ijdc->ij", centred, centred)
        diag = np.sqrt(np.clip(np.diag(gram), 0.0, None))
        denom = np.outer(diag, diag)
        cka = np.divide(gram, denom, out=np.zeros_like(gram), where=denom > 0)
        np.fill_diagonal(cka, 1.0)
        out["cka"] = cka
    else:
        out["cka"] = _normalise_gram(h["cross"])
    out["routed_m"] = h["routed_m"]
    out["routed_n"] = h["routed_n"]
    for name, value in out.items():
        if not np.all(np.isfinite(value)):
            raise ValueError(f"statistic {name!r} is not finite (NaN or inf in the model's outputs?)")
    return out


def weight_cosine(
    w_gate: Float[Array, "e d f"], w_up: Float[Array, "e d f"], w_down: Float[Array, "e f d"]
) -> Float[Array, "e e"]:
    """Cosine similarity of the experts' flattened weights (data-free baseline)."""
    e = w_gate.shape[0]
    flat = jnp.concatenate(
        [w.reshape(e, -1).astype(jnp.float32) for w in (w_gate, w_up, w_down)], axis=1
    )
    gram = jnp.einsum("ik,jk->ij", flat, flat, precision=HIGH)
    norms = jnp.sqrt(jnp.diag(gram))
    return gram / jnp.maximum(jnp.outer(norms, norms), 1e-30)
