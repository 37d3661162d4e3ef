"""`grape heal` end to end on a tiny model: heal.json, recipe, loss curve, PyTorch parity, bad input."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import transformers

import grape_jax.cli.heal as cli_heal
from conversion.load import load_hf
from grape_jax.cli.main import main as grape
from grape_jax.core.model import param_view
from grape_jax.core.sharding import make_mesh
from grape_jax.data.text import DataSpec
from grape_jax.healing.heal import HealInterrupted, HealOptions, heal
from grape_jax.pipeline import blocks_for, save_hf
from grape_jax.planners import DEFAULT_METHOD
from tests.hf_models import build_model, random_tokens, save_model, tiny_mixtral_config, torch_logits
from tests.strict_json import check_json_tree
from tests.test_model_parity import assert_close_logits

PRUNE = ["--num-samples", "6", "--seq-len", "32", "--batch-size", "3", "--token-chunk", "48"]
HEAL = [
    "--steps",
    "4",
    "--warmup",
    "1",
    "--batch-size",
    "4",
    "--num-samples",
    "12",
    "--seq-len",
    "32",
    "--eval-samples",
    "4",
    "--val-blocks",
    "2",
    "--val-every",
    "2",
    "--train",
    "all",
    "--learning-rate",
    "0.003",
]


@pytest.fixture(scope="module")
def pruned(tiny_mixtral_tok, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("heal") / "pruned")
    assert grape(["prune", tiny_mixtral_tok.path, "--per-layer", "2", "--out", out, *PRUNE]) == 0
    return out


def test_heal_cli_end_to_end(tiny_mixtral_tok, pruned, tmp_path, capsys):
    out = str(tmp_path / "healed")
    assert grape(["heal", pruned, "--teacher", tiny_mixtral_tok.path, "--out", out, *HEAL]) == 0
    printed = capsys.readouterr().out
    assert f"healed model -> {out}" in printed
    assert not os.path.exists(out + ".work"), "the work directory goes once the output is in place"

    assert {"heal.json", "recipe.json", "config.json"} <= set(check_json_tree(out))  # strict JSON
    report = json.load(open(os.path.join(out, "heal.json")))
    assert report["steps"] == 4 and len(report["losses"]) == 4 and report["options"]["train"] == "all"
    for key in ("ppl_before", "ppl_after", "ppl_original"):
        assert report[key] > 1.0, key
    # validation from step 0 (the unhealed model): the export is the best validated step, the unhealed
    # model itself when no step beats it
    val = dict((int(step), loss) for step, loss in report["val_losses"])
    assert 0 in val and val[report["best_step"]] == min(val.values())
    assert (report["ppl_after"] == report["ppl_before"]) == (report["best_step"] == 0)
    with open(os.path.join(out, "loss.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    recipe = json.load(open(os.path.join(out, "recipe.json")))
    (healing,) = recipe["healing"]
    assert healing["steps"] == 4 and healing["trained"] == "all" and healing["data"]["num_blocks"] == 12
    assert healing["data"]["files"][0]["path"].endswith("(shipped)") and len(healing["data"]["blocks_sha256"]) == 64
    assert healing["heldout"]["ppl_after"] == pytest.approx(report["ppl_after"])
    assert recipe["method"] == DEFAULT_METHOD and [r["stage"] for r in recipe["provenance"]] == [
        "load",
        "merge",
        "load",
        "heal",
    ]
    # a run whose best step is 0 says, on the command line and in the card, that the unhealed model was kept
    healed, card = report["best_step"] > 0, open(os.path.join(out, "README.md")).read()
    assert ("healing recovered" in printed) == healed and ("the unhealed model was kept" in printed) != healed
    assert ("Healed after pruning: 4 steps" in card) == healed and ("kept the unhealed model" in card) != healed

    # the export holds exactly the model the API heals with the same data and options
    mesh = make_mesh(None)
    spec = DataSpec(seq_len=32, num_samples=12, seed=0)
    blocks = blocks_for(pruned, spec)
    api = heal(
        load_hf(pruned, mesh=mesh),
        load_hf(tiny_mixtral_tok.path, mesh=mesh),
        blocks,
        options=HealOptions(
            steps=4, warmup=1, batch_size=4, val_blocks=2, val_every=2, train="all", learning_rate=0.003
        ),
        progress=False,
    )
    exported = load_hf(out)
    for name, value in param_view(api.model).items():
        np.testing.assert_array_equal(np.asarray(param_view(exported)[name]), np.asarray(value), err_msg=name)
    # and PyTorch gives the healed JAX model's logits
    remote = "auto_map" in json.load(open(os.path.join(out, "config.json")))  # per-layer expert counts
    torch_model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=remote).eval()
    tokens = random_tokens(exported.cfg.vocab_size, batch=2, seq=16, seed=3)
    assert_close_logits(api.model(tokens), torch_logits(torch_model, tokens))

    # re-exporting the re-loaded healed model keeps the whole chain in its recipe
    again = save_hf(exported, str(tmp_path / "again"))
    chain = json.load(open(os.path.join(again, "recipe.json")))
    assert [r["stage"] for r in chain["provenance"]] == ["load", "merge", "load", "heal", "load"]
    assert chain["healing"] == recipe["healing"]


def test_heal_cli_refuses_bad_input_before_loading(tiny_mixtral_tok, tiny_mixtral, pruned, tmp_path, capsys):
    def error(*args) -> str:
        assert grape(["heal", *args[:3], "--out", str(tmp_path / "o"), *HEAL, *args[3:]]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("grape: error: "), err
        return err

    assert "differ in vocab_size" in error(pruned, "--teacher", tiny_mixtral.path)
    # same architecture and tokenizer, other weights: not the model it was pruned from
    other = save_model(
        build_model(
            tiny_mixtral_config(
                vocab_size=transformers.AutoConfig.from_pretrained(tiny_mixtral_tok.path).vocab_size,
                num_local_experts=8,
                num_hidden_layers=3,
            ),
            seed=6,
        ),
        tmp_path / "other",
    )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(tiny_mixtral_tok.path, name), other)
    capsys.readouterr()
    assert "not pruned from this teacher" in error(pruned, "--teacher", other)
    # the same model with another tokenizer
    retok = str(tmp_path / "retok")
    shutil.copytree(tiny_mixtral_tok.path, retok)
    with open(os.path.join(retok, "tokenizer.json"), "a") as f:
        f.write(" ")
    assert "tokenizers differ (tokenizer.json" in error(pruned, "--teacher", retok)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert "holds no text" in error(pruned, "--teacher", tiny_mixtral_tok.path, "--data", str(empty))
    assert "heal option warmup" in error(pruned, "--teacher", tiny_mixtral_tok.path, "--warmup", "9")
    assert not os.path.exists(tmp_path / "o") and not os.path.exists(tmp_path / "o.work")


def test_heal_cli_ctrl_c_says_what_was_saved(tiny_mixtral_tok, pruned, tmp_path, capsys, monkeypatch):
    def interrupted(*args, **kw):
        raise HealInterrupted(3, kw["resume_dir"])

    monkeypatch.setattr(cli_heal, "heal", interrupted)
    out = str(tmp_path / "o")
    assert grape(["heal", pruned, "--teacher", tiny_mixtral_tok.path, "--out", out, *HEAL]) == 130
    err = capsys.readouterr().err.strip()
    assert err == (
        f"grape: interrupted during healing; the state after step 3 is saved in {out}.work/heal: run the "
        f"same command again to resume"
    )
    assert not os.path.exists(out)


@pytest.mark.slow
def test_killed_heal_resumes_to_the_uninterrupted_result(tiny_mixtral_tok, pruned, tmp_path):
    """SIGKILL once a few steps are saved: nothing looks complete, the rerun resumes from the saved step
    and exports exactly what an uninterrupted run exports."""
    import signal

    from tests.test_kill_resume import _grape, _saved_steps, _wait_for

    args = [*HEAL[2:], "--steps", "40", "--checkpoint-every", "1", "--checkpoint-seconds", "0"]
    out = str(tmp_path / "healed")
    progress = os.path.join(out + ".work", "heal", "last")
    proc = _grape("heal", pruned, "--teacher", tiny_mixtral_tok.path, "--out", out, *args)
    _wait_for(lambda: len(_saved_steps(progress)) >= 2, proc, "saved healing steps", timeout=300)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not os.path.exists(out), "a killed healing must not leave an output"
    saved = _saved_steps(progress)[-1]
    assert 0 < saved < 40
    rerun = _grape("heal", pruned, "--teacher", tiny_mixtral_tok.path, "--out", out, *args)
    assert rerun.wait(timeout=600) == 0
    assert f"resuming healing after step {saved} of 40" in rerun.stdout.read()
    full = _grape("heal", pruned, "--teacher", tiny_mixtral_tok.path, "--out", str(tmp_path / "full"), *args)
    assert full.wait(timeout=600) == 0, full.stdout.read()
    for name in sorted(os.listdir(tmp_path / "full")):
        if name.endswith(".safetensors"):
            with open(os.path.join(out, name), "rb") as a, open(tmp_path / "full" / name, "rb") as b:
                assert a.read() == b.read(), name
    a, b = (json.load(open(os.path.join(d, "heal.json"))) for d in (out, str(tmp_path / "full")))
    assert a["losses"] == b["losses"] and a["val_losses"] == b["val_losses"] and a["ppl_after"] == b["ppl_after"]


@pytest.mark.slow
def test_heal_cli_cached_teacher_logits(tiny_mixtral_tok, pruned, tmp_path):
    """--teacher-logits cached (the teacher dropped before the student is loaded) trains like live."""
    outs = {}
    for mode in ("live", "cached"):
        outs[mode] = str(tmp_path / mode)
        assert (
            grape(
                [
                    "heal",
                    pruned,
                    "--teacher",
                    tiny_mixtral_tok.path,
                    "--out",
                    outs[mode],
                    *HEAL,
                    "--teacher-logits",
                    mode,
                ]
            )
            == 0
        )
    live, cached = (json.load(open(os.path.join(outs[m], "heal.json"))) for m in ("live", "cached"))
    np.testing.assert_allclose(cached["losses"], live["losses"], rtol=1e-5)
    assert cached["ppl_original"] == pytest.approx(live["ppl_original"], rel=1e-6)
    assert cached["ppl_after"] == pytest.approx(live["ppl_after"], rel=1e-3)
    assert cached["options"]["teacher_logits"] == "cached"


def test_load_keeps_an_exports_provenance_and_ignores_foreign_recipes(tiny_mixtral_tok, pruned, tmp_path):
    from conversion.hf_dir import provenance_of, recorded_provenance

    recipe = json.load(open(os.path.join(pruned, "recipe.json")))
    assert recorded_provenance(pruned) == recipe["provenance"]
    assert [r["stage"] for r in provenance_of(pruned)] == ["load", "merge", "load"]
    assert recorded_provenance(tiny_mixtral_tok.path) == []  # no recipe.json
    foreign = str(tmp_path / "foreign")
    shutil.copytree(tiny_mixtral_tok.path, foreign)
    for text in ("not json", json.dumps({"provenance": "x"}), json.dumps([1, 2]), json.dumps({"provenance": [{}]})):
        with open(os.path.join(foreign, "recipe.json"), "w") as f:
            f.write(text)
        assert [r["stage"] for r in provenance_of(foreign)] == ["load"], text
