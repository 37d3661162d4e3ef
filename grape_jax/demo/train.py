"""Training a small MoE from scratch with optax (for the embedded demo model).

Next-token cross-entropy plus the Switch-Transformer load-balancing loss (E * Σ_i f_i P_i per MoE layer),
without which tiny MoEs collapse onto a few experts and pruning has nothing to show. Deterministic for
a seed on a given machine.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from grape_jax.core import transformer
from grape_jax.core.config import MoEConfig
from grape_jax.core.params import init_params


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    steps: int = 300
    batch_size: int = 16
    learning_rate: float = 3e-3
    warmup: int = 30
    weight_decay: float = 0.01
    aux_loss_coef: float = 0.02
    seed: int = 0
    init_scale: float = 0.02


def loss_fn(
    params: Mapping[str, jax.Array], cfg: MoEConfig, tokens: jax.Array, aux_coef: float, *, dispatch: str = "auto"
) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Mean next-token NLL + aux_coef * mean load-balancing loss over MoE layers; MoE blocks by
    `dispatch` (`grape_jax.core.dispatch.DISPATCHES`, static)."""
    mask = jnp.ones(tokens.shape, bool)
    positions = transformer.default_positions(mask)
    balance = []

    def moe_fn(prefix, h, m):
        out, routing = transformer.moe_apply(params, prefix, cfg, h, dispatch=dispatch)
        e = routing.gates.shape[-1]
        frac = jnp.mean(routing.selected.astype(jnp.float32), axis=0) / cfg.top_k
        prob = jnp.mean(jax.nn.softmax(routing.logits, axis=-1), axis=0)
        balance.append(e * jnp.sum(frac * prob))
        return out

    x = transformer.embed(params, tokens)
    for layer in range(cfg.num_layers):
        x = transformer.decoder_layer(params, cfg, layer, x, positions, mask, moe_fn=moe_fn)
    logits = transformer.head(params, cfg, x)[:, :-1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))
    aux = jnp.mean(jnp.stack(balance)) if balance else jnp.zeros(())
    return nll + aux_coef * aux, (nll, aux)


def train(
    cfg: MoEConfig,
    blocks: np.ndarray,
    *,
    options: TrainOptions = TrainOptions(),
    log: Callable[[str], None] = print,
) -> tuple[dict[str, jax.Array], list[float]]:
    """Train from random init on token blocks [n, T]; returns parameters and the NLL curve."""
    rng = np.random.default_rng(options.seed)
    params = {k: jnp.asarray(v) for k, v in init_params(cfg, seed=options.seed, scale=options.init_scale).items()}
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, options.learning_rate, options.warmup, max(options.steps, options.warmup + 1)
    )
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=options.weight_decay))
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, tokens):
        (_, (nll, aux)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, cfg, tokens, options.aux_loss_coef)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, nll, aux

    curve = []
    t0 = time.perf_counter()
    for i in range(options.steps):
        idx = rng.choice(blocks.shape[0], size=options.batch_size, replace=False)
        params, opt_state, nll, aux = step(params, opt_state, jnp.asarray(blocks[idx]))
        curve.append(float(nll))
        if i % 25 == 0 or i == options.steps - 1:
            log(f"step {i:4d}  nll {float(nll):.3f}  balance {float(aux):.3f}  {time.perf_counter() - t0:.0f}s")
    return params, curve
