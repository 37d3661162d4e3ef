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

import ml_dtypes  # noqa: F401  (registers bfloat16 with NumPy)
import numpy as np

from conversion.quant.mxfp4 import decode_mxfp4
from conversion.transpose import transposed
from grape_jax.core.config import MoEConfig
from grape_jax.core.params import ParamSpec, param_specs

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
        return transposed(src(tuple(reversed(index))))

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        return transposed(ours)


IDENTITY, TRANSPOSE = Identity(), Transpose()


@dataclasses.dataclass(frozen=True)
class Interleaved:
    """One of `parts` tensors interleaved along the HF tensor's last axis: `hf[..., part::parts] == ours`.

    GPT-OSS fuses gate and up as alternating columns of `gate_up_proj` (`[..., ::2]` gate,
    `[..., 1::2]` up). Several of our tensors then share one HF key: export groups them with
    `hf_tensors` and writes the HF tensor with `combine`.
    """

    part: int
    parts: int = 2

    def hf_shape(self, ours: tuple[int, ...]) -> tuple[int, ...]:
        return (*ours[:-1], ours[-1] * self.parts)

    def read(self, src: SliceReader, index: Index) -> np.ndarray:
        *lead, last = index
        raw = src((*lead, slice(last.start * self.parts, last.stop * self.parts)))
        return np.ascontiguousarray(raw[..., self.part :: self.parts])

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        raise ConversionError("an interleaved part is written with the other parts (see hf_tensors)")

    def combine(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        """The HF tensor from all parts, in `part` order."""
        first = parts[0]
        out = np.empty((*first.shape[:-1], first.shape[-1] * self.parts), dtype=first.dtype)
        for i, x in enumerate(parts):
            out[..., i :: self.parts] = x
        return out


@dataclasses.dataclass(frozen=True)
class Concatenated:
    """One of `parts` equal blocks of the HF tensor's last axis: `hf[..., part*n:(part+1)*n] == ours`
    with `n = size` (Llama-4 stores `gate_up_proj [E, d, 2f]` as gate then up). Export writes the
    HF tensor from all parts with `combine`, as for `Interleaved`."""

    part: int
    size: int
    parts: int = 2

    def hf_shape(self, ours: tuple[int, ...]) -> tuple[int, ...]:
        return (*ours[:-1], ours[-1] * self.parts)

    def read(self, src: SliceReader, index: Index) -> np.ndarray:
        *lead, last = index
        offset = self.part * self.size
        return src((*lead, slice(offset + last.start, offset + last.stop)))

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        raise ConversionError("a concatenated part is written with the other parts (see hf_tensors)")

    def combine(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate(list(parts), axis=-1)


@dataclasses.dataclass(frozen=True)
class LeadingUnitAxis:
    """HF stores our tensor with an extra leading axis of 1 (ERNIE's `e_score_correction_bias [1, E]`)."""

    def hf_shape(self, ours: tuple[int, ...]) -> tuple[int, ...]:
        return (1, *ours)

    def read(self, src: SliceReader, index: Index) -> np.ndarray:
        return src((slice(0, 1), *index))[0]

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        return ours[None]


@dataclasses.dataclass(frozen=True)
class Mxfp4:
    """Our `[E, in, out]` expert tensor from MXFP4 `<key>_blocks` `[E, out', in/32, 16]` and
    `<key>_scales` `[E, out', in/32]` (`out' = out * parts`; `part` picks interleaved columns as in
    `Interleaved`). Decoded per requested expert slice with `conversion.quant.mxfp4` (transformers' values)
    to `dtype` (GPT-OSS's bf16). Read-only: exports write the dequantised tensor."""

    part: int = 0
    parts: int = 1
    dtype: str = "bfloat16"

    def sources(self, key: str) -> tuple[str, ...]:
        return (key + "_blocks", key + "_scales")

    def source_shapes(self, ours: tuple[int, ...]) -> tuple[tuple[int, ...], ...]:
        e, d_in, d_out = ours
        rows, groups = d_out * self.parts, d_in // 32
        return (e, rows, groups, 16), (e, rows, groups)

    def value_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    def hf_shape(self, ours: tuple[int, ...]) -> tuple[int, ...]:
        return (*ours[:-1], ours[-1] * self.parts)

    def read_sources(self, srcs: Sequence[SliceReader], index: Index) -> np.ndarray:
        experts, cols, rows = index
        lo, hi = rows.start * self.parts, rows.stop * self.parts
        blocks = srcs[0]((experts, slice(lo, hi), slice(None), slice(None)))
        scales = srcs[1]((experts, slice(lo, hi), slice(None)))
        dense = decode_mxfp4(blocks, scales, dtype=self.value_dtype())  # [e, in, rows]
        return np.ascontiguousarray(dense[:, cols, self.part :: self.parts])

    def to_hf(self, ours: np.ndarray) -> np.ndarray:
        raise ConversionError("MXFP4 tensors are exported dequantised; bind without hf_config")


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

    def hf_sources(self) -> dict[str, tuple[int, ...]]:
        """Every checkpoint tensor this parameter is read from, with its expected shape."""
        if not hasattr(self.transform, "sources"):
            return {key: self.hf_shape() for key in self.hf_keys}
        shape = self.spec.shape[1:] if self.per_expert else self.spec.shape
        shapes = self.transform.source_shapes(tuple(shape))
        return {k: sh for key in self.hf_keys for k, sh in zip(self.transform.sources(key), shapes)}

    def value_dtype(self, stored: Any) -> np.dtype:
        """dtype of the values read (the stored one unless the transform decodes, e.g. MXFP4)."""
        if hasattr(self.transform, "value_dtype"):
            return self.transform.value_dtype()
        return np.dtype(stored)

    def read(self, open_key: Callable[[str], SliceReader], index: Index) -> np.ndarray:
        """Slice `index` (normalised slices, our layout) read from the checkpoint: per-expert keys
        are read one expert at a time and stacked; multi-source transforms get all their readers."""

        def one(key: str, idx: Index) -> np.ndarray:
            if hasattr(self.transform, "sources"):
                readers = [open_key(k) for k in self.transform.sources(key)]
                return self.transform.read_sources(readers, idx)
            return self.transform.read(open_key(key), idx)

        if not self.per_expert:
            return one(self.hf_keys[0], index)
        experts, rest = index[0], index[1:]
        return np.stack([one(self.hf_keys[e], rest) for e in range(experts.start, experts.stop)])


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """One tensor of an export and the parameter slices it is made of (one, or several fused)."""

    key: str
    shape: tuple[int, ...]
    parts: tuple[tuple[Binding, int | None], ...]  # (binding, expert index for per-expert keys)

    def produce(self, read_ours: Callable[[str, int | None], np.ndarray]) -> np.ndarray:
        """The HF tensor; `read_ours(name, expert)` returns our parameter (or one expert of it)."""
        arrays = [read_ours(b.name, e) for b, e in self.parts]
        if len(self.parts) == 1 and not hasattr(self.parts[0][0].transform, "combine"):
            return self.parts[0][0].transform.to_hf(arrays[0])
        return self.parts[0][0].transform.combine(arrays)


def hf_tensors(bindings: Mapping[str, Binding]) -> list[HFTensor]:
    """The export's HF tensors in a stable order, grouping parameters that share one HF key.

    `conversion/export.py` writes one entry per `HFTensor` (shape `.shape`, dtype of its parameters)
    and fills it with `.produce(read_ours)`.
    """
    grouped: dict[str, list[tuple[Binding, int | None]]] = {}
    for b in bindings.values():
        for e, key in enumerate(b.hf_keys):
            grouped.setdefault(key, []).append((b, e if b.per_expert else None))
    out = []
    for key, parts in grouped.items():
        if len(parts) > 1:
            transforms = [b.transform for b, _ in parts]
            if not all(hasattr(t, "combine") for t in transforms) or sorted(t.part for t in transforms) != list(
                range(transforms[0].parts)
            ):
                raise ConversionError(
                    f"HF tensor {key!r} is bound by several parameters that "
                    f"do not form one interleaved group: {[b.name for b, _ in parts]}"
                )
            parts.sort(key=lambda be: be[0].transform.part)
        out.append(HFTensor(key, tuple(parts[0][0].hf_shape()), tuple(parts)))
    return out


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
    # Rules for a quantised checkpoint (`quantization_config` in config.json), read-only; None: refused.
    quantized_rules: Callable[[MoEConfig, Mapping[str, Any]], Sequence[KeyRule]] | None = None
    # transformers ships a class for `architectures[0]` (else loading needs the checkpoint's own code)
    in_transformers: bool = True
    # The routing rule in words (`grape families`).
    routing: str = ""
    # Exports are written as this family (Llama-4's multimodal checkpoints export their text model).
    export_as: str | None = None


def _instantiate(pattern: str, **values: int) -> str:
    return pattern.format(**values)


def _compile(pattern: str) -> re.Pattern:
    body = re.escape(pattern).replace(r"\{l\}", r"(?P<l>\d+)")
    return re.compile("^" + body + "$")


def quant_method(hf_config: Mapping[str, Any] | None) -> str | None:
    quant = None if hf_config is None else hf_config.get("quantization_config")
    return quant.get("quant_method") if quant else None


def family_rules(family: Family, cfg: MoEConfig, hf_config: Mapping[str, Any] | None = None) -> list[KeyRule]:
    """The family's table; for a checkpoint whose config.json has a `quantization_config`, the
    family's quantised table (or an error naming what is supported). FP8 block quantisation reads
    through the plain table (`bind` then swaps in the dequantising transform where the checkpoint
    holds scales)."""
    quant = None if hf_config is None else hf_config.get("quantization_config")
    if not quant or quant.get("quant_method") == "fp8":
        return list(family.rules(cfg))
    if family.quantized_rules is None:
        raise ConversionError(
            f"config.json: quantization_config {quant.get('quant_method')!r} is not supported for "
            f"family {family.name}; convert a bf16/fp32 checkpoint"
        )
    return list(family.quantized_rules(cfg, quant))


def bind(
    family: Family,
    cfg: MoEConfig,
    *,
    hf_config: Mapping[str, Any] | None = None,
) -> dict[str, Binding]:
    """Bind every parameter of `cfg`'s table to its HF key(s); each parameter exactly once.

    Pass the checkpoint's `hf_config` when *reading* a checkpoint whose family has a quantised table
    (MXFP4); export binds without it and writes the dequantised layout. FP8 block quantisation binds
    through the plain table: `conversion.quant.read_bindings` (what loading uses) then swaps in the
    dequantising reads."""
    specs = param_specs(cfg)
    bindings: dict[str, Binding] = {}
    rules = family_rules(family, cfg, hf_config)
    compiled = [(rule, _compile(rule.ours)) for rule in rules]
    for name, spec in specs.items():
        matches = [(rule, m) for rule, rx in compiled if (m := rx.match(name)) is not None]
        if len(matches) != 1:
            raise ConversionError(
                f"family {family.name}: parameter {name!r} matches {len(matches)} key rules, expected exactly 1"
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


def require(hf: Mapping[str, Any], key: str) -> Any:
    if key not in hf or hf[key] is None:
        raise ConversionError(f"config.json: required field {key!r} is missing")
    return hf[key]
