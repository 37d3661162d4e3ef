"""How calibration runs (`CalibrationOptions`) and what identifies a calibration (its fingerprint), with
the choices that follow from the options and the model: the compute dtype and the CKA mode."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Int

from grape_jax.calibration import similarity
from grape_jax.core.config import MoEConfig


@dataclasses.dataclass(frozen=True)
class CalibrationOptions:
    """How calibration runs (only compute_dtype changes the statistics beyond fp32 summation order).

    batch_size          blocks per jitted step (rounded up to a multiple of the data-parallel size)
    token_chunk         tokens per expert chunk inside a step (bounds memory)
    cka                 'exact' | 'minibatch' | 'auto' (see `grape_jax.calibration.similarity`)
    checkpoint_seconds  with a resume directory: save the accumulators at most this often (0: never by time)
    checkpoint_every    with a resume directory: also save every this many batches (0: never by count)
    compute_dtype       dtype of the experts' matmuls (None: the checkpoint's on accelerators, float32 on CPU;
                        the statistics are fp32 sums either way: module docstring)
    gradients           also accumulate the gradient sensitivities (one backward pass per batch; module
                        docstring); the statistics then hold sens_m/sens_n/sens_g
    """

    batch_size: int = 4
    token_chunk: int = 512
    cka: str = "auto"
    exact_cka_max_bytes: int = 1 << 30
    checkpoint_seconds: float = 60.0
    checkpoint_every: int = 0
    compute_dtype: str | None = None
    gradients: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.gradients, bool):
            raise ValueError(f"calibration option gradients: expected True or False, got {self.gradients!r}")
        for name in ("batch_size", "token_chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"calibration option {name}: expected an integer >= 1, got {value!r}")
        if self.cka not in ("auto", *similarity.CKA_MODES):
            raise ValueError(f"calibration option cka: {self.cka!r} unknown; expected auto, exact or minibatch")
        if not self.checkpoint_seconds >= 0:
            raise ValueError(f"calibration option checkpoint_seconds: expected >= 0, got {self.checkpoint_seconds!r}")
        if (
            isinstance(self.checkpoint_every, bool)
            or not isinstance(self.checkpoint_every, int)
            or self.checkpoint_every < 0
        ):
            raise ValueError(
                f"calibration option checkpoint_every: expected an integer >= 0, got {self.checkpoint_every!r}"
            )
        if self.compute_dtype is not None and self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(
                f"calibration option compute_dtype: {self.compute_dtype!r} unknown; expected one of "
                f"{COMPUTE_DTYPES} (or None: the checkpoint's dtype on accelerators, float32 on CPU)"
            )


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def resolve_compute_dtype(params: Mapping[str, jax.Array], options: CalibrationOptions) -> str:
    """The dtype the calibration forward runs in: `options.compute_dtype` if given, else the routed
    experts' parameter dtype on accelerators and float32 on CPU devices."""
    if options.compute_dtype is not None:
        return options.compute_dtype
    experts = [v for k, v in params.items() if k.endswith(".mlp.w_gate") and v.ndim == 3]
    sample = experts[0] if experts else next(iter(params.values()))
    devices = sample.sharding.device_set if hasattr(sample, "sharding") else set(jax.devices()[:1])
    if all(d.platform == "cpu" for d in devices):
        return "float32"
    name = jnp.dtype(sample.dtype).name
    return name if name in COMPUTE_DTYPES else "float32"


def choose_cka_mode(cfg: MoEConfig, options: CalibrationOptions) -> str:
    """'exact' when the d x d cross-moments of every expert pair fit the byte budget, else 'minibatch'."""
    if options.cka != "auto":
        return options.cka
    worst = max(similarity.exact_cka_bytes(e, cfg.hidden_size) for e in cfg.num_experts if e)
    return "exact" if worst * len(cfg.moe_layers) <= options.exact_cka_max_bytes else "minibatch"


def run_record(
    blocks: Int[np.ndarray, "n seq"], *, cka: str, token_chunk: int, compute_dtype: str, gradients: bool, seconds: float
) -> dict:
    """What statistics record of the calibration run (resident or layer-streamed alike): the blocks' shape
    and sha256 (a fit plan is merged on exactly these), the accumulator choices and the time taken."""
    return {
        "num_blocks": int(blocks.shape[0]),
        "seq_len": int(blocks.shape[1]),
        "num_tokens": int(blocks.size),
        "blocks_sha256": blocks_sha256(blocks),
        "cka_mode": cka,
        "token_chunk": token_chunk,
        "compute_dtype": compute_dtype,
        "gradients": gradients,
        "seconds": round(seconds, 3),
    }


def blocks_sha256(blocks: Int[np.ndarray, "n seq"]) -> str:
    """sha256 of token blocks as contiguous int32 ids: what statistics, plans and the fit record of the
    blocks they were computed on (a fit plan is merged on the same blocks: `grape_jax.fit.operator`)."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(blocks), np.int32).tobytes()).hexdigest()


def calibration_fingerprint(
    model_fingerprint: str, cfg: MoEConfig, blocks: Int[np.ndarray, "n seq"], options: CalibrationOptions
) -> str:
    """The identity of a calibration: the model's weights (`ModelInfo.fingerprint`), its architecture, the
    token blocks, the options that shape the accumulators (gradient sensitivities too) and the compute
    dtype (an explicit one, or the backend that picks it). Statistics record it; a resumed calibration and
    a re-run that wants to reuse saved statistics must match it."""
    blocks = np.ascontiguousarray(blocks, np.int32)
    h = hashlib.sha256(blocks.tobytes())
    h.update(
        json.dumps(
            [
                model_fingerprint,
                list(blocks.shape),
                cfg.to_dict(),
                options.batch_size,
                options.token_chunk,
                choose_cka_mode(cfg, options),
                options.compute_dtype or jax.default_backend(),
                options.gradients,
            ],
            sort_keys=True,
        ).encode()
    )
    return h.hexdigest()
