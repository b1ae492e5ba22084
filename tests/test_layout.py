"""The code's layout: no import circle among rcma's modules, and no module too long to find one's way in."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 700


def modules() -> dict[str, Path]:
    """{dotted name: file} of every module of pipeline/, fusion/ and cli.py."""
    found = {}
    for path in [*sorted((REPO / "pipeline").rglob("*.py")), *sorted((REPO / "fusion").rglob("*.py"))]:
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    found["cli"] = REPO / "cli.py"
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The rcma modules a module imports, at its top or inside functions (a package's own
    submodule named in `from package import submodule` counts as that submodule)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name in known)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            for alias in node.names:
                if f"{base}.{alias.name}" in known:
                    out.add(f"{base}.{alias.name}")
                elif base in known:
                    out.add(base)
    return out - {name}


def test_no_module_imports_itself_through_others():
    found = modules()
    graph = {name: imports(name, path, set(found)) for name, path in found.items()}
    for start in graph:
        stack, seen = [(start, [start])], set()
        while stack:
            name, route = stack.pop()
            for after in graph[name]:
                assert after != start, "import circle: " + " -> ".join([*route, after])
                if after not in seen:
                    seen.add(after)
                    stack.append((after, [*route, after]))


def test_no_module_is_longer_than_the_limit():
    lengths = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert {name: n for name, n in lengths.items() if n > MAX_MODULE_LINES} == {}
