"""Merge: a model state and a Plan -> the merged state, as one pure function (`merge_state`).

A layer's plan becomes two matrices over experts, `mix [E_new, E_old]` for expert weights (α of each
group's members) and `route [E_new, E_old]` for the router columns/biases (one-hot on the dominant
member, or α for the 'mean' rule). Every parameter whose logical axes hold `experts` follows them (its
`merge_role` metadata picks which), so biases, DeepSeek's score bias and GPT-OSS's router bias need no
special code. Rows that are one-hot are gathered rather than multiplied, so pruning and budget 0 are
exact bit for bit; merged rows are summed in fp32 and cast back.

Work that needs data runs first on the host and yields plain arrays (`MergeInputs`): the neuron
permutations of the 'aligned' operator (`merge_inputs`, one group of experts gathered to the writer
process at a time) and whole replacement leaves (`overrides`: the 'fit' operator's down projections,
`grape_jax.fit.operator.fit_inputs`, which runs a streamed pass over calibration data). `merge_state` maps
(state, plan, inputs) to the new state with no other input: it runs under `jax.jit` and
`jax.eval_shape`. `merge_model` runs it as one jitted program whose output shardings come from the new
config's parameter table on the model's run context.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Int

from grape_jax.base.multihost import broadcast_array, gather_slice, is_writer
from grape_jax.core.config import ConfigError, MoEConfig
from grape_jax.core.model import MoEModel, abstract_model, param_view, state_shardings
from grape_jax.core.params import EXPERTS, layer_of
from grape_jax.merge.alignment import neuron_permutation
from grape_jax.planners.plan import LayerPlan, Plan, PlanError

# Expert leaves with an intermediate-neuron axis, and where it is (b_down has none).
NEURON_AXIS = {"w_gate": 2, "w_up": 2, "w_down": 1, "b_gate": 1, "b_up": 1}


class MergeError(ValueError):
    """A plan that does not fit the model it is applied to."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MergeInputs:
    """Host-computed arrays a merge may need besides the state.

    permutations  MoE-block prefix (`layers.3.mlp.`) -> [E_old, f] int32: expert e's neuron n of the
                  aligned expert is its neuron `perm[e, n]` (identity rows where nothing is averaged)
    overrides     parameter name -> the whole merged leaf (new shape), used instead of mixing
    made_by       JSON of how the arrays were computed (e.g. the fit's options, data and per-layer choices;
                  static, not traced): `merge_model` keeps it in the merged model's provenance
    """

    permutations: Mapping[str, Int[Array, "experts mlp"]] = dataclasses.field(default_factory=dict)
    overrides: Mapping[str, Array] = dataclasses.field(default_factory=dict)
    made_by: str = dataclasses.field(default="", metadata={"static": True})


@dataclasses.dataclass(frozen=True)
class LayerMix:
    """How one MoE layer's experts map to the merged layer's experts."""

    layer: int
    mix: np.ndarray  # [E_new, E_old], rows sum to 1
    route: np.ndarray  # [E_new, E_old], rows sum to 1
    aligned: bool = False

    @property
    def is_identity(self) -> bool:
        n, o = self.mix.shape
        eye = np.eye(o)
        return n == o and np.array_equal(self.mix, eye) and np.array_equal(self.route, eye)

    @property
    def averages(self) -> bool:
        """Whether some merged expert averages several members (only those need alignment)."""
        return bool(np.any(np.count_nonzero(self.mix, axis=1) > 1))


def layer_mixes(plan: Plan) -> dict[int, LayerMix]:
    """The mix/route matrices of every planned layer (identity layers included)."""
    out = {}
    for lp in plan.layers:
        mix = np.zeros((lp.num_kept, lp.num_experts_before))
        route = np.zeros_like(mix)
        for row, (members, alphas, dom) in enumerate(zip(lp.groups, lp.weights, lp.dominant, strict=True)):
            mix[row, list(members)] = alphas
            if plan.router_rule == "dominant":
                route[row, dom] = 1.0
            else:
                route[row] = mix[row]
        out[lp.layer] = LayerMix(lp.layer, mix, route, aligned=plan.operator == "aligned")
    return out


def merged_config(cfg: MoEConfig, plan: Plan) -> MoEConfig:
    """The config after `plan`; refuses a plan made for another architecture or one that breaks the
    router's expert-count rule."""
    moe = list(cfg.moe_layers)
    planned = [lp.layer for lp in plan.layers]
    if planned != moe:
        raise MergeError(f"plan covers MoE layers {planned}, the model's MoE layers are {moe}")
    counts = list(cfg.num_experts)
    for lp in plan.layers:
        if lp.num_experts_before != cfg.num_experts[lp.layer]:
            raise MergeError(
                f"layer {lp.layer}: plan is for {lp.num_experts_before} experts, the model has "
                f"{cfg.num_experts[lp.layer]}"
            )
        counts[lp.layer] = lp.num_kept
    try:
        return cfg.with_num_experts(tuple(counts))
    except ConfigError as e:
        raise MergeError(f"plan {plan.method!r}: {e}") from None


def _mix(x: jax.Array, matrix: np.ndarray, axis: int) -> jax.Array:
    """`x` mixed along `axis` by `matrix`: gathered where every row is one-hot (exact), else fp32 sums."""
    v = jnp.moveaxis(x, axis, 0)
    if np.all(np.isin(matrix, (0.0, 1.0))) and np.all(matrix.sum(1) == 1.0):
        out = jnp.take(v, jnp.asarray(np.argmax(matrix, axis=1), jnp.int32), axis=0)
    else:
        out = jnp.tensordot(
            jnp.asarray(matrix, jnp.float32), v.astype(jnp.float32), axes=1, precision=jax.lax.Precision.HIGHEST
        ).astype(x.dtype)
    return jnp.moveaxis(out, 0, axis)


def _permute_neurons(x: jax.Array, perms: jax.Array, axis: int) -> jax.Array:
    """Expert e's neurons reordered by perms[e] along `axis` (new neuron n = old neuron perms[e, n])."""
    shape = [1] * x.ndim
    shape[0], shape[axis] = perms.shape
    return jnp.take_along_axis(x, perms.reshape(shape), axis=axis)


def merge_state(state: nnx.State, plan: Plan, inputs: MergeInputs | None = None) -> nnx.State:
    """The merged state (pure; `plan` is static Python data, so jit/eval_shape it over `state`).

    Leaves of planned layers with an `experts` axis are mixed (or replaced by `inputs.overrides`);
    every other leaf passes through untouched. A plan with operator 'fit' needs the fit's inputs
    (`fit_inputs`): without them it is refused, never merged as another operator. The module of the
    result: `nnx.merge(merged_graphdef(model, plan, inputs), new_state)`."""
    check_inputs(plan, inputs)
    inputs = MergeInputs() if inputs is None else inputs
    mixes = layer_mixes(plan)
    out, seen = [], set()
    for path, var in nnx.to_flat_state(state):
        name = ".".join(str(k) for k in path)
        axes = var.get_metadata().get("out_sharding", ())
        layer = layer_of(name)
        m = mixes.get(layer) if layer is not None else None
        if EXPERTS not in axes or m is None:
            out.append((path, var))
            continue
        seen.add(layer)
        axis = axes.index(EXPERTS)
        x = var.get_value()
        if x.shape[axis] != m.mix.shape[1]:
            raise MergeError(f"{name}: {x.shape[axis]} experts, the plan is for {m.mix.shape[1]}")
        if name in inputs.overrides:
            new = inputs.overrides[name]
            want = (*x.shape[:axis], m.mix.shape[0], *x.shape[axis + 1 :])
            if tuple(new.shape) != want:
                raise MergeError(f"override for {name}: shape {tuple(new.shape)}, expected {want}")
            out.append((path, var.replace(jnp.asarray(new, x.dtype))))
            continue
        if m.is_identity:
            out.append((path, var))
            continue
        role = var.get_metadata().get("merge_role")
        leaf = name.rsplit(".", 1)[1]
        if role == "expert" and m.aligned and m.averages and leaf in NEURON_AXIS:
            prefix = name.rsplit(".", 1)[0] + "."
            if prefix not in inputs.permutations:
                raise MergeError(f"operator 'aligned' needs neuron permutations for {prefix} (merge_inputs)")
            x = _permute_neurons(x, jnp.asarray(inputs.permutations[prefix]), NEURON_AXIS[leaf])
        out.append((path, var.replace(_mix(x, m.route if role == "router" else m.mix, axis))))
    missing = sorted(set(mixes) - seen)
    if missing:
        raise MergeError(f"plan names layers {missing}, which hold no experts in this state")
    return nnx.from_flat_state(out)


def check_inputs(plan: Plan, inputs: MergeInputs | None) -> None:
    """Refuse a 'fit' plan without the fit's inputs: none, or inputs with no replacement leaf that do not
    say they were made by the fit (`made_by`; a fit may keep every layer's base merge)."""
    if plan.operator != "fit":
        return
    made_by = json.loads(inputs.made_by) if inputs is not None and inputs.made_by else {}
    if made_by.get("operator") != "fit" and not (inputs is not None and inputs.overrides):
        raise MergeError(
            "plan has operator 'fit': its merged down projections are fitted on the calibration blocks; pass "
            "inputs=gj.fit_inputs(model, plan, blocks) (or apply_plan(model, plan, blocks=blocks)), or plan "
            "with operator='dominant' for the merge without a fit"
        )


def merge_inputs(model: MoEModel, plan: Plan) -> MergeInputs:
    """The host-computed arrays `plan` needs: neuron permutations for operator 'aligned' (else none).
    Operator 'fit' needs calibration data, which this function does not have: `grape_jax.fit.operator.fit_inputs`."""
    if plan.operator == "fit":
        raise MergeError(
            "operator 'fit' needs the calibration blocks at merge time: pass "
            "inputs=grape_jax.fit.operator.fit_inputs(model, plan, blocks) (gj.fit_inputs)"
        )
    if plan.operator != "aligned":
        return MergeInputs()
    return alignment_inputs(param_view(model), plan)


def alignment_inputs(params: Mapping[str, jax.Array], plan: Plan) -> MergeInputs:
    """The neuron permutations of operator 'aligned' for the planned layers whose experts `params` holds
    (the whole model, or one layer of it when the merge streams layer by layer)."""
    mixes = layer_mixes(plan)
    return MergeInputs(
        permutations={
            f"layers.{lp.layer}.mlp.": _alignment_permutations(params, f"layers.{lp.layer}.mlp.", lp)
            for lp in plan.layers
            if mixes[lp.layer].averages and f"layers.{lp.layer}.mlp.w_gate" in params
        }
    )


def _alignment_permutations(params: Mapping[str, jax.Array], prefix: str, lp: LayerPlan) -> np.ndarray:
    """perms [E, f]: each group member's neurons matched to its group's dominant member (identity
    elsewhere). One group's member experts at a time are gathered to the writer process, which computes
    the permutations; they are then broadcast, so no process holds more than one group on the host."""
    num_experts, f = params[prefix + "w_gate"].shape[0], params[prefix + "w_gate"].shape[2]
    perms = np.tile(np.arange(f, dtype=np.int32), (num_experts, 1))
    keys = [k for k in NEURON_AXIS if prefix + k in params]
    for members, anchor in zip(lp.groups, lp.dominant, strict=True):
        if len(members) < 2:
            continue
        group = {e: {k: gather_slice(params[prefix + k], (e,)) for k in keys} for e in members}
        if is_writer():
            for e in members:
                if e != anchor:
                    perms[e] = neuron_permutation(group[anchor], group[e])
        del group
    return broadcast_array(perms).astype(np.int32)


def merge_model(model: MoEModel, plan: Plan, *, inputs: MergeInputs | None = None) -> MoEModel:
    """A new model with the plan's experts (one jitted merge; shardings from the new config on the
    model's run context). `inputs` defaults to `merge_inputs(model, plan)`."""
    try:
        plan.validate()
    except PlanError as e:
        raise MergeError(str(e)) from None
    check_made_for(model, plan)
    inputs = merge_inputs(model, plan) if inputs is None else inputs
    graphdef = merged_graphdef(model, plan, inputs)
    state = nnx.state(model, nnx.Param)

    def merge(state: nnx.State, inputs: MergeInputs) -> nnx.State:
        return merge_state(state, plan, inputs)

    shapes = jax.eval_shape(merge, state, inputs)
    merged = jax.jit(merge, out_shardings=state_shardings(shapes, model.ctx))(state, inputs)
    return nnx.merge(graphdef, merged)


def merged_graphdef(model: MoEModel, plan: Plan, inputs: MergeInputs | None = None) -> nnx.GraphDef:
    """The graph definition of `model` merged by `plan` (its config with the new expert counts, its run
    context, its provenance with the plan and `inputs` recorded): `nnx.merge(merged_graphdef(model, plan,
    inputs), merge_state(state, plan, inputs))` is the module `merge_model` returns. The original graph
    definition does not fit a merged state (its config keeps the old expert counts)."""
    new_cfg = merged_config(model.cfg, plan)
    info = model.info.with_record(plan_record(plan, inputs))
    graphdef, _ = nnx.split(abstract_model(new_cfg, ctx=model.ctx, info=info))
    return graphdef


def check_made_for(model: MoEModel, plan: Plan) -> None:
    """Refuse a plan whose statistics were computed on another model (when both identities are known)."""
    made_for = str(plan.made_from.get("model_fingerprint") or "")
    have = model.info.fingerprint
    if made_for and have and made_for != have:
        raise MergeError(
            f"plan was made from statistics of model {made_for[:16]} ({plan.made_from.get('model_source')}), "
            f"but this model is {have[:16]} ({model.info.source}); calibrate this model and plan again"
        )


def plan_record(plan: Plan, inputs: MergeInputs | None = None) -> dict:
    """What a model's provenance keeps of a plan applied to it: the whole plan (recipes are built from it)
    and, when the merge inputs say how they were made (the fit), that too."""
    record = {"stage": "merge", "fingerprint": plan.fingerprint, "plan": plan.to_dict()}
    if inputs is not None and inputs.made_by:
        record["inputs"] = json.loads(inputs.made_by)
    return record
