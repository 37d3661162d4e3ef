"""Layer streaming gives the resident run's answers: statistics and gradient sensitivities (fp32, within
1e-5 relative), the plan, the fit and the export, on several families, on 1 and 8 simulated devices;
a streamed calibration resumes from its last finished layer."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
import torch
from safetensors import safe_open

from conversion.load import load_hf, open_hf
from grape_jax.calibration.calibrate import calibrate
from grape_jax.calibration.options import CalibrationOptions
from grape_jax.calibration.stats import SENSITIVITIES, ModelStats
from grape_jax.core.model import param_view
from grape_jax.core.sharding import make_mesh
from grape_jax.fit.operator import FitOptions
from grape_jax.merge.state import merge_model
from grape_jax.pipeline import apply_plan, save_hf
from grape_jax.planners import make_plan
from grape_jax.source import ModelSource
from grape_jax.stream import choose
from grape_jax.stream.layers import ResidentLayers, canonical_layer, head_names, layer_names
from grape_jax.stream.merge import MergedLayers, MergedParams
from grape_jax.stream.run import StreamInterrupted, calibrate_streamed
from grape_jax.streamed import merge_and_export
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


def _tensors(path: str) -> dict[str, np.ndarray]:
    out = {}
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "np") as f:
                out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def assert_exports_close(a: str, b: str, rtol: float = 1e-4) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert sorted(ta) == sorted(tb)
    for key in ta:
        x, y = ta[key].astype(np.float64), tb[key].astype(np.float64)
        assert x.shape == y.shape, key
        err = float(np.abs(x - y).max()) / max(float(np.abs(x).max()), 1e-30)
        assert err <= rtol, f"{key}: relative error {err:.2e}"


@pytest.mark.parametrize("family,mesh", [("mixtral", "1"), ("deepseek_v3", "8"), ("qwen2_moe", "8"), ("gpt_oss", "1")])
def test_streamed_fit_merge_and_export_match_resident(family, mesh, family_dir, tmp_path):
    """The default planner's plan (operator 'fit', its loss check included), merged and exported a layer at a
    time, gives the resident merge's export."""
    path = family_dir(family)
    m = None if MESHES[mesh] is None else make_mesh(MESHES[mesh])
    model = load_hf(path, mesh=m)
    cfg = model.cfg
    blocks = random_tokens(cfg.vocab_size, batch=6, seq=12, seed=5)
    options = CalibrationOptions(batch_size=4, token_chunk=16)
    stats = calibrate(model, blocks, options=options, progress=False)
    plan = make_plan(stats, budget=sum(cfg.num_experts) // 4)
    assert plan.operator == "fit"
    fit_options = FitOptions.like(options)
    resident = save_hf(apply_plan(model, plan, blocks=blocks, fit_options=fit_options), str(tmp_path / "resident"))
    del model
    streamed_cfg = merge_and_export(
        ModelSource.open(path), plan, blocks, str(tmp_path / "streamed"), mesh=m, fit_options=fit_options,
        work_dir=str(tmp_path / "work"), save=save_hf,
    )  # fmt: skip
    assert streamed_cfg.num_experts == tuple(lp.num_kept if lp else e for lp, e in _kept(plan, cfg))
    assert_exports_close(resident, str(tmp_path / "streamed"))
    recipes = [json.load(open(os.path.join(tmp_path, d, "recipe.json"))) for d in ("resident", "streamed")]
    # the fit's choices, layer by layer; the losses the steps were chosen by agree to rounding (the
    # merged model computes in its own dtype: bf16 for the MXFP4 source)
    fits = [r["merge_inputs"]["layers"] for r in recipes]
    assert fits[0].keys() == fits[1].keys()
    nll_rtol = 1e-3 if family == "gpt_oss" else 1e-6
    for layer, want in fits[0].items():
        got = fits[1][layer]
        for key in ("calibration_nll_before", "calibration_nll_after"):
            assert got.pop(key) == pytest.approx(want.pop(key), rel=nll_rtol), (layer, key)
        assert got == want, layer
    assert recipes[0]["model_fingerprint"] == recipes[1]["model_fingerprint"]


def _kept(plan, cfg):
    by_layer = {lp.layer: lp for lp in plan.layers}
    return [(by_layer.get(layer), e) for layer, e in enumerate(cfg.num_experts)]


def test_merged_params_read_each_layer_once(family_dir, tmp_path):
    path = family_dir("mixtral")
    model = load_hf(path)
    blocks = random_tokens(128, batch=4, seq=12, seed=6)
    stats = calibrate(model, blocks, options=CalibrationOptions(batch_size=4, gradients=False), progress=False)
    plan = make_plan(stats, method="grape", per_layer=2, operator="freq")
    lazy = MergedParams(MergedLayers(ResidentLayers(model), plan))
    want = param_view(merge_model(model, plan))
    for name in lazy:
        np.testing.assert_array_equal(np.asarray(lazy[name]), np.asarray(want[name]))
        assert lazy.shapes[name].shape == want[name].shape and lazy.shapes[name].dtype == want[name].dtype
    # embed, then each layer once, then final_norm and lm_head
    assert lazy.reads == 1 + model.cfg.num_layers + 2


def test_auto_streams_only_when_the_model_does_not_fit():
    cpu = jax.devices()[:1]
    gb = 10**9
    resident, why = choose.stream_or_not("auto", model_bytes=gb, devices=cpu, available=(4 * gb, "RAM"))
    assert not resident and "fit 4.00 GB RAM" in why
    streamed, why = choose.stream_or_not("auto", model_bytes=2 * gb, devices=cpu, available=(4 * gb, "RAM"))
    assert streamed and why.startswith("auto: streamed, 3 x 2.00 GB of weights exceed 4.00 GB")
    assert choose.stream_or_not("on", model_bytes=gb, devices=cpu, available=(100 * gb, "RAM"))[0]
    assert not choose.stream_or_not("off", model_bytes=100 * gb, devices=cpu, available=(gb, "RAM"))[0]
    decide = choose.stream_or_not
    assert not decide("auto", model_bytes=100 * gb, devices=cpu, checkpoint=True, available=(gb, "RAM"))[0]
    with pytest.raises(choose.StreamModeError, match="--stream-layers on: a grape checkpoint"):
        choose.stream_or_not("on", model_bytes=gb, devices=cpu, checkpoint=True)
    assert choose.stream_or_not("on", model_bytes=gb, devices=cpu, processes=2)[0]
    # several processes: each holds its share of the weights, against the least memory of any of them
    resident, why = decide("auto", model_bytes=2 * gb, devices=cpu, processes=2, available=(4 * gb, "RAM"))
    assert not resident and why == "auto: resident, 3 x 2.00 GB of weights / 2 processes fit 4.00 GB RAM"
    assert decide("auto", model_bytes=3 * gb, devices=cpu, processes=2, available=(4 * gb, "RAM"))[0]
    with pytest.raises(choose.StreamModeError, match="expected one of auto, on, off"):
        choose.stream_or_not("yes", model_bytes=gb, devices=cpu)
    assert choose.available_bytes(cpu)[0] > 0


@pytest.mark.slow  # two CLI prunes end to end
def test_cli_prune_streamed_matches_resident_and_records_the_choice(tiny_mixtral_tok, tmp_path, capsys):
    from grape_jax.cli.main import main

    outs = {}
    for mode in ("off", "on"):
        out = str(tmp_path / mode)
        args = [
            "prune", tiny_mixtral_tok.path, "--out", out, "--per-layer", "2", "--seq-len", "16",
            "--num-samples", "6", "--batch-size", "4", "--token-chunk", "32", "--stream-layers", mode,
        ]  # fmt: skip
        assert main(args) == 0
        outs[mode] = out
    printed = capsys.readouterr().out
    assert "layer streaming: off (--stream-layers off)" in printed
    assert "layer streaming: on (--stream-layers on)" in printed
    assert_exports_close(outs["off"], outs["on"])
    recipes = {mode: json.load(open(os.path.join(out, "recipe.json"))) for mode, out in outs.items()}
    assert recipes["on"]["calibration"]["run"]["stream_layers"] == {"streamed": True, "why": "--stream-layers on"}
    assert "stream_layers" not in recipes["off"]["calibration"]["run"]  # resident: as the stage commands
    assert recipes["on"]["plan"]["layers"] == recipes["off"]["plan"]["layers"]
    assert recipes["on"]["model_fingerprint"] == recipes["off"]["model_fingerprint"]
