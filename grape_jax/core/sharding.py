"""Device meshes and the one table that maps logical axes to mesh axes.

Mesh axes: `data` (batch), `fsdp` (parameter sharding of the embed dimension), `expert` (routed
experts), `tensor` (heads / MLP width). A logical dimension whose size does not divide the product of
its mesh axes is replicated instead (pruned layers often keep expert counts such as 6 on an expert axis
of 4): correctness first, and the replication is visible in `param_shardings`' result.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "expert", "tensor")


class MeshError(ValueError):
    """A mesh description that does not fit the available devices."""


@dataclasses.dataclass(frozen=True)
class ShardingRules:
    """Logical axis -> mesh axis (or tuple of mesh axes, or None for replicated)."""

    experts: str | tuple[str, ...] | None = "expert"
    embed: str | tuple[str, ...] | None = "fsdp"
    mlp: str | tuple[str, ...] | None = "tensor"
    heads: str | tuple[str, ...] | None = "tensor"
    kv_heads: str | tuple[str, ...] | None = "tensor"
    vocab: str | tuple[str, ...] | None = "tensor"
    norm: str | tuple[str, ...] | None = None
    batch: str | tuple[str, ...] | None = ("data", "fsdp")

    def mesh_axes(self, logical: str | None) -> tuple[str, ...]:
        if logical is None:
            return ()
        value = getattr(self, logical)
        if value is None:
            return ()
        return (value,) if isinstance(value, str) else tuple(value)


DEFAULT_RULES = ShardingRules()


@dataclasses.dataclass(frozen=True)
class RunContext:
    """Where a model's arrays live: the device mesh (None: the first local device) and the rules that
    map logical axes onto it. One value travels with the model through loading, calibration, merge and
    export, so no stage can pair a mesh with other rules than the ones the parameters were placed by."""

    mesh: Mesh | None = None
    rules: ShardingRules = DEFAULT_RULES

    def sharding(self, shape: Sequence[int], axes: Sequence[str | None]) -> jax.sharding.Sharding:
        """Where an array of `shape` with logical `axes` goes (replicated along non-dividing axes)."""
        if self.mesh is None:
            return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        return NamedSharding(self.mesh, logical_to_pspec(shape, axes, self.mesh, self.rules))

    @property
    def data_parallel_size(self) -> int:
        """How many ways a batch is split (batches are padded to a multiple of this)."""
        return data_parallel_size(self.mesh, self.rules)

    def scope(self) -> contextlib.AbstractContextManager:
        """The mesh (as an abstract mesh) in context unless there is none or one is already set, so code
        traced inside sees it (the routed MoE dispatch splits its work over it with shard_map). Abstract,
        because `jax.set_mesh` is refused under jit and grad, where a model is called when it trains."""
        if self.mesh is None or self.mesh.size == 1 or not jax.sharding.get_abstract_mesh().empty:
            return contextlib.nullcontext()
        return jax.sharding.use_abstract_mesh(self.mesh.abstract_mesh)

    def put_batch(self, x: np.ndarray) -> jax.Array:
        """A host [batch, ...] array placed with its batch over the data axes (replicated when the batch
        does not divide them; on one device, simply put there)."""
        if self.mesh is None:
            return jax.device_put(x, self.sharding(x.shape, (None,) * x.ndim))
        if x.shape[0] % self.data_parallel_size:
            return jax.device_put(x, NamedSharding(self.mesh, PartitionSpec()))
        return shard_batch(x, self.mesh, self.rules)


def parse_mesh_spec(spec: str | Mapping[str, int] | None) -> dict[str, int]:
    """'expert=4,fsdp=2' -> {'data': 1, 'fsdp': 2, 'expert': 4, 'tensor': 1}."""
    sizes = {axis: 1 for axis in MESH_AXES}
    if spec is None or spec == "":
        return sizes
    items = (
        spec.items()
        if isinstance(spec, Mapping)
        else (part.split("=", 1) if "=" in part else (part, None) for part in spec.split(","))
    )
    for axis, size in items:
        axis = axis.strip()
        if axis not in sizes:
            raise MeshError(f"mesh axis {axis!r} unknown; expected some of {MESH_AXES}")
        try:
            sizes[axis] = int(size)
        except (TypeError, ValueError):
            raise MeshError(f"mesh axis {axis!r}: size {size!r} is not an integer") from None
        if sizes[axis] < 1:
            raise MeshError(f"mesh axis {axis!r}: size must be >= 1, got {sizes[axis]}")
    return sizes


def make_mesh(spec: str | Mapping[str, int] | None = None, *, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over all four named axes (unused ones have size 1) and every device: when `data` is not
    named it takes the devices the other axes leave (their product must divide the device count); a
    spec that would leave devices idle, or needs more than exist, is refused."""
    sizes = parse_mesh_spec(spec)
    devices = list(jax.devices() if devices is None else devices)
    named = math.prod(sizes.values())
    given = spec if isinstance(spec, Mapping) else dict(p.split("=", 1) for p in (spec or "").split(",") if "=" in p)
    text = spec if isinstance(spec, str) else ",".join(f"{k}={v}" for k, v in (spec or {}).items())
    if named != len(devices):
        if "data" not in given and len(devices) % named == 0:
            sizes["data"] = len(devices) // named
        elif named > len(devices):
            raise MeshError(f"--mesh {text}: needs {named} devices, {len(devices)} are available")
        else:
            hint = "name axis sizes whose product is " + str(len(devices))
            if "data" not in given:
                hint += f" or divides it (data takes the rest; {len(devices)} is not a multiple of {named})"
            raise MeshError(f"--mesh {text}: uses {named} of the {len(devices)} devices; {hint}")
    shape = tuple(sizes[a] for a in MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def describe_mesh(mesh: Mesh | None) -> str:
    """One line saying what runs where (printed by the CLI)."""
    if mesh is None:
        device = jax.local_devices()[0]
        return f"mesh: none (one {device.platform} device)"
    axes = " ".join(f"{a}={mesh.shape[a]}" for a in MESH_AXES)
    platform = mesh.devices.flat[0].platform
    return f"mesh: {axes} on {mesh.devices.size} {platform} devices ({jax.process_count()} process(es))"


def logical_to_pspec(
    shape: Sequence[int],
    axes: Sequence[str | None],
    mesh: Mesh,
    rules: ShardingRules = DEFAULT_RULES,
) -> PartitionSpec:
    """PartitionSpec for an array with logical `axes`; non-dividing or reused mesh axes replicate.

    Trailing replicated dimensions are dropped (`P('expert')`, not `P('expert', None)`): that is how
    jitted outputs report their shardings, and equal specs keep jit caches from recompiling."""
    used: set[str] = set()
    parts: list[str | tuple[str, ...] | None] = []
    for dim, logical in zip(shape, axes, strict=True):
        mesh_axes = tuple(a for a in rules.mesh_axes(logical) if mesh.shape[a] > 1 and a not in used)
        size = math.prod(mesh.shape[a] for a in mesh_axes)
        if not mesh_axes or dim % size:
            parts.append(None)
            continue
        used.update(mesh_axes)
        parts.append(mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
    while parts and parts[-1] is None:
        parts.pop()
    return PartitionSpec(*parts)


def batch_sharding(mesh: Mesh, rank: int = 2, rules: ShardingRules = DEFAULT_RULES) -> NamedSharding:
    """Sharding of a [batch, seq, ...] activation: batch over the data(+fsdp) axes."""
    axes = tuple(a for a in rules.mesh_axes("batch") if mesh.shape[a] > 1)
    first = None if not axes else (axes[0] if len(axes) == 1 else axes)
    return NamedSharding(mesh, PartitionSpec(first, *([None] * (rank - 1))))


def data_parallel_size(mesh: Mesh | None, rules: ShardingRules = DEFAULT_RULES) -> int:
    """How many ways a batch is split on `mesh` (batches must be padded to a multiple of this)."""
    if mesh is None:
        return 1
    return math.prod(mesh.shape[a] for a in rules.mesh_axes("batch"))


def shard_batch(x: np.ndarray, mesh: Mesh, rules: ShardingRules = DEFAULT_RULES) -> jax.Array:
    """Place a host batch on the mesh (batch dimension must divide the data-parallel size; pad first).

    Every process passes the same global batch and contributes only its devices' rows, so this works
    unchanged on several hosts."""
    sharding = batch_sharding(mesh, x.ndim, rules)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def replicate(tree, mesh: Mesh):
    """The same values, fully replicated on `mesh` (so every process can read them on its host)."""
    return _replicator(mesh)(tree)


@functools.lru_cache(maxsize=16)
def _replicator(mesh: Mesh):
    """One jitted identity per mesh, so each shape compiles once (a layer-streamed pass on several
    processes replicates every batch's hidden states)."""
    return jax.jit(lambda t: t, out_shardings=NamedSharding(mesh, PartitionSpec()))


def host(x: jax.Array, ctx: RunContext) -> np.ndarray:
    """A (possibly sharded, possibly multi-host) array as one host NumPy array on every process."""
    if ctx.mesh is not None and not getattr(x, "is_fully_addressable", True):
        x = replicate(x, ctx.mesh)
    return np.asarray(x)


def pin(tree, shardings: tuple[jax.sharding.Sharding, ...] | None):
    """`tree` with every leaf constrained to its sharding (`shardings`: the flattened tree's, in leaf
    order), inside a jitted function: a carry pinned this way leaves each step where it came in, so the
    step compiles once. None or single-device shardings leave the tree as it is."""
    if not shardings or isinstance(shardings[0], jax.sharding.SingleDeviceSharding):
        return tree
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(
        treedef, [jax.lax.with_sharding_constraint(x, s) for x, s in zip(leaves, shardings, strict=True)]
    )
