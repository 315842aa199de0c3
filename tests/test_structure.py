"""The package's shape: no import cycle, no module using another's private names, and every
hook an algorithm overrides is one ``MetaLearner``'s docstring lists."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "lit_meta"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def imports_of(name: str) -> set[str]:
    """lit_meta modules that ``name`` imports anywhere (functions included; not under ``if TYPE_CHECKING``)."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_block(node):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # ``from pkg import module``
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in MODULES and m != name}


def test_no_import_cycle_in_lit_meta():
    graph = {name: imports_of(name) for name in MODULES}
    assert "lit_meta.cli" not in graph["lit_meta.adapt"]  # cli -> adapt (for adapt.main), never back
    state: dict[str, str] = {}
    stack: list[str] = []

    def walk(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                walk(nxt)
        stack.pop()
        state[node] = "done"

    for name in graph:
        if name not in state:
            walk(name)


def private_names(name: str) -> set[str]:
    """``_names`` a module defines: functions, methods, classes, ``self._x`` / module-level assignments."""
    names = set()
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
    return {n for n in names if n.startswith("_") and not n.startswith("__")}


def test_no_module_uses_another_modules_private_names():
    defined = {name: private_names(name) for name in MODULES}
    offences = []
    for name in MODULES:
        own = defined[name]
        others = set().union(*(d for m, d in defined.items() if m != name)) - own
        for node in ast.walk(ast.parse(MODULES[name].read_text())):
            used = None
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                used = node.attr
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lit_meta"):
                used = next((a.name for a in node.names if a.name.startswith("_")), None)
            if used in others:
                offences.append(f"{name}:{node.lineno} uses {used}")
    assert not offences, offences


def test_every_hook_an_algorithm_overrides_is_documented_and_public():
    import lit_meta.algorithms as algorithms
    from lit_meta.algorithms import MetaLearner, MetaModule

    documented = MetaLearner.__doc__
    base_names = set(vars(MetaLearner)) | set(vars(MetaModule))
    for cls in (getattr(algorithms, n) for n in algorithms.__all__):
        if not issubclass(cls, MetaLearner) or cls is MetaLearner:
            continue
        overridden = {n for n in vars(cls) if n in base_names and not n.startswith("__")} - {"algorithm"}
        for hook in overridden:
            assert f"``{hook}" in documented, f"{cls.__name__}.{hook} is not among MetaLearner's documented hooks"
            assert not hook.startswith("_"), f"{cls.__name__} overrides private {hook}"
            assert not hook.startswith("on_"), f"{cls.__name__} overrides Lightning hook {hook}"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports_first_in_a_fresh_interpreter(name):
    result = subprocess.run([sys.executable, "-c", f"import {name}"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr.strip().splitlines()[-1:]


def test_readme_tree_names_every_module():
    """README's "How it works" tree matches the files: each module of lit_meta is in it."""
    readme = (REPO / "README.md").read_text()
    tree = readme.split("## How it works", 1)[1].split("```")[1]
    missing = [str(p.relative_to(REPO)) for p in sorted(PACKAGE.rglob("*.py"))
               if p.name != "__init__.py" and p.name not in tree]
    assert not missing, f"README's How it works tree does not name {missing}"
