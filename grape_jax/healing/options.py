"""How healing runs (`HealOptions`), in a module that imports nothing heavy: the command line's help
reads the defaults from here without importing JAX."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

TRAIN_MODES = ("routers", "merged", "all")
TEACHER_LOGITS = ("live", "cached")


@dataclasses.dataclass(frozen=True)
class HealOptions:
    """How healing runs.

    steps               optimizer steps (the schedule's horizon); None: as many as `max_minutes` allows,
                        estimated from the time of the first min(warmup, 5) steps (a warm-up step's rate does
                        not depend on the horizon) and then fixed (saved for a resume)
    max_minutes         stop when training (compile, steps, validation, saves) has taken this long
    batch_size          blocks per step (rounded up to a multiple of the data-parallel size)
    learning_rate       peak of the warm-up + cosine schedule (AdamW)
    warmup              linear warm-up steps from 0
    weight_decay        decoupled (AdamW) weight decay
    clip_norm           clip the gradient's global norm to this
    kl_weight, lm_weight  weights of the distillation KL and of the next-token NLL
    temperature         softmax temperature of the KL (scaled by temperature²)
    train               'routers' | 'merged' (routers + experts made by merging several) | 'all'
    seed                data order and the validation split
    val_blocks          training blocks held out to pick the best step (0: keep the last step)
    val_every           validate every this many steps (and at the last)
    checkpoint_every    with a resume directory: save every this many steps (0: never by count)
    checkpoint_seconds  with a resume directory: save at most this often (0: never by time)
    teacher_logits      'live' (the teacher runs in each step) | 'cached' (one pass before training)
    """

    steps: int | None = 200
    max_minutes: float | None = None
    batch_size: int = 8
    learning_rate: float = 3e-4
    warmup: int = 10
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    kl_weight: float = 1.0
    lm_weight: float = 0.0
    temperature: float = 1.0
    train: str = "all"
    seed: int = 0
    val_blocks: int = 8
    val_every: int = 50
    checkpoint_every: int = 0
    checkpoint_seconds: float = 60.0
    teacher_logits: str = "live"

    def __post_init__(self) -> None:
        def integer(name: str, least: int, *, optional: bool = False) -> None:
            value = getattr(self, name)
            if optional and value is None:
                return
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ValueError(f"heal option {name}: expected an integer >= {least}, got {value!r}")

        def number(name: str, *, positive: bool, optional: bool = False) -> None:
            value = getattr(self, name)
            if optional and value is None:
                return
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not ok or value < 0 or (positive and value == 0):
                raise ValueError(f"heal option {name}: expected a number {'>' if positive else '>='} 0, got {value!r}")

        integer("steps", 1, optional=True)
        number("max_minutes", positive=True, optional=True)
        if self.steps is None and self.max_minutes is None:
            raise ValueError("heal options: give steps or max_minutes (or both)")
        for name in ("batch_size", "val_every"):
            integer(name, 1)
        for name in ("warmup", "seed", "val_blocks", "checkpoint_every"):
            integer(name, 0)
        if self.steps is not None and self.warmup >= self.steps:
            raise ValueError(
                f"heal option warmup: {self.warmup} warm-up steps leave none of the {self.steps} steps "
                f"to decay; expected warmup < steps"
            )
        for name in ("learning_rate", "clip_norm", "temperature"):
            number(name, positive=True)
        for name in ("weight_decay", "kl_weight", "lm_weight", "checkpoint_seconds"):
            number(name, positive=False)
        if self.kl_weight == 0 and self.lm_weight == 0:
            raise ValueError("heal options kl_weight and lm_weight: both 0 leaves nothing to minimise")
        if self.train not in TRAIN_MODES:
            raise ValueError(f"heal option train: {self.train!r} unknown; expected one of {', '.join(TRAIN_MODES)}")
        if self.teacher_logits not in TEACHER_LOGITS:
            raise ValueError(f"heal option teacher_logits: {self.teacher_logits!r} unknown; expected live or cached")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
