"""What `pip install vecpress` puts on a machine: one top-level package, `vecpress`, holding
every module of flows/, pipeline/ and kernels/, and the `vecpress` command."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    # setuptools' own backend, in this environment: no download, no build isolation
    code = ("import sys, setuptools.build_meta as b; "
            "print(b.build_wheel(sys.argv[1]))")
    name = subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip().splitlines()[-1]
    return zipfile.ZipFile(out / name)


def test_the_wheel_installs_only_vecpress(wheel):
    tops = {n.split("/")[0] for n in wheel.namelist() if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"vecpress"}


def test_the_wheel_holds_every_module(wheel):
    have = {n for n in wheel.namelist() if n.endswith(".py")}
    want = {"vecpress/__init__.py"} | {f"vecpress/{p.relative_to(ROOT).as_posix()}"
                                       for layer in ("flows", "pipeline", "kernels") for p in (ROOT / layer).rglob("*.py")}
    assert want - have == set(), "modules missing from the wheel: add their package to pyproject.toml"
    assert have - want == set()


def test_the_wheel_declares_the_command(wheel):
    entry_points = next(n for n in wheel.namelist() if n.endswith(".dist-info/entry_points.txt"))
    assert "vecpress = vecpress.flows.cli:main" in wheel.read(entry_points).decode()
