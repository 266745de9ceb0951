"""What a user sees on the command line: no Ray notice on every command, named search scores,
help that lists only what a command takes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vecpress.flows.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_commands_show_no_ray_token_notice(make_corpus, tmp_path):
    """Ray 2.60 warned 'Token authentication is enabled for this Ray cluster' on every command
    that starts a local Ray, even with -q. With -q a successful run now writes nothing to stderr."""
    folder, _ = make_corpus(num_rows=2000, dim=16, num_files=1)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    proc = subprocess.run([sys.executable, "-m", "vecpress.flows.cli", "-q", "compress", str(folder), str(tmp_path / "out"),
                           "--table", "t", "--codec", "PQ4", "--num-train", "1000", "--num-queries", "50",
                           "--eval-k", "10", "--no-prefect"], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "Token authentication" not in proc.stderr
    assert "table           t (version 1)" in proc.stdout


@pytest.mark.parametrize("metric", ["cosine", "ip"])
def test_search_shows_named_scores_not_negative_distances(make_corpus, tmp_path, capsys, ray_executor, metric):
    """`vecpress search` printed cosine and inner-product results as negative 'distance's (the
    kernels' negated similarity). Cosine now shows cosine_distance = 1 - similarity (>= 0), inner
    product its value as inner_product (larger first)."""
    folder, x = make_corpus(num_rows=3000, dim=16, num_files=1)
    out = tmp_path / "out"
    assert main(["-q", "compress", str(folder), str(out), "--table", "t", "--codec", "PQ4", "--metric", metric,
                 "--num-train", "2000", "--num-queries", "50", "--eval-k", "10", "--no-prefect"]) == 0
    capsys.readouterr()
    q = tmp_path / "q.parquet"
    xq = x[:5]
    pq.write_table(pa.table({"embedding": pa.FixedSizeListArray.from_arrays(pa.array(xq.ravel()), 16)}), q)

    assert main(["search", str(out), "--table", "t", "--queries", str(q), "-k", "5", "--rerank", "10", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 25 and all("distance" not in r for r in rows)
    name = {"cosine": "cosine_distance", "ip": "inner_product"}[metric]
    for r in rows:  # re-ranked: exact scores against the source vectors
        a, b = xq[r["query"]], x[r["id"]]
        exact = 1 - a @ b / np.linalg.norm(a) / np.linalg.norm(b) if metric == "cosine" else a @ b
        assert r[name] == pytest.approx(exact, rel=1e-4, abs=1e-4)
    scores = np.array([r[name] for r in rows]).reshape(5, 5)
    if metric == "cosine":
        assert (scores >= 0).all() and (np.diff(scores, axis=1) >= -1e-6).all()  # nearest first
        assert scores[:, 0] == pytest.approx(0, abs=1e-4)  # each query is in the table
    else:
        assert (np.diff(scores, axis=1) <= 1e-6).all()  # largest first

    assert main(["search", str(out), "--table", "t", "--queries", str(q), "-k", "3"]) == 0  # codes only, as text
    header = capsys.readouterr().out.splitlines()[0].split()
    assert name in header and "distance" not in header


def test_schedule_help_lists_only_what_schedule_takes():
    """`schedule --help` listed --no-prefect, which schedule then refused."""
    out = subprocess.run([sys.executable, "-m", "vecpress.flows.cli", "schedule", "--help"], capture_output=True,
                         text=True, check=True, cwd=ROOT).stdout
    assert "--no-prefect" not in out and "--json" not in out and "--cron" in out
    with pytest.raises(SystemExit) as exit_:
        main(["schedule", "in", "out", "--table", "t", "--no-prefect"])
    assert exit_.value.code == 2


def test_search_of_a_served_table_is_lancedb_s_with_nprobes_and_where(make_corpus, tmp_path, capsys, ray_executor):
    """`vecpress search` runs the Python API's search: on a --serve lancedb table that is
    LanceDB's own (--nprobes, --rerank as refine_factor), with --where applied before scoring."""
    import lancedb

    folder, x = make_corpus(num_rows=3000, dim=16, num_files=1)
    out = tmp_path / "out"
    assert main(["-q", "compress", str(folder), str(out), "--table", "t", "--serve", "lancedb", "--codec", "IVF8,PQ4",
                 "--num-train", "2000", "--num-queries", "50", "--eval-k", "10", "--no-prefect"]) == 0
    capsys.readouterr()
    q = tmp_path / "q.npy"
    np.save(q, x[[3, 2500]])
    assert main(["search", str(out), "--table", "t", "--queries", str(q), "-k", "4", "--nprobes", "8", "--rerank", "5",
                 "--where", "id >= 2000", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["query"] for r in rows] == [0] * 4 + [1] * 4 and [r["rank"] for r in rows] == [0, 1, 2, 3] * 2
    assert all(r["id"] >= 2000 for r in rows) and rows[4]["id"] == 2500 and rows[4]["distance"] < 1e-3
    want = lancedb.connect(str(out)).open_table("t").search(x[3]).nprobes(8).refine_factor(5) \
        .where("id >= 2000", prefilter=True).limit(4).to_list()
    assert [r["id"] for r in rows[:4]] == [r["id"] for r in want]
    assert main(["search", str(out), "--table", "t", "--queries", str(q), "--rerank", "2", "--rerank-from",
                 "source"]) == 2  # (a codes-table option on a served table: one line)
    assert "re-ranks with its stored vectors" in capsys.readouterr().err
