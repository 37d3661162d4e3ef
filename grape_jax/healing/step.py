"""The jitted healing step on a model's NNX state: a student copy, its `nnx.Optimizer`, and the teacher.

The student is split three ways by the trained-parameter filter (`distill.trainable_masks`):
  carry   the trained parameters, copied to fp32, plus the optimizer state (moments, step count): the
          only thing a step changes, donated to it, saved for resuming;
  frozen  every other parameter: the student's own arrays, shared, never copied or donated;
  teacher its parameters (the live teacher forward runs inside the same step) or None with cached logits.
The carry keeps its placement from step to step (pinned to its logical axes), so one compiled program
serves the whole run. A step whose loss or masked gradient norm is not finite returns the carry
unchanged and says so (`ok`).

Everything static about a step (graph definitions, what trains, the options, the pure pieces) is one
hashable `StepSpec`, the static argument of two module-level jitted functions: a second run with the
same model, teacher, trained set and options reuses the compiled programs.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from grape_jax.core.model import MoEModel
from grape_jax.core.sharding import pin


def dotted(path: tuple) -> str:
    """'layers.3.mlp.router' from an NNX path or a JAX key path of a state."""
    return ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


@dataclasses.dataclass(frozen=True)
class Trained:
    """NNX filter: the parameters named in `names` (a value, so graph definitions holding it hash alike)."""

    names: frozenset[str]

    def __call__(self, path, value) -> bool:
        return isinstance(value, nnx.Param) and dotted(path) in self.names


@dataclasses.dataclass(frozen=True)
class InCarry:
    """NNX filter over (model, optimizer): the trained parameters of the model and the optimizer state."""

    trained: Trained

    def __call__(self, path, value) -> bool:
        return isinstance(value, nnx.OptState) or (path[0] == 0 and self.trained(path[1:], value))


@dataclasses.dataclass(frozen=True)
class Masks:
    """Which entries of each trained leaf may change: name -> None (all) or a boolean array that broadcasts
    against the leaf. Hashable by content."""

    rows: tuple[tuple[str, tuple[int, ...] | None, bytes | None], ...]

    @classmethod
    def of(cls, masks: Mapping[str, np.ndarray | None]) -> Masks:
        rows = [
            (n, None, None) if m is None else (n, tuple(np.shape(m)), np.asarray(m, bool).tobytes())
            for n, m in masks.items()
        ]
        return cls(tuple(sorted(rows)))

    def array(self, name: str) -> np.ndarray:
        _, shape, data = next(r for r in self.rows if r[0] == name)
        return np.ones((), bool) if shape is None else np.frombuffer(data, bool).reshape(shape)

    def tree(self, params: Any) -> Any:
        """The masks as a tree shaped like `params` (a pure state of the trained parameters)."""
        return jax.tree_util.tree_map_with_path(lambda p, _: self.array(dotted(p)), params)


@functools.lru_cache(maxsize=16)
def _optimizer(make: Callable, masks: Masks, treedef: Any, clip_norm: float, weight_decay: float):
    """One optax transformation per (masks, options): the optimizer is static in the graph definition, so
    equal requests must get the same object for compiled steps to be reused. `treedef`: the trained
    parameters' tree."""
    template = jax.tree.unflatten(treedef, [0] * treedef.num_leaves)
    return make(masks.tree(template), clip_norm=clip_norm, weight_decay=weight_decay)


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything static about a healing step (hashable: the static argument of the jitted functions)."""

    graphdef: Any
    teacher_graphdef: Any
    trained: Trained
    masks: Masks
    learning_rate: float
    warmup: int
    weights: tuple[tuple[str, float], ...]  # the loss's keyword weights (kl_weight, lm_weight, temperature)
    loss: Callable
    schedule: Callable
    forward: Callable
    shardings: tuple  # the carry's leaves' placements, in tree order
    mesh: Any

    def teacher_logits(self, teacher_state, tokens, mask, cached):
        if self.teacher_graphdef is None:
            return cached
        return self.forward(nnx.merge(self.teacher_graphdef, teacher_state), tokens, mask)


def _train_step(carry, frozen, teacher_state, tokens, mask, cached, horizon, *, spec: StepSpec):
    model, opt = nnx.merge(spec.graphdef, carry, frozen)
    target = spec.teacher_logits(teacher_state, tokens, mask, cached)

    def loss_fn(m):
        return spec.loss(spec.forward(m, tokens, mask), target, tokens, mask, **dict(spec.weights))

    (value, parts), grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, spec.trained), has_aux=True)(model)
    grads_pure = nnx.as_pure(grads)
    masks = spec.masks.tree(grads_pure)
    grad_norm = optax.global_norm(jax.tree.map(lambda g, m: jnp.where(m, g, jnp.zeros_like(g)), grads_pure, masks))
    ok = jnp.isfinite(value) & jnp.isfinite(grad_norm)
    lr = spec.schedule(opt.step[...], peak=spec.learning_rate, warmup=spec.warmup, horizon=horizon)
    opt.update(model, grads, learning_rate=lr)
    new = nnx.as_pure(nnx.state((model, opt), InCarry(spec.trained)))
    new = jax.tree.map(lambda n, c: jnp.where(ok, n, c), new, carry)
    if spec.mesh is not None:
        new = pin(new, spec.shardings)
    metrics = {
        "loss": value,
        "kl": parts["kl"],
        "nll": parts["nll"],
        "tokens": parts["tokens"],
        "ok": ok,
        "grad_norm": grad_norm,
        "learning_rate": lr,
    }
    return new, metrics


def _validation_loss(carry, frozen, teacher_state, tokens, mask, cached, *, spec: StepSpec):
    model, _ = nnx.merge(spec.graphdef, carry, frozen)
    target = spec.teacher_logits(teacher_state, tokens, mask, cached)
    value, parts = spec.loss(spec.forward(model, tokens, mask), target, tokens, mask, **dict(spec.weights))
    return value * parts["tokens"], parts["tokens"]


train_step_jit = jax.jit(_train_step, static_argnames=("spec",), donate_argnums=(0,))
validation_jit = jax.jit(_validation_loss, static_argnames=("spec",))


def _is_variable(x) -> bool:
    return isinstance(x, nnx.Variable)


class TrainStep:
    """A student prepared for training against a teacher: the split state and its step functions.

    `loss(student_logits, teacher_logits, tokens, mask, **weights) -> (loss, parts)`, `optimizer(masks,
    clip_norm=, weight_decay=)`, `schedule(count, peak=, warmup=, horizon=)` and `forward(model, tokens,
    mask) -> logits` are the pure pieces (`grape_jax.healing.distill`, `grape_jax.healing.heal.model_logits`):
    module-level functions, so that equal requests hash alike."""

    def __init__(
        self,
        student: MoEModel,
        teacher: MoEModel | None,
        masks: Mapping[str, np.ndarray | None],
        options,
        *,
        loss: Callable,
        optimizer: Callable,
        schedule: Callable,
        forward: Callable,
    ):
        self.ctx = student.ctx
        dp = student.ctx.data_parallel_size
        self.rows = -(-options.batch_size // dp) * dp
        trained = Trained(frozenset(masks))
        model_graphdef, params, frozen = nnx.split(student, trained, ...)
        params = nnx.as_pure(params)
        self.dtypes = {dotted(p): v.dtype for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
        params = jax.tree.map(lambda x: jnp.array(x, dtype=jnp.float32, copy=True), params)
        mask_spec = Masks.of(masks)
        model = nnx.merge(model_graphdef, params, frozen)
        tx = _optimizer(optimizer, mask_spec, jax.tree.structure(params), options.clip_norm, options.weight_decay)
        opt = nnx.Optimizer(model, tx, wrt=trained)
        self.model_graphdef, _, self.frozen_model = nnx.split(model, trained, ...)
        graphdef, carry, frozen_all = nnx.split((model, opt), InCarry(trained), ...)
        shardings = nnx.as_pure(jax.tree.map(self._placement, carry, is_leaf=_is_variable))
        self._carry = jax.device_put(nnx.as_pure(carry), shardings)
        self.frozen = nnx.as_pure(frozen_all)
        if teacher is None:
            teacher_graphdef, self.teacher_state = None, None
        else:
            teacher_graphdef, teacher_state = nnx.split(teacher)
            self.teacher_state = nnx.as_pure(teacher_state)
        weights = (
            ("kl_weight", options.kl_weight),
            ("lm_weight", options.lm_weight),
            ("temperature", options.temperature),
        )
        self.spec = StepSpec(
            graphdef,
            teacher_graphdef,
            trained,
            mask_spec,
            options.learning_rate,
            options.warmup,
            weights,
            loss,
            schedule,
            forward,
            tuple(jax.tree.leaves(shardings)),
            self.ctx.mesh,
        )

    def _placement(self, var: nnx.Variable) -> jax.sharding.Sharding:
        """Where a carry leaf lives: by its logical axes (moments inherit their parameter's), replicated
        on the mesh when it has none (step counters)."""
        value = var.get_value()
        axes = var.get_metadata().get("out_sharding") or (None,) * value.ndim
        return self.ctx.sharding(value.shape, axes)

    def init_carry(self) -> nnx.State:
        """The carry before the first step (fresh fp32 copies of the trained parameters, zero moments)."""
        return self._carry

    def compile(self, carry: nnx.State, batch: tuple, *, ahead: bool = False) -> Callable:
        """`step(carry, tokens, mask, cached_logits, horizon) -> (carry, metrics)` (carry donated). With
        `ahead`, compiled now (so that the first call's time is the step's alone); else on first use,
        through the jit cache that equal requests share."""
        if not ahead:
            return functools.partial(self._call, train_step_jit)
        compiled = train_step_jit.lower(
            carry, self.frozen, self.teacher_state, *batch, np.int32(1), spec=self.spec
        ).compile()
        return functools.partial(self._call, lambda *a, spec: compiled(*a))

    def _call(self, fn, carry, tokens, mask, cached, horizon):
        return fn(carry, self.frozen, self.teacher_state, tokens, mask, cached, horizon, spec=self.spec)

    def validate(self, carry: nnx.State, batch: tuple) -> tuple[jax.Array, jax.Array]:
        """(Σ loss x tokens, tokens) of one batch."""
        return validation_jit(carry, self.frozen, self.teacher_state, *batch, spec=self.spec)

    @staticmethod
    def count(carry: nnx.State) -> int:
        """The number of steps a carry has taken (the optimizer's own counter)."""
        return int(jax.device_get(carry[1]["step"]))

    @staticmethod
    def params_part(carry: nnx.State) -> nnx.State:
        """The trained parameters (fp32) of a carry."""
        return carry[0]

    def params_state(self, params: nnx.State) -> nnx.State:
        """Every parameter of the student (an `nnx.State` of `nnx.Param`): the trained ones from `params`
        (a carry's `params_part`) cast back to the student's dtypes, the frozen ones as they were."""
        params = jax.tree_util.tree_map_with_path(lambda p, x: x.astype(self.dtypes[dotted(p)]), params)
        model = nnx.merge(self.model_graphdef, params, self.frozen_model)
        return nnx.state(model, nnx.Param)
