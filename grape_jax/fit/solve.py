"""Host float64 ridge least squares from streamed sufficient statistics, with the ridge chosen by
cross-validation between folds of calibration blocks (used by the fit operator, `grape_jax.fit.operator`).

For one output (expert k): folds f hold G_f = Σ a aᵀ [n, n], C_f = Σ a bᵀ [n, m] and Σ ‖b‖² of features a and
targets b. W = (G + λI)⁻¹ (C + λ W0) with G, C summed over folds and λ = ρ·tr(G)/n (scale-free), so the ridge
pulls towards the starting weights W0 where data is scarce; ρ = inf keeps W0. With ridge 'cv', each ρ of
`RIDGE_GRID` is scored by the residual of every fold under the solution of the other folds (computable from
the statistics alone: Σ‖b - aᵀW‖² = Σ‖b‖² - 2 tr(WᵀC) + tr(WᵀGW)), and the best ρ is used on all folds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from jaxtyping import Float

RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, math.inf)


def _ridge_solve(gram: np.ndarray, cross: np.ndarray, w0: np.ndarray, rho: float) -> np.ndarray:
    """(G + λI)⁻¹ (C + λ W0) with λ = ρ·tr(G)/n > 0, float64; ρ = inf or an empty Gram gives W0."""
    n = gram.shape[0]
    scale = np.trace(gram) / n
    if not scale > 0 or math.isinf(rho):
        return w0.copy()
    lam = rho * scale
    return np.linalg.solve(gram + lam * np.eye(n), cross + lam * w0)


def _residual1(gram: np.ndarray, cross: np.ndarray, target_sq: float, w: np.ndarray) -> float:
    return float(target_sq - 2.0 * np.sum(w * cross) + np.sum(w * (gram @ w)))


def ridge_fit(
    gram: Float[np.ndarray, "folds n n"],
    cross: Float[np.ndarray, "folds n m"],
    target_sq: Float[np.ndarray, " folds"],
    w0: Float[np.ndarray, "n m"],
    ridge: float | str = "cv",
) -> tuple[Float[np.ndarray, "n m"], float]:
    """One output's ridge solution towards w0 and the ρ used (module docstring)."""
    folds = gram.shape[0]
    rho = ridge
    if ridge == "cv":
        scores = []
        for r in RIDGE_GRID:
            held_out = 0.0
            for f in range(folds):
                rest = [g for g in range(folds) if g != f]
                w = _ridge_solve(gram[rest].sum(0), cross[rest].sum(0), w0, r)
                held_out += _residual1(gram[f], cross[f], target_sq[f], w)
            scores.append(held_out)
        rho = RIDGE_GRID[int(np.argmin(scores))]  # ties -> the smaller ρ listed first
    return _ridge_solve(gram.sum(0), cross.sum(0), w0, float(rho)), float(rho)


def solve_down(
    gram: Float[np.ndarray, "folds experts feat feat"],
    cross: Float[np.ndarray, "folds experts feat embed"],
    target_sq: Float[np.ndarray, "folds experts"],
    w0: Float[np.ndarray, "experts feat embed"],
    *,
    ridge: float | str = "cv",
    fit_mask: Sequence[bool] | None = None,
) -> tuple[Float[np.ndarray, "experts feat embed"], list[float]]:
    """Host float64 ridge solve towards `w0` on the folds' summed statistics, with ρ fixed or chosen per
    expert by cross-validation between the folds (module docstring). Experts with fit_mask False keep w0.
    Returns the down projections and each expert's ρ."""
    gram, cross, target_sq, w0 = (np.asarray(a, np.float64) for a in (gram, cross, target_sq, w0))
    out, chosen = w0.copy(), []
    for k in range(gram.shape[1]):
        if fit_mask is not None and not fit_mask[k]:
            chosen.append(math.inf)
            continue
        out[k], rho = ridge_fit(gram[:, k], cross[:, k], target_sq[:, k], w0[k], ridge)
        chosen.append(rho)
    return out, chosen


def residual(gram, cross, target_sq, w) -> np.ndarray:
    """Σ_t ‖ĝ_k h̃ W_k - T_k‖² per output expert, from the (fold-summed) sufficient statistics (float64)."""
    gram, cross, w = (np.asarray(a, np.float64) for a in (gram, cross, w))
    quad = np.einsum("efd,efg,egd->e", w, gram, w)
    return np.asarray(target_sq, np.float64) - 2.0 * np.einsum("efd,efd->e", w, cross) + quad
