"""The import direction flows -> pipeline -> kernels, Ray only in pipeline.distributed,
Prefect only in flows, no I/O libraries in kernels."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def modules(package: str):
    return sorted((ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", modules("kernels"), ids=lambda p: str(p.relative_to(ROOT)))
def test_kernels_are_pure_compute(path):
    forbidden = {"pipeline", "flows", "ray", "prefect", "pyarrow", "lance", "lancedb", "os", "pathlib", "fsspec"}
    assert not imports_of(path) & forbidden


@pytest.mark.parametrize("path", modules("pipeline"), ids=lambda p: str(p.relative_to(ROOT)))
def test_pipeline_has_no_prefect_and_ray_only_in_distributed(path):
    names = imports_of(path)
    assert "prefect" not in names and "flows" not in names
    if "distributed" not in path.parts:
        assert "ray" not in names
