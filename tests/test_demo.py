"""The embedded demo and the reproduction script run end to end on small models."""

from __future__ import annotations

import csv
import math
import os
import re

import pytest

from grape_jax.cli.main import main as grape


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_demo_quick_shows_every_method(tmp_path, capsys):
    out = tmp_path / "demo"
    assert grape(["demo", "--quick", "--per-layer", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = _rows(out / "results.csv")
    names = {r["name"] for r in rows}
    assert {
        "original",
        "grape-l (fit, default)",
        "grape (fit)",
        "grape (dominant)",
        "grape-r (dominant)",
        "local (dominant)",
        "frequency",
        "frequency (global)",
        "reap",
    } <= names
    for r in rows:
        assert math.isfinite(float(r["ppl"])) and float(r["ppl"]) > 1, r
        assert f"| {r['name']} |" in printed
    original = next(r for r in rows if r["name"] == "original")
    for r in rows:
        if r["name"] != "original":
            assert int(r["params"]) < int(original["params"])
            assert sum(map(int, r["kept_per_layer"].split())) == sum(map(int, original["kept_per_layer"].split())) - 8
    for f in ("report.md", "perplexity.png", "allocation_r2.png"):
        assert os.path.getsize(out / f) > 0


@pytest.mark.slow
def test_reproduce_paper_tiny(tiny_mixtral_tok, tmp_path):
    from grape_jax.evaluation.tasks import sample_task_path
    from scripts.reproduce_paper import main

    out = tmp_path / "repro"
    main(
        [
            "--preset",
            "tiny",
            "--hf-dir",
            tiny_mixtral_tok.path,
            "--out",
            str(out),
            "--num-samples",
            "4",
            "--seq-len",
            "32",
            "--eval-samples",
            "4",
            "--task",
            f"piqa={sample_task_path('piqa')}",
        ]
    )
    rows = _rows(out / "results.csv")
    assert {r["method"] for r in rows} >= {"grape", "grape-r", "local", "frequency", "reap", "hc-smoe", "m-smoe"}
    assert {int(r["per_layer"]) for r in rows if r["method"] != "-"} == {1, 2}
    assert os.path.isfile(out / "zero_shot.json") and os.path.isfile(out / "report.md")


def readme_demo_figures() -> list[str]:
    """The perplexities README.md says `grape demo` prints (the paragraph after <!-- demo-figures -->)."""
    text = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")).read()
    paragraph = text.split("<!-- demo-figures -->\n", 1)[1].split("\n\n", 1)[0]
    return re.findall(r"\d+\.\d{3}", paragraph)


@pytest.mark.slow
def test_readme_demo_figures_are_what_grape_demo_prints(tmp_path, capsys):
    """`grape demo` as a fresh clone runs it: the README's figures are the ones it prints (3 decimals)."""
    assert grape(["demo", "--out", str(tmp_path / "demo")]) == 0
    rows = {(r["name"], int(r["per_layer"])): float(r["ppl"]) for r in _rows(tmp_path / "demo" / "results.csv")}
    want = [
        rows[("original", 0)],
        rows[("grape-l (fit, default)", 2)],
        rows[("grape-l (fit, default)", 4)],
        next(v for (name, r), v in rows.items() if name.startswith("grape-l (fit, default) + heal")),
        rows[("frequency", 2)],
        rows[("frequency", 4)],
    ]
    assert readme_demo_figures() == [f"{v:.3f}" for v in want]
