"""A model path opened once: whether it is a Hugging Face directory or a grape checkpoint, its
architecture, its provenance and fingerprint, where its tokenizer lives, and how to load it.

Every job starts from one `ModelSource`, so "checkpoint or HF directory?" is decided in one place and
config.json / grape.json are read once, before any weight is loaded.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from jax.sharding import Mesh

from conversion.checkpoint import META_FILE, checkpoint_config, read_checkpoint_meta, restore_checkpoint
from conversion.families.base import ConversionError
from conversion.load import HFReader, family_of, load_hf, open_hf, provenance_of, read_hf_config
from grape_jax.core.config import MoEConfig
from grape_jax.core.model import ModelInfo, MoEModel
from grape_jax.core.sharding import DEFAULT_RULES, ShardingRules


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """One model on disk (`open` it; do not construct directly).

    path          the absolute directory
    is_checkpoint a grape (Orbax) checkpoint rather than a Hugging Face directory
    config        the architecture, from config.json or the checkpoint's metadata (no weights read)
    meta          the checkpoint's metadata (None for HF directories)
    """

    path: str
    is_checkpoint: bool
    config: MoEConfig
    meta: dict[str, Any] | None
    _provenance: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def open(cls, path: str | os.PathLike) -> ModelSource:
        """Read what a path holds from its metadata alone; a one-line error for anything else."""
        path = os.path.abspath(os.fspath(path))
        if not os.path.isdir(path):
            what = "does not exist" if not os.path.exists(path) else "is not a directory"
            raise ConversionError(f"{path}: {what}; expected a Hugging Face model directory or a grape checkpoint")
        if os.path.isfile(os.path.join(path, META_FILE)):
            return cls(path, True, checkpoint_config(path), read_checkpoint_meta(path))
        hf = read_hf_config(path)
        return cls(path, False, family_of(hf, source=os.path.join(path, "config.json")).config_from_hf(hf), None)

    def provenance(self, *, dtype: Any = None) -> list[dict[str, Any]]:
        """The provenance `load(dtype=dtype).info` will have, without loading any weight (computed once
        per dtype: for an HF directory it reads sampled bytes of every tensor)."""
        key = str(dtype)
        if key not in self._provenance:
            if self.is_checkpoint:
                self._provenance[key] = list(self.meta.get("provenance") or [])
            else:
                self._provenance[key] = provenance_of(self.path, dtype)
        return [dict(r) for r in self._provenance[key]]

    def fingerprint(self, *, dtype: Any = None) -> str:
        """The fingerprint `load(dtype=dtype).info.fingerprint` will have: the one the statistics, plans,
        recipes and model cards of this model record."""
        return ModelInfo.create(provenance=self.provenance(dtype=dtype)).fingerprint

    @property
    def tokenizer_dir(self) -> str:
        """Where the tokenizer lives: the HF directory itself, or a checkpoint's source directory."""
        if not self.is_checkpoint:
            return self.path
        source = self.meta.get("source") or ""
        if not os.path.isdir(source):
            raise ConversionError(f"{self.path}: its source directory {source!r} (which holds the tokenizer) is gone")
        return source

    def load(self, *, mesh: Mesh | None = None, rules: ShardingRules = DEFAULT_RULES, dtype: Any = None) -> MoEModel:
        """The model on `mesh`: an HF directory streamed and sharded, or a checkpoint restored."""
        if self.is_checkpoint:
            if dtype is not None:
                raise ConversionError(
                    f"{self.path}: a grape checkpoint keeps its stored dtypes; dtype applies to HF directories"
                )
            return restore_checkpoint(self.path, mesh=mesh, rules=rules)
        return load_hf(self.path, mesh=mesh, rules=rules, dtype=dtype)

    def reader(self, *, mesh: Mesh | None = None, rules: ShardingRules = DEFAULT_RULES) -> HFReader:
        """The HF directory opened to read any subset of its parameters onto `mesh` (layer streaming);
        a grape checkpoint is refused (it is restored whole)."""
        if self.is_checkpoint:
            raise ConversionError(
                f"{self.path}: a grape checkpoint is restored whole; layer streaming reads HF directories"
            )
        return open_hf(self.path, mesh=mesh, rules=rules)

    def model_info(self) -> ModelInfo:
        """The `info` the loaded model has (family, source, config.json, provenance), without loading it."""
        if self.is_checkpoint:
            raise ConversionError(f"{self.path}: a grape checkpoint's info is restored with it")
        hf = read_hf_config(self.path)
        family = family_of(hf, source=os.path.join(self.path, "config.json"))
        return ModelInfo.create(family=family.name, source=self.path, hf_config=hf, provenance=self.provenance())
