"""The package's imports flow one way: each subpackage imports only the ones below it in
:data:`LAYERS`, and no two modules import each other, directly or in a loop (runtime,
function-local and TYPE_CHECKING imports alike; the file's imports read with ``ast``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "crma_lightning"

LAYERS = [
    "core",
    "adapters",
    "backbone",
    "methods",
    "data",
    "runs",
    "training",
    "routing",
    "evaluation",
    "callbacks",
    "serve",
    "cli",
]
"""Bottom to top. ``corpus`` (data files) and the package's ``__init__``/``_paths`` (re-exports and
import wiring) sit outside the layers."""


def _sources() -> dict[str, Path]:
    files = {p: ROOT for p in (ROOT / PACKAGE).rglob("*.py")}
    files.update({p: ROOT for p in (ROOT / "callbacks").rglob("*.py")})
    out = {}
    for path in files:
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[0] == "callbacks":  # installed as crma_lightning.callbacks
            parts = [PACKAGE, *parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _sources()


def imports_of(name: str) -> set[str]:
    """The package modules ``name`` imports, anywhere in its file."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                here = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:
                t = t.rpartition(".")[0]
            if t and t != name and t != PACKAGE:
                found.add(t)
    return found


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


GRAPH = {m: imports_of(m) for m in MODULES}


def test_every_subpackage_is_in_a_layer():
    subpackages = {m.split(".")[1] for m in MODULES if m.count(".") >= 1}
    assert subpackages - set(LAYERS) <= {"corpus", "_paths"}


def test_no_module_imports_a_layer_above_its_own():
    upward = [
        f"{m} ({layer_of(m)}) imports {d} ({layer_of(d)})"
        for m, deps in GRAPH.items()
        for d in deps
        if layer_of(m) and layer_of(d) and LAYERS.index(layer_of(d)) > LAYERS.index(layer_of(m))
    ]
    assert not upward, "\n".join(upward)


def _cycle() -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(GRAPH.get(m, ())):
            if d == PACKAGE or layer_of(d) is None and not d.startswith(PACKAGE):
                continue
            if state.get(d) == 1:
                return stack[stack.index(d) :] + [d]
            if d not in state and (found := visit(d)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(GRAPH):
        # a subpackage's __init__ re-exports its own modules: an edge into the package is not a loop
        if m not in state and (found := visit(m)):
            return found
    return None


def test_no_import_cycles():
    cycle = _cycle()
    assert cycle is None, " -> ".join(cycle or [])


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("from crma_lightning.serve.run import load_run\n", "crma_lightning.serve.run"),
        ("if TYPE_CHECKING:\n    from crma_lightning.cli import fit\n", "crma_lightning.cli.fit"),
        ("def f():\n    from crma_lightning.serve import run\n", "crma_lightning.serve.run"),
    ],
)
def test_the_checker_sees_runtime_local_and_type_checking_imports(tmp_path, monkeypatch, source, expected):
    probe = "crma_lightning.core.probe"
    path = tmp_path / "probe.py"
    path.write_text(source)
    monkeypatch.setitem(MODULES, probe, path)
    assert expected in imports_of(probe)


def test_the_checker_finds_a_cycle_and_an_upward_import(monkeypatch):
    monkeypatch.setitem(GRAPH, "crma_lightning.core.atomic", {"crma_lightning.core.dist"})
    monkeypatch.setitem(GRAPH, "crma_lightning.core.dist", {"crma_lightning.core.atomic"})
    assert set(_cycle() or []) == {"crma_lightning.core.atomic", "crma_lightning.core.dist"}
    monkeypatch.setitem(GRAPH, "crma_lightning.core.dist", {"crma_lightning.serve.run"})
    with pytest.raises(AssertionError, match="core.dist \\(core\\) imports crma_lightning.serve.run"):
        test_no_module_imports_a_layer_above_its_own()
