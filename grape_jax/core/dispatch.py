"""Routed MoE dispatch: each token runs only its top-k experts, exactly (no capacity, nothing dropped).

The (token, expert) assignments are sorted by expert, every expert's MLP runs on its own rows as a
grouped matmul, and the rows go back to token order to be combined with the routing weights: the same
sums as the dense path (`layers.moe_block`, every expert on every token), in another order, for k/E of
its FLOPs. Two grouped matmuls:

  ragged_dot  `jax.lax.ragged_dot` over the sorted rows. Native on TPU. On GPU it is a grouped GEMM only
              with the Pallas Triton lowering (`jax_ragged_dot_use_gpu_pallas_triton_lowering`, where the
              installed jax ships it) or XLA's cuDNN fusion (`--xla_gpu_experimental_use_ragged_dot_fusion`);
              otherwise XLA, as on CPU, expands it to a dense matmul against every group (E x the work).
  tokamax_*   `tokamax.ragged_dot` (optional package, extra `gpu`) over the same sorted rows, with its
              VJP: `mosaic` (Pallas Mosaic GPU kernels, Hopper sm90 / Blackwell sm100 forward; `triton`
              where mosaic has none for the case), `triton` (Pallas Triton, any GPU) or `xla` (any backend:
              `jax.lax.ragged_dot` again). `tokamax_kind` picks the implementation per device.
  blocked     every expert's rows padded to a multiple of a block of B rows (at most one partial block
              per expert), then one `lax.scan` over the blocks, each a plain [B, d] x [d, f] matmul with
              its expert's weights; blocks past the last expert's rows are skipped. Portable.
  batched     the same layout with B = the average rows per expert (so at most 2 E blocks), run as one
              batched matmul with every block's expert weights gathered: no sequential loop, at the cost
              of up to twice the experts' weights in transient memory and up to twice the routed FLOPs.

Under a mesh (`jax.set_mesh`; `MoEModel` sets its run context's mesh around its forward) the routed
path is a `jax.shard_map` over the whole mesh: tokens stay where the batch rules put them (split over
`data`/`fsdp`, replicated over `expert`/`tensor`), every device runs the experts it holds (the `expert`
axis, and its slice of the MLP width on `tensor`) on the assignments of its tokens that route to them,
and a psum over those axes adds the partial outputs. Tokens are already on every device of an expert
group, so no token exchange is needed before the experts run (the all-gather + local compute scheme;
an all-to-all would only pay off with tokens sharded over the expert axis too). Weights sharded over
`fsdp` are gathered at the shard_map boundary, as FSDP does. An expert count that does not divide the
expert axis is replicated by the rules; every device then runs all experts on its own tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
from collections.abc import Callable, Mapping
from types import ModuleType

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec
from jaxtyping import Array, Float, Int

from grape_jax.core.config import MoEConfig
from grape_jax.core.params import param_specs
from grape_jax.core.sharding import DEFAULT_RULES, logical_to_pspec

TOKAMAX_IMPLEMENTATIONS = {
    "tokamax_mosaic": ("mosaic", "triton"),
    "tokamax_triton": ("triton",),
    "tokamax_xla": ("xla",),
}
"""tokamax kind -> the `implementation` sequence `tokamax.ragged_dot` tries (the first with a kernel for the case)."""
GROUPED_KINDS = ("ragged_dot", "blocked", "batched", *TOKAMAX_IMPLEMENTATIONS)
DISPATCHES = ("auto", "dense", "routed", "tokamax", *GROUPED_KINDS)
"""auto: the faster of dense and routed on this backend (`choose`); dense: every expert on every token;
routed: the backend's grouped matmul (`grouped_matmul_kind`); tokamax: tokamax's kernel for this device
(`tokamax_kind`); ragged_dot / blocked / batched / tokamax_*: routed with that one."""
# GPU compute capabilities where tokamax 0.0.12's Mosaic kernels cover forward and VJP: Hopper (Blackwell's
# VJP raises, no weight-gradient kernel: triton there unless dispatch="tokamax_mosaic" asks).
MOSAIC_GPU_MAJORS = ("9",)
TOKAMAX_MISSING = "dispatch {!r} needs the optional package tokamax: pip install 'grape-jax[gpu]' (tokamax==0.0.12)"
EXPERT_LEAVES = ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down")
MAX_BLOCK = 512  # rows per block of the blocked grouped matmul (more: fewer, larger matmuls, more padding)
MIN_BLOCK = 8

Activation = Callable[[jax.Array, jax.Array], jax.Array]


class DispatchError(ValueError):
    """An unknown dispatch mode."""


def check_dispatch(dispatch: str) -> None:
    if dispatch not in DISPATCHES:
        raise DispatchError(f"dispatch {dispatch!r} unknown; expected one of {DISPATCHES}")


def fast_gpu_ragged_dot() -> bool:
    """Whether `jax.lax.ragged_dot` lowers to a grouped GEMM on GPU in this process (else XLA expands it
    densely): the Pallas Triton lowering switched on and shipped by the installed jax, or XLA's cuDNN
    ragged-dot fusion asked for in XLA_FLAGS."""
    pallas = bool(getattr(jax.config, "jax_ragged_dot_use_gpu_pallas_triton_lowering", False))
    if pallas and importlib.util.find_spec("jax._src.lax.pallas_lowerings") is not None:
        return True
    return "xla_gpu_experimental_use_ragged_dot_fusion=true" in os.environ.get("XLA_FLAGS", "").lower()


@functools.cache
def tokamax_module() -> ModuleType | None:
    """The tokamax package, imported on first use (about 6 s of imports), or None where it is not installed.
    absl's flags are marked parsed (defaults), else tokamax parses sys.argv (our CLI's, pytest's) and fails."""
    if importlib.util.find_spec("tokamax") is None:
        return None
    import tokamax  # noqa: PLC0415  (deferred: optional GPU kernels, slow to import, used only by tokamax_*)
    from absl import flags  # noqa: PLC0415  (deferred: installed with tokamax, needed only with it)

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return tokamax


def compute_capability(platform: str) -> str | None:
    """The first device's compute capability ('9.0') on GPU, else None."""
    gpu = platform == "gpu" and jax.default_backend() == "gpu"
    return getattr(jax.devices()[0], "compute_capability", None) if gpu else None


def tokamax_kind(platform: str, capability: str | None) -> str:
    """tokamax's kernel for a device (pure): mosaic on Hopper GPUs (compute capability 9.x, see
    MOSAIC_GPU_MAJORS), triton on other GPUs, xla elsewhere (tokamax's TPU kernel is not measured here)."""
    if platform != "gpu":
        return "tokamax_xla"
    return "tokamax_mosaic" if (capability or "").split(".")[0] in MOSAIC_GPU_MAJORS else "tokamax_triton"


def select_grouped_kind(platform: str, capability: str | None, *, tokamax: bool, fast_ragged_dot: bool) -> str:
    """The grouped matmul `routed` uses (pure): on GPU tokamax's (`tokamax_kind`) where installed, else
    ragged_dot where it lowers to a grouped GEMM, else batched (one H200: 1.75x dense, 3.3x blocked with 128
    experts of f 768); ragged_dot on TPU; blocked on CPU (faster there than batched's weight gather and
    than tokamax's xla, which is `jax.lax.ragged_dot`, dense over every group; BENCHMARKS.md)."""
    if platform == "gpu" and tokamax:
        return tokamax_kind(platform, capability)
    if platform == "tpu" or (platform == "gpu" and fast_ragged_dot):
        return "ragged_dot"
    return "batched" if platform == "gpu" else "blocked"


def grouped_matmul_kind(platform: str) -> str:
    """`select_grouped_kind` with this process's facts (tokamax installed, jax's GPU lowering, device)."""
    gpu, capability = platform == "gpu", compute_capability(platform)
    tokamax, fast = gpu and tokamax_module() is not None, gpu and fast_gpu_ragged_dot()
    return select_grouped_kind(platform, capability, tokamax=tokamax, fast_ragged_dot=fast)


# On CPU the blocked routed path beat dense on every measured shape whose dense work (6 T E d f FLOPs) is
# at least this, when E > k (1.4x-14x); below it both take tens of microseconds and dense won by a few
# (scripts/bench_forward.py --sweep; BENCHMARKS.md "Routed MoE dispatch").
CPU_MIN_DENSE_FLOPS = 1e8


def choose(
    dispatch: str, *, num_experts: int, top_k: int, tokens: int, hidden: int, ffn: int, platform: str | None = None
) -> str:
    """Resolve a dispatch mode to 'dense' or a grouped kind for one MoE layer (static shapes).

    auto: routed on accelerators; on CPU routed where the measured rule above says it is faster."""
    check_dispatch(dispatch)
    if dispatch == "dense" or dispatch in GROUPED_KINDS:
        return dispatch
    platform = platform or jax.default_backend()
    if dispatch == "tokamax":
        return tokamax_kind(platform, compute_capability(platform))
    routed = grouped_matmul_kind(platform)
    if dispatch == "routed" or platform != "cpu":
        return routed
    dense_flops = 6 * tokens * num_experts * hidden * ffn
    return routed if num_experts > top_k and dense_flops >= CPU_MIN_DENSE_FLOPS else "dense"


def expert_leaves(params: Mapping[str, jax.Array], p: str) -> dict[str, jax.Array]:
    """The routed experts' weights (and biases, where the family has them) of the MoE block at `p`."""
    return {name: params[p + name] for name in EXPERT_LEAVES if p + name in params}


# ----------------------------------------------------------------------------- local grouped FFN


@dataclasses.dataclass(frozen=True)
class _Sorted:
    """Assignments of T tokens x k choices (M = T k rows) sorted by local expert; rows of experts held
    elsewhere sort last and are in no group."""

    order: Int[Array, " m"]  # sorted position -> assignment index (t * k + j)
    expert: Int[Array, " m"]  # local expert of each sorted row (clipped into range for the others)
    local: Array  # [m] bool, sorted row belongs to a local expert
    group_sizes: Int[Array, " e"]


def _sort(indices: Int[Array, "t k"], first: jax.Array | int, num_local: int) -> _Sorted:
    e = indices.reshape(-1) - first
    local = (e >= 0) & (e < num_local)
    key = jnp.where(local, e, num_local).astype(jnp.int32)
    order = jnp.argsort(key, stable=True)
    group_sizes = jnp.bincount(key, length=num_local + 1)[:num_local].astype(jnp.int32)
    sorted_key = key[order]
    return _Sorted(order, jnp.minimum(sorted_key, num_local - 1), sorted_key < num_local, group_sizes)


def _tokamax_dot(kind: str) -> Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]:
    """`tokamax.ragged_dot` with `kind`'s implementations, as dot(rows, weights, group_sizes, local). Rows in
    no group are zeroed on the way in and out, so whatever a kernel leaves in them reaches neither the
    output nor, through the VJP, the gradients."""
    tokamax = tokamax_module()
    if tokamax is None:
        raise DispatchError(TOKAMAX_MISSING.format(kind))
    implementation = TOKAMAX_IMPLEMENTATIONS[kind]

    def dot(a: jax.Array, b: jax.Array, group_sizes: jax.Array, local: jax.Array) -> jax.Array:
        y = tokamax.ragged_dot(jnp.where(local, a, 0), b, group_sizes, implementation=implementation)
        return jnp.where(local, y, 0)

    return dot


def _lax_dot(a: jax.Array, b: jax.Array, group_sizes: jax.Array, local: jax.Array) -> jax.Array:
    """`jax.lax.ragged_dot` (rows in no group come out 0)."""
    return jax.lax.ragged_dot(a, b, group_sizes)


def _ffn_ragged(
    x_rows: jax.Array,
    s: _Sorted,
    w: Mapping[str, jax.Array],
    activation: Activation,
    down_bias_scale: jax.Array | float,
    dot: Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array] = _lax_dot,
) -> jax.Array:
    """Expert MLPs on rows sorted by expert with the ragged matmul `dot` (rows in no group come out 0)."""
    local = s.local[:, None]
    gate = dot(x_rows, w["w_gate"], s.group_sizes, local)
    up = dot(x_rows, w["w_up"], s.group_sizes, local)
    if "b_gate" in w:
        gate = gate + w["b_gate"][s.expert]
        up = up + w["b_up"][s.expert]
    y = dot(activation(gate, up), w["w_down"], s.group_sizes, local)
    if "b_down" in w:
        y = y + w["b_down"][s.expert] * down_bias_scale
    return jnp.where(s.local[:, None], y, 0)


def block_rows(rows: int, num_experts: int, *, cap: int | None = MAX_BLOCK) -> int:
    """Block size of the blocked grouped matmul: the average rows per expert, as a power of two (at most
    `cap`; no cap gives at most 2 E blocks)."""
    average = max(1, -(-rows // max(num_experts, 1)))
    size = max(MIN_BLOCK, 1 << (average - 1).bit_length())
    return int(size if cap is None else min(cap, size))


def _ffn_blocked(
    x: jax.Array,
    token_of_row: jax.Array,
    s: _Sorted,
    w: Mapping[str, jax.Array],
    activation: Activation,
    down_bias_scale: jax.Array | float,
    *,
    batched: bool = False,
) -> jax.Array:
    """Expert MLPs over blocks of B rows, each expert's rows padded to whole blocks (see module doc):
    a scan over blocks of at most MAX_BLOCK rows, or (`batched`) one batched matmul over at most 2 E
    blocks with each block's expert weights gathered.

    Returns the rows in sorted order (0 for rows of experts held elsewhere)."""
    m, num_local = token_of_row.shape[0], s.group_sizes.shape[0]
    b = block_rows(m, num_local, cap=None if batched else MAX_BLOCK)
    blocks = (m + num_local * (b - 1)) // b  # >= sum over experts of ceil(rows / b)
    padded = (s.group_sizes + b - 1) // b * b
    padded_end = jnp.cumsum(padded)
    padded_start = padded_end - padded
    group_start = jnp.cumsum(s.group_sizes) - s.group_sizes
    rank = jnp.arange(m, dtype=jnp.int32) - group_start[s.expert]
    slot = jnp.where(s.local, padded_start[s.expert] + rank, blocks * b)  # sorted row -> padded slot
    slot_token = jnp.full((blocks * b,), x.shape[0], jnp.int32).at[slot].set(token_of_row, mode="drop")
    x_blocks = jnp.take(x, slot_token, axis=0, mode="fill", fill_value=0).reshape(blocks, b, x.shape[1])
    block_start = jnp.arange(blocks, dtype=jnp.int32) * b
    block_expert = jnp.minimum(jnp.searchsorted(padded_end, block_start, side="right"), num_local - 1)
    live = block_start < padded_end[-1]

    def run(xb: jax.Array, e: jax.Array) -> jax.Array:
        """One block (xb [b, d], e scalar) or all of them at once (xb [n, b, d], e [n])."""
        mm = lambda a, name: jnp.einsum("...bi,...io->...bo", a, w[name][e])
        bias = lambda name: jnp.expand_dims(w[name][e], -2)
        gate, up = mm(xb, "w_gate"), mm(xb, "w_up")
        if "b_gate" in w:
            gate, up = gate + bias("b_gate"), up + bias("b_up")
        y = mm(activation(gate, up), "w_down")
        if "b_down" in w:
            y = y + bias("b_down") * down_bias_scale
        return y

    if batched:  # dead blocks hold only zero rows, and no row's slot points into them
        y_blocks = run(x_blocks, block_expert)
    else:

        def skip(xb: jax.Array, e: jax.Array) -> jax.Array:
            # Under shard_map both branches must vary over the same mesh axes, and `run`'s output also
            # varies over the axes that split the weights: a zero times one weight row carries them.
            return jnp.zeros_like(xb) + 0 * w["w_down"][e, 0].astype(xb.dtype)

        def step(carry: None, inputs: tuple) -> tuple[None, jax.Array]:
            xb, e, on = inputs
            return carry, jax.lax.cond(on, run, skip, xb, e)

        _, y_blocks = jax.lax.scan(step, None, (x_blocks, block_expert, live))
    return jnp.take(y_blocks.reshape(blocks * b, -1), slot, axis=0, mode="fill", fill_value=0)


def _routed_local(
    x: Float[Array, "t d"],
    indices: Int[Array, "t k"],
    weights: Float[Array, "t k"],
    w: Mapping[str, jax.Array],
    *,
    first: jax.Array | int,
    kind: str,
    activation: Activation,
    down_bias_scale: jax.Array | float = 1.0,
) -> Float[Array, "t d"]:
    """Σ_j weights[t, j] · expert_{indices[t, j]}(x[t]) over the assignments whose expert is held here
    (experts first .. first + E_local - 1)."""
    t, k = indices.shape
    s = _sort(indices, first, w["w_gate"].shape[0])
    token_of_row = (s.order // k).astype(jnp.int32)
    if kind == "ragged_dot":
        y_rows = _ffn_ragged(x[token_of_row], s, w, activation, down_bias_scale)
    elif kind in TOKAMAX_IMPLEMENTATIONS:
        y_rows = _ffn_ragged(x[token_of_row], s, w, activation, down_bias_scale, _tokamax_dot(kind))
    else:
        y_rows = _ffn_blocked(x, token_of_row, s, w, activation, down_bias_scale, batched=kind == "batched")
    # back to assignment order (t * k + j) by the inverse permutation, then combine as the dense path does
    inverse = jnp.zeros_like(s.order).at[s.order].set(jnp.arange(s.order.shape[0], dtype=s.order.dtype))
    y = y_rows[inverse].reshape(t, k, -1)
    return jnp.einsum("tkd,tk->td", y, weights.astype(y.dtype))


# ----------------------------------------------------------------------------- mesh


@functools.lru_cache(maxsize=64)
def _leaf_axes(cfg: MoEConfig, p: str) -> dict[str, tuple]:
    specs = param_specs(cfg)
    return {name: specs[p + name].axes for name in EXPERT_LEAVES if p + name in specs}


def _mesh_axes(spec: PartitionSpec, dim: int) -> tuple[str, ...]:
    part = tuple(spec)[dim] if dim < len(spec) else None
    return () if part is None else ((part,) if isinstance(part, str) else tuple(part))


def routed_experts(
    params: Mapping[str, jax.Array],
    p: str,
    cfg: MoEConfig,
    x: Float[Array, "t d"],
    indices: Int[Array, "t k"],
    weights: Float[Array, "t k"],
    *,
    kind: str,
    activation: Activation,
) -> Float[Array, "t d"]:
    """The routed experts' combined output Σ_j weights[t, j] · expert_{indices[t, j]}(x[t]) (no shared
    expert), by the grouped matmul `kind` (one of GROUPED_KINDS); on a mesh, per device by shard_map
    (module docstring)."""
    if kind not in GROUPED_KINDS:
        raise DispatchError(f"grouped matmul {kind!r} unknown; expected one of {GROUPED_KINDS}")
    w = expert_leaves(params, p)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or math.prod(mesh.shape.values()) == 1:
        return _routed_local(x, indices, weights, w, first=0, kind=kind, activation=activation)

    # Expert leaves as the rules place them, except the model width (embed), gathered as FSDP does.
    rules = dataclasses.replace(DEFAULT_RULES, embed=None)
    axes = _leaf_axes(cfg, p)
    w_specs = {n: logical_to_pspec(a.shape, axes[n], mesh, rules) for n, a in w.items()}
    expert_axes = _mesh_axes(w_specs["w_gate"], 0)
    tensor_axes = _mesh_axes(w_specs["w_gate"], 2)
    if _mesh_axes(w_specs["w_down"], 1) != tensor_axes:  # keep gate/up and down split alike
        tensor_axes = ()
        w_specs = {n: PartitionSpec(*(tuple(s)[:1])) for n, s in w_specs.items()}
    batch_axes = tuple(a for a in DEFAULT_RULES.mesh_axes("batch") if mesh.shape[a] > 1)
    if x.shape[0] % math.prod(mesh.shape[a] for a in batch_axes):
        batch_axes = ()
    tokens = PartitionSpec(batch_axes or None)

    def local(x, indices, weights, w):
        first = jax.lax.axis_index(expert_axes) * w["w_gate"].shape[0] if expert_axes else 0
        # b_down is not split over `tensor`: only the first tensor shard adds it before the psum
        bias_scale = (jax.lax.axis_index(tensor_axes) == 0).astype(x.dtype) if tensor_axes else 1.0
        reduce = expert_axes + tensor_axes
        # Each device gathers its own rows of x, by indices this jax types as invariant (from axis_index):
        # x varying first, or the gradient's psum adds up rows of different tokens before the scatter.
        x = jax.lax.pcast(x, reduce, to="varying") if reduce else x
        y = _routed_local(
            x, indices, weights, w, first=first, kind=kind, activation=activation, down_bias_scale=bias_scale
        )
        return jax.lax.psum(y, reduce) if reduce else y

    return jax.shard_map(local, mesh=mesh, in_specs=(tokens, tokens, tokens, w_specs), out_specs=tokens)(
        x, indices, weights, w
    )
