"""The Prefect flow under Prefect's test harness, and the `vecpress` command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vecpress.flows.cli import main
from vecpress.pipeline.errors import SourceError


@pytest.fixture
def corpus(make_corpus):
    folder, x = make_corpus(num_rows=5000, dim=32, num_files=2)
    return folder, x


def test_flow_runs_every_stage_as_a_task(corpus, tmp_path, prefect_harness, ray_executor):
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from vecpress.flows.compress import compress_flow

    folder, _ = corpus
    state = compress_flow(inputs=[str(folder)], out=str(tmp_path / "out"), table="corpus", codec="PQ8",
                          keep=["text"], num_train=2000, num_queries=100, eval_k=20, return_state=True)
    assert state.is_completed()
    info = state.result()
    assert info["version"] == 1 and info["num_rows"] == 5000 and info["eval"]["recall_at_10"] > 0.2

    import anyio

    async def task_names():
        async with get_client() as client:
            runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
            return sorted((r.name.rsplit("-", 1)[0], r.state.type.value) for r in runs)

    import time

    # Prefect records task runs asynchronously: wait (bounded) until every stage's is in
    deadline = time.monotonic() + 30
    names = anyio.run(task_names)
    while len(names) < 8 and time.monotonic() < deadline:
        time.sleep(0.5)
        names = anyio.run(task_names)
    assert [n for n, _ in names] == sorted(["plan", "sample", "advise", "train", "encode", "commit", "evaluate", "gate"])
    assert all(s == "COMPLETED" for _, s in names)


def test_flow_fails_on_bad_input_without_retrying(tmp_path, prefect_harness, ray_executor):
    from vecpress.flows.compress import compress_flow

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(SourceError, match="x.parquet"):
        compress_flow(inputs=[str(bad)], out=str(tmp_path / "out"), table="corpus")
    assert not (tmp_path / "out" / "corpus.lance" / "_versions").exists()


def test_cli_compress_inspect_search(corpus, tmp_path, capsys, ray_executor):
    folder, x = corpus
    out = tmp_path / "out"
    rc = main(["compress", str(folder), str(out), "--table", "corpus", "--codec", "PQ8", "--keep", "text",
               "--num-train", "2000", "--num-queries", "100", "--eval-k", "20", "--no-prefect", "--json"])
    assert rc == 0
    made = json.loads(capsys.readouterr().out)
    rc = main(["inspect", str(out), "--table", "corpus", "--json"])
    info = json.loads(capsys.readouterr().out)
    assert rc == 0 and made["run"]["committed"] and {k: v for k, v in made.items() if k != "run"} == info
    for key in ("table", "version", "num_rows", "dim", "metric", "codec", "codec_uri", "code_bytes", "source_bytes"):
        assert key in info
    for key in ("num_queries", "recall_at_1", "recall_at_10", "recall_at_100", "relative_error"):
        assert key in info["eval"]
    assert info["eval"]["recall_at_100"] is None  # eval_k=20 cannot measure recall@100
    assert info["eval"]["searched"] == "encode pass"
    rc = main(["evaluate", str(out), "--table", "corpus", "--json"])
    again = json.loads(capsys.readouterr().out)
    assert rc == 0 and again["searched"] == "stored codes" and again["version"] == info["version"]
    assert again["recall_at_10"] == pytest.approx(info["eval"]["recall_at_10"], abs=0.01)
    rc = main(["evaluate", str(out), "--table", "corpus", "-k", "10", "--no-rerank"])
    text = capsys.readouterr().out
    assert rc == 0 and "search over the stored codes" in text and "k=10" in text and "re-ranked" not in text

    q = tmp_path / "q.parquet"
    pq.write_table(pa.table({"embedding": pa.FixedSizeListArray.from_arrays(pa.array(x[:3].ravel()), 32)}), q)
    rc = main(["search", str(out), "--table", "corpus", "--queries", str(q), "-k", "4", "--rerank", "5", "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rc == 0 and len(rows) == 12
    assert [r["id"] for r in rows if r["rank"] == 0] == [0, 1, 2]  # exact re-rank finds the vectors themselves
    assert rows[0]["text"] == "doc 0"


def test_cli_reports_bad_input_clearly(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.parquet").write_bytes(b"PAR1 truncated")
    rc = main(["compress", str(tmp_path / "src"), str(tmp_path / "out"), "--table", "t", "--no-prefect"])
    err = capsys.readouterr().err
    assert rc == 2 and "a.parquet" in err and "error" in err


def test_help_lists_every_command():
    out = subprocess.run([sys.executable, "-m", "vecpress.flows.cli", "--help"], capture_output=True, text=True, check=True).stdout
    for cmd in ("demo", "compress", "inspect", "evaluate", "search", "generate"):
        assert cmd in out


def test_demo_follows_its_dim_and_regenerates_a_corpus_of_other_parameters(tmp_path, capsys):
    """The demo's codec follows --dim (it was PQ48 for every dim: 'does not work for dim=32'),
    and a corpus made with other --rows/--dim is made again (it was reused as it was)."""
    out = tmp_path / "demo"
    common = ["--out", str(out), "--rows", "3000", "--files", "2", "--num-train", "2000", "--num-queries", "100",
              "--eval-k", "10", "--no-prefect", "--json"]
    assert main(["demo", "--dim", "32", *common]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["codec"] == "PQ4" and first["dim"] == 32 and first["num_rows"] == 3000
    assert main(["demo", "--dim", "48", *common]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["codec"] == "PQ6" and second["dim"] == 48
    assert sorted(p.name for p in (out / "source").glob("*.parquet")) == ["part-00000.parquet", "part-00001.parquet"]


def test_generate_refuses_empty_corpora_and_replaces_its_own_files(tmp_path, capsys):
    folder = tmp_path / "gen"
    assert main(["generate", str(folder), "--rows", "0"]) == 2
    assert "--rows must be at least 1" in capsys.readouterr().err
    assert main(["generate", str(folder), "--rows", "10", "--files", "20"]) == 2
    assert main(["generate", str(folder), "--rows", "400", "--dim", "8", "--files", "4"]) == 0
    assert main(["generate", str(folder), "--rows", "400", "--dim", "16", "--files", "2"]) == 0
    parts = sorted(folder.glob("*.parquet"))
    assert [p.name for p in parts] == ["part-00000.parquet", "part-00001.parquet"]  # no 8-d files left behind
    assert all(pq.read_schema(p).field("embedding").type.list_size == 16 for p in parts)


@pytest.mark.parametrize("args, says", [
    (["--keep", "text,text"], "columns must be distinct"),
    (["--codec", "PQ0"], "must be at least 1"),
    (["--device", "cuda:x"], "device must be auto, cpu or cuda[:N]"),
    (["--ngpu", "-5"], "--ngpu must be"),
    (["--gate-min-recall", "5"], "--gate-min-recall must be in [0, 1]"),
    (["--rerank-codec", "BIN"], "cannot re-rank by distance"),
    ([], "the output must be a folder"),
], ids=["keep-twice", "PQ0", "device", "ngpu", "gate-floor", "binary-warm", "out-is-a-file"])
def test_cli_refuses_bad_options_in_one_line(make_corpus, tmp_path, capsys, args, says):
    """Each of these ended in a traceback (or was accepted) before; nothing is written."""
    folder, _ = make_corpus(num_rows=2000, num_files=1)
    out = tmp_path / "out" if args else next(folder.glob("*.parquet"))
    rc = main(["compress", str(folder), str(out), "--table", "t", "--keep", "text", *args, "--no-prefect"])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert rc == 2 and last.startswith("vecpress: error:") and says in last
    assert not (tmp_path / "out" / "t.lance").exists()


def test_prefect_console_shows_user_errors_without_tracebacks():
    """Prefect logs a failed run's exception with its traceback (83 lines for a bad --codec):
    for vecpress's own errors the console shows the message; -q keeps warnings and errors."""
    import logging

    from vecpress.flows.cli import _PrefectConsoleFilter

    def record(level, exc=None):
        info = (type(exc), exc, None) if exc else None
        return logging.LogRecord("prefect.flow_runs", level, __file__, 1, "run failed", None, info)

    quiet, loud = _PrefectConsoleFilter(quiet=True), _PrefectConsoleFilter(quiet=False)
    assert not quiet.filter(record(logging.INFO)) and loud.filter(record(logging.INFO))
    user = record(logging.ERROR, SourceError("a.parquet: bad"))
    assert quiet.filter(user) and user.exc_info is None
    bug = record(logging.ERROR, KeyError("x"))
    assert loud.filter(bug) and bug.exc_info is not None  # other errors keep their traceback


def test_device_cuda_without_a_gpu_fails_instead_of_encoding_on_the_cpu(make_corpus, tmp_path, capsys):
    from vecpress.kernels.gpu_encode import gpu_count
    from vecpress.pipeline.lance_io import open_dataset

    if gpu_count() > 0:
        pytest.skip("this machine has a GPU")
    folder, _ = make_corpus(num_rows=2000, num_files=1)
    rc = main(["compress", str(folder), str(tmp_path / "out"), "--table", "t", "--codec", "PQ8", "--num-train", "1000",
               "--device", "cuda", "--no-prefect"])
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and "--device cuda" in last and "sees no such GPU" in last
    assert open_dataset(str(tmp_path / "out"), "t") is None  # nothing committed


def test_cli_serves_a_table_to_lancedb(corpus, tmp_path, capsys, ray_executor):
    """`compress --serve lancedb`: its JSON carries LanceDB's recall over the grid, and
    `inspect` prints the grid and the cheapest settings."""
    folder, _ = corpus
    out = tmp_path / "out"
    rc = main(["compress", str(folder), str(out), "--table", "t", "--serve", "lancedb", "--codec", "IVF16,PQ8",
               "--num-train", "2000", "--num-queries", "100", "--eval-k", "20", "--no-prefect", "--json"])
    assert rc == 0
    made = json.loads(capsys.readouterr().out)
    grid = made["eval"]["served"]["grid"]
    assert made["serve"] == "lancedb" and made["eval"]["searched"] == "lancedb"
    assert {(g["nprobes"], g["refine_factor"]) for g in grid} >= {(10, None), (20, None), (50, None)}
    assert all(set(g) == {"nprobes", "refine_factor", "recall_at_10", "p50_ms"} for g in grid)
    assert main(["inspect", str(out), "--table", "t"]) == 0
    text = capsys.readouterr().out
    assert "served by       LanceDB: IVF_PQ IVF16,PQ8 over column embedding" in text
    assert "nprobes 20" in text and "recall@10 >= 0.9" in text and "index" in text
    assert main(["compress", str(folder), str(out), "--table", "t", "--codec", "IVF16,PQ8", "--no-prefect"]) == 2
    assert "add --serve lancedb" in capsys.readouterr().err
