"""Strict JSON: what base.jsonio writes parses with a strict parser, and the checker the pipeline tests
use (tests/strict_json.py) refuses Python's non-standard literals."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from grape_jax.base import jsonio
from grape_jax.base.atomic import atomic_write_json
from tests.strict_json import check_json_tree, strict_load


def test_non_finite_floats_are_written_as_strings(tmp_path):
    value = {"ridge": [math.inf, 1e-3], "low": -math.inf, "nan": np.float32("nan"), "n": np.int64(3)}
    atomic_write_json(tmp_path / "a.json", value)
    assert strict_load(tmp_path / "a.json") == {"ridge": ["inf", 0.001], "low": "-inf", "nan": "nan", "n": 3}
    assert json.loads(jsonio.dumps(value)) == strict_load(tmp_path / "a.json")


def test_the_checker_refuses_python_literals(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "ok.json").write_text('{"a": 1}')
    assert check_json_tree(tmp_path) == ["sub/ok.json"]
    (tmp_path / "bad.json").write_text(json.dumps({"ridge": math.inf}))  # Python writes Infinity
    with pytest.raises(AssertionError, match="not strict JSON"):
        check_json_tree(tmp_path)
