"""The project's one conversion to JSON: every JSON file grape-jax writes is strict JSON.

Python's `json` writes `Infinity` and `NaN` for non-finite floats, which strict parsers (JavaScript,
`jq`, Go) refuse. `native` turns values into plain JSON types and writes a non-finite float as the
string "inf", "-inf" or "nan" (documented in DESIGN_NOTES.md), so a reader sees what it was, and
`dumps` refuses anything that would still not be strict.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

NON_FINITE = {math.inf: "inf", -math.inf: "-inf"}


def native(x: Any, default: Callable[[Any], Any] | None = None) -> Any:
    """`x` as plain JSON types (dicts with string keys, lists, str, int, float, bool, None); NumPy values
    become Python ones, tuples and sets lists, non-finite floats the strings "inf" / "-inf" / "nan";
    any other value goes through `default` (e.g. `str`), or is refused without one."""
    if isinstance(x, Mapping):
        return {str(k): native(v, default) for k, v in x.items()}
    if isinstance(x, list | tuple | set | frozenset):
        return [native(v, default) for v in x]
    if isinstance(x, np.ndarray):
        return native(x.tolist(), default)
    if isinstance(x, np.generic):
        return native(x.item(), default)
    if isinstance(x, float) and not math.isfinite(x):
        return "nan" if math.isnan(x) else NON_FINITE[x]
    if x is None or isinstance(x, str | int | float | bool):
        return x
    if default is None:
        raise TypeError(f"{type(x).__name__} is not JSON serialisable")
    return native(default(x))


def dumps(x: Any, *, default: Callable[[Any], Any] | None = None, **kwargs: Any) -> str:
    """Strict JSON text of `x` (through `native`; `kwargs` as for `json.dumps`, e.g. indent, sort_keys)."""
    return json.dumps(native(x, default), allow_nan=False, **kwargs)
