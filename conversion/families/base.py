"""What a model family declares, once, for loading and export alike.

A family is its HF config translation plus one table of `KeyRule`s: (our parameter pattern, HF key
pattern, transform). `{l}` is the decoder layer, `{e}` a routed expert: a rule whose HF pattern holds
`{e}` stacks E per-expert HF tensors into our leading `experts` axis. Loading reads slices through
`Transform.read`; export writes through `Transform.to_hf`, so both directions come from the same row.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from grape_jax.config import MoEConfig
from grape_jax.params import ParamSpec, param_specs

Index = tuple[slice, ...]
SliceReader = Callable[[Index], np.ndarray]


class ConversionError(ValueError):
    """A checkpoint or config that does not match what the family table expects."""


class Transform(Protocol):
    """How one of our tensors relates to one HF tensor (per expert, for stacked rules)."""

    def hf_shape(self, ours: tuple[int, ...]) -> tuple[int, ...]: ...

    def read(self, src: SliceReader, index: Index) -> np.ndarray: ...

    def to_hf(self, ours: np.ndarray) -> np.ndarray: ...


@dataclasses.dataclass(frozen=True)
class Identity:
    def hf_shape(self, ours: tuple[int, ...]) -> tuple[int, ...]:
        return ours

    def read(self, src: SliceReader, index: Index) -> np.ndarray:
        return src(index)

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        return ours


@dataclasses.dataclass(frozen=True)
class Transpose:
    """HF linear weights are [out, in]; ours are [in, out]."""

    def hf_shape(self, ours: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(reversed(ours))

    def read(self, src: SliceReader, index: Index) -> np.ndarray:
        return np.ascontiguousarray(src(tuple(reversed(index))).T)

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(ours.T)


IDENTITY, TRANSPOSE = Identity(), Transpose()


@dataclasses.dataclass(frozen=True)
class KeyRule:
    ours: str
    hf: str
    transform: Transform = IDENTITY

    @property
    def per_expert(self) -> bool:
        return "{e}" in self.hf


@dataclasses.dataclass(frozen=True)
class Binding:
    """One of our parameters bound to its HF tensor(s)."""

    name: str
    spec: ParamSpec
    hf_keys: tuple[str, ...]  # one key, or one per expert
    transform: Transform
    per_expert: bool

    def hf_shape(self) -> tuple[int, ...]:
        shape = self.spec.shape[1:] if self.per_expert else self.spec.shape
        return self.transform.hf_shape(tuple(shape))


@dataclasses.dataclass(frozen=True)
class Family:
    """A supported HF architecture: config translation both ways and the key table."""

    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    config_from_hf: Callable[[Mapping[str, Any]], MoEConfig]
    config_to_hf: Callable[[MoEConfig, Mapping[str, Any]], dict[str, Any]]
    rules: Callable[[MoEConfig], Sequence[KeyRule]]
    experts_config_key: str


def _instantiate(pattern: str, **values: int) -> str:
    return pattern.format(**values)


def _compile(pattern: str) -> re.Pattern:
    body = re.escape(pattern).replace(r"\{l\}", r"(?P<l>\d+)")
    return re.compile("^" + body + "$")


def bind(family: Family, cfg: MoEConfig) -> dict[str, Binding]:
    """Bind every parameter of `cfg`'s table to its HF key(s); each parameter exactly once."""
    specs = param_specs(cfg)
    bindings: dict[str, Binding] = {}
    rules = list(family.rules(cfg))
    compiled = [(rule, _compile(rule.ours)) for rule in rules]
    for name, spec in specs.items():
        matches = [(rule, m) for rule, rx in compiled if (m := rx.match(name)) is not None]
        if len(matches) != 1:
            raise ConversionError(
                f"family {family.name}: parameter {name!r} matches {len(matches)} key rules, "
                f"expected exactly 1"
            )
        rule, m = matches[0]
        values = {k: int(v) for k, v in m.groupdict().items()}
        if rule.per_expert:
            if spec.expert_axis != 0:
                raise ConversionError(f"{name}: per-expert rule needs experts as the first axis")
            keys = tuple(_instantiate(rule.hf, e=e, **values) for e in range(spec.shape[0]))
        else:
            keys = (_instantiate(rule.hf, **values),)
        bindings[name] = Binding(name, spec, keys, rule.transform, rule.per_expert)
    return bindings


def hf_layer_types(hf: Mapping[str, Any], num_layers: int) -> tuple[str, ...] | None:
    types = hf.get("layer_types")
    return None if types is None else tuple(types)[:num_layers]


def rope_theta(hf: Mapping[str, Any], default: float = 10000.0) -> float:
    """`rope_theta` lives in `rope_parameters` in transformers 5 configs, at top level before."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ("default", None):
        raise ConversionError(
            f"config.json: rope_type {rope_type!r} is not supported yet (only 'default')"
        )
    return float(params.get("rope_theta", hf.get("rope_theta", default)))


def require(hf: Mapping[str, Any], key: str) -> Any:
    if key not in hf or hf[key] is None:
        raise ConversionError(f"config.json: required field {key!r} is missing")
    return hf[key]
