"""Calibration statistics: the one record that calibration writes and every planner reads.

One `LayerStats` per MoE layer (dense layers have none), gathered in a `ModelStats`. Arrays are
host NumPy float64 so planners stay pure NumPy; the jitted accumulators live in
`grape_jax.calibration.calibrate` and are converted with `finalize`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

from grape_jax.base import jsonio
from grape_jax.base.atomic import atomic_write, atomic_write_text
from grape_jax.core.config import ExpertCountRule, MoEConfig

SIMILARITY_METRICS = ("cka", "cos_mean", "router", "weight")
SENSITIVITIES = ("sens_m", "sens_n", "sens_g")  # gradient sensitivities (calibration option `gradients`)


class StatsError(ValueError):
    """A stats file or stats record that cannot be used."""


@dataclasses.dataclass(frozen=True)
class LayerStats:
    """Routing and redundancy statistics of one MoE layer with `E` experts.

    freq[i]       fraction of tokens routed to expert i by the model's own router (sums to top_k)
    gate_mass[i]  mean routing weight of expert i over all tokens (0 where not routed)
    reap[i]       mean over tokens routed to i of gate_i(t) * ||y_i(t)||  (0 if never routed)
    sim[name]     [E, E] symmetric similarity, diagonal 1, for name in SIMILARITY_METRICS
    routed_m      [E, E] sum_t g_i(t) <y_i(t), y_j(t)>        (routed substitution moments;
    routed_n      [E, E] sum_t g_i(t) ||y_j(t)||^2              None when not collected)
    sens_m        [E, E] sum_t g_i² u_i u_j   with u_j(t) = dL/d(block output)(t) . y_j(t): gradient
    sens_n        [E, E] sum_t g_i² u_j²      sensitivities (`grape_jax.calibration.similarity`); None when
    sens_g        [E, E] sum_t g_i u_j        calibrated without gradients
    count_multiple  the layer's expert count must stay a multiple of this (group-limited routers: n_group)
    min_count       fewest experts the router can use (top_k; more for group-limited routers)
    """

    layer: int
    num_tokens: int
    top_k: int
    freq: np.ndarray
    gate_mass: np.ndarray
    reap: np.ndarray
    sim: Mapping[str, np.ndarray]
    routed_m: np.ndarray | None = None
    routed_n: np.ndarray | None = None
    sens_m: np.ndarray | None = None
    sens_n: np.ndarray | None = None
    sens_g: np.ndarray | None = None
    count_multiple: int = 1
    min_count: int = 0

    @property
    def num_experts(self) -> int:
        return int(self.freq.shape[0])

    @property
    def expert_rule(self) -> ExpertCountRule:
        """The expert counts this layer's router can keep (recorded by calibration from the config)."""
        return ExpertCountRule(self.top_k, max(self.min_count, self.top_k), self.count_multiple)

    @property
    def routing_share(self) -> np.ndarray:
        """Each expert's share of the layer's routed top-k slots (`freq / top_k`; sums to 1)."""
        return self.freq / self.top_k

    def sensitivities(self) -> dict[str, np.ndarray]:
        """The gradient sensitivities present (all three, or none when calibrated without gradients)."""
        return {name: getattr(self, name) for name in SENSITIVITIES if getattr(self, name) is not None}

    def similarity(self, metric: str) -> np.ndarray:
        if metric not in self.sim:
            raise StatsError(f"layer {self.layer}: similarity metric {metric!r} not in stats (have {sorted(self.sim)})")
        return self.sim[metric]

    def validate(self) -> None:
        e = self.num_experts
        if self.count_multiple < 1 or self.top_k < 1:
            raise StatsError(
                f"layer {self.layer}: count_multiple and top_k must be >= 1, got {self.count_multiple} and {self.top_k}"
            )
        problem = self.expert_rule.problem(e)
        if problem:
            raise StatsError(f"layer {self.layer} {problem}")
        vectors = {"freq": self.freq, "gate_mass": self.gate_mass, "reap": self.reap}
        matrices = dict(self.sim)
        if self.routed_m is not None:
            matrices["routed_m"] = self.routed_m
        if self.routed_n is not None:
            matrices["routed_n"] = self.routed_n
        matrices.update(self.sensitivities())
        for name, v in vectors.items():
            if v.shape != (e,):
                raise StatsError(f"layer {self.layer}: {name} has shape {v.shape}, expected ({e},)")
        for name, m in matrices.items():
            if m.shape != (e, e):
                raise StatsError(f"layer {self.layer}: {name} has shape {m.shape}, expected ({e}, {e})")
        for name, a in {**vectors, **matrices}.items():
            if not np.all(np.isfinite(a)):
                raise StatsError(f"layer {self.layer}: {name} contains NaN or inf")


@dataclasses.dataclass(frozen=True)
class ModelStats:
    """Statistics of every MoE layer of one model, plus free-form metadata (JSON-able)."""

    layers: tuple[LayerStats, ...]
    meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def fingerprint(self) -> str:
        """The calibration's identity (model, tokens, options) recorded by `calibrate`; '' if unknown."""
        return str(self.meta.get("fingerprint", ""))

    @property
    def model_fingerprint(self) -> str:
        """The fingerprint of the model the statistics were computed on; '' if unknown."""
        model = self.meta.get("model")
        return str(model.get("fingerprint", "")) if isinstance(model, Mapping) else ""

    def provenance(self) -> dict[str, Any]:
        """What a plan made from these statistics records of them (`Plan.made_from`)."""
        model = self.meta.get("model") if isinstance(self.meta.get("model"), Mapping) else {}
        run = {k: v for k, v in (self.meta.get("calibration") or {}).items() if k != "seconds"}  # not a timing
        return {
            "stats_fingerprint": self.fingerprint,
            "model_fingerprint": self.model_fingerprint,
            "model_source": model.get("source", ""),
            "data": self.meta.get("data"),
            "calibration": run,
        }

    def validate(self) -> None:
        if not self.layers:
            raise StatsError("stats hold no MoE layer")
        for layer in self.layers:
            layer.validate()

    def save(self, path: str | os.PathLike) -> None:
        """Write `path` (.npz) and `path` + '.json' (summary) atomically."""
        path = os.fspath(path)
        arrays: dict[str, np.ndarray] = {}
        header = []
        for n, ls in enumerate(self.layers):
            p = f"l{n}."
            arrays[p + "freq"] = ls.freq
            arrays[p + "gate_mass"] = ls.gate_mass
            arrays[p + "reap"] = ls.reap
            for name, m in ls.sim.items():
                arrays[p + "sim." + name] = m
            if ls.routed_m is not None:
                arrays[p + "routed_m"] = ls.routed_m
            if ls.routed_n is not None:
                arrays[p + "routed_n"] = ls.routed_n
            arrays.update({p + name: m for name, m in ls.sensitivities().items()})
            header.append(
                {
                    "layer": ls.layer,
                    "num_tokens": ls.num_tokens,
                    "top_k": ls.top_k,
                    "count_multiple": ls.count_multiple,
                    "min_count": ls.min_count,
                }
            )
        arrays["__header__"] = np.frombuffer(
            jsonio.dumps({"layers": header, "meta": dict(self.meta)}).encode(), dtype=np.uint8
        )
        atomic_write(path, lambda f: np.savez(f, **arrays))
        summary = {
            "meta": dict(self.meta),
            "sha256": file_sha256(path),
            "layers": [
                {
                    "layer": ls.layer,
                    "num_experts": ls.num_experts,
                    "num_tokens": ls.num_tokens,
                    "top_k": ls.top_k,
                    "count_multiple": ls.count_multiple,
                    "min_count": ls.min_count,
                    "freq": np.round(ls.freq, 6).tolist(),
                    "mean_offdiag_cka": _mean_offdiag(ls.sim.get("cka")),
                }
                for ls in self.layers
            ],
        }
        atomic_write_text(path + ".json", jsonio.dumps(summary, indent=1))

    @classmethod
    def load(cls, path: str | os.PathLike) -> ModelStats:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise StatsError(f"{path}: stats file not found")
        with open(path, "rb") as f:
            if f.read(4) != b"PK\x03\x04":
                raise StatsError(
                    f"{path}: not a grape-jax stats file (expected the .npz archive `grape calibrate` writes)"
                )
        try:  # arrays only: object arrays (pickles) are refused by allow_pickle=False
            with np.load(path, allow_pickle=False) as z:
                data = {k: z[k] for k in z.files}
        except (OSError, ValueError, zipfile.BadZipFile):
            raise StatsError(f"{path}: not a readable stats .npz archive (damaged, or holds non-array data)") from None
        if "__header__" not in data:
            raise StatsError(f"{path}: missing '__header__' entry; not a grape-jax stats file")
        try:
            header = json.loads(bytes(data["__header__"]).decode())
            header["layers"]
        except (ValueError, KeyError, TypeError):
            raise StatsError(f"{path}: '__header__' is not the JSON header grape-jax writes") from None
        layers = []
        for n, h in enumerate(header["layers"]):
            p = f"l{n}."
            sim = {k[len(p) + 4 :]: np.asarray(v, np.float64) for k, v in data.items() if k.startswith(p + "sim.")}
            layers.append(
                LayerStats(
                    layer=int(h["layer"]),
                    num_tokens=int(h["num_tokens"]),
                    top_k=int(h["top_k"]),
                    freq=np.asarray(data[p + "freq"], np.float64),
                    gate_mass=np.asarray(data[p + "gate_mass"], np.float64),
                    reap=np.asarray(data[p + "reap"], np.float64),
                    sim=sim,
                    routed_m=_opt(data.get(p + "routed_m")),
                    routed_n=_opt(data.get(p + "routed_n")),
                    **{name: _opt(data.get(p + name)) for name in SENSITIVITIES},
                    count_multiple=int(h.get("count_multiple", 1)),
                    min_count=int(h.get("min_count", 0)),
                )
            )
        stats = cls(layers=tuple(layers), meta=header.get("meta", {}))
        try:
            stats.validate()
        except StatsError as e:
            raise StatsError(f"{path}: {e}") from None
        return stats


def routing_entropy(layer: LayerStats) -> float:
    """Normalised entropy of the layer's routed top-k slots over its experts: H(freq / top_k) / log(E).

    1 means every expert receives the same share of the routed slots; values near 0 mean routing has
    collapsed onto few experts (what load balancing is meant to prevent). Experts with no share add 0."""
    share = np.asarray(layer.routing_share, np.float64)
    e = share.shape[0]
    if e < 2:
        raise StatsError(f"layer {layer.layer}: routing entropy needs at least 2 experts, got {e}")
    if np.any(share < 0) or not np.isclose(share.sum(), 1.0, atol=1e-6):
        raise StatsError(f"layer {layer.layer}: freq / top_k must be a distribution, sums to {share.sum():.6f}")
    nonzero = share[share > 0]
    return float(-np.sum(nonzero * np.log(nonzero)) / np.log(e))


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _opt(a: np.ndarray | None) -> np.ndarray | None:
    return None if a is None else np.asarray(a, np.float64)


def _mean_offdiag(m: np.ndarray | None) -> float | None:
    if m is None or m.shape[0] < 2:
        return None
    e = m.shape[0]
    return float((m.sum() - np.trace(m)) / (e * (e - 1)))


def neutral_stats(cfg: MoEConfig, *, gradients: bool = True) -> ModelStats:
    """Statistics with the model's MoE layers, expert counts and routing rules and arbitrary but valid
    values (seeded): planners run on them to check a request (method, options, budget against the
    floors) from config.json alone, before any weight is loaded or token calibrated. `gradients` False:
    without the gradient sensitivities, as a calibration without them would be."""
    rng = np.random.default_rng(0)
    layers = []
    for layer in cfg.moe_layers:
        e = cfg.num_experts[layer]
        y = rng.standard_normal((e, 8))
        gram = y @ y.T
        norm = np.sqrt(np.diag(gram))
        sim = np.clip(gram / np.outer(norm, norm), 0.0, 1.0)
        np.fill_diagonal(sim, 1.0)
        freq = np.full(e, cfg.top_k / e)
        layers.append(
            LayerStats(
                layer=layer,
                num_tokens=1,
                top_k=cfg.top_k,
                freq=freq,
                gate_mass=np.full(e, 1.0 / e),
                reap=np.ones(e),
                sim={m: sim for m in SIMILARITY_METRICS},
                routed_m=freq[:, None] * gram,
                routed_n=freq[:, None] * np.diag(gram)[None, :],
                sens_m=freq[:, None] * gram if gradients else None,
                sens_n=freq[:, None] * np.diag(gram)[None, :] if gradients else None,
                sens_g=np.outer(freq, y[:, 0]) if gradients else None,
                count_multiple=cfg.expert_count_multiple,
                min_count=cfg.min_routable_experts,
            )
        )
    return ModelStats(layers=tuple(layers), meta={"neutral": True})
