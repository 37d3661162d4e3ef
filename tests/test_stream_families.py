"""Layer streaming on every family (slow; `test_stream.py` covers mixtral, qwen2_moe, deepseek_v3 and
gpt_oss (MXFP4) on 1 and 8 devices in the default suite): the streamed statistics and gradient
sensitivities equal the resident ones on the other families, DeepSeek-V2 and DeepSeek-MoE and an FP8
source; the 'aligned' operator and an FP8 export give the resident run's export when streamed."""

from __future__ import annotations

import functools

import numpy as np
import pytest

from conversion.load import load_hf
from grape_jax.calibration.calibrate import calibrate
from grape_jax.calibration.options import CalibrationOptions
from grape_jax.core.sharding import make_mesh
from grape_jax.fit.operator import FitOptions
from grape_jax.merge.state import merge_model
from grape_jax.pipeline import save_hf
from grape_jax.planners import make_plan
from grape_jax.source import ModelSource
from grape_jax.streamed import merge_and_export
from tests import deepseek_reference as dsref
from tests.family_configs import NEW_CONFIGS
from tests.hf_models import build_model, random_tokens, save_model
from tests.test_deepseek_v2 import CONFIGS as DEEPSEEK_V2
from tests.test_families_prune import CONFIGS
from tests.test_fp8 import DEEPSEEK_V3_QUANT, load_file, write_fp8_checkpoint
from tests.test_stream import FAMILIES, assert_stats_close, streamed_stats

pytestmark = pytest.mark.slow

FP8_QUANT = {**DEEPSEEK_V3_QUANT, "weight_block_size": [8, 16]}


def _deepseek_moe(path: str) -> str:
    cfg = dsref.tiny_deepseek_config(num_hidden_layers=3, num_experts_per_tok=2)
    return dsref.save_checkpoint(path, cfg, dsref.random_weights(cfg, seed=1))


SOURCES = {
    **{
        name: functools.partial(lambda path, make: save_model(build_model(make(), seed=1), path), make=make)
        for name, make in CONFIGS.items()
        if name not in FAMILIES
    },
    **{
        f"deepseek_v2_{name}": functools.partial(
            lambda path, make: save_model(build_model(make(), seed=1), path), make=make
        )
        for name, make in DEEPSEEK_V2.items()
    },
    "deepseek_moe": _deepseek_moe,
    "minimax_m2_fp8": lambda path: write_fp8_checkpoint(
        build_model(NEW_CONFIGS["minimax_m2"](), seed=8), path, FP8_QUANT
    ),
}


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    made = {}

    def get(name: str) -> str:
        if name not in made:
            made[name] = SOURCES[name](str(tmp_path_factory.mktemp(name)))
        return made[name]

    return get


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_streamed_statistics_match_resident_on_every_family(name, source_dir):
    path = source_dir(name)
    model = load_hf(path)
    blocks = random_tokens(model.cfg.vocab_size, batch=6, seq=12, seed=2)
    options = CalibrationOptions(batch_size=4, token_chunk=16)
    want = calibrate(model, blocks, options=options, progress=False)
    assert all(ls.sens_m is not None for ls in want.layers)
    assert_stats_close(streamed_stats(path, blocks, options), want)


def _exports_equal(a: str, b: str) -> None:
    """Every tensor of the two exports bit for bit (FP8 and its scales included)."""
    ta, tb = load_file(f"{a}/model.safetensors"), load_file(f"{b}/model.safetensors")
    assert sorted(ta) == sorted(tb)
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and ta[key].shape == tb[key].shape, key
        np.testing.assert_array_equal(ta[key].view(np.uint8), tb[key].view(np.uint8), err_msg=key)


@pytest.mark.parametrize(
    "name,mesh,operator,quantize",
    [("minimax_m2_fp8", None, "freq", "fp8"), ("minimax_m2_fp8", "expert=4", "aligned", None)],
)
def test_streamed_merge_and_export_match_resident(name, mesh, operator, quantize, source_dir, tmp_path):
    """An FP8 source merged by averaging and exported as FP8 (fresh scales for the merged experts, the
    source's for the others), and the 'aligned' operator (permutations computed from each layer as it is
    read), streamed and resident."""
    path = source_dir(name)
    m = None if mesh is None else make_mesh(mesh)
    model = load_hf(path, mesh=m)
    blocks = random_tokens(model.cfg.vocab_size, batch=6, seq=12, seed=5)
    options = CalibrationOptions(batch_size=4, token_chunk=16, gradients=False)
    stats = calibrate(model, blocks, options=options, progress=False)
    plan = make_plan(stats, method="grape", per_layer=3, operator=operator, guard="none")
    assert any(len(g) > 1 for lp in plan.layers for g in lp.groups)  # something is averaged
    save = functools.partial(save_hf, max_shard_bytes=1 << 30, quantize=quantize)
    resident = save(merge_model(model, plan), str(tmp_path / "resident"))
    del model
    merge_and_export(
        ModelSource.open(path), plan, blocks, str(tmp_path / "streamed"), mesh=m,
        fit_options=FitOptions.like(options), work_dir=str(tmp_path / "work"), save=save,
    )  # fmt: skip
    _exports_equal(resident, str(tmp_path / "streamed"))
