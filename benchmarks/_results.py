"""Where every benchmark leaves its figures: one JSON file (see BENCHMARKS.md)."""

from __future__ import annotations

import json
from pathlib import Path


def write_results(path: str, payload: dict) -> None:
    """Write `payload` as indented JSON at `path`, creating its folder, and say where."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=1))
    print(f"wrote {path}")
