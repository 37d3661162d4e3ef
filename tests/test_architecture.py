"""The packages' imports point one way: base <- core <- method <- I/O <- app, with no import cycle.

A module's layer is read from its folder (DESIGN_NOTES.md draws them): `grape_jax/base/` is base,
`grape_jax/core/` core, the method packages (`passes/`, `calibration/`, `planners/`, `merge/`, `fit/`,
`healing/`, `evaluation/`) method, `conversion/` I/O, and everything else of `grape_jax` (its top-level
modules, `data/`, `report/`, `demo/`, `cli/`) app. A module may import modules of its own layer or of
lower layers only. Imports inside functions count as edges too (and may not close a cycle); they exist
only where a heavy or optional import is deferred on purpose, and each says why.
"""

from __future__ import annotations

import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYERS = ("base", "core", "method", "io", "app")
FOLDER_LAYER = {
    "grape_jax.base": "base",
    "grape_jax.core": "core",
    "grape_jax.passes": "method",
    "grape_jax.calibration": "method",
    "grape_jax.planners": "method",
    "grape_jax.merge": "method",
    "grape_jax.fit": "method",
    "grape_jax.stream": "method",
    "grape_jax.healing": "method",
    "grape_jax.evaluation": "method",
    "conversion": "io",
    "grape_jax": "app",
}
MAX_TOP_LEVEL = 15  # modules directly in grape_jax/
MAX_LINES = 400  # lines of one module


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
    """The layer of a module: that of the deepest listed package holding it (or being it)."""
    for package in sorted(FOLDER_LAYER, key=len, reverse=True):
        if module == package or module.startswith(package + "."):
            return FOLDER_LAYER[package]
    raise AssertionError(f"{module} is in no layer's folder: see FOLDER_LAYER (and DESIGN_NOTES.md)")


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
    """No cycle, counting imports inside functions too (a deferred import does not excuse a cycle)."""
    _, edges = graph
    top = {m: sorted({t for t, _, _ in targets}) for m, targets in edges.items()}
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


def test_packages_stay_small():
    """At most MAX_TOP_LEVEL modules directly in grape_jax/ and no module over MAX_LINES lines."""
    modules = _modules()
    top = [m for m, p in modules.items() if os.path.dirname(p) == os.path.join(ROOT, "grape_jax") and m != "grape_jax"]
    assert len(top) <= MAX_TOP_LEVEL, f"{len(top)} modules at the top of grape_jax: {sorted(top)}"
    long = {p: n for p in modules.values() if (n := len(open(p, encoding="utf-8").read().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_public_functions_defined_once():
    """No public (non-underscore) module-level function or class name is defined in two modules of
    grape_jax: a name says which function it is. (The families of conversion/ implement one protocol of
    same-named functions on purpose.)"""
    seen: dict[str, list[str]] = {}
    for module, path in _modules().items():
        if not module.startswith("grape_jax"):
            continue
        for node in ast.parse(open(path, encoding="utf-8").read()).body:
            if isinstance(node, ast.FunctionDef | ast.ClassDef) and not node.name.startswith("_"):
                seen.setdefault(node.name, []).append(module)
    twice = {name: where for name, where in seen.items() if len(where) > 1}
    assert not twice, f"defined in several modules: {twice}"


def test_layer_of_a_path():
    """A module's layer follows from its folder alone."""
    assert layer("grape_jax.core.model") == "core"
    assert layer("grape_jax.fit.solve") == "method"
    assert layer("grape_jax.cli.main") == layer("grape_jax.pipeline") == "app"
    assert layer("conversion.quant.fp8") == "io"
    assert layer("grape_jax.base.atomic") == "base"


def test_layer_check_catches_an_upward_edge(tmp_path):
    """The checker itself: a core module importing an app module is reported."""
    fake = tmp_path / "m.py"
    fake.write_text("from grape_jax.cli.main import main\n")
    edges = _imports(str(fake), "grape_jax.core.config", set(_modules()))
    assert edges == [("grape_jax.cli.main", 1, True)]
    assert LAYERS.index(layer("grape_jax.cli.main")) > LAYERS.index(layer("grape_jax.core.config"))
