"""Smaller CLI surfaces: stats plots, plan plots, family listing, option errors."""

from __future__ import annotations

import os

import numpy as np
import pytest

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


def test_nothing_to_do_is_refused_before_loading(tmp_path, capsys, monkeypatch):
    """--per-layer 0 / --budget 0 would calibrate and export the unchanged model: refused in one line
    before any weight is read (prune, plan, gj.prune)."""
    from grape_jax.demo.model import ensure_demo_model
    from grape_jax.pipeline import prune
    from grape_jax.planners.plan import PlanError
    from grape_jax.source import ModelSource

    def no_load(*args, **kwargs):
        raise AssertionError("loaded weights for a request that does nothing")

    monkeypatch.setattr(ModelSource, "load", no_load)
    model_dir = ensure_demo_model()
    for budget in (["--per-layer", "0"], ["--budget", "0"]):
        assert grape(["prune", model_dir, *budget, "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{' '.join(budget)} (" in err and "removes no expert" in err
        assert grape(["plan", _stats(tmp_path / "s.npz"), *budget]) == 2
        assert "removes no expert" in capsys.readouterr().err
    with pytest.raises(PlanError, match="per_layer=0"):
        prune(model_dir, str(tmp_path / "api"), per_layer=0)
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / "api")


def test_bad_paths_and_flags_say_what_is_wrong(tmp_path, capsys):
    missing = str(tmp_path / "nonexistent")
    for args in (["eval", missing], ["convert", missing, str(tmp_path / "c")], ["calibrate", missing, "--out", "s"]):
        assert grape(args) == 2
        err = capsys.readouterr().err.strip()
        want = f"grape: error: {missing}: does not exist; expected a Hugging Face model directory or a grape checkpoint"
        assert err == want, args


def _recipe(**changes):
    recipe = {
        "source_model": {"path": "/m/src", "fingerprint": "f" * 64},
        "method": "grape-l",
        "budget": 2,
        "operator": "fit",
        "seed": None,
        "num_experts_before": [4, 4],
        "num_experts_after": [3, 3],
        "params_before": 100,
        "params_after": 80,
        "calibration": {"data": {"files": [], "num_samples": 8, "seq_len": 32, "seed": 0}},
        "provenance": [
            {"stage": "load", "fingerprint": "f" * 64},
            {
                "stage": "merge",
                "plan": {"made_from": {"stats_fingerprint": "s" * 64}},
                "inputs": {"operator": "fit"},
            },
        ],
        "healing": [],
    }
    return {**recipe, **changes}


def test_card_lists_every_stage_and_says_when_healing_kept_the_unhealed_model():
    from types import SimpleNamespace

    from grape_jax.cli.heal import summary
    from grape_jax.report.recipe import model_card

    card = " ".join(model_card(_recipe(), uniform=True).split())
    assert (
        "stages: load, calibrate, plan, fit, merge." in card and "seed None" not in card and "planner seed" not in card
    )
    assert "planner seed 3" in model_card(_recipe(seed=3), uniform=True)
    heal = {
        "stage": "heal",
        "steps": 40,
        "best_step": 0,
        "teacher": {"fingerprint": "t" * 64},
        "data": {"files": [{"path": "a.txt"}], "num_blocks": 12},
        "heldout": {"ppl_before": 12.0, "ppl_after": 12.0, "ppl_teacher": 10.0},
    }
    provenance = [*_recipe()["provenance"], heal]
    card = " ".join(model_card(_recipe(healing=[heal], provenance=provenance), uniform=True).split())
    assert "Healed after pruning" not in card and "kept the unhealed model" in card
    assert "never validated better than step 0" in card and "lower --learning-rate" in card
    assert "stages: load, calibrate, plan, fit, merge, heal." in card
    card = " ".join(model_card(_recipe(healing=[{**heal, "best_step": 40}]), uniform=True).split())
    assert "Healed after pruning: 40 steps" in card and "kept step 40" in card
    run = SimpleNamespace(ppl_before=12.0, ppl_after=12.0, steps=40, seconds=30.0, best_step=0)
    text = summary(run, 10.0)
    assert "the unhealed model was kept" in text and "lower --learning-rate" in text and "recovered" not in text
    assert "recovered 50.0%" in summary(SimpleNamespace(**{**vars(run), "ppl_after": 11.0, "best_step": 40}), 10.0)


def test_plots_keep_legends_outside_and_perplexity_on_a_relative_log_axis(tmp_path, monkeypatch):
    """Rows near the original stay apart from rows at twice its perplexity (a relative, symmetric-log
    axis with labelled points), and no legend covers a bar or a line."""
    from grape_jax.report import plots

    figures = []
    save = plots._save

    def keep(fig, plt, path):
        fig.canvas.draw()
        figures.append(fig)
        return save(fig, plt, path)

    monkeypatch.setattr(plots, "_save", keep)
    table = {"a": {2: 72.9, 4: 73.6}, "b": {2: 92.0, 4: 189.2}, "a + heal": {4: 72.6}}
    plots.plot_perplexity(table, 72.72, str(tmp_path / "p.png"))
    plots.plot_allocation({"a": [8, 2, 2, 4], "b": [3, 6, 4, 3]}, [0, 1, 2, 3], str(tmp_path / "a.png"))
    for fig in figures:
        (ax,) = fig.axes
        legend = ax.get_legend().get_window_extent()
        assert legend.x0 >= ax.get_window_extent().x1, "the legend overlaps the axes"
    ax = figures[0].axes[0]
    assert ax.get_yscale() == "symlog" and "original" in ax.get_ylabel()
    labels = {t.get_text() for t in ax.texts}
    assert {"72.90", "73.60", "189.20", "72.60"} <= labels
    assert os.path.getsize(tmp_path / "p.png") > 0 and os.path.getsize(tmp_path / "a.png") > 0
