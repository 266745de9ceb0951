"""How the code is laid out, read from its imports: the direction flows -> pipeline -> kernels,
Ray only in pipeline.distributed, Prefect only in flows, no I/O libraries in kernels, every
import by its `vecpress.` name, no import cycle (function-level imports included), and no
module past the size of one concern."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("flows", "pipeline", "kernels")
#: a module longer than this holds more than one concern (the house rule: about 500 lines)
MAX_MODULE_LINES = 500


def modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def all_modules() -> list[Path]:
    return [p for package in PACKAGES for p in modules(package)]


def module_name(path: Path) -> str:
    """flows/cli.py -> vecpress.flows.cli (as installed)."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["vecpress", *parts])


def imported_names(path: Path) -> set[str]:
    """Every module name `path` imports, anywhere in it (function-level imports too), relative
    imports resolved, `from a import b` as both a and a.b."""
    tree = ast.parse(path.read_text())
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            names.add(base)
            names |= {f"{base}.{a.name}" for a in node.names}
    return names


def top_names(path: Path) -> set[str]:
    """The distributions a module imports: `vecpress.<layer>` for vecpress's own, else the top name."""
    out = set()
    for n in imported_names(path):
        parts = n.split(".")
        out.add(".".join(parts[:2]) if parts[0] == "vecpress" and len(parts) > 1 else parts[0])
    return out


@pytest.mark.parametrize("path", modules("kernels"), ids=lambda p: str(p.relative_to(ROOT)))
def test_kernels_are_pure_compute(path):
    forbidden = {"vecpress.pipeline", "vecpress.flows", "ray", "prefect", "pyarrow", "lance", "lancedb", "os",
                 "pathlib", "fsspec"}
    assert not top_names(path) & forbidden


@pytest.mark.parametrize("path", modules("pipeline"), ids=lambda p: str(p.relative_to(ROOT)))
def test_pipeline_has_no_prefect_and_ray_only_in_distributed(path):
    names = top_names(path)
    assert "prefect" not in names and "vecpress.flows" not in names
    if "distributed" not in path.parts:
        assert "ray" not in names


@pytest.mark.parametrize("path", all_modules() + sorted((ROOT / "tests").rglob("*.py"))
                         + sorted((ROOT / "benchmarks").glob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_use_the_installed_names(path):
    """`pipeline`, `kernels` and `flows` are not importable once installed: only `vecpress.*`."""
    bare = {n for n in imported_names(path) if n.split(".")[0] in PACKAGES}
    assert not bare, f"{path.relative_to(ROOT)} imports {sorted(bare)}: use vecpress.<name>"


def import_graph() -> dict[str, set[str]]:
    """vecpress module -> the vecpress modules it imports (a package's own parents left out:
    importing a.b.c runs a and a.b first, which is no cycle of the code's making)."""
    known = {module_name(p): p for p in all_modules()}

    def resolve(name: str) -> str | None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for name, path in known.items():
        deps = {resolve(n) for n in imported_names(path) if n.startswith("vecpress.")}
        graph[name] = {d for d in deps if d and d != name and not name.startswith(d + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The graph's strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("path", all_modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_modules_hold_one_concern(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.relative_to(ROOT)} has {lines} lines: split it by concern"
