"""Pure functions of the decoder: norms, rotary embeddings, attention, experts and the MoE block.

Every function takes the flat parameter dict (see `grape_jax.core.params`) plus a prefix, so the same code
serves the NNX shell, calibration (which needs the MoE layer inputs) and merged models with any per-layer
expert count. Norms, softmaxes and routing run in fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import chex
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from grape_jax.core import dispatch as moe_dispatch
from grape_jax.core.config import MoEConfig
from grape_jax.core.mla import mla_attention
from grape_jax.core.rope import apply_partial_rope
from grape_jax.core.routing import Routing, route

Params = Mapping[str, jax.Array]


def rms_norm(x: Float[Array, "... d"], weight: Float[Array, " d"], eps: float) -> Float[Array, "... d"]:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (weight.astype(jnp.float32) * y).astype(x.dtype)


def layer_norm(
    x: Float[Array, "... d"], weight: Float[Array, " d"], bias: Float[Array, " d"], eps: float
) -> Float[Array, "... d"]:
    """LayerNorm (biased variance) in fp32, as torch's `nn.LayerNorm` (Phi-3.5-MoE)."""
    x32 = x.astype(jnp.float32)
    centred = x32 - jnp.mean(x32, axis=-1, keepdims=True)
    y = centred * jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)
    return (y * weight.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def norm(params: Params, name: str, cfg: MoEConfig, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
    """The family's normalisation `name` (`layers.3.attn_norm`, `final_norm`): RMSNorm or LayerNorm."""
    if cfg.norm == "layer":
        return layer_norm(x, params[name], params[name + "_bias"], cfg.rms_norm_eps)
    return rms_norm(x, params[name], cfg.rms_norm_eps)


def l2_norm(x: Float[Array, "... d"], eps: float) -> Float[Array, "... d"]:
    """RMS normalisation without a weight (Llama-4's q/k `L2Norm`)."""
    x32 = x.astype(jnp.float32)
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def attention_mask(
    mask: Bool[Array, "b t"], *, sliding_window: int | None = None, chunk_size: int | None = None
) -> Bool[Array, "b 1 t t"]:
    """Causal mask combined with key padding and an optional sliding window or attention chunks (a
    query sees the keys of its own `chunk_size` block only; right padding, so no offset)."""
    t = mask.shape[1]
    q = jnp.arange(t)[:, None]
    k = jnp.arange(t)[None, :]
    allowed = k <= q
    if sliding_window is not None:
        allowed = allowed & (q - k < sliding_window)
    if chunk_size is not None:
        allowed = allowed & (q // chunk_size == k // chunk_size)
    return allowed[None, None] & mask[:, None, None, :]


def attention(
    params: Params,
    p: str,
    cfg: MoEConfig,
    x: Float[Array, "b t d"],
    positions: Int[Array, "b t"],
    mask: Bool[Array, "b 1 t t"],
    *,
    rope: bool = True,
) -> Float[Array, "b t d"]:
    """Grouped-query attention with (partial) RoPE, optional q/k norm, biases and attention sinks (or
    MLA). `rope` False: a NoPE layer (Llama-4), with query temperature tuning if the config asks."""
    if cfg.attention == "mla":
        return mla_attention(params, p, cfg, x, positions, mask)
    b, t, _ = x.shape
    hd, hq, hkv = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads

    def proj(name: str, heads: int) -> jax.Array:
        y = x @ params[p + name + "_proj"]
        if p + name + "_bias" in params:
            y = y + params[p + name + "_bias"]
        if cfg.qk_norm and cfg.qk_norm_full and name != "v":
            y = rms_norm(y, params[p + name + "_norm"], cfg.rms_norm_eps)
        if cfg.clip_qkv is not None:
            y = jnp.clip(y, -cfg.clip_qkv, cfg.clip_qkv)
        return y.reshape(b, t, heads, hd)

    q, k, v = proj("q", hq), proj("k", hkv), proj("v", hkv)
    if cfg.qk_norm and not cfg.qk_norm_full:
        q = rms_norm(q, params[p + "q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, params[p + "k_norm"], cfg.rms_norm_eps)
    if rope:
        q, k = apply_partial_rope(q, positions, cfg), apply_partial_rope(k, positions, cfg)
        if cfg.qk_l2_norm:
            q, k = l2_norm(q, cfg.rms_norm_eps), l2_norm(k, cfg.rms_norm_eps)
    elif cfg.attn_temperature_tuning:
        pos = positions.astype(jnp.float32)
        scales = jnp.log1p(jnp.floor((pos + 1.0) / cfg.attn_floor_scale)) * cfg.attn_scale + 1.0
        q = (q * scales[:, :, None, None]).astype(q.dtype)
    groups = hq // hkv
    q = q.reshape(b, t, hkv, groups, hd)
    scale = cfg.attention_scale if cfg.attention_scale is not None else hd**-0.5
    scores = jnp.einsum("bqhgd,bkhd->bhgqk", q, k).astype(jnp.float32) * scale
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
    if cfg.attention_sinks:
        sinks = params[p + "sinks"].astype(jnp.float32).reshape(1, hkv, groups, 1, 1)
        sinks = jnp.broadcast_to(sinks, scores.shape[:-1] + (1,))
        probs = jax.nn.softmax(jnp.concatenate([scores, sinks], axis=-1), axis=-1)[..., :-1]
    else:
        probs = jax.nn.softmax(scores, axis=-1)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", probs.astype(v.dtype), v).reshape(b, t, hq * hd)
    out = out @ params[p + "o_proj"]
    if p + "o_bias" in params:
        out = out + params[p + "o_bias"]
    return out


def swiglu(gate: jax.Array, up: jax.Array, cfg: MoEConfig) -> jax.Array:
    """The family's gated activation: SiLU(gate)*up, or GPT-OSS's clamped variant."""
    if cfg.activation == "gptoss_clamped_swiglu":
        gate = jnp.minimum(gate, cfg.swiglu_limit)
        up = jnp.clip(up, -cfg.swiglu_limit, cfg.swiglu_limit)
        return (up + 1.0) * gate * jax.nn.sigmoid(gate * cfg.swiglu_alpha)
    return jax.nn.silu(gate) * up


def dense_mlp(params: Params, p: str, cfg: MoEConfig, x: Float[Array, "... d"]) -> Float[Array, "... d"]:
    return swiglu(x @ params[p + "w_gate"], x @ params[p + "w_up"], cfg) @ params[p + "w_down"]


def expert_hidden(
    params: Params, p: str, cfg: MoEConfig, x: Float[Array, "t d"] | Float[Array, "e t d"]
) -> Float[Array, "e t f"]:
    """Every routed expert's activated intermediate features on every token (the input of w_down);
    `x` [e, t, d] gives each expert its own input."""
    spec = "td,edf->etf" if x.ndim == 2 else "etd,edf->etf"
    gate = jnp.einsum(spec, x, params[p + "w_gate"])
    up = jnp.einsum(spec, x, params[p + "w_up"])
    if p + "b_gate" in params:
        gate = gate + params[p + "b_gate"][:, None, :]
        up = up + params[p + "b_up"][:, None, :]
    return swiglu(gate, up, cfg)


def all_expert_outputs(
    params: Params, p: str, cfg: MoEConfig, x: Float[Array, "t d"] | Float[Array, "e t d"]
) -> Float[Array, "e t d"]:
    """Every routed expert of the layer applied to every token (unweighted); `x` [e, t, d] gives each
    expert its own input."""
    y = jnp.einsum("etf,efd->etd", expert_hidden(params, p, cfg, x), params[p + "w_down"])
    if p + "b_down" in params:
        y = y + params[p + "b_down"][:, None, :]
    return y


def router(params: Params, p: str, cfg: MoEConfig, x: Float[Array, "t d"]) -> Routing:
    logits = (x @ params[p + "router"]).astype(jnp.float32)
    return route(logits, cfg, bias=params.get(p + "router_bias"))


def shared_expert(params: Params, p: str, cfg: MoEConfig, x: Float[Array, "t d"]) -> Float[Array, "t d"] | None:
    """The shared expert's output (times its sigmoid gate where the family has one), or None."""
    if p + "shared.w_gate" not in params:
        return None
    shared = dense_mlp(params, p + "shared.", cfg, x)
    if p + "shared_gate" in params:
        shared = jax.nn.sigmoid(x @ params[p + "shared_gate"]) * shared
    return shared


def moe_block(
    params: Params, p: str, cfg: MoEConfig, x: Float[Array, "t d"], *, expert_dtype: jnp.dtype | None = None
) -> tuple[Float[Array, "t d"], Routing, Float[Array, "e t d"]]:
    """Routed experts (+ shared expert). Returns the block output, the routing and every expert's output.

    All experts run on all tokens and are combined with the dense gates: exact, shards trivially over
    the `expert` mesh axis, and calibration needs every expert's output anyway. The forward pass uses
    `moe_apply`, which can take the routed path instead. With `expert_dtype` the experts (routed and
    shared) run on x cast to it while the router sees x as given; the output comes back in x's dtype.
    """
    routing = router(params, p, cfg, x)
    xe = x if expert_dtype is None else x.astype(expert_dtype)
    y_all = all_expert_outputs(params, p, cfg, xe)
    if cfg.router_scales_input:  # Llama-4: expert e sees gate_e * x (0 for unrouted experts)
        scaled = xe[None] * routing.gates.T.astype(xe.dtype)[:, :, None]
        out = jnp.sum(all_expert_outputs(params, p, cfg, scaled), axis=0)
    else:
        out = jnp.einsum("etd,te->td", y_all, routing.gates.astype(y_all.dtype))
    shared = shared_expert(params, p, cfg, xe)
    out = out if shared is None else out + shared
    return out.astype(x.dtype), routing, y_all


def moe_apply(
    params: Params, p: str, cfg: MoEConfig, x: Float[Array, "t d"], *, dispatch: str = "auto"
) -> tuple[Float[Array, "t d"], Routing]:
    """The MoE block's output and routing, by the dense path (`moe_block`) or the routed one
    (`grape_jax.core.dispatch`: each token through its top-k experts only); `dispatch` as
    `dispatch.DISPATCHES` (static), 'auto' picks per backend and shape. A router that scales the experts'
    input (Llama-4) takes the routed path only at top-1, where the scaled input is one row per token."""
    num_experts, hidden, ffn = params[p + "w_gate"].shape
    kind = moe_dispatch.choose(
        dispatch, num_experts=num_experts, top_k=cfg.top_k, tokens=x.shape[0], hidden=hidden, ffn=ffn
    )
    if kind == "dense" or (cfg.router_scales_input and cfg.top_k != 1):
        out, routing, _ = moe_block(params, p, cfg, x)
        return out, routing
    routing = router(params, p, cfg, x)
    x_in, weights = x, routing.weights
    if cfg.router_scales_input:
        x_in, weights = x * weights.astype(x.dtype), jnp.ones_like(weights)
    out = moe_dispatch.routed_experts(
        params, p, cfg, x_in, routing.indices, weights, kind=kind, activation=lambda gate, up: swiglu(gate, up, cfg)
    )
    shared = shared_expert(params, p, cfg, x)
    return (out if shared is None else out + shared), routing


def moe_output(
    params: Params, p: str, cfg: MoEConfig, x: Float[Array, "t d"], *, dispatch: str = "auto"
) -> Float[Array, "t d"]:
    """The MoE block's output only (see `moe_apply`)."""
    return moe_apply(params, p, cfg, x, dispatch=dispatch)[0]


def layer_window(cfg: MoEConfig, layer: int) -> int | None:
    if cfg.layer_types is not None and cfg.layer_types[layer] == "sliding_attention":
        return cfg.sliding_window
    return None


def layer_chunk(cfg: MoEConfig, layer: int) -> int | None:
    if cfg.layer_types is not None and cfg.layer_types[layer] == "chunked_attention":
        return cfg.attention_chunk_size
    return None


def decoder_layer(
    params: Params,
    cfg: MoEConfig,
    layer: int,
    x: Float[Array, "b t d"],
    positions: Int[Array, "b t"],
    mask: Bool[Array, "b t"],
    *,
    moe_fn: Callable[[str, jax.Array, jax.Array], jax.Array] | None = None,
    dispatch: str = "auto",
) -> Float[Array, "b t d"]:
    """One pre-norm decoder layer. `moe_fn(prefix, h [b*t, d], mask [b*t]) -> out` replaces the MoE
    block (calibration uses it to accumulate statistics on the same pass); otherwise the block runs by
    `moe_output` with `dispatch`."""
    p = f"layers.{layer}."
    attn_mask = attention_mask(mask, sliding_window=layer_window(cfg, layer), chunk_size=layer_chunk(cfg, layer))
    h = norm(params, p + "attn_norm", cfg, x)
    x = x + attention(params, p + "attn.", cfg, h, positions, attn_mask, rope=cfg.layer_uses_rope(layer))
    h = norm(params, p + "mlp_norm", cfg, x)
    b, t, d = h.shape
    if cfg.num_experts[layer] == 0:
        return x + dense_mlp(params, p + "mlp.", cfg, h)
    flat = h.reshape(b * t, d)
    if moe_fn is None:
        out = moe_output(params, p + "mlp.", cfg, flat, dispatch=dispatch)
    else:
        out = moe_fn(p + "mlp.", flat, mask.reshape(b * t))
    return x + out.reshape(b, t, d)


def embed(params: Params, tokens: Int[Array, "b t"]) -> Float[Array, "b t d"]:
    return jnp.take(params["embed"], tokens, axis=0)


def head(params: Params, cfg: MoEConfig, x: Float[Array, "b t d"]) -> Float[Array, "b t v"]:
    x = norm(params, "final_norm", cfg, x)
    w = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    y = x @ w
    if "lm_head_bias" in params:
        y = y + params["lm_head_bias"]
    return y.astype(jnp.float32)


def default_positions(mask: Bool[Array, "b t"]) -> Int[Array, "b t"]:
    """Positions 0..t-1 for right-padded batches (padding sits after the real tokens)."""
    return jnp.broadcast_to(jnp.arange(mask.shape[1], dtype=jnp.int32), mask.shape)


def forward(
    params: Params,
    cfg: MoEConfig,
    tokens: Int[Array, "b t"],
    mask: Bool[Array, "b t"] | None = None,
    *,
    dispatch: str = "auto",
) -> Float[Array, "b t v"]:
    """Logits of a causal LM over right-padded token batches; `dispatch` (static) chooses the MoE
    blocks' path (`grape_jax.core.dispatch.DISPATCHES`)."""
    if mask is None:
        mask = jnp.ones(tokens.shape, dtype=bool)
    chex.assert_rank(tokens, 2)
    chex.assert_type(tokens, int)
    chex.assert_equal_shape([tokens, mask])
    positions = default_positions(mask)
    x = embed(params, tokens)
    for layer in range(cfg.num_layers):
        x = decoder_layer(params, cfg, layer, x, positions, mask, dispatch=dispatch)
    return head(params, cfg, x)
