"""Calibration uses the model's real routing and is independent of batching and sharding."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from conversion.load import load_hf
from grape_jax.calibration.calibrate import CalibrationInterrupted, calibrate, output_gradients
from grape_jax.calibration.options import CalibrationOptions
from grape_jax.calibration.stats import ModelStats, StatsError
from grape_jax.core.model import param_view
from grape_jax.core.sharding import make_mesh
from tests.hf_models import random_tokens

OPTS = CalibrationOptions(batch_size=2, token_chunk=16, cka="exact")


@pytest.fixture(scope="module")
def model(tiny_mixtral):
    return load_hf(tiny_mixtral.path)


@pytest.fixture(scope="module")
def blocks():
    return random_tokens(128, batch=4, seq=16, seed=11)


@pytest.fixture(scope="module")
def stats(model, blocks):
    return calibrate(model, blocks, options=OPTS, progress=False)


def test_frequencies_are_transformers_top_k(tiny_mixtral, stats, blocks):
    with torch.no_grad():
        out = tiny_mixtral.model(input_ids=torch.as_tensor(blocks, dtype=torch.long), output_router_logits=True)
    k = tiny_mixtral.model.config.num_experts_per_tok
    for ls, router_logits in zip(stats.layers, out.router_logits):
        top = torch.topk(router_logits.float(), k, dim=-1).indices.numpy()
        counts = np.bincount(top.ravel(), minlength=ls.num_experts) / blocks.size
        np.testing.assert_allclose(ls.freq, counts, atol=1e-12)
        probs = torch.softmax(router_logits.float(), -1)
        topv = torch.topk(probs, k, -1).values
        gates = torch.zeros_like(probs).scatter(1, torch.topk(probs, k, -1).indices, topv / topv.sum(-1, keepdim=True))
        np.testing.assert_allclose(ls.gate_mass, gates.mean(0).numpy(), rtol=1e-5)
    assert stats.meta["calibration"]["num_tokens"] == blocks.size
    assert stats.model_fingerprint and stats.model_fingerprint == load_hf(tiny_mixtral.path).info.fingerprint


def test_batching_and_sharding_do_not_change_stats(model, blocks, stats, tiny_mixtral):
    other = calibrate(
        model, blocks, options=CalibrationOptions(batch_size=3, token_chunk=8, cka="exact"), progress=False
    )
    sharded_model = load_hf(tiny_mixtral.path, mesh=make_mesh("data=2,expert=4"))
    sharded = calibrate(
        sharded_model, blocks, options=CalibrationOptions(batch_size=2, token_chunk=16, cka="exact"), progress=False
    )
    for a, b, c in zip(stats.layers, other.layers, sharded.layers):
        for field in ("freq", "gate_mass", "reap", "routed_m", "routed_n", "sens_m", "sens_n", "sens_g"):
            atol = 1e-6 * max(1.0, float(np.abs(getattr(a, field)).max()))
            np.testing.assert_allclose(getattr(b, field), getattr(a, field), rtol=1e-4, atol=atol)
            np.testing.assert_allclose(getattr(c, field), getattr(a, field), rtol=1e-4, atol=atol)
        for metric in ("cka", "cos_mean", "router", "weight"):
            np.testing.assert_allclose(b.sim[metric], a.sim[metric], rtol=1e-4, atol=1e-5)
            np.testing.assert_allclose(c.sim[metric], a.sim[metric], rtol=1e-4, atol=1e-5)


def test_output_gradients_match_torch_autograd(tiny_mixtral, model, blocks):
    """∂(summed next-token NLL)/∂(MoE block output) per layer and token, against PyTorch autograd through
    the transformers model with a zero tensor added to each MoE block's output."""
    hf = tiny_mixtral.model
    deltas, hooks = [], []
    for layer in hf.model.layers:
        delta = torch.zeros(blocks.shape + (hf.config.hidden_size,), requires_grad=True)
        deltas.append(delta)
        hooks.append(layer.mlp.register_forward_hook(lambda mod, inp, out, d=delta: out + d))
    try:
        t = torch.as_tensor(blocks, dtype=torch.long)
        logp = torch.log_softmax(hf(input_ids=t).logits[:, :-1].double(), -1)
        (-logp.gather(-1, t[:, 1:, None]).sum()).backward()
    finally:
        for h in hooks:
            h.remove()
    ours = output_gradients(param_view(model), model.cfg, jnp.asarray(blocks), jnp.ones(blocks.shape, bool))
    for layer, delta in enumerate(deltas):
        ref = delta.grad.numpy().reshape(-1, hf.config.hidden_size)
        np.testing.assert_allclose(np.asarray(ours[str(layer)]), ref, rtol=1e-3, atol=1e-4 * np.abs(ref).max())
    assert np.abs(deltas[0].grad.numpy()).max() > 0


def test_gradients_enter_the_fingerprint_and_the_stats(model, blocks, stats):
    without = calibrate(model, blocks, options=dataclasses.replace(OPTS, gradients=False), progress=False)
    assert without.fingerprint != stats.fingerprint
    assert all(ls.sens_m is None and ls.sensitivities() == {} for ls in without.layers)
    assert all(set(ls.sensitivities()) == {"sens_m", "sens_n", "sens_g"} for ls in stats.layers)
    np.testing.assert_array_equal(without.layers[0].routed_m, stats.layers[0].routed_m)
    with pytest.raises(ValueError, match="calibration option gradients: expected True or False"):
        CalibrationOptions(gradients="yes")


def test_stats_file_round_trip(stats, tmp_path):
    path = tmp_path / "stats.npz"
    stats.save(path)
    back = ModelStats.load(path)
    assert (tmp_path / "stats.npz.json").exists()
    for a, b in zip(stats.layers, back.layers):
        np.testing.assert_array_equal(a.sim["cka"], b.sim["cka"])
        np.testing.assert_array_equal(a.routed_m, b.routed_m)
        np.testing.assert_array_equal(a.sens_m, b.sens_m)


def test_bad_inputs(model, stats, tmp_path):
    with pytest.raises(ValueError, match="non-empty"):
        calibrate(model, np.zeros((0, 8), np.int32), options=OPTS, progress=False)
    with pytest.raises(ValueError, match="exceeds the model's max_position_embeddings=128"):
        calibrate(model, np.zeros((1, 129), np.int32), options=OPTS, progress=False)
    with pytest.raises(ValueError, match="calibration option batch_size: expected an integer >= 1"):
        CalibrationOptions(batch_size=0)
    not_npz = tmp_path / "stats.txt"
    not_npz.write_text("hello")
    with pytest.raises(StatsError, match="not a grape-jax stats file") as e:
        ModelStats.load(not_npz)
    assert "pickle" not in str(e.value)
    bad = stats.layers[0]
    sim = dict(bad.sim)
    sim["cka"] = np.full_like(sim["cka"], np.nan)
    import dataclasses

    broken = ModelStats(layers=(dataclasses.replace(bad, sim=sim),), meta={})
    broken.save(tmp_path / "bad.npz")
    with pytest.raises(StatsError, match="layer 0: cka contains NaN"):
        ModelStats.load(tmp_path / "bad.npz")


@pytest.mark.parametrize("every", ["batch", "interrupt"])
def test_resume_after_interruption(model, blocks, tmp_path, monkeypatch, every):
    """Ctrl-C in the 4th of 4 batches: the accumulators of 3 are saved (periodically, or on the
    interrupt itself); a rerun computes only the last batch and gives the uninterrupted stats bit for bit."""
    import grape_jax.calibration.calibrate as cal

    opts = CalibrationOptions(
        batch_size=1, token_chunk=16, cka="exact", checkpoint_every=int(every == "batch"), checkpoint_seconds=0
    )
    whole = calibrate(model, blocks, options=opts, progress=False)
    resume = tmp_path / "progress"
    real, calls = cal.calibration_step_jit, []

    def dying(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(cal, "calibration_step_jit", dying)
    with pytest.raises(CalibrationInterrupted) as e:
        calibrate(model, blocks, options=opts, progress=False, resume_dir=resume)
    assert (e.value.saved, e.value.total) == (3, 4)
    calls.clear()
    resumed = calibrate(model, blocks, options=opts, progress=False, resume_dir=resume)
    assert len(calls) == 1  # only the last batch was computed again
    for a, b in zip(whole.layers, resumed.layers):
        for field in ("freq", "gate_mass", "reap", "routed_m", "routed_n"):
            np.testing.assert_array_equal(getattr(b, field), getattr(a, field))
        for metric in a.sim:
            np.testing.assert_array_equal(b.sim[metric], a.sim[metric])
    with pytest.raises(Exception, match="different run"):
        calibrate(model, blocks[:2], options=opts, progress=False, resume_dir=resume)


def test_periodic_saves_by_time(model, blocks, tmp_path, monkeypatch):
    """checkpoint_seconds: a save whenever that much time has passed since the last one."""
    import grape_jax.calibration.calibrate as cal
    import grape_jax.passes.engine as engine

    saves = []
    real_save = cal.Progress.save
    monkeypatch.setattr(cal.Progress, "save", lambda self, carry, n, **kw: (saves.append(n), real_save(self, carry, n)))
    clock = iter(range(0, 1000, 40))  # each call to the clock advances 40 s
    monkeypatch.setattr(engine, "_clock", lambda: next(clock))
    calibrate(
        model,
        blocks,
        options=CalibrationOptions(batch_size=1, token_chunk=16, cka="exact", checkpoint_seconds=60),
        progress=False,
        resume_dir=tmp_path / "p",
    )
    assert saves == [2]  # 80 s after the start (the last batch needs no save: its stats are returned)


@pytest.mark.parametrize("mesh_spec", [None, "fsdp=2,expert=4"])
def test_one_compile_per_run(blocks, tiny_mixtral, mesh_spec):
    """Accumulators start where every step leaves them, so the jitted step compiles once, not twice."""
    from grape_jax.calibration.calibrate import calibration_step_jit

    model = load_hf(tiny_mixtral.path, mesh=None if mesh_spec is None else make_mesh(mesh_spec))
    before = calibration_step_jit._cache_size()
    calibrate(model, blocks, options=CalibrationOptions(batch_size=1, token_chunk=12, cka="exact"), progress=False)
    assert calibration_step_jit._cache_size() - before == 1
