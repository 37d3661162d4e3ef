"""Layer streaming gives the resident run's answers: statistics and gradient sensitivities (fp32, within
1e-5 relative), the plan, the fit and the export, on several families, on 1 and 8 simulated devices;
a streamed calibration resumes from its last finished layer."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from conversion.load import load_hf, open_hf
from grape_jax.calibration.calibrate import calibrate
from grape_jax.calibration.options import CalibrationOptions
from grape_jax.calibration.stats import SENSITIVITIES, ModelStats
from grape_jax.core.sharding import make_mesh
from grape_jax.source import ModelSource
from grape_jax.stream.layers import canonical_layer, head_names, layer_names
from grape_jax.stream.run import StreamInterrupted, calibrate_streamed
from tests.hf_models import build_model, random_tokens, save_model, tiny_mixtral_config
from tests.test_families import HF_CONFIGS, _mxfp4_checkpoint
from tests.test_families_prune import CONFIGS

FAMILIES = {
    "mixtral": lambda: tiny_mixtral_config(num_local_experts=8, num_hidden_layers=3),
    "qwen2_moe": HF_CONFIGS["qwen2_moe"],  # dense first layer, shared expert with a gate
    "deepseek_v3": CONFIGS["deepseek_v3"],  # MLA, dense first layer, group-limited routing
    "gpt_oss": HF_CONFIGS["gpt_oss"],  # sliding-window layers, MXFP4 source
}
MESHES = {"1": None, "8": "data=2,expert=4"}
RTOL = 1e-5


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    made = {}

    def get(name: str) -> str:
        if name not in made:
            root = tmp_path_factory.mktemp(name)
            if name == "gpt_oss":
                bf16 = save_model(build_model(FAMILIES[name](), seed=1, dtype=torch.bfloat16), root / "bf16")
                made[name] = _mxfp4_checkpoint(bf16, str(root / "mxfp4"))
            else:
                made[name] = save_model(build_model(FAMILIES[name](), seed=1), root / "hf")
        return made[name]

    return get


def streamed_stats(path: str, blocks, options, *, mesh=None, work_dir=None, on_layer=None) -> ModelStats:
    record = {"fingerprint": ModelSource.open(path).fingerprint(), "source": path}
    reader = open_hf(path, mesh=mesh)
    return calibrate_streamed(
        reader, blocks, model_record=record, options=options, work_dir=work_dir, progress=False, on_layer=on_layer
    )


def assert_stats_close(got: ModelStats, want: ModelStats, rtol: float = RTOL) -> None:
    """Every statistic within `rtol` of the largest magnitude of its array."""
    assert [ls.layer for ls in got.layers] == [ls.layer for ls in want.layers]
    assert got.fingerprint == want.fingerprint
    for a, b in zip(got.layers, want.layers, strict=True):
        assert a.num_tokens == b.num_tokens
        arrays = {"freq": (a.freq, b.freq), "gate_mass": (a.gate_mass, b.gate_mass), "reap": (a.reap, b.reap)}
        arrays.update({"routed_m": (a.routed_m, b.routed_m), "routed_n": (a.routed_n, b.routed_n)})
        arrays.update({f"sim.{k}": (a.sim[k], b.sim[k]) for k in b.sim})
        arrays.update({k: (getattr(a, k), getattr(b, k)) for k in SENSITIVITIES if getattr(b, k) is not None})
        for name, (x, y) in arrays.items():
            assert x is not None, f"layer {a.layer}: {name} missing"
            scale = max(float(np.abs(y).max()), 1e-30)
            err = float(np.abs(x - y).max()) / scale
            assert err <= rtol, f"layer {a.layer} {name}: relative error {err:.2e}"


@pytest.mark.parametrize("mesh", sorted(MESHES))
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_streamed_statistics_and_sensitivities_match_resident(family, mesh, family_dir):
    path = family_dir(family)
    m = None if MESHES[mesh] is None else make_mesh(MESHES[mesh])
    model = load_hf(path, mesh=m)
    blocks = random_tokens(model.cfg.vocab_size, batch=6, seq=12, seed=2)
    options = CalibrationOptions(batch_size=4, token_chunk=16)
    want = calibrate(model, blocks, options=options, progress=False)
    assert all(ls.sens_m is not None for ls in want.layers)
    assert_stats_close(streamed_stats(path, blocks, options, mesh=m), want)


def test_streamed_statistics_without_gradients(family_dir):
    path = family_dir("mixtral")
    blocks = random_tokens(128, batch=5, seq=12, seed=4)
    options = CalibrationOptions(batch_size=2, token_chunk=8, gradients=False, cka="minibatch")
    want = calibrate(load_hf(path), blocks, options=options, progress=False)
    got = streamed_stats(path, blocks, options)
    assert all(ls.sens_m is None for ls in got.layers)
    assert_stats_close(got, want)


def test_stats_comparison_can_fail(family_dir):
    """The check above sees a change of one statistic beyond the tolerance."""
    path = family_dir("mixtral")
    blocks = random_tokens(128, batch=4, seq=12, seed=4)
    options = CalibrationOptions(batch_size=4, token_chunk=16, gradients=False)
    stats = streamed_stats(path, blocks, options)
    layer = stats.layers[1]
    changed = layer.routed_m.copy()
    changed[0, 1] += 1e-4 * np.abs(changed).max()
    other = ModelStats(
        layers=(stats.layers[0], type(layer)(**{**layer.__dict__, "routed_m": changed}), *stats.layers[2:]),
        meta=stats.meta,
    )
    with pytest.raises(AssertionError, match="routed_m"):
        assert_stats_close(other, stats)


def test_layer_names_cover_the_model_once(family_dir):
    reader = open_hf(family_dir("deepseek_v3"))
    cfg = reader.cfg
    names = ["embed"] + [n for layer in range(cfg.num_layers) for n in layer_names(cfg, layer)] + head_names(cfg)
    assert sorted(set(names)) == sorted(reader.bindings)
    assert canonical_layer(cfg, 0) == 0 and canonical_layer(cfg, 1) == 1  # dense layer 0, MoE layer 1


def test_streamed_calibration_resumes_from_its_last_finished_layer(family_dir, tmp_path):
    path = family_dir("mixtral")
    blocks = random_tokens(128, batch=6, seq=12, seed=3)
    options = CalibrationOptions(batch_size=4, token_chunk=16)
    whole = streamed_stats(path, blocks, options)
    stops = []

    def stop_at(phase: str, layer: int) -> None:
        stops.append((phase, layer))
        if (phase, layer) in (("forward", 1), ("reverse", 1)):
            raise KeyboardInterrupt

    work = str(tmp_path / "work")
    with pytest.raises(StreamInterrupted) as first:
        streamed_stats(path, blocks, options, work_dir=work, on_layer=stop_at)
    assert first.value.done == 2 and first.value.total == 6
    with pytest.raises(StreamInterrupted) as second:
        streamed_stats(path, blocks, options, work_dir=work, on_layer=stop_at)
    assert second.value.done == 5  # forward 2, then the reverse sweep's layers 2 and 1
    resumed = streamed_stats(path, blocks, options, work_dir=work, on_layer=stop_at)
    assert stops == [("forward", 0), ("forward", 1), ("forward", 2), ("reverse", 2), ("reverse", 1), ("reverse", 0)]
    for a, b in zip(resumed.layers, whole.layers, strict=True):
        for name in ("freq", "routed_m", *SENSITIVITIES):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        np.testing.assert_array_equal(a.sim["cka"], b.sim["cka"])
    assert os.path.isfile(os.path.join(work, "state.json"))
