"""The README's Python example runs as written, and the API it shows is what `grape_jax` exports."""

from __future__ import annotations

import os
import re

import numpy as np
import pytest
from flax import nnx

import grape_jax
from grape_jax import api
from grape_jax.base.atomic import OutputExistsError

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")


def readme_example() -> str:
    text = open(README, encoding="utf-8").read()
    match = re.search(r"<!-- readme-example -->\n```python\n(.*?)```", text, re.S)
    assert match, "README.md has no python block after <!-- readme-example -->"
    return match.group(1)


def test_readme_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(readme_example(), "README.md", "exec"), scope)  # noqa: S102 - the file is ours
    pruned, shapes, new_state = scope["pruned"], scope["shapes"], scope["new_state"]
    assert sum(pruned.cfg.num_experts) == sum(scope["model"].cfg.num_experts) - 2 * len(pruned.cfg.moe_layers)
    assert os.path.isfile(tmp_path / "demo-pruned" / "recipe.json")
    flat_shapes = {".".join(map(str, k)): v.get_value().shape for k, v in nnx.to_flat_state(shapes)}
    for name, value in grape_jax.param_view(pruned).items():
        assert flat_shapes[name] == value.shape, name
    jitted = {".".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(new_state)}
    for name, value in grape_jax.param_view(pruned).items():
        np.testing.assert_array_equal(np.asarray(jitted[name]), np.asarray(value), err_msg=name)
    merged, blocks = scope["merged"], scope["blocks"]
    assert merged.cfg == pruned.cfg and merged.info == pruned.info
    np.testing.assert_array_equal(np.asarray(merged(blocks[:2])), np.asarray(scope["logits"]))
    # the original graph definition under the merged state: one line naming the layer and both counts
    wrong = nnx.merge(scope["graphdef"], new_state)
    layer = next(lp for lp in scope["plan"].layers if lp.num_kept < lp.num_experts_before)
    want = (
        f"layer {layer.layer}: the module's config has {layer.num_experts_before} experts but its "
        f"parameters hold {layer.num_kept}"
    )
    with pytest.raises(ValueError, match=want):
        wrong(blocks[:2])
    with pytest.raises(ValueError, match=want):
        grape_jax.save_hf(wrong, tmp_path / "wrong")
    assert not os.path.exists(tmp_path / "wrong")
    # the API's own words: overwrite=True, not the command line's --overwrite
    with pytest.raises(OutputExistsError, match=r"already exists; pass overwrite=True to replace it$"):
        grape_jax.save_hf(pruned, "demo-pruned")
    # a fit plan without its inputs is refused (never merged as another operator)
    with pytest.raises(ValueError, match=r"inputs=gj\.fit_inputs"):
        grape_jax.merge_state(scope["state"], scope["plan"])


def test_public_names_are_the_api():
    assert tuple(sorted(grape_jax.PUBLIC)) == tuple(sorted(api.__all__))
    for name in grape_jax.PUBLIC:
        assert getattr(grape_jax, name) is getattr(api, name)
