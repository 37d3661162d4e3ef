"""The packages' imports point one way: base <- core <- method <- I/O <- app, with no import cycle.

The layers (DESIGN_NOTES.md draws them): a module may import modules of its own layer or of lower
layers only. Every module of `grape_jax` and `conversion` must be listed here, so a new module has to be
placed in a layer before its imports are checked. Imports inside functions count as edges too; they
exist only where a heavy or optional import is deferred on purpose, and each says why.
"""

from __future__ import annotations

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ("base", "core", "method", "io", "app")
LAYER_OF = {
    "base": ["grape_jax.atomic", "grape_jax.multihost"],
    "core": [
        "grape_jax.config",
        "grape_jax.params",
        "grape_jax.sharding",
        "grape_jax.routing",
        "grape_jax.rope",
        "grape_jax.mla",
        "grape_jax.layers",
        "grape_jax.dispatch",
        "grape_jax.model",
    ],
    "method": [
        "grape_jax.similarity",
        "grape_jax.calibration",
        "grape_jax.stats",
        "grape_jax.plan",
        "grape_jax.planners.*",
        "grape_jax.merge",
        "grape_jax.fit",
        "grape_jax.fit_pass",
        "grape_jax.fit_accumulate",
        "grape_jax.fit_solve",
        "grape_jax.fit_check",
        "grape_jax.alignment",
        "grape_jax.resume",
        "grape_jax.evaluate",
        "grape_jax.distill",
        "grape_jax.heal_step",
        "grape_jax.heal_loop",
        "grape_jax.healing",
    ],
    "io": ["conversion.*"],
    "app": [
        "grape_jax",
        "grape_jax.api",
        "grape_jax.pipeline",
        "grape_jax.cli",
        "grape_jax.cli_args",
        "grape_jax.cli_model",
        "grape_jax.cli_method",
        "grape_jax.cli_demo",
        "grape_jax.cli_heal",
        "grape_jax.compare",
        "grape_jax.demo_model",
        "grape_jax.tasks",
        "grape_jax.plots",
        "grape_jax.lm_eval_adapter",
        "grape_jax.train",
        "grape_jax.data",
        "grape_jax.tokenizer",
        "grape_jax.recipe",
    ],
}


def _modules() -> dict[str, str]:
    """Every module of the two packages: dotted name -> file."""
    out = {}
    for package in ("grape_jax", "conversion"):
        for root, _, files in os.walk(os.path.join(ROOT, package)):
            for f in files:
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(root, f), ROOT)[:-3].replace(os.sep, ".")
                    out[rel.removesuffix(".__init__")] = os.path.join(root, f)
    return out


def layer(module: str) -> str:
    """The layer of a module: listed by name, or inside a package listed as `package.*`."""
    found = None
    for name, entries in LAYER_OF.items():
        for entry in entries:
            package = entry.removesuffix(".*")
            if module == package or (entry.endswith(".*") and module.startswith(package + ".")):
                found = name
    if found is None:
        raise AssertionError(f"{module} is in no layer: add it to LAYER_OF (and DESIGN_NOTES.md)")
    return found


def _imports(path: str, module: str, modules: set[str]) -> list[tuple[str, int, bool]]:
    """(imported internal module, line, at module level) for every import in the file."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")
                base = ".".join(
                    parts[: len(parts) - node.level + (1 if path.endswith("__init__.py") else 0)]
                    + ([node.module] if node.module else [])
                )
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name and name != module:
                out.append((name, node.lineno, id(node) in top))
    return out


@pytest.fixture(scope="module")
def graph():
    modules = _modules()
    return modules, {m: _imports(p, m, set(modules)) for m, p in modules.items()}


def test_every_module_has_a_layer(graph):
    modules, _ = graph
    for m in modules:
        layer(m)


def test_no_upward_import(graph):
    _, edges = graph
    bad = [
        f"{m} ({layer(m)}) imports {t} ({layer(t)}) at line {line}"
        for m, targets in edges.items()
        for t, line, _ in targets
        if LAYERS.index(layer(t)) > LAYERS.index(layer(m))
    ]
    assert not bad, "\n".join(bad)


def test_no_import_cycle(graph):
    _, edges = graph
    top = {m: sorted({t for t, _, at_top in targets if at_top}) for m, targets in edges.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in top.get(m, []):
            if state.get(t) == 1:
                cycle = stack[stack.index(t) :] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(top):
        if m not in state:
            visit(m)


def test_deferred_imports_say_why():
    """An import inside a function is marked `# noqa: PLC0415` with a reason (ruff enforces the mark)."""
    pattern = re.compile(r"noqa: PLC0415\s*(\(.+\)|#.+)?$")
    bad = []
    for path in _modules().values():
        lines = open(path, encoding="utf-8").read().splitlines()
        for n, line in enumerate(lines, 1):
            if "noqa: PLC0415" in line:
                above = lines[n - 2].strip() if n > 1 else ""
                m = pattern.search(line)
                if not ((m and m.group(1)) or above.startswith("#")):
                    bad.append(f"{path}:{n}: deferred import without a reason")
    assert not bad, "\n".join(bad)


def test_layer_check_catches_an_upward_edge(tmp_path):
    """The checker itself: a core module importing an app module is reported."""
    fake = tmp_path / "m.py"
    fake.write_text("from grape_jax.cli import main\n")
    edges = _imports(str(fake), "grape_jax.config", set(_modules()))
    assert edges == [("grape_jax.cli", 1, True)]
    assert LAYERS.index(layer("grape_jax.cli")) > LAYERS.index(layer("grape_jax.config"))
