"""Streaming accumulators of expert statistics (pure JAX; one set per MoE layer).

Per chunk of T tokens the calibration driver passes every expert's output `y [E, T, d]`, the model's own
routing (`gates [T, E]`, 0 where not routed; `selected [T, E]`), `router_logits [T, E]` and a token mask
(False = padding, which counts nowhere). Every accumulator is a sum over tokens (or over HSIC minibatches),
so chunks, devices and hosts combine by addition (`combine`, or a psum of the leaves) and k chunks give
the same result as one pass over their concatenation (exactly up to fp32 summation order).

Linear CKA of expert outputs over tokens, column-centred: CKA = ‖Ỹ_iᵀỸ_j‖²_F / (‖Ỹ_iᵀỸ_i‖_F ‖Ỹ_jᵀỸ_j‖_F).
Two streaming forms (`cka=`):
  exact      Σ_t y_i(t) and the cross-moments Σ_t y_i(t) y_j(t)ᵀ for the pairs i <= j only (C_ji is
             C_ijᵀ), from which the centred cross-covariance C_ij = Σ y_i y_jᵀ - Σy_i Σy_jᵀ / n and the
             numerator ‖C_ij‖²_F follow exactly. Memory `exact_cka_bytes(E, d)` = 4·(E(E+1)/2·d² + E·d)
             bytes per layer (fp32); an update also holds two [E(E+1)/2, T, d] gathers, i.e. 2T/d times
             the accumulator. For small E·d (tests, demo models) and as the reference. Centring raw
             fp32 moments loses precision as (mean/std)² grows (measured: CKA error 1e-8 at mean 0,
             5e-7 at mean 3·std, 6e-6 at 10·std over 64 tokens); minibatch mode has no such loss.
  minibatch  unbiased HSIC_1 (Song et al., 2012) per minibatch of `chunk` tokens (0: each update is one
             minibatch) on the Gram matrices K_i = Y_i Y_iᵀ, summed over minibatches;
             CKA = ΣHSIC_ij / sqrt(ΣHSIC_ii ΣHSIC_jj) (Nguyen et al., 2021). Memory E² floats (+ an
             E·T·chunk transient Gram). HSIC_1 is computed as the U-centred inner product
             (Ũ_i · Ũ_j) / (n(n-3)) (Székely & Rizzo, 2014: the same number as Song's formula), after
             subtracting each minibatch's mean output, which leaves HSIC_1 unchanged but avoids fp32
             cancellation. Padding is handled with a static shape: padded rows/columns of Ũ are zero and
             n is the minibatch's count of valid tokens; a minibatch with n < 4 adds nothing.
             Scales to real models (d in the thousands).
Gradient sensitivities (when the driver also passes `out_grad`, ∂L/∂(block output) per token, L the summed
next-token NLL of the batch): u_j(t) = ∂L/∂out(t) · y_j(t) is the first-order loss change per unit of
expert j's output on token t, so serving i's routed tokens with j instead changes the loss by about
g_i(u_j - u_i). Sums kept: sens_m[i, j] = Σ g_i² u_i u_j, sens_n[i, j] = Σ g_i² u_j², sens_g[i, j] = Σ g_i u_j,
from which Σ_t g_i² (u_i - u_j)² = sens_n[i, i] + sens_n[i, j] - 2 sens_m[i, j] (a second-order,
Fisher-style loss cost in nats², used by the `grape-l` planner) and the first-order sum follow.
Conventions in `finalize`: every [E, E] similarity has diagonal 1; an expert with zero variance (or zero
mean output for `cos_mean`) has similarity 0 to the others. Counts are int32 (exact past 2^24 tokens).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

HIGHEST = jax.lax.Precision.HIGHEST
CKA_MODES = ("exact", "minibatch")


def num_pairs(num_experts: int) -> int:
    """Number of expert pairs i <= j that exact CKA stores."""
    return num_experts * (num_experts + 1) // 2


def exact_cka_bytes(num_experts: int, embed: int) -> int:
    """Bytes of the fp32 accumulators that exact CKA needs for one layer (pair moments + sums)."""
    return 4 * (num_pairs(num_experts) * embed * embed + num_experts * embed)


def _pair_index(num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """Static (i, j) of the stored pairs, i <= j, row-major (numpy.triu_indices order)."""
    return np.triu_indices(num_experts)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Accumulators:
    """Running sums of one MoE layer (see the module docstring); `cka` and `chunk` are static."""

    num_tokens: Int[Array, ""]
    count: Int[Array, " experts"]  # Σ selected
    gate_sum: Float[Array, " experts"]  # Σ g_i
    reap_sum: Float[Array, " experts"]  # Σ g_i ||y_i||
    y_sum: Float[Array, "experts embed"]  # Σ y_i
    logit_sum: Float[Array, " experts"]
    logit_outer: Float[Array, "experts experts"]  # Σ l_i l_j
    routed_m: Float[Array, "experts experts"]  # Σ g_i <y_i, y_j>
    routed_n: Float[Array, "experts experts"]  # Σ g_i ||y_j||²
    cka_sum: Array  # exact: [pairs, embed, embed] Σ y_i y_jᵀ (i <= j); minibatch: [E, E] Σ HSIC_1
    # gradient sensitivities (zeros unless the driver passes output gradients; u_j = ∂L/∂out · y_j):
    sens_m: Float[Array, "experts experts"]  # Σ g_i² u_i u_j
    sens_n: Float[Array, "experts experts"]  # Σ g_i² u_j²
    sens_g: Float[Array, "experts experts"]  # Σ g_i u_j
    cka: str = dataclasses.field(default="exact", metadata=dict(static=True))
    chunk: int = dataclasses.field(default=0, metadata=dict(static=True))

    @property
    def num_experts(self) -> int:
        return int(self.y_sum.shape[0])

    @property
    def embed(self) -> int:
        return int(self.y_sum.shape[1])


def init_accumulators(num_experts: int, embed: int, *, cka: str = "exact", chunk: int = 0) -> Accumulators:
    """Zeroed accumulators; `chunk` is the HSIC minibatch size in tokens (minibatch mode; 0 = per update)."""
    if cka not in CKA_MODES:
        raise ValueError(f"similarity: cka mode {cka!r} unknown; expected one of {CKA_MODES}")
    if num_experts < 1 or embed < 1:
        raise ValueError(f"similarity: num_experts and embed must be >= 1, got {num_experts}, {embed}")
    if not isinstance(chunk, int) or chunk < 0:
        raise ValueError(f"similarity: chunk must be an int >= 0 (0 = one minibatch per update), got {chunk!r}")
    e, d = num_experts, embed
    f32 = lambda *s: jnp.zeros(s, jnp.float32)  # noqa: E731
    big = f32(num_pairs(e), d, d) if cka == "exact" else f32(e, e)
    return Accumulators(
        num_tokens=jnp.zeros((), jnp.int32),
        count=jnp.zeros((e,), jnp.int32),
        gate_sum=f32(e),
        reap_sum=f32(e),
        y_sum=f32(e, d),
        logit_sum=f32(e),
        logit_outer=f32(e, e),
        routed_m=f32(e, e),
        routed_n=f32(e, e),
        cka_sum=big,
        sens_m=f32(e, e),
        sens_n=f32(e, e),
        sens_g=f32(e, e),
        cka=cka,
        chunk=chunk,
    )


def accumulator_axes(cka: str) -> dict[str, tuple[str | None, ...]]:
    """Logical axes of each accumulator field (placement on a mesh follows the experts and the model
    width, like the parameters the statistics come from)."""
    experts = ("experts",)
    return {
        "num_tokens": (),
        "count": experts,
        "gate_sum": experts,
        "reap_sum": experts,
        "logit_sum": experts,
        "y_sum": ("experts", "embed"),
        "logit_outer": ("experts", None),
        "routed_m": ("experts", None),
        "routed_n": ("experts", None),
        "sens_m": ("experts", None),
        "sens_n": ("experts", None),
        "sens_g": ("experts", None),
        "cka_sum": (None, "embed", None) if cka == "exact" else ("experts", None),
    }


def _check_shapes(acc: Accumulators, y, gates, selected, router_logits, mask) -> None:
    if y.ndim != 3 or y.shape[0] != acc.num_experts or y.shape[2] != acc.embed:
        raise ValueError(
            f"similarity.update_accumulators: y must be [experts={acc.num_experts}, tokens, "
            f"embed={acc.embed}], got {tuple(y.shape)}"
        )
    e, t, _ = y.shape
    for name, a in (("gates", gates), ("selected", selected), ("router_logits", router_logits)):
        if tuple(a.shape) != (t, e):
            raise ValueError(
                f"similarity.update_accumulators: {name} must be [tokens, experts]={(t, e)}, got {tuple(a.shape)}"
            )
    if tuple(mask.shape) != (t,):
        raise ValueError(f"similarity.update_accumulators: mask must be [tokens]={(t,)}, got {tuple(mask.shape)}")


def _exact_moments(y: Float[Array, "e t d"]) -> Float[Array, "pairs d d"]:
    """Σ_t y_i(t) y_j(t)ᵀ for the stored pairs i <= j (one batched matmul over pairs), accumulated in fp32
    whatever y's dtype (a bf16 x bf16 product is exact in fp32)."""
    iu, ju = _pair_index(y.shape[0])
    return jnp.einsum("ptd,ptc->pdc", y[iu], y[ju], precision=HIGHEST, preferred_element_type=jnp.float32)


def _minibatch_hsic(y: Float[Array, "e t d"], valid: Bool[Array, " t"], chunk: int) -> Float[Array, "e e"]:
    """Σ over minibatches of the unbiased HSIC_1 of every expert pair's linear-kernel Grams. Means and
    centring in fp32; for bf16/fp16 y the Gram of the fp32 centred values is three matmuls in y's dtype
    (hi·hi + hi·lo + lo·hi of a two-part split, fp32 accumulation: ~2^-16 relative error) instead of one
    fp32 matmul, several times slower on accelerators."""
    gram_dtype = y.dtype
    y = y.astype(jnp.float32)
    e, t, d = y.shape
    c = min(chunk, t) if chunk else t
    pad = (-t) % c
    if pad:
        y = jnp.pad(y, ((0, 0), (0, pad), (0, 0)))
        valid = jnp.pad(valid, (0, pad))
    b = (t + pad) // c
    v = valid.reshape(b, c).astype(jnp.float32)  # [B, c]
    y = y.reshape(e, b, c, d)
    n = jnp.sum(v, axis=1)  # [B]
    mean = jnp.einsum("ebcd,bc->ebd", y, v, precision=HIGHEST) / jnp.maximum(n, 1.0)[None, :, None]
    yc = (y - mean[:, :, None, :]) * v[None, :, :, None]  # padded rows exactly 0
    if gram_dtype == jnp.float32:
        k = jnp.einsum("ebcd,ebsd->ebcs", yc, yc, precision=HIGHEST)
    else:
        hi = yc.astype(gram_dtype)
        lo = (yc - hi.astype(jnp.float32)).astype(gram_dtype)
        gram = lambda a, b: jnp.einsum("ebcd,ebsd->ebcs", a, b, preferred_element_type=jnp.float32)  # noqa: E731
        k = gram(hi, hi) + gram(hi, lo) + gram(lo, hi)
    off = v[:, :, None] * v[:, None, :] * (1.0 - jnp.eye(c, dtype=jnp.float32))  # valid a != b
    k = k * off[None]
    nn = jnp.maximum(n, 4.0)[None, :]  # [1, B]; minibatches with n < 4 are zeroed below
    rows = jnp.sum(k, axis=3) / (nn - 2.0)[..., None]  # [E, B, c]
    total = jnp.sum(k, axis=(2, 3)) / ((nn - 1.0) * (nn - 2.0))  # [E, B]
    u = (k - rows[..., :, None] - rows[..., None, :] + total[..., None, None]) * off[None]
    weight = jnp.where(n >= 4, 1.0 / (nn[0] * (nn[0] - 3.0)), 0.0)  # [B]
    return jnp.einsum("ebcs,fbcs->ef", u * weight[None, :, None, None], u, precision=HIGHEST)


def update_accumulators(
    acc: Accumulators,
    y: Float[Array, "experts tokens embed"],
    gates: Float[Array, "tokens experts"],
    selected: Bool[Array, "tokens experts"],
    router_logits: Float[Array, "tokens experts"],
    mask: Bool[Array, " tokens"],
    out_grad: Float[Array, "tokens embed"] | None = None,
) -> Accumulators:
    """Add one chunk of tokens; tokens with mask False contribute nothing (pure; jit and donate `acc`).

    `y` may be fp32 or the model's bf16/fp16: the big matmuls (CKA moments or Grams) then take it as it is
    with fp32 accumulation; every other statistic is computed from it in fp32. `out_grad` (optional):
    ∂L/∂(block output) per token, for the gradient sensitivities sens_* (left unchanged without it)."""
    _check_shapes(acc, y, gates, selected, router_logits, mask)
    if out_grad is not None and tuple(out_grad.shape) != (y.shape[1], acc.embed):
        raise ValueError(
            f"similarity.update_accumulators: out_grad must be [tokens, embed]={(y.shape[1], acc.embed)}, "
            f"got {tuple(out_grad.shape)}"
        )
    valid = jnp.asarray(mask).astype(bool)
    y_in = jnp.asarray(y)
    if not jnp.issubdtype(y_in.dtype, jnp.floating) or jnp.finfo(y_in.dtype).bits > 32:
        y_in = y_in.astype(jnp.float32)
    y_in = jnp.where(valid[None, :, None], y_in, jnp.zeros((), y_in.dtype))
    y = y_in.astype(jnp.float32)
    g = jnp.where(valid[:, None], jnp.asarray(gates, jnp.float32), 0.0)
    sel = (jnp.asarray(selected).astype(bool) & valid[:, None]).astype(jnp.int32)
    logits = jnp.where(valid[:, None], jnp.asarray(router_logits, jnp.float32), 0.0)
    sq = jnp.sum(y * y, axis=-1)  # [E, T]
    gt = g.T  # [E, T]
    if acc.cka == "exact":
        cka_sum = acc.cka_sum + _exact_moments(y_in)
    else:
        cka_sum = acc.cka_sum + _minibatch_hsic(y_in, valid, acc.chunk)
    sens = {}
    if out_grad is not None:
        grad = jnp.where(valid[:, None], jnp.asarray(out_grad, jnp.float32), 0.0)
        u = jnp.einsum("etd,td->et", y, grad, precision=HIGHEST)  # [E, T]: each output's first-order loss
        g2 = gt * gt
        sens = {
            "sens_m": acc.sens_m + jnp.einsum("it,jt->ij", g2 * u, u, precision=HIGHEST),
            "sens_n": acc.sens_n + jnp.einsum("it,jt->ij", g2, u * u, precision=HIGHEST),
            "sens_g": acc.sens_g + jnp.einsum("it,jt->ij", gt, u, precision=HIGHEST),
        }
    return dataclasses.replace(
        acc,
        **sens,
        num_tokens=acc.num_tokens + jnp.sum(valid.astype(jnp.int32)),
        count=acc.count + jnp.sum(sel, axis=0),
        gate_sum=acc.gate_sum + jnp.sum(gt, axis=1),
        reap_sum=acc.reap_sum + jnp.sum(gt * jnp.sqrt(sq), axis=1),
        y_sum=acc.y_sum + jnp.sum(y, axis=1),
        logit_sum=acc.logit_sum + jnp.sum(logits, axis=0),
        logit_outer=acc.logit_outer + jnp.einsum("ti,tj->ij", logits, logits, precision=HIGHEST),
        routed_m=acc.routed_m + jnp.einsum("itd,jtd->ij", gt[:, :, None] * y, y, precision=HIGHEST),
        routed_n=acc.routed_n + jnp.einsum("it,jt->ij", gt, sq, precision=HIGHEST),
        cka_sum=cka_sum,
    )


def combine(a: Accumulators, b: Accumulators) -> Accumulators:
    """Sum of two partial accumulators (chunks, devices or hosts); modes and shapes must agree."""
    if (a.cka, a.chunk) != (b.cka, b.chunk):
        raise ValueError(
            f"similarity.combine: modes differ: cka={a.cka!r}/chunk={a.chunk} vs cka={b.cka!r}/chunk={b.chunk}"
        )
    if a.cka_sum.shape != b.cka_sum.shape or a.y_sum.shape != b.y_sum.shape:
        raise ValueError(
            f"similarity.combine: shapes differ: y_sum {a.y_sum.shape} vs {b.y_sum.shape}, "
            f"cka_sum {a.cka_sum.shape} vs {b.cka_sum.shape}"
        )
    return jax.tree.map(jnp.add, a, b)


@jax.jit
def _device_summary(acc: Accumulators) -> dict[str, jax.Array]:
    """Everything `finalize` needs, reduced on device to O(E² + E·d) numbers."""
    out = {f.name: getattr(acc, f.name) for f in dataclasses.fields(acc) if f.name not in ("cka", "chunk", "cka_sum")}
    if acc.cka == "exact":
        iu, ju = _pair_index(acc.num_experts)
        n = jnp.maximum(acc.num_tokens, 1).astype(jnp.float32)
        centred = acc.cka_sum - jnp.einsum("pd,pc->pdc", acc.y_sum[iu], acc.y_sum[ju], precision=HIGHEST) / n
        frob = jnp.sum(jnp.square(centred), axis=(1, 2))  # ‖C_ij‖²_F for i <= j
        out["cka_num"] = jnp.zeros((acc.num_experts,) * 2, jnp.float32).at[iu, ju].set(frob).at[ju, iu].set(frob)
        out["cka_nan"] = jnp.any(~jnp.isfinite(acc.cka_sum))  # a NaN pair is not hidden by the reduction
    else:
        out["cka_num"] = acc.cka_sum
        out["cka_nan"] = jnp.any(~jnp.isfinite(acc.cka_sum))
    return out


def _normalise(num: np.ndarray, self_sim: np.ndarray) -> np.ndarray:
    """num_ij / sqrt(self_i self_j), 0 where an expert has no signal, diagonal 1."""
    scale = np.sqrt(np.clip(self_sim, 0.0, None))
    denom = np.outer(scale, scale)
    out = np.divide(num, denom, out=np.zeros_like(num), where=denom > 0)
    np.fill_diagonal(out, 1.0)
    return out


_SOURCES = {  # accumulator -> the statistics that read it, for error messages
    "count": "freq",
    "gate_sum": "gate_mass",
    "reap_sum": "reap",
    "y_sum": "cos_mean/cka",
    "logit_sum": "router",
    "logit_outer": "router",
    "routed_m": "routed_m",
    "routed_n": "routed_n",
    "cka_num": "cka",
    "sens_m": "sens_m",
    "sens_n": "sens_n",
    "sens_g": "sens_g",
}


def finalize(acc: Accumulators) -> dict[str, np.ndarray]:
    """Host float64 statistics: freq, gate_mass, reap [E]; cka, cos_mean, router, routed_m, routed_n, sens_m,
    sens_n, sens_g [E, E]; num_tokens []. Raises ValueError naming the statistic when any is NaN or infinite."""
    h = {k: np.asarray(v, np.float64) for k, v in _device_summary(acc).items()}
    if h.pop("cka_nan"):
        raise ValueError("similarity.finalize: statistic 'cka' is not finite (NaN or inf in the expert outputs?)")
    for name, stat in _SOURCES.items():
        if not np.all(np.isfinite(h[name])):
            raise ValueError(f"similarity.finalize: statistic {stat!r} is not finite (NaN or inf in the inputs?)")
    n = float(h["num_tokens"])
    if n <= 0:
        raise ValueError("similarity.finalize: no calibration tokens were accumulated (num_tokens = 0)")
    count = h["count"]
    mean = h["y_sum"] / n
    logit_cov = h["logit_outer"] / n - np.outer(h["logit_sum"], h["logit_sum"]) / n**2
    gram = mean @ mean.T
    out = {
        "num_tokens": np.asarray(n),
        "freq": count / n,
        "gate_mass": h["gate_sum"] / n,
        "reap": np.divide(h["reap_sum"], count, out=np.zeros_like(count), where=count > 0),
        "cka": _normalise(h["cka_num"], np.diag(h["cka_num"])),
        "cos_mean": _normalise(gram, np.diag(gram)),
        "router": _normalise(logit_cov, np.diag(logit_cov)),
        "routed_m": h["routed_m"],
        "routed_n": h["routed_n"],
        "sens_m": h["sens_m"],
        "sens_n": h["sens_n"],
        "sens_g": h["sens_g"],
    }
    for name, value in out.items():
        if not np.all(np.isfinite(value)):
            raise ValueError(f"similarity.finalize: statistic {name!r} is not finite")
    return out


def weight_cosine(
    w_gate: Float[Array, "experts embed mlp"],
    w_up: Float[Array, "experts embed mlp"],
    w_down: Float[Array, "experts mlp embed"],
) -> Float[Array, "experts experts"]:
    """Cosine similarity of the experts' flattened (gate, up, down) weights: a data-free baseline.

    Summed per-matrix Grams accumulated in fp32, so no concatenated or up-cast copy of the weights is made."""
    e, d, f = w_gate.shape if w_gate.ndim == 3 else (None, None, None)
    if e is None or w_up.shape != (e, d, f) or w_down.shape != (e, f, d):
        raise ValueError(
            "similarity.weight_cosine: expected w_gate, w_up [E, d, f] and w_down [E, f, d], got "
            f"{tuple(w_gate.shape)}, {tuple(w_up.shape)}, {tuple(w_down.shape)}"
        )
    gram = sum(  # flattened [E, d*f] Grams: one plain matmul each (~2x faster than the 3-d einsum on CPU)
        jnp.dot(w.reshape(e, -1), w.reshape(e, -1).T, precision=HIGHEST, preferred_element_type=jnp.float32)
        for w in (w_gate, w_up, w_down)
    )
    norms = jnp.sqrt(jnp.diag(gram))
    return gram / jnp.maximum(jnp.outer(norms, norms), jnp.finfo(jnp.float32).tiny)
