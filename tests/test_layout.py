"""The package's import graph: no import cycle (counting imports inside functions, which only
hide a cycle until the first call), and no module imports another module's private name."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOT_INSTALLED = {"tests", "bench", "experiments", "default_model", ".venv"}


def package_modules(root: Path) -> dict[str, Path]:
    """saekit module name -> file, for the installed package's modules."""
    mods = {}
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if NOT_INSTALLED & set(rel.parts) or any(s.startswith(".") for s in rel.parts):
            continue
        parts = ("saekit", *rel.with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return mods


def imports(name: str, path: Path, mods: dict[str, Path]) -> list[tuple[str, str]]:
    """(imported saekit module, imported name or "") for every import in the module."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, "") for a in node.names if a.name in mods]
        elif isinstance(node, ast.ImportFrom):
            base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
            if node.level:
                base = base[: len(base) - node.level + 1] + ([node.module] if node.module else [])
                target = ".".join(base)
            else:
                target = node.module or ""
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((sub, "") if sub in mods else (target, a.name))
    return [(t, n) for t, n in out if t in mods]


def import_graph(root: Path) -> dict[str, set[str]]:
    mods = package_modules(root)
    return {m: {t for t, _ in imports(m, p, mods) if t != m} for m, p in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(u: str, path: list[str]) -> list[str] | None:
        state[u] = 1
        for v in sorted(graph[u]):
            if v.startswith(u + ".") or u.startswith(v + "."):
                continue  # a package and its own modules: __init__ runs first either way
            if state.get(v) == 1:
                return [*path[path.index(v) :], v]
            if v not in state and (c := visit(v, [*path, v])):
                return c
        state[u] = 2
        return None

    for u in sorted(graph):
        if u not in state and (c := visit(u, [u])):
            return c
    return None


def test_no_import_cycle():
    assert find_cycle(import_graph(ROOT)) is None


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"saekit.a.x": {"saekit.a.y"}, "saekit.a.y": {"saekit.b"}, "saekit.b": {"saekit.a.x"}}
    assert find_cycle(graph) == ["saekit.a.x", "saekit.a.y", "saekit.b", "saekit.a.x"]
    assert find_cycle({**graph, "saekit.b": set()}) is None


def test_no_private_name_is_imported_across_modules():
    mods = package_modules(ROOT)
    bad = [
        f"{m} imports {n} from {t}"
        for m, p in mods.items()
        for t, n in imports(m, p, mods)
        if n.startswith("_") and not n.startswith("__") and t != m
    ]
    assert bad == []
