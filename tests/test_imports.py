"""The import graph of packages/*/src: no circle between modules, and arrows only down.

Every module is parsed with ``ast``; every import counts, at module level or inside a function
(a function-level import is a dependency that runs later, not a lesser one). ``from pkg import
name`` depends on the module ``pkg.name`` when there is one, else on ``pkg``. Importing
``a.b.c`` also runs ``a/__init__`` and ``a/b/__init__``; those implicit edges are not drawn
(a package's ``__init__`` importing its own submodules would otherwise always be a circle).

The layering is that of docs/architecture.md ("Arrows point down only").
"""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: top-level package -> packages it must never import
FORBIDDEN = {
    "d2s": {"densecap", "vse", "vse_train", "bench", "d2s_ui"},
    "densecap": {"vse", "vse_train", "bench", "d2s_ui"},
    "vse": {"densecap", "bench", "vse_train", "d2s_ui"},
    "vse_train": {"densecap", "bench", "d2s_ui"},
    "bench": {"densecap", "vse_train", "d2s_ui"},
    "d2s_ui": {"vse_train"},  # the page sits on top; it needs inference only (vse), never the trainer
}


def project_modules() -> dict[str, Path]:
    """module name -> file, for every module under packages/*/src."""
    mods = {}
    for src in sorted(REPO.glob("packages/*/src")):
        for f in sorted(src.rglob("*.py")):
            parts = list(f.relative_to(src).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = f
    return mods


def _base(module: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    """The absolute module ``from ... import`` names (relative imports resolved)."""
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    up = parts if is_pkg else parts[:-1]
    up = up[: len(up) - (node.level - 1)]
    return ".".join(up + ([node.module] if node.module else []))


def imports_of(module: str, path: Path, mods: dict[str, Path]) -> list[tuple[str, int, str]]:
    """(imported project module, line, the import as written) for every import in ``path``."""
    out = []
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _base(module, is_pkg, node)
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in mods:  # `import a.b.X` where X is not a module: a.b
                t = t.rpartition(".")[0]
            if t and t != module:
                out.append((t, node.lineno, ast.unparse(node)))
    return out


def graph() -> tuple[dict[str, Path], dict[str, list[tuple[str, int, str]]]]:
    mods = project_modules()
    return mods, {m: imports_of(m, p, mods) for m, p in mods.items()}


def find_cycle(edges: dict[str, list[tuple[str, int, str]]]) -> list[str]:
    """One circle of modules (first module repeated at the end), or [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str]:
        state[m] = 1
        path.append(m)
        for t, _, _ in edges.get(m, []):
            if state.get(t) == 1:
                return path[path.index(t) :] + [t]
            if t not in state:
                found = visit(t)
                if found:
                    return found
        path.pop()
        state[m] = 2
        return []

    for m in sorted(edges):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return []


def test_the_graph_sees_function_level_and_relative_imports():
    """The checks below can fail: known edges of each kind are found."""
    _, edges = graph()
    targets = {m: {t for t, _, _ in e} for m, e in edges.items()}
    assert "densecap.executors.base" in targets["densecap.config"]  # module level, relative
    assert "densecap.caption_sources" in targets["densecap.config"]  # inside a method
    assert "densecap.executors.inline" in targets["densecap.executors.local"]  # from . import inline
    assert "d2s.config" in targets["d2s.registry"]
    assert find_cycle({"a": [("b", 1, "")], "b": [("c", 1, "")], "c": [("a", 1, "")]}) == ["a", "b", "c", "a"]


def test_no_import_circle():
    mods, edges = graph()
    cycle = find_cycle(edges)
    if cycle:
        steps = []
        for a, b in zip(cycle, cycle[1:]):
            line, text = next((n, t) for m, n, t in edges[a] if m == b)
            steps.append(f"  {mods[a].relative_to(REPO)}:{line}: {text}")
        raise AssertionError("import circle " + " -> ".join(cycle) + ":\n" + "\n".join(steps))


def test_arrows_point_down_only():
    mods, edges = graph()
    broken = []
    for m, e in sorted(edges.items()):
        top = m.split(".")[0]
        for t, line, text in e:
            if t.split(".")[0] in FORBIDDEN.get(top, ()):
                broken.append(
                    f"  {mods[m].relative_to(REPO)}:{line}: {text}  ({top} must not import {t.split('.')[0]})"
                )
    assert not broken, "imports against docs/architecture.md's layering:\n" + "\n".join(broken)
