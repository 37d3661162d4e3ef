"""Pure merge: (flat parameters, plan) -> merged flat parameters with new per-layer expert counts.

A layer's plan becomes two matrices over experts, `mix [E_new, E_old]` for expert weights (α of each
group's members) and `route [E_new, E_old]` for the router columns/biases (one-hot on the dominant
member, or α for the 'mean' rule). Every parameter whose table entry has an `experts` axis follows
them (`role` picks which), so biases, DeepSeek's score bias and GPT-OSS's router bias need no special
code. Rows that are one-hot are gathered rather than multiplied, so pruning and budget 0 are exact
bit for bit; merged rows are summed in fp32 and cast back. Results keep the input's mesh and
partition specs (a dimension that no longer divides its mesh axis is replicated).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding

from grape_jax.config import MoEConfig
from grape_jax.params import layer_of, param_specs
from grape_jax.sharding import DEFAULT_RULES, ShardingRules, logical_to_pspec


class MergeError(ValueError):
    """A plan that does not fit the model it is applied to."""


@dataclasses.dataclass(frozen=True)
class LayerMix:
    """How one MoE layer's experts map to the merged layer's experts."""

    layer: int
    mix: np.ndarray  # [E_new, E_old], rows sum to 1
    route: np.ndarray  # [E_new, E_old], rows sum to 1
    align_to: tuple[int, ...] | None = None  # per new expert: the anchor members are aligned to

    @property
    def is_identity(self) -> bool:
        n, o = self.mix.shape
        eye = np.eye(o)
        return n == o and np.array_equal(self.mix, eye) and np.array_equal(self.route, eye)

    @property
    def aligns(self) -> bool:
        """Whether some merged expert averages several members (only those need alignment)."""
        return self.align_to is not None and bool(np.any(np.count_nonzero(self.mix, axis=1) > 1))


def layer_mix(
    *,
    layer: int,
    num_experts: int,
    groups: Sequence[Sequence[int]],
    weights: Sequence[Sequence[float]],
    dominant: Sequence[int],
    router_rule: str,
    align: bool = False,
) -> LayerMix:
    """Matrices of one layer from its groups (each group -> one new expert, in order); with `align`,
    members are neuron-aligned to the group's dominant member before averaging."""
    if router_rule not in ("dominant", "mean"):
        raise MergeError(f"router rule {router_rule!r} unknown; expected 'dominant' or 'mean'")
    mix = np.zeros((len(groups), num_experts))
    route = np.zeros_like(mix)
    for row, (members, alphas, dom) in enumerate(zip(groups, weights, dominant, strict=True)):
        for e, a in zip(members, alphas, strict=True):
            if not 0 <= e < num_experts:
                raise MergeError(f"layer {layer}: expert id {e} out of range [0, {num_experts})")
            mix[row, e] = a
        if router_rule == "dominant":
            route[row, dom] = 1.0
        else:
            route[row] = mix[row]
    return LayerMix(layer, mix, route, tuple(int(d) for d in dominant) if align else None)


@jax.jit
def _gather_rows(v: jax.Array, idx: jax.Array) -> jax.Array:
    return jnp.take(v, idx, axis=0)


@jax.jit
def _mix_rows(v: jax.Array, m: jax.Array) -> jax.Array:
    out = jnp.tensordot(m, v.astype(jnp.float32), axes=1, precision=jax.lax.Precision.HIGHEST)
    return out.astype(v.dtype)


def _apply(x: jax.Array, matrix: np.ndarray, axis: int, sharding) -> jax.Array:
    """Mix `x` along `axis` with `matrix`: gathered where rows are one-hot, else fp32 weighted sums."""
    v = jnp.moveaxis(x, axis, 0) if axis else x
    if np.all(np.isin(matrix, (0.0, 1.0))) and np.all(matrix.sum(1) == 1.0):
        out = _gather_rows(v, jnp.asarray(np.argmax(matrix, axis=1), jnp.int32))
    else:
        out = _mix_rows(v, jnp.asarray(matrix, jnp.float32))
    out = jnp.moveaxis(out, 0, axis) if axis else out
    return out if sharding is None else jax.device_put(out, sharding)


def _target_sharding(x: jax.Array, shape, axes, rules: ShardingRules):
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, logical_to_pspec(shape, axes, sharding.mesh, rules))
    return sharding


def merge_params(
    params: Mapping[str, jax.Array],
    cfg: MoEConfig,
    mixes: Sequence[LayerMix],
    *,
    rules: ShardingRules = DEFAULT_RULES,
) -> tuple[dict[str, jax.Array], MoEConfig]:
    """Apply per-layer mixes; layers without a mix (or with an identity mix) pass through untouched."""
    by_layer = {m.layer: m for m in mixes}
    counts = list(cfg.num_experts)
    for layer, m in by_layer.items():
        if not 0 <= layer < cfg.num_layers or cfg.num_experts[layer] == 0:
            raise MergeError(f"plan names layer {layer}, which is not an MoE layer of this model")
        if m.mix.shape[1] != cfg.num_experts[layer]:
            raise MergeError(
                f"layer {layer}: plan is for {m.mix.shape[1]} experts, model has "
                f"{cfg.num_experts[layer]}"
            )
        if m.mix.shape[0] < cfg.top_k:
            raise MergeError(
                f"layer {layer}: plan keeps {m.mix.shape[0]} experts, fewer than top_k={cfg.top_k}"
            )
        counts[layer] = m.mix.shape[0]
    new_cfg = cfg.with_num_experts(tuple(counts))
    new_specs = param_specs(new_cfg)
    out: dict[str, jax.Array] = {}
    for name, spec in param_specs(cfg).items():
        x = params[name]
        layer = layer_of(name)
        m = by_layer.get(layer) if layer is not None else None
        if spec.expert_axis is None or m is None or m.is_identity:
            out[name] = x
            continue
        new = new_specs[name]
        target = _target_sharding(x, new.shape, new.axes, rules)
        if spec.role == "expert" and m.aligns:
            if name.rsplit(".", 1)[1] == "w_gate":  # one alignment per layer serves all its expert leaves
                prefix = name.rsplit(".", 1)[0] + "."
                out.update(_aligned_layer(params, prefix, m, new_specs, rules))
            continue
        matrix = m.route if spec.role == "router" else m.mix
        out[name] = _apply(x, matrix, spec.expert_axis, target)
    return out, new_cfg


EXPERT_LEAVES = ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down")


NEURON_AXIS = {"w_gate": 2, "w_up": 2, "w_down": 1, "b_gate": 1, "b_up": 1}  # b_down has no neuron axis


@functools.partial(jax.jit, static_argnames="axis")
def _permute_neurons(x: jax.Array, perms: jax.Array, axis: int = 2) -> jax.Array:
    """Expert e's neurons reordered by perms[e] along `axis` (new neuron n = old neuron perms[e, n])."""
    shape = [1] * x.ndim
    shape[0], shape[axis] = perms.shape
    return jnp.take_along_axis(x, perms.reshape(shape), axis=axis)


def _alignment_permutations(params, prefix: str, m: LayerMix, keys: list[str]) -> np.ndarray:
    """perms [E, f]: each group member's neurons matched to its group's anchor (identity elsewhere).

    One group's member experts at a time are gathered to the writer process (as export gathers an HF
    tensor); the writer computes the permutations and they are broadcast, so no process ever holds more
    than one group of experts on the host."""
    from conversion.distributed import gather_slice, is_writer
    from grape_jax.alignment import neuron_permutation

    num_experts, f = params[prefix + "w_gate"].shape[0], params[prefix + "w_gate"].shape[2]
    perms = np.tile(np.arange(f, dtype=np.int32), (num_experts, 1))
    neuron_keys = [k for k in keys if k in NEURON_AXIS]
    for row, anchor in enumerate(m.align_to):
        members = [int(e) for e in np.flatnonzero(m.mix[row])]
        if len(members) < 2:
            continue
        group = {e: {k: gather_slice(params[prefix + k], (e,)) for k in neuron_keys} for e in members}
        if is_writer():
            for e in members:
                if e != anchor:
                    perms[e] = neuron_permutation(group[anchor], group[e])
        del group
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        perms = np.asarray(multihost_utils.broadcast_one_to_all(perms), np.int32)
    return perms


def _aligned_layer(params, prefix: str, m: LayerMix, new_specs, rules: ShardingRules) -> dict[str, jax.Array]:
    """Expert leaves of one layer merged with neuron alignment: permutations from the host (one group
    at a time, `_alignment_permutations`), then on the devices every member is permuted to its anchor
    and the layer is mixed like any other operator (fp32 weighted sums), shardings kept."""
    keys = [k for k in EXPERT_LEAVES if prefix + k in params]
    perms = jnp.asarray(_alignment_permutations(params, prefix, m, keys))
    out = {}
    for k in keys:
        x, new = params[prefix + k], new_specs[prefix + k]
        target = _target_sharding(x, new.shape, new.axes, rules)
        aligned = _permute_neurons(x, perms, NEURON_AXIS[k]) if k in NEURON_AXIS else x
        out[prefix + k] = _apply(aligned, m.mix, 0, target)
    return out


def mixes_from_plan(plan) -> list[LayerMix]:
    """One LayerMix per planned layer (identity layers included; merge_params passes them through)."""
    return [
        layer_mix(layer=lp.layer, num_experts=lp.num_experts_before, groups=lp.groups, weights=lp.weights,
                  dominant=lp.dominant, router_rule=plan.router_rule, align=plan.operator == "aligned")
        for lp in plan.layers
    ]
