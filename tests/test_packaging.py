"""What `pip install vecpress` puts on a machine: one top-level package, `vecpress`, holding
every module of flows/, pipeline/ and kernels/, and the `vecpress` command."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ("flows", "pipeline", "kernels")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """The wheel built from a clean copy of the sources (setuptools reuses a build/ folder)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("vecpress", *LAYERS):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    # setuptools' own backend, in this environment: no download, no build isolation
    code = "import sys, setuptools.build_meta as b; print(b.build_wheel(sys.argv[1]))"
    name = subprocess.run([sys.executable, "-c", code, str(out)], cwd=src, capture_output=True, text=True,
                          check=True).stdout.strip().splitlines()[-1]
    return zipfile.ZipFile(out / name)


def test_the_wheel_installs_only_vecpress(wheel):
    tops = {n.split("/")[0] for n in wheel.namelist() if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"vecpress"}


def test_the_wheel_holds_every_module(wheel):
    have = {n for n in wheel.namelist() if n.endswith(".py")}
    want = {"vecpress/__init__.py"} | {f"vecpress/{p.relative_to(ROOT).as_posix()}"
                                       for layer in LAYERS for p in (ROOT / layer).rglob("*.py")}
    assert want - have == set(), "modules missing from the wheel: add their package to pyproject.toml"
    assert have - want == set()


def test_the_wheel_declares_the_command(wheel):
    entry_points = next(n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt"))
    assert "vecpress = vecpress.flows.cli:main" in wheel.read(entry_points).decode()
