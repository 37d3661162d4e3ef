"""A re-run never lies: stages are reused only when their fingerprints match, inputs made from another
model are refused, cheap checks run before any work, Ctrl-C says what was saved, and every export
carries a recipe built from its provenance."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
import transformers

import grape_jax.pipeline as pipeline_module
from grape_jax.calibration import calibrate as calibration_module
from grape_jax.calibration.stats import ModelStats
from grape_jax.cli.main import main as grape
from grape_jax.data.text import DataSpec, default_heldout_texts
from grape_jax.planners import DEFAULT_METHOD
from tests.hf_models import build_model, save_model

DATA = ["--num-samples", "6", "--seq-len", "32", "--batch-size", "3", "--token-chunk", "48"]


@pytest.fixture(scope="module")
def twin(tiny_mixtral_tok, tmp_path_factory):
    """Model B: A's architecture and tokenizer, other weights (same shapes, so only fingerprints tell)."""
    config = transformers.AutoConfig.from_pretrained(tiny_mixtral_tok.path)
    path = save_model(build_model(config, seed=6), tmp_path_factory.mktemp("twin") / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tiny_mixtral_tok.path, name), path)
    return path


@pytest.fixture(scope="module")
def other_text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "other.txt"
    path.write_text("\n\n".join(default_heldout_texts()[:40]))
    return str(path)


def _one_line_error(capsys) -> str:
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    err = "\n".join(line for line in lines if line.strip() and "%|" not in line)  # progress bars aside
    assert len(err.splitlines()) == 1 and err.startswith("grape:") and "Traceback" not in err, err
    return err


def test_rerun_with_other_data_recalibrates_and_the_recipe_says_so(tiny_mixtral_tok, other_text, tmp_path, capsys):
    out, work = str(tmp_path / "out"), str(tmp_path / "work")
    common = [
        "prune",
        tiny_mixtral_tok.path,
        "--method",
        "frequency",
        "--per-layer",
        "1",
        "--out",
        out,
        "--work-dir",
        work,
        "--keep-work",
    ]
    assert grape([*common, *DATA]) == 0
    first = ModelStats.load(os.path.join(work, "stats.npz"))
    capsys.readouterr()
    other = ["--data", other_text, "--num-samples", "8", "--seq-len", "32", "--batch-size", "3", "--token-chunk", "48"]
    assert grape([*common, "--overwrite", *other]) == 0
    assert "calibrating again" in capsys.readouterr().out
    stats = ModelStats.load(os.path.join(work, "stats.npz"))
    assert stats.fingerprint != first.fingerprint
    recipe = json.load(open(os.path.join(out, "recipe.json")))
    assert recipe["calibration"]["data"] == stats.meta["data"]  # the recipe is the statistics' own record
    assert recipe["calibration"]["stats_fingerprint"] == stats.fingerprint
    assert recipe["calibration"]["data"]["files"][0]["path"] == os.path.abspath(other_text)
    assert recipe["calibration"]["data"]["num_samples"] == 8
    # the same request again reuses the statistics (and says so)
    assert grape([*common, "--overwrite", *other]) == 0
    assert "reusing the statistics" in capsys.readouterr().out


def test_other_models_work_dir_is_not_reused(tiny_mixtral_tok, twin, tmp_path, capsys):
    work = str(tmp_path / "work")
    args = ["--method", "frequency", "--per-layer", "1", "--work-dir", work, "--keep-work", *DATA]
    assert grape(["prune", tiny_mixtral_tok.path, "--out", str(tmp_path / "a"), *args]) == 0
    capsys.readouterr()
    assert grape(["prune", twin, "--out", str(tmp_path / "b"), *args]) == 0
    assert "calibrating again" in capsys.readouterr().out
    recipe = json.load(open(tmp_path / "b" / "recipe.json"))
    stats = ModelStats.load(os.path.join(work, "stats.npz"))
    assert recipe["source_model"]["path"] == os.path.abspath(twin)
    assert recipe["calibration"]["model_fingerprint"] == stats.model_fingerprint
    assert recipe["provenance"][0]["fingerprint"] == recipe["source_model"]["fingerprint"]
    assert stats.meta["model"]["source"] == os.path.abspath(twin)


def test_plan_of_another_model_is_refused_by_merge_and_compare(tiny_mixtral_tok, twin, tmp_path, capsys):
    stats_b, plan_b, ckpt_a = (str(tmp_path / n) for n in ("b.npz", "b.json", "ckpt_a"))
    assert grape(["calibrate", twin, "--out", stats_b, *DATA]) == 0
    assert not os.path.exists(stats_b + ".progress"), "progress is removed once the statistics are saved"
    assert grape(["plan", stats_b, "--method", "frequency", "--per-layer", "1", "--out", plan_b]) == 0
    assert grape(["convert", tiny_mixtral_tok.path, ckpt_a]) == 0
    capsys.readouterr()
    assert grape(["merge", ckpt_a, plan_b, "--out", str(tmp_path / "merged")]) == 2
    err = _one_line_error(capsys)
    b = ModelStats.load(stats_b).model_fingerprint
    assert f"made from statistics of model {b[:16]}" in err and "but this model is" in err
    assert not os.path.exists(tmp_path / "merged")
    assert (
        grape(
            [
                "compare",
                tiny_mixtral_tok.path,
                "--stats",
                stats_b,
                "--out",
                str(tmp_path / "cmp"),
                "--per-layer",
                "1",
                "--methods",
                "frequency",
                "--eval-samples",
                "2",
                "--seq-len",
                "32",
            ]
        )
        == 2
    )
    assert "calibrate this model" in _one_line_error(capsys)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--method", "bogus", "--per-layer", "1"], "method 'bogus' unknown"),
        (["--per-layer", "-1"], r"per_layer (--per-layer) must be an integer >= 0"),
        (["--budget", "-2"], "budget must be >= 0"),
        (["--budget", "19"], "budget 19 exceeds the 18 experts removable"),
        (["--per-layer", "1", "--option", "gamma=abc"], "option gamma='abc': expected float"),
        (["--per-layer", "1", "--option", "guard=maybe"], "guard 'maybe' unknown"),
        (["--per-layer", "1", "--mesh", "expert=3"], "--mesh expert=3: uses 3 of the 8 devices"),
        (["--per-layer", "1", "--data", "/nonexistent.txt"], "/nonexistent.txt: file not found"),
        (["--per-layer", "1", "--seq-len", "1"], "--seq-len must be an integer >= 2"),
        (["--fraction", "0.95"], "fraction (--fraction) 0.95 removes 23 of 24 experts, more than the 18 removable"),
        (["--fraction", "1.5"], "fraction (--fraction) must be in (0, 1)"),
        (["--method", "ream", "--fraction", "0.5", "--option", "group_size=1"], "ream: group_size 1 too small"),
    ],
)
def test_bad_requests_fail_before_any_work(tiny_mixtral_tok, tmp_path, capsys, monkeypatch, args, message):
    def no_weights(*a, **k):
        raise AssertionError("weights were loaded before the request was checked")

    monkeypatch.setattr(pipeline_module, "load_model", no_weights)
    out = str(tmp_path / "out")
    assert grape(["prune", tiny_mixtral_tok.path, "--out", out, *args]) == 2
    assert message in _one_line_error(capsys)
    assert os.listdir(tmp_path) == [], "no output or work directory may be left"


def test_compare_by_fraction(tiny_mixtral_tok, tmp_path, capsys):
    out = str(tmp_path / "cmp")
    args = ["compare", tiny_mixtral_tok.path, "--out", out, "--fraction", "0.25,0.5", "--methods", "frequency,ream"]
    assert (
        grape([*args, "--operators", "dominant", "--eval-samples", "2", "--seq-len", "32", "--num-samples", "4"]) == 0
    )
    table = capsys.readouterr().out
    for name in ("frequency", "frequency (global)", "ream"):
        assert f"| {name} | 25% |" in table and f"| {name} | 50% |" in table
    assert sorted(f for f in os.listdir(out) if f.startswith("allocation")) == [
        "allocation_r25.png",
        "allocation_r50.png",
    ]
    assert grape(["compare", tiny_mixtral_tok.path, "--out", out, "--overwrite", "--fraction", "0.5,2"]) == 2
    assert "--fraction '0.5,2': expected comma-separated fractions strictly between 0 and 1" in capsys.readouterr().err


def test_plan_option_of_the_wrong_type_is_one_line(tmp_path, capsys):
    from tests.test_cli_misc import _stats

    path = _stats(tmp_path / "s.npz")
    assert grape(["plan", path, "--per-layer", "1", "--option", "gamma=abc"]) == 2
    assert f"{DEFAULT_METHOD}: option gamma='abc': expected float" in _one_line_error(capsys)


def test_ctrl_c_in_prune_says_what_was_saved_and_resumes(tiny_mixtral_tok, tmp_path, capsys, monkeypatch):
    out, work = str(tmp_path / "out"), str(tmp_path / "work")
    args = [
        "prune",
        tiny_mixtral_tok.path,
        "--method",
        "frequency",
        "--per-layer",
        "1",
        "--out",
        out,
        "--work-dir",
        work,
        "--checkpoint-every",
        "1",
        "--mesh",
        "expert=8",
        *DATA,
    ]
    real, calls = calibration_module.calibration_step_jit, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(calibration_module, "calibration_step_jit", interrupted)
    assert grape(args) == 130
    err = _one_line_error(capsys)
    assert "statistics of 3 of 6 blocks are saved in" in err and "run the same command again to resume" in err
    assert not os.path.exists(out)
    calls.clear()
    monkeypatch.setattr(calibration_module, "calibration_step_jit", real)
    assert grape(args) == 0
    assert "resuming calibration after batch 1 of 2" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["out"], "the work directory is removed after success"


def test_ctrl_c_elsewhere_is_one_line(tiny_mixtral_tok, tmp_path, capsys, monkeypatch):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("grape_jax.source.ModelSource.load", interrupt)
    assert grape(["convert", tiny_mixtral_tok.path, str(tmp_path / "ckpt")]) == 130
    assert "interrupted; nothing of this command was saved" in _one_line_error(capsys)


def test_stage_by_stage_export_carries_the_same_recipe_as_prune(tiny_mixtral_tok, tmp_path):
    paths = {n: str(tmp_path / n) for n in ("stats.npz", "plan.json", "ckpt", "merged", "hf", "pruned")}
    plan_args = ["--method", "grape", "--per-layer", "1", "--option", "guard=none"]
    assert grape(["calibrate", tiny_mixtral_tok.path, "--out", paths["stats.npz"], *DATA]) == 0
    assert grape(["plan", paths["stats.npz"], *plan_args, "--out", paths["plan.json"]]) == 0
    assert grape(["convert", tiny_mixtral_tok.path, paths["ckpt"]]) == 0
    assert grape(["merge", paths["ckpt"], paths["plan.json"], "--out", paths["merged"]]) == 0
    assert grape(["export", paths["merged"], paths["hf"]]) == 0
    assert grape(["prune", tiny_mixtral_tok.path, *plan_args, "--out", paths["pruned"], *DATA]) == 0
    staged = json.load(open(os.path.join(paths["hf"], "recipe.json")))
    pruned = json.load(open(os.path.join(paths["pruned"], "recipe.json")))
    assert staged == pruned
    assert staged["method"] == "grape" and staged["model_fingerprint"]
    card = open(os.path.join(paths["hf"], "README.md")).read()
    assert card == open(os.path.join(paths["pruned"], "README.md")).read()
    assert staged["source_model"]["fingerprint"][:16] in card


def test_eval_reports_perplexity_equal_to_transformers(tiny_mixtral_tok, tmp_path, capsys):
    out = str(tmp_path / "eval.json")
    task = os.path.join(os.path.dirname(__file__), "..", "grape_jax", "assets", "tasks", "piqa.jsonl")
    assert (
        grape(
            [
                "eval",
                tiny_mixtral_tok.path,
                "--num-samples",
                "4",
                "--seq-len",
                "32",
                "--out",
                out,
                "--task",
                f"piqa={task}",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "perplexity" in printed and "piqa" in printed
    result = json.load(open(out))
    tok = transformers.AutoTokenizer.from_pretrained(tiny_mixtral_tok.path)
    blocks = DataSpec(seq_len=32, num_samples=4).blocks(tok, max_positions=128, heldout=True)
    with torch.no_grad():
        logits = tiny_mixtral_tok.model(input_ids=torch.as_tensor(blocks, dtype=torch.long)).logits.double()
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, torch.as_tensor(blocks[:, 1:, None], dtype=torch.long))
    ref = float(torch.exp(-logp.mean()))
    np.testing.assert_allclose(result["perplexity"]["ppl"], ref, rtol=1e-4)
    assert set(result["tasks"]["piqa"]) == {"acc", "acc_norm", "n"}
    assert grape(["eval", tiny_mixtral_tok.path, "--task", "piqa"]) == 2
    assert "--task 'piqa': expected NAME=PATH" in _one_line_error(capsys)


def test_help_is_complete(capsys):
    with pytest.raises(SystemExit):
        grape(["--help"])
    top = capsys.readouterr().out
    assert "evaluate" not in top and "eval " in top
    for command in ("convert", "export", "families", "eval", "prune"):
        assert command in top
    with pytest.raises(SystemExit):
        grape(["prune", "--help"])
    text = capsys.readouterr().out
    assert "(default: 128)" in text and "--coordinator" in text and "--checkpoint-seconds" in text
    for command in ("plan", "stats", "families", "demo"):
        with pytest.raises(SystemExit):
            grape([command, "--help"])
        assert "--coordinator" not in capsys.readouterr().out, command


def test_stats_prints_shares_that_sum_to_one(tmp_path, capsys):
    from tests.test_cli_misc import _stats

    assert grape(["stats", _stats(tmp_path / "s.npz")]) == 0
    out = capsys.readouterr().out
    assert "min share" in out and "sums to 1" in out


def test_plots_tick_integers_under_their_bars(tmp_path, monkeypatch):
    from grape_jax.report import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, plt, path: figures.append(fig))
    plots.plot_allocation({"a": [1, 2, 0], "b": [0, 1, 3]}, [0, 2, 5], str(tmp_path / "a.png"))
    plots.plot_perplexity({"a": {2: 10.0, 4: 12.0}}, 9.0, str(tmp_path / "p.png"))
    bars, ppl = figures[0].axes[0], figures[1].axes[0]
    assert [t.get_text() for t in bars.get_xticklabels()] == ["0", "2", "5"]
    centres = np.array([p.get_x() + p.get_width() / 2 for p in bars.patches]).reshape(2, 3)  # [name, layer]
    np.testing.assert_allclose(centres.mean(axis=0), bars.get_xticks())  # each tick under its group
    assert list(bars.get_xticks()) == [0, 1, 2]
    assert list(ppl.get_xticks()) == [2, 4] and ppl.get_title()
