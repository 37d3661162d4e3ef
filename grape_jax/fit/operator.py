"""The 'fit' merge operator: every output expert's down projection solved by ridge least squares so that
the merged layer reproduces the original layer's routed output on calibration tokens.

One MoE layer; original experts i with outputs y_i(t), routing S(t) and gates g_i(t); the merged layer's
output experts k with hidden features h_k(t) = act(x W_gate_k) * (x W_up_k) taken from the base merge
(each group's dominant member, `dominant` operator), and routing S'(t), ĝ_k(t) from the merged router on
the same layer input x(t) (the original model's activations):

    original routed output  y(t) = Σ_{i∈S(t)} g_i(t) y_i(t)
    merged routed output    ŷ(t) = Σ_{k∈S'(t)} ĝ_k(t) h_k(t) W_k

Slot targets (`slot_targets`). Each original contribution g_i y_i (i ∈ S(t)) goes to one selected output:
to i's own group π(i) when the merged router selected it; otherwise (group not selected, or i dropped)
it is an orphan, and the orphans, in order of decreasing gate, go to the selected outputs that received
nothing, in order of decreasing ĝ. |S| = |S'| = top_k, so every orphan finds a free slot and the targets
T_k(t) add up to y(t): the merged layer reproduces the original one exactly when each output expert
reproduces its own targets. Each output expert is then fitted on its own:

    W_k = argmin_W Σ_t ‖ĝ_k h_k W - T_k‖² + λ_k ‖W - W0_k‖²  =  (G_k + λ_k I)⁻¹ (C_k + λ_k W0_k)
    G_k = Σ_t ĝ_k² h_k h_kᵀ  [f, f],   C_k = Σ_t ĝ_k h_k T_kᵀ  [f, d]

(tokens where k is not selected have ĝ_k = 0 and add nothing). W0_k is the base merge's down projection,
so the ridge pulls towards it where data is scarce and an expert that is never selected keeps it.
λ_k = ρ · trace(G_k) / f (scale-free). ρ is chosen per output expert by 2-fold cross-validation over
calibration blocks (even / odd blocks; `fit_solve.RIDGE_GRID`, ρ = inf keeps W0_k): the statistics are kept per
fold, each fold's solution is scored on the other fold's residual (computable from its sufficient
statistics), and the ρ with the smallest summed held-out residual is used on both folds together. A
least-squares fit of f·d numbers per expert overfits a few thousand routed tokens (measured on
gcide-moe-22m: ρ = 1e-4 gave a worse model than no fit at all), so ρ is chosen from the data rather than
fixed; `FitOptions(ridge=ρ)` fixes it instead. With expert biases (GPT-OSS) h is
extended by a constant 1, so b_down is fitted with W_down. Pruned singletons are fitted too (they take
over the tokens of the experts the router no longer has); `FitOptions.outputs='merged'` fits only
outputs with several members.

Router: the base merge's router column (the dominant member's) is kept. Fitting each merged group's
column to the log-sum-exp of its members' logits (so that a softmax router gives the merged expert its
members' summed probability) was measured and made models much worse (gcide-moe-22m, grape-l: 10.90 ->
14.56 at 2 removed per layer, 12.58 -> 17.41 at 4; BENCHMARKS.md), so it is not offered.

Loss check (`grape_jax.fit.check`, `FitOptions.steps`): a smaller output error is not always a smaller
loss (regressed experts drift towards averages of their members), so each fitted layer moves from the base
merge by the step α ∈ {0, 0.25, 0.5, 1} that gives the lowest next-token loss on the calibration blocks,
layer by layer; α = 0 keeps the base merge.

Passes (`grape_jax.fit.stream`): one jitted, streamed pass over the calibration blocks accumulates G, C
(fp32, per fold) for a set of MoE layers whose accumulators fit `FitOptions.max_bytes`; memory depends on
2·E'·f·(f + d) per layer, never on the number of tokens (the dense all-experts forward computes h for every
output expert on every token, as calibration does; experts in the calibration's compute dtype). The solves
run on the host in float64 (`grape_jax.fit.solve`). `fit_overrides` returns full replacement arrays of the
merged layers' leaves (`w_down`, `b_down`); `fit_inputs` wraps them as `MergeInputs.overrides`, which the
one pure merge (`merge.merge_state`, run by `merge.merge_model`) installs instead of the base merge's leaves.
Routers that scale the experts' input by the gate (Llama-4) make h depend on the gate; the fit refuses them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Int

from grape_jax.base import jsonio
from grape_jax.calibration.calibrate import check_blocks
from grape_jax.calibration.options import COMPUTE_DTYPES, CalibrationOptions, blocks_sha256, resolve_compute_dtype
from grape_jax.core.config import MoEConfig
from grape_jax.core.model import MoEModel, param_view
from grape_jax.core.sharding import host
from grape_jax.fit.accumulate import (
    ACCUMULATOR_AXES,
    FitAccumulators,
    accumulate_down,
    accumulator_bytes,
    init_fit_accumulators,
)
from grape_jax.fit.check import checked_steps
from grape_jax.fit.solve import residual, solve_down
from grape_jax.fit.stream import run_pass
from grape_jax.merge.state import MergeInputs, merge_inputs, merge_model
from grape_jax.planners.plan import LayerPlan, Plan

FIT_OUTPUTS = ("all", "merged")
MERGED_KEYS = ("router", "router_bias", "w_gate", "w_up", "b_gate", "b_up", "b_down")


class FitError(ValueError):
    """A fit that cannot run (no calibration data, bad options, an unsupported router)."""


@dataclasses.dataclass(frozen=True)
class FitOptions:
    """How the fit operator runs (module docstring).

    ridge          'cv' (ρ cross-validated per output expert over `fit_solve.RIDGE_GRID`) or a fixed ρ > 0
    outputs        'all' | 'merged': which output experts get a fitted down projection
    batch_size     blocks per jitted step (rounded up to the data-parallel size); token_chunk: tokens per scan
    max_bytes      accumulators held at once; more layers than fit -> several passes
    steps          α tried per layer by calibration loss (`grape_jax.fit.check`); () = α 1 without a check
    compute_dtype  the experts' dtype in the pass (None: as calibration, the checkpoint's on accelerators,
                   float32 on CPU)
    """

    ridge: float | str = "cv"
    outputs: str = "all"
    batch_size: int = 4
    token_chunk: int = 512
    max_bytes: int = 2 << 30
    steps: tuple[float, ...] = (0.25, 0.5, 1.0)
    compute_dtype: str | None = None

    @classmethod
    def like(cls, calibration: CalibrationOptions, **changes) -> FitOptions:
        """Options whose pass batches, chunks and computes as `calibration` does."""
        return cls(
            batch_size=calibration.batch_size,
            token_chunk=calibration.token_chunk,
            compute_dtype=calibration.compute_dtype,
            **changes,
        )

    def __post_init__(self) -> None:
        if self.ridge != "cv" and (isinstance(self.ridge, (bool, str)) or not self.ridge > 0):
            raise FitError(
                f"fit option ridge: expected 'cv' or a number > 0 (the Grams are fp32 sums: an unregularised "
                f"solve amplifies their round-off), got {self.ridge!r}"
            )
        if self.outputs not in FIT_OUTPUTS:
            raise FitError(f"fit option outputs: {self.outputs!r} unknown; expected one of {FIT_OUTPUTS}")
        for name in ("batch_size", "token_chunk", "max_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FitError(f"fit option {name}: expected an integer >= 1, got {value!r}")
        if not isinstance(self.steps, tuple) or any(
            isinstance(a, bool) or not isinstance(a, (int, float)) or not 0 < a <= 1 for a in self.steps
        ):
            raise FitError(f"fit option steps: expected a tuple of numbers in (0, 1], got {self.steps!r}")
        if self.compute_dtype is not None and self.compute_dtype not in COMPUTE_DTYPES:
            raise FitError(
                f"fit option compute_dtype: {self.compute_dtype!r} unknown; expected one of {COMPUTE_DTYPES}"
            )


def assignment(plan: Plan) -> dict[int, np.ndarray]:
    """Per planned layer: original expert -> output expert (-1 for dropped), from the plan's groups."""
    out = {}
    for lp in plan.layers:
        a = np.full(lp.num_experts_before, -1, np.int32)
        for k, g in enumerate(lp.groups):
            a[list(g)] = k
        out[lp.layer] = a
    return out


def layer_passes(layer_ids: Sequence[int], sizes: Mapping[int, int], max_bytes: int) -> list[list[int]]:
    """Consecutive MoE layers grouped so each pass's accumulators (`sizes`, bytes) fit `max_bytes`
    (at least one layer per pass)."""
    passes: list[list[int]] = []
    used = 0
    for layer in layer_ids:
        b = sizes[layer]
        if passes and used + b <= max_bytes:
            passes[-1].append(layer)
            used += b
        else:
            passes.append([layer])
            used = b
    return passes


def fit_overrides(
    model: MoEModel,
    plan: Plan,
    blocks: Int[np.ndarray, "n seq"],
    *,
    options: FitOptions = FitOptions(),
    progress: bool = False,
) -> tuple[dict[str, np.ndarray], dict[int, dict]]:
    """Replacement arrays for the merged model's `w_down` (and `b_down`) leaves, of the merged shapes (each
    layer's step towards its fit chosen by calibration loss, `grape_jax.fit.check`; a layer whose best step
    is 0 keeps the base merge and has no override), and per-layer diagnostics (ridge chosen, relative
    residual of the targets before and after the fit, step and calibration loss)."""
    if plan.operator != "fit":
        raise FitError(f"plan {plan.method!r} has operator {plan.operator!r}; the fit runs for operator 'fit'")
    cfg, ctx = model.cfg, model.ctx
    check_supported(cfg)
    try:
        blocks = check_blocks(blocks, cfg)
    except ValueError as e:
        raise FitError(f"operator 'fit': {e}") from None
    # the dominant members' gate/up, router and W0 (the fit's weights are the dominant operator's)
    base = merge_model(model, dataclasses.replace(plan, operator="dominant"), inputs=MergeInputs())
    params, merged, new_cfg = param_view(model), param_view(base), base.cfg
    compute_dtype = resolve_compute_dtype(params, CalibrationOptions(compute_dtype=options.compute_dtype))
    assign = assignment(plan)
    layer_ids = [lp.layer for lp in plan.layers if not _identity(lp)]
    overrides: dict[str, np.ndarray] = {}
    diagnostics: dict[int, dict] = {layer: {} for layer in layer_ids}
    accumulate = _down_accumulator(cfg, new_cfg)
    sizes = {layer: accumulator_bytes(new_cfg, layer) for layer in layer_ids}
    for layer_set in layer_passes(layer_ids, sizes, options.max_bytes):
        acc = {
            str(layer): init_fit_accumulators(new_cfg, layer, with_bias=f"layers.{layer}.mlp.b_down" in merged)
            for layer in layer_set
        }
        placement = {
            k: dataclasses.replace(
                a, **{n: ctx.sharding(getattr(a, n).shape, axes) for n, axes in ACCUMULATOR_AXES.items()}
            )
            for k, a in acc.items()
        }
        aux = {
            str(layer): {"merged": _merged_leaves(merged, layer), "assign": jnp.asarray(assign[layer])}
            for layer in layer_set
        }
        acc = run_pass(
            params,
            cfg,
            ctx,
            blocks,
            acc,
            aux,
            accumulate=accumulate,
            batch_size=options.batch_size,
            token_chunk=options.token_chunk,
            compute_dtype=compute_dtype,
            acc_shardings=placement,
            progress=progress,
            desc=f"fit layers {layer_set}",
        )
        for layer in layer_set:
            lp = next(lp for lp in plan.layers if lp.layer == layer)
            overrides.update(solve_layer(acc[str(layer)], merged, lp, options, diagnostics[layer], ctx))
    if options.steps and overrides:
        overrides = checked_steps(merged, new_cfg, ctx, overrides, blocks, steps=options.steps, diagnostics=diagnostics)
    return overrides, diagnostics


def check_supported(cfg: MoEConfig) -> None:
    """Refuse architectures the fit cannot serve: routers that scale the experts' input by the gate
    (Llama-4) make the merged experts' features depend on the gate."""
    if cfg.router_scales_input:
        raise FitError(
            "operator 'fit' does not support routers that scale the experts' input (Llama-4): the merged "
            "experts' features depend on the gate; pass --option operator=dominant (operator='dominant')"
        )


def fit_inputs(
    model: MoEModel,
    plan: Plan,
    blocks: Int[np.ndarray, "n seq"],
    *,
    options: FitOptions = FitOptions(),
    progress: bool = False,
) -> MergeInputs:
    """The merge inputs of a plan with operator 'fit': the fitted leaves as `MergeInputs.overrides`, and
    how they were made (`fit_record`) for the merged model's provenance."""
    check_fit_blocks(plan, blocks)
    overrides, diagnostics = fit_overrides(model, plan, blocks, options=options, progress=progress)
    record = fit_record(blocks, options, diagnostics)
    return MergeInputs(overrides=overrides, made_by=jsonio.dumps(record, sort_keys=True))


def check_fit_blocks(plan: Plan, blocks: Int[np.ndarray, "n seq"]) -> None:
    """The fit runs on the blocks the plan's statistics were computed on (`made_from.calibration.
    blocks_sha256`, when recorded): other text would fit the merged experts to another distribution than
    the one the plan was chosen on."""
    want = str((plan.made_from.get("calibration") or {}).get("blocks_sha256") or "")
    have = blocks_sha256(blocks)
    if want and want != have:
        raise FitError(
            f"operator 'fit': these blocks (sha256 {have[:12]}) are not the calibration blocks the plan was made "
            f"from (sha256 {want[:12]}); fit on the same data (plan.made_from['data']: files, seq_len, "
            f"num_samples, seed)"
        )


def fit_record(blocks: Int[np.ndarray, "n seq"], options: FitOptions, diagnostics: Mapping[int, dict]) -> dict:
    """What recipes keep of a fit: its options, the calibration blocks it solved on (shape and sha256 of the
    int32 token ids) and each layer's choices (ridge per output expert, residuals, step, calibration NLL)."""
    return jsonio.native(
        {
            "operator": "fit",
            "options": dataclasses.asdict(options),
            "blocks": {"shape": list(np.shape(blocks)), "sha256": blocks_sha256(blocks)},
            "layers": {str(layer): d for layer, d in sorted(diagnostics.items())},
        }
    )


def plan_inputs(
    model: MoEModel,
    plan: Plan,
    *,
    blocks: Int[np.ndarray, "n seq"] | None = None,
    options: FitOptions = FitOptions(),
    progress: bool = False,
) -> MergeInputs:
    """Whatever host inputs `plan` needs for `merge.merge_model`: the fit's overrides (operator 'fit', from
    the calibration `blocks`), else `merge.merge_inputs` (alignment permutations or nothing)."""
    if plan.operator != "fit":
        return merge_inputs(model, plan)
    if blocks is None:
        raise FitError("operator 'fit' needs the calibration blocks at merge time (the same data as calibration)")
    return fit_inputs(model, plan, blocks, options=options, progress=progress)


@functools.lru_cache(maxsize=16)
def _down_accumulator(cfg: MoEConfig, new_cfg: MoEConfig):
    """One accumulate function per (cfg, new_cfg), so the jitted pass is compiled once per merged shape."""
    return functools.partial(accumulate_down, cfg=cfg, new_cfg=new_cfg)


def _identity(lp: LayerPlan) -> bool:
    return lp.num_kept == lp.num_experts_before and all(len(g) == 1 for g in lp.groups)


def _merged_leaves(merged: Mapping[str, jax.Array], layer: int) -> dict[str, jax.Array]:
    p = f"layers.{layer}.mlp."
    return {p + k: merged[p + k] for k in MERGED_KEYS if p + k in merged}


def solve_layer(acc: FitAccumulators, merged, lp: LayerPlan, options: FitOptions, diag: dict, ctx):
    """One layer's fitted `w_down` (and `b_down`) from its accumulators, `merged` holding the base merge's
    leaves of the layer; `diag` receives the ridge chosen and the residuals before and after."""
    p = f"layers.{lp.layer}.mlp."
    gram, cross, target_sq = (host(a, ctx).astype(np.float64) for a in (acc.gram, acc.cross, acc.target_sq))
    count = host(acc.count, ctx)
    w_down = host(merged[p + "w_down"], ctx)
    with_bias = p + "b_down" in merged
    w0 = w_down.astype(np.float64)
    if with_bias:
        w0 = np.concatenate([w0, host(merged[p + "b_down"], ctx).astype(np.float64)[:, None, :]], axis=1)
    fit_mask = [options.outputs == "all" or len(g) > 1 for g in lp.groups]
    w, rho = solve_down(gram, cross, target_sq, w0, ridge=options.ridge, fit_mask=fit_mask)
    gram, cross, target_sq = gram.sum(0), cross.sum(0), target_sq.sum(0)
    energy = float(np.sum(target_sq))
    before, after = residual(gram, cross, target_sq, w0), residual(gram, cross, target_sq, w)
    diag.update(
        {
            "tokens_per_expert": count.sum(0).tolist(),
            "ridge": rho,
            "relative_residual_before": float(np.sum(before) / energy) if energy > 0 else 0.0,
            "relative_residual_after": float(np.sum(after) / energy) if energy > 0 else 0.0,
        }
    )
    out = {p + "w_down": w[:, : w_down.shape[1]].astype(np.float32)}  # cast to the leaf's dtype on install
    if with_bias:
        out[p + "b_down"] = w[:, -1].astype(np.float32)
    return out
