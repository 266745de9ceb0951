"""The `vecpress` command and Prefect flows import vecpress.flows before numpy: numpy's
huge-page advice is off there unless NUMPY_MADVISE_HUGEPAGE says otherwise."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PROBE = ("import vecpress.flows, numpy\n"
         "from numpy._core.multiarray import _get_madvise_hugepage\n"
         "print(_get_madvise_hugepage())")


def _advised(**env) -> str:
    base = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"}
    base["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    done = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                          env={**base, **env}, check=True)
    return done.stdout.strip()


def test_the_command_turns_numpy_s_huge_page_advice_off_unless_told_otherwise():
    assert _advised() == "False"
    assert _advised(NUMPY_MADVISE_HUGEPAGE="1") == "True"
