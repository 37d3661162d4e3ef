"""Pruned models back in PyTorch: uniform and per-layer counts, exact sizes, re-conversion, errors."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np
import pytest
import transformers

from conversion.load import load_hf
from grape_jax.api import describe
from grape_jax.calibration.options import CalibrationOptions
from grape_jax.calibration.stats import ModelStats
from grape_jax.cli.main import main as grape
from grape_jax.cli.methods import data_flags
from grape_jax.core.model import param_view
from grape_jax.core.params import count_params
from grape_jax.data.text import DataSpec
from grape_jax.evaluation.scoring import perplexity
from grape_jax.fit.operator import FitError, FitOptions
from grape_jax.merge.state import MergeError, MergeInputs, merge_model
from grape_jax.pipeline import apply_plan, blocks_for
from grape_jax.planners import DEFAULT_METHOD
from grape_jax.planners.plan import Plan
from grape_jax.source import ModelSource
from tests.hf_models import random_tokens, torch_logits
from tests.strict_json import check_json_tree, strict_load
from tests.test_model_parity import assert_close_logits

DATA = ["--num-samples", "6", "--seq-len", "32", "--batch-size", "3", "--token-chunk", "48"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("prune")


@pytest.fixture(scope="module")
def stats_path(tiny_mixtral_tok, work):
    path = str(work / "stats.npz")
    assert grape(["calibrate", tiny_mixtral_tok.path, "--out", path, *DATA]) == 0
    return path


def _dir_bytes(d):
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))


@pytest.mark.parametrize("method,trust", [("local", False), ("grape", True)])
def test_prune_export_matches_jax_and_shrinks(tiny_mixtral_tok, stats_path, work, method, trust, monkeypatch):
    out = str(work / f"out-{method}")
    args = [
        "prune",
        tiny_mixtral_tok.path,
        "--method",
        method,
        "--per-layer",
        "2",
        "--out",
        out,
        "--work-dir",
        str(work / f"work-{method}"),
        "--keep-work",
        *DATA,
    ]
    if method == "grape":  # make it non-uniform
        args += ["--option", "guard=none"]
    assert grape(args) == 0
    config = json.load(open(os.path.join(out, "config.json")))
    recipe = json.load(open(os.path.join(out, "recipe.json")))
    assert recipe["method"] == method and sum(recipe["num_experts_before"]) - sum(recipe["num_experts_after"]) == 6
    assert os.path.isfile(os.path.join(out, "README.md")) and os.path.isfile(os.path.join(out, "tokenizer.json"))
    uniform = len(set(recipe["num_experts_after"])) == 1
    assert uniform == (not trust), recipe["num_experts_after"]
    assert ("auto_map" in config) == trust
    # the tokenizer (and the config) load with the stock classes: no custom code, no prompt
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("asked to run custom code"))
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("In the beginning")["input_ids"]
    assert type(transformers.AutoConfig.from_pretrained(out)).__name__ == "MixtralConfig"
    # the JAX pruned model and the PyTorch model loaded from the export agree
    pruned = load_hf(out)
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=trust).eval()
    tokens = random_tokens(pruned.cfg.vocab_size, batch=2, seq=16, seed=9)
    assert_close_logits(pruned(tokens), torch_logits(torch_model, tokens))
    # parameters and bytes on disk shrink by exactly the removed experts' share
    original = load_hf(tiny_mixtral_tok.path)
    per_expert = count_params(original.cfg) - count_params(original.cfg.with_num_experts((7, 8, 8)))
    n_before = sum(p.numel() for p in tiny_mixtral_tok.model.parameters())
    n_after = sum(p.numel() for p in torch_model.parameters())
    assert n_before - n_after == 6 * per_expert == recipe["params_before"] - recipe["params_after"]
    assert _dir_bytes(tiny_mixtral_tok.path) - _dir_bytes(out) in range(
        6 * per_expert * 4 - 4096, 6 * per_expert * 4 + 4096
    )
    # re-converting the export gives the merged state bit for bit
    plan = Plan.load(str(work / f"work-{method}" / "plan.json"))
    merged = merge_model(original, plan)
    cfg = merged.cfg
    assert cfg == pruned.cfg
    for name, arr in param_view(merged).items():
        assert np.asarray(arr).tobytes() == np.asarray(param_view(pruned)[name]).tobytes(), name


def test_prune_with_the_default_method_fits_and_exports(tiny_mixtral_tok, work):
    """No --method: grape-l with the fit operator; the export matches the JAX model in PyTorch and is
    reproduced by apply_plan on the same calibration blocks; the fit's loss check keeps the merged model
    at least as good as the base (dominant) merge on those blocks."""
    out, work_dir = str(work / "out-default"), work / "work-default"
    args = ["prune", tiny_mixtral_tok.path, "--per-layer", "2", "--out", out, "--work-dir", str(work_dir)]
    assert grape([*args, "--keep-work", *DATA]) == 0
    recipe = json.load(open(os.path.join(out, "recipe.json")))
    assert recipe["method"] == DEFAULT_METHOD == "grape-l" and recipe["operator"] == "fit"
    pruned = load_hf(out)
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    tokens = random_tokens(pruned.cfg.vocab_size, batch=2, seq=16, seed=9)
    assert_close_logits(pruned(tokens), torch_logits(torch_model, tokens))
    original = load_hf(tiny_mixtral_tok.path)
    plan = Plan.load(str(work_dir / "plan.json"))
    assert plan.operator == "fit"
    # one fingerprint per source: gj.describe, the statistics, the model source and the card agree; the
    # card lists every stage that was done and no planner seed for a deterministic planner
    fingerprint = describe(original)["fingerprint"]
    assert fingerprint == ModelStats.load(str(work_dir / "stats.npz")).model_fingerprint
    assert fingerprint == ModelSource.open(tiny_mixtral_tok.path).fingerprint() == recipe["source_model"]["fingerprint"]
    card = open(os.path.join(out, "README.md")).read()
    assert f"Source model fingerprint `{fingerprint[:16]}`" in card
    assert "stages: load, calibrate, plan, fit, merge." in " ".join(card.split())
    assert "seed None" not in card and "planner seed" not in card
    with pytest.raises(MergeError, match="operator 'fit' needs the calibration blocks"):
        merge_model(original, plan)
    blocks = blocks_for(tiny_mixtral_tok.path, DataSpec(seq_len=32, num_samples=6))
    fit = FitOptions.like(CalibrationOptions(batch_size=3, token_chunk=48))
    with pytest.raises(FitError, match="not the calibration blocks the plan was made from"):
        apply_plan(original, plan, blocks=blocks[:-1], fit_options=fit)
    merged = apply_plan(original, plan, blocks=blocks, fit_options=fit)
    assert merged.cfg == pruned.cfg
    # the recipe says how the fit ran: its options, the blocks it solved on, each merged layer's choices
    made = recipe["merge_inputs"]
    assert made["operator"] == "fit" and made["options"] == json.loads(json.dumps(dataclasses.asdict(fit)))
    sha = hashlib.sha256(np.ascontiguousarray(blocks, np.int32).tobytes()).hexdigest()
    assert made["blocks"] == {"shape": list(blocks.shape), "sha256": sha}
    changed = [str(lp.layer) for lp in plan.layers if lp.num_kept < lp.num_experts_before]
    assert changed and sorted(made["layers"]) == sorted(changed)
    assert all(len(made["layers"][k]["ridge"]) == len(plan.layers[int(k)].groups) for k in changed)
    # the same fit run again records the same options, blocks and steps (ridge choices can flip on near
    # ties of the cross-validation, and the residuals differ by float rounding)
    again = merged.info.provenance[-1]["inputs"]
    assert {k: v for k, v in again.items() if k != "layers"} == {k: v for k, v in made.items() if k != "layers"}
    assert {k: d["step"] for k, d in again["layers"].items()} == {k: d["step"] for k, d in made["layers"].items()}
    for name, arr in param_view(merged).items():
        np.testing.assert_allclose(np.asarray(arr), np.asarray(param_view(pruned)[name]), rtol=1e-4, atol=1e-6)
    base = merge_model(original, dataclasses.replace(plan, operator="dominant"), inputs=MergeInputs())
    assert perplexity(merged, blocks).nll_sum <= perplexity(base, blocks).nll_sum * (1 + 1e-6)


def test_data_flags_name_the_plans_data():
    record = {
        "files": [{"path": "/d/calib set.jsonl", "sha256": "ab"}],
        "text_field": "text",
        "seq_len": 2048,
        "num_samples": 128,
        "seed": 0,
    }
    want = "--data '/d/calib set.jsonl' --text-field text --seq-len 2048 --num-samples 128 --seed 0"
    assert data_flags(record) == want


def test_plan_merge_export_cli_chain(tiny_mixtral_tok, stats_path, work, capsys):
    plan_path, ckpt, merged, out = (str(work / n) for n in ("p.json", "ckpt", "merged", "hf"))
    assert grape(["plan", stats_path, "--method", "frequency", "--per-layer", "1", "--out", plan_path, "--show"]) == 0
    assert "total removed: 3" in capsys.readouterr().out
    assert grape(["convert", tiny_mixtral_tok.path, ckpt]) == 0
    assert grape(["merge", ckpt, plan_path, "--out", merged]) == 0
    assert grape(["export", merged, out]) == 0
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert model.config.num_local_experts == 7
    # the default planner's plan (operator 'fit') merges with the calibration data given to `grape merge`
    fit_plan, fit_merged = str(work / "p-fit.json"), str(work / "merged-fit")
    assert grape(["plan", stats_path, "--per-layer", "1", "--out", fit_plan]) == 0
    assert "(grape-l, operator fit, 3 experts removed)" in capsys.readouterr().out
    # ... and only with it: other blocks (the defaults, or another text) are refused before any weight is
    # loaded, naming the flags that give the plan's blocks
    text = work / "other.txt"
    text.write_text("Other words than the shipped sample, repeated to fill blocks. " * 200)
    for data in ([], ["--data", str(text), "--num-samples", "6", "--seq-len", "32"]):
        assert grape(["merge", ckpt, fit_plan, "--out", fit_merged, *data]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "operator 'fit' refits on the calibration blocks" in err
        assert err.strip().endswith("pass no --data (the shipped sample) with --seq-len 32 --num-samples 6 --seed 0")
        assert not os.path.exists(fit_merged)
    assert grape(["merge", ckpt, fit_plan, "--out", fit_merged, "--num-samples", "6", "--seq-len", "32"]) == 0
    assert "experts per layer [8, 8, 8] ->" in capsys.readouterr().out
    # errors: the export exists; a plan for another model; a plan that breaks a floor
    assert grape(["export", merged, out]) == 2
    assert "already exists" in capsys.readouterr().err
    other = Plan.load(plan_path).to_dict()
    other["layers"] = other["layers"][:2]
    other["budget"] = 2
    json.dump(other, open(work / "other.json", "w"))
    assert grape(["merge", ckpt, str(work / "other.json"), "--out", str(work / "x")]) == 2
    assert "plan covers MoE layers [0, 1], the model's MoE layers are [0, 1, 2]" in capsys.readouterr().err
    assert grape(["plan", stats_path, "--method", "grape", "--budget", "19", "--out", str(work / "y.json")]) == 2
    assert "exceeds the 18 experts removable" in capsys.readouterr().err
    assert not os.path.exists(work / "x") and not os.path.exists(work / "y.json")
    # every JSON file written above (statistics summary, plans, checkpoints, exports with recipe.json) and
    # by the prunes of this module is strict JSON, including the fit's non-finite ridge values
    assert grape(["eval", out, "--num-samples", "2", "--seq-len", "32", "--out", str(work / "eval.json")]) == 0
    found = set(check_json_tree(work))
    for name in ("stats.npz.json", "p.json", "p-fit.json", "hf/recipe.json", "hf/config.json", "eval.json"):
        assert name in found, name
    fitted = strict_load(work / "merged-fit" / "grape.json")  # the fit's record: ridge values, maybe "inf"
    assert any(r.get("inputs", {}).get("operator") == "fit" for r in fitted["provenance"])
