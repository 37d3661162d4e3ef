"""Every JSON file the project writes must parse with a strict parser (no NaN / Infinity literals)."""

from __future__ import annotations

import json
import os


def _refuse(literal: str):
    raise ValueError(f"non-standard JSON literal {literal}")


def strict_load(path: str | os.PathLike):
    """`json.load` that refuses NaN, Infinity and -Infinity, as JavaScript, jq and Go do."""
    with open(path, encoding="utf-8") as f:
        return json.loads(f.read(), parse_constant=_refuse)


def check_json_tree(root: str | os.PathLike) -> list[str]:
    """Parse every *.json file under `root` strictly; returns their names (relative to `root`)."""
    found = []
    for directory, _, files in os.walk(root):
        for name in files:
            if name.endswith(".json"):
                path = os.path.join(directory, name)
                try:
                    strict_load(path)
                except ValueError as e:
                    raise AssertionError(f"{path}: not strict JSON ({e})") from None
                found.append(os.path.relpath(path, root))
    return found
