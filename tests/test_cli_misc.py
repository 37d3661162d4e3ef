"""Smaller CLI surfaces: stats plots, plan plots, family listing, option errors."""

from __future__ import annotations

import os

import numpy as np

from conversion.families import FAMILIES
from grape_jax.calibration.stats import LayerStats, ModelStats
from grape_jax.cli.main import main as grape


def _stats(path):
    rng = np.random.default_rng(0)
    layers = []
    for l in range(3):
        x = rng.random((6, 6))
        s = (x + x.T) / 2
        np.fill_diagonal(s, 1)
        f = rng.dirichlet(np.ones(6)) * 2
        layers.append(LayerStats(l, 100, 2, f, f / 2, f, {"cka": s, "cos_mean": s, "router": s, "weight": s}, s * f, s))
    ModelStats(tuple(layers), {"model": "synthetic"}).save(path)
    return str(path)


def test_stats_and_plan_plots(tmp_path, capsys):
    path = _stats(tmp_path / "s.npz")
    assert grape(["stats", path, "--plot", str(tmp_path / "plots")]) == 0
    assert sorted(os.listdir(tmp_path / "plots")) == ["layer000.png", "layer001.png", "layer002.png"]
    assert "mean CKA" in capsys.readouterr().out
    assert (
        grape(["plan", path, "--method", "grape", "--per-layer", "2", "--show", "--plot", str(tmp_path / "a.png")]) == 0
    )
    assert "total removed: 6" in capsys.readouterr().out
    assert os.path.getsize(tmp_path / "a.png") > 0


def test_families_and_option_errors(tmp_path, capsys):
    assert grape(["families"]) == 0
    out = capsys.readouterr().out.splitlines()
    for model_type, family in FAMILIES.items():  # name + class, routing rule, what export writes
        i = next(i for i, line in enumerate(out) if line.split()[:1] == [model_type])
        assert family.architectures[0] in out[i]
        assert out[i + 1].split() == ["routing:", *family.routing.split()] and family.routing
        assert out[i + 2].split()[0] == "export:" and "modeling_pruned_moe.py" in out[i + 2]
    assert "FP8 block-quantised" in out[-1]
    path = _stats(tmp_path / "s.npz")
    assert grape(["plan", path, "--method", "grape", "--per-layer", "1", "--option", "gamma"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err
    assert grape(["plan", path, "--method", "grape", "--per-layer", "1", "--option", "gama=0.1"]) == 2
    assert "unknown option(s) ['gama']" in capsys.readouterr().err
    assert grape(["stats", str(tmp_path / "missing.npz")]) == 2
    assert "stats file not found" in capsys.readouterr().err
