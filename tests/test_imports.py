"""No import circle among dadpo's modules: every `import`/`from ... import` in dadpo/ and cli/
(the click layer, installed as dadpo.cli), at module level or inside a function, read with ast."""

from __future__ import annotations

import ast
from pathlib import Path

from support import REPO

PACKAGES = {"dadpo": REPO / "dadpo", "dadpo.cli": REPO / "cli"}


def module_files() -> dict[str, Path]:
    """Module name -> source file, for every .py under dadpo/ (less the cli link) and cli/."""
    found = {}
    for package, root in PACKAGES.items():
        for path in sorted(root.rglob("*.py")):
            relative = path.relative_to(root).with_suffix("")
            if package == "dadpo" and relative.parts[0] == "cli":
                continue  # dadpo/cli is a link to cli/ in a checkout; cli/ is read as dadpo.cli
            parts = [package, *relative.parts]
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The dadpo modules `name` imports. `from P import x` counts as importing P.x when that is a
    module, else P; importing P.x also runs P's __init__, but a package importing its own modules
    is no circle, so only the named module counts."""
    is_package = path.name == "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import dadpo.cache.layout as x` names a module; a.b.c may be a.b's attribute
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None (depth-first search, three colours)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 finished
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for successor in sorted(graph[node]):
            if state.get(successor) == 1:
                return path[path.index(successor):] + [successor]
            if successor not in state and (cycle := visit(successor)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imported_modules(name, path, set(files)) for name, path in files.items()}


def test_no_import_circle():
    graph = import_graph()
    assert "dadpo.cli.main" in graph and "dadpo.cache.layout" in graph["dadpo.cache.manifest"]
    cycle = find_cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_check_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
