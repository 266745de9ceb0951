"""The advisor's benchmarks (both stages, the first stage's residual chain), the training and
the list-search benchmarks run end to end at toy sizes and write their JSON: they call into
pipeline.preselect, pipeline.lists and kernels.codecs.train below the public API, so a change
there that breaks them shows here, not in the next session that needs their figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RUNS = {
    "first_stage": ["--dim", "32", "--budget", "8", "--num-train", "11000", "--base", "3000", "--queries", "60",
                    "--stages", "10000x20000,11000x2000"],
    "first_stage_chain": ["--dims", "32", "--budgets", "8,16"],
    "second_stage": ["--dim", "32", "--budget", "8", "--num-train", "11000", "--base", "4000", "--rows", "2000,4000",
                     "--queries", "60"],
    "list_search": ["--rows", "20000", "--dim", "32", "--codec", "RQ4x8", "--partitions", "32", "--num-train",
                    "10000", "--queries", "40", "--single", "2", "--nprobes", "2,8"],
    "train_rows": ["--dims", "32", "--num-train", "12000", "--base", "2000", "--queries", "50", "--max-bytes", "16"],
    "greedy_encode": ["--rows", "3000", "--dims", "32", "--stages", "4", "--repeats", "1"],
    "rq_train": ["--codec", "RQ4x8", "--rows", "12000", "--dim", "32", "--base-rows", "2000",
                 "--variants", "vecpress,vecpress-faiss-pca"],
}


@pytest.mark.parametrize("data", ["clustered", "powerlaw"])
@pytest.mark.parametrize("name", sorted(RUNS))
def test_benchmark_runs_and_writes_its_results(tmp_path, name, data):
    if name == "rq_train" and data == "powerlaw":
        pytest.skip("rq_train.py generates its own rows")
    out = tmp_path / f"{name}.json"
    extra = [] if name == "rq_train" else ["--data", data]
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *RUNS[name], *extra,
                           "--results", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(out.read_text())
    if name == "first_stage":
        assert results["full_size"] and results["args"]["data"] == data
        assert [(s["train_rows"], s["base_rows"]) for s in results["stages"]] == [(10_000, 3_000), (11_000, 2_000)]
        assert all(s["first_stage"] for s in results["stages"])
    elif name == "first_stage_chain":
        (row,) = results["rows"]
        assert list(row["family_recall_at_10"]) == ["RQ4x8", "RQ8x8", "RQ16x8", "RQ32x8", "RQ64x8"]
        assert [s["budget"] for s in row["budgets"]] == [8, 16] and all(s["front_runners"] for s in row["budgets"])
    elif name == "list_search":
        assert [r["nprobes"] for r in results["rows"]] == [2, 8]
        assert all(r["same_neighbours"] > 0.99 and r["max_distance_difference"] < 1e-4 for r in results["rows"])
    elif name == "train_rows":  # (every codec trained on fewer rows than the sample, and judged against it)
        rows = {r["codec"]: r for r in results["rows"]}
        assert rows["PQ8"]["train_rows"] == 39 * 256 and rows["SQ4"]["train_rows"] == 6_000
        assert all(r["train_rows"] < 12_000 and 0 < r["recall_at_10"] <= 1 for r in rows.values())
        assert all(r["behind_whole"] == round(r["whole_recall_at_10"] - r["recall_at_10"], 4) for r in rows.values())
    elif name == "greedy_encode":  # (each way at each thread count; the same codes but near-ties)
        assert {(r["threads"], r["way"]) for r in results["results"]} >= {(1, "encode_greedy (now)")}
        assert all(r["bytes_differing"] < 0.01 and r["seconds"] > 0 for r in results["results"])
    elif name == "second_stage":
        assert results["args"]["data"] == data and "train_seconds" in results
    else:
        assert [r["variant"] for r in results["rows"]] == ["vecpress", "vecpress-faiss-pca"]
        assert all(0 < r["recall_at_10"] <= 1 for r in results["rows"])
