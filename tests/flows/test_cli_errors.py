"""The command line's errors are one line (issue 17, item 5): bad table names in every command,
a negative seed, query files that are neither Parquet nor .npy, an altered codec file, a
read-only output folder. Each printed a traceback, or was accepted and left a stray folder."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from vecpress.flows.cli import main
from vecpress.pipeline.codec_store import _load
from vecpress.pipeline.errors import ConfigError
from vecpress.pipeline.lance_io import check_table_name, open_dataset
from vecpress.pipeline.options import CompressOptions
from vecpress.pipeline.run import run_compress

OPTS = CompressOptions(codec="PQ8", num_train=1000, num_queries=20, eval_k=10)


def one_line_error(capsys, rc: int) -> str:
    """The error main printed: exit code 2, one line on stderr, no traceback."""
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("vecpress: error: "), err
    return last


@pytest.fixture(scope="module")
def table(tmp_path_factory, ray_executor):
    """(corpus folder, out) with version 1 of table t (32-d, PQ8)."""
    from tests.conftest import write_vectors
    from vecpress.kernels.synthetic import ClusteredEmbeddings

    root = tmp_path_factory.mktemp("cli-errors")
    write_vectors(root / "src" / "a.parquet", ClusteredEmbeddings(32, seed=0).batch(0, 2000))
    run_compress([str(root / "src")], str(root / "out"), "t", OPTS, executor=ray_executor)
    return root / "src", root / "out"


BAD_NAMES = ["t\n", "-t", "../t", "t/x", "t_eval", "", "t" * 129]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_table_names_are_matched_whole(name):
    with pytest.raises(ConfigError, match="invalid table name"):
        check_table_name(name)


@pytest.mark.parametrize("name", ["t\n", "-t"], ids=["newline", "dash"])
@pytest.mark.parametrize("command", ["compress", "demo", "inspect", "search", "evaluate", "schedule"])
def test_every_command_refuses_a_bad_table_name_before_writing(tmp_path, capsys, command, name):
    """A trailing newline passed the `$`-anchored pattern (a stray OUT/_vecpress/t<newline>
    folder, then Lance's multi-line error); the demo wrote its corpus before checking."""
    out = tmp_path / "out"
    args = {"compress": ["compress", str(tmp_path), str(out), "--no-prefect"],
            "demo": ["demo", "--out", str(out), "--rows", "100", "--dim", "8", "--no-prefect"],
            "inspect": ["inspect", str(out)], "evaluate": ["evaluate", str(out)],
            "search": ["search", str(out), "--queries", str(tmp_path / "q.npy")],
            "schedule": ["schedule", str(tmp_path), str(out), "--print-parameters"]}[command]
    last = one_line_error(capsys, main([*args, f"--table={name}"]))
    assert f"invalid table name {name!r} (--table)" in last
    assert not out.exists()


def test_a_negative_seed_is_refused_before_anything_starts(tmp_path, capsys):
    """It failed inside the first Ray task (numpy's SeedSequence), as a traceback."""
    with pytest.raises(ConfigError, match="--seed must not be negative, got -1"):
        CompressOptions(seed=-1)
    (tmp_path / "src").mkdir()
    last = one_line_error(capsys, main(["compress", str(tmp_path / "src"), str(tmp_path / "out"), "--table", "t",
                                        "--seed", "-1", "--no-prefect"]))
    assert "--seed must not be negative" in last and not (tmp_path / "out").exists()
    last = one_line_error(capsys, main(["generate", str(tmp_path / "gen"), "--rows", "10", "--seed", "-1"]))
    assert "--seed must be at least 0, got -1" in last and not (tmp_path / "gen").exists()


def test_query_files_that_are_neither_parquet_nor_npy(table, tmp_path, capsys):
    _, out = table
    search = ["search", str(out), "--table", "t", "-k", "3"]
    text = tmp_path / "q.txt"
    text.write_text("0.1,0.2\n")
    last = one_line_error(capsys, main([*search, "--queries", str(text)]))
    assert f"--queries {text}: not a readable Parquet file nor a .npy array" in last and "not a Parquet file" in last
    broken = tmp_path / "q.npy"
    broken.write_bytes(b"\x93NUMPY garbage")
    last = one_line_error(capsys, main([*search, "--queries", str(broken)]))
    assert f"--queries {broken}: not a readable .npy array" in last
    np.save(tmp_path / "q5.npy", np.ones((2, 5), np.float32))
    last = one_line_error(capsys, main([*search, "--queries", str(tmp_path / "q5.npy")]))
    assert "shape (2, 5); expected (n, 32) floats" in last
    np.save(tmp_path / "ok.npy", np.ones((2, 32), np.float32))  # a .npy of queries works
    assert main([*search, "--queries", str(tmp_path / "ok.npy"), "--json"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 6


def test_an_altered_codec_file_is_named_by_the_cli(table, tmp_path, capsys):
    _, out = table
    codec_file = next((out / "_vecpress" / "t" / "codecs").glob("*.faiss"))
    good = codec_file.read_bytes()
    np.save(tmp_path / "q.npy", np.ones((2, 32), np.float32))
    try:
        codec_file.write_bytes(good[:50] + b"x" + good[51:])
        _load.cache_clear()  # (this process trained it: a fresh one reads the file)
        last = one_line_error(capsys, main(["search", str(out), "--table", "t", "--queries", str(tmp_path / "q.npy")]))
        assert str(codec_file) in last and "does not match its checksum" in last
    finally:
        codec_file.write_bytes(good)
        _load.cache_clear()


def test_a_read_only_output_folder_is_one_line(table, tmp_path, capsys):
    """Root writes through chmod: a read-only bind mount then (skipped where it cannot mount)."""
    src, out = table
    before = open_dataset(str(out), "t").version
    if os.geteuid() == 0:
        done = subprocess.run(["mount", "--bind", str(out), str(out)], capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"cannot bind-mount here: {done.stderr.strip()}")
        subprocess.run(["mount", "-o", "remount,bind,ro", str(out)], check=True)
        undo = ["umount", str(out)]
    else:
        subprocess.run(["chmod", "-R", "a-w", str(out)], check=True)
        undo = ["chmod", "-R", "u+w", str(out)]
    try:
        rc = main(["compress", str(src), str(out), "--table", "t", "--codec", "PQ8", "--num-train", "1000",
                   "--mode", "full", "--no-prefect"])
    finally:
        subprocess.run(undo, check=True)
    last = one_line_error(capsys, rc)
    assert f"{out}/_vecpress/t/lock.json: cannot write the table's lease: " in last
    assert last.endswith(("read-only file system", "permission denied"))
    assert open_dataset(str(out), "t").version == before


def test_planning_refuses_another_dimension_before_ray_starts(table, tmp_path):
    """The run started Ray before planning, so every input planning refuses (here vectors of
    another dimension than the table's) cost a Ray start first. A fresh process whose Ray would
    live under RAY_TMPDIR: the error, and no Ray session there."""
    from tests.conftest import write_vectors
    from vecpress.kernels.synthetic import ClusteredEmbeddings

    _, out = table
    write_vectors(tmp_path / "wide" / "a.parquet", ClusteredEmbeddings(48, seed=1).batch(0, 500))
    ray_dir = Path(tempfile.mkdtemp(prefix="vp-", dir="/tmp")) / "ray"  # (short: Ray's socket paths)
    env = {**os.environ, "RAY_TMPDIR": str(ray_dir), "RAY_ADDRESS": ""}
    try:
        done = subprocess.run([sys.executable, "-m", "vecpress.flows.cli", "-q", "compress", str(tmp_path / "wide"),
                               str(out), "--table", "t", "--codec", "PQ8", "--no-prefect"], env=env,
                              capture_output=True, text=True)
    finally:
        started = ray_dir.exists()
        shutil.rmtree(ray_dir.parent, ignore_errors=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("vecpress: error: ") and "dimension 48, table has 32" in last
    assert not started, "Ray was started before planning"
    assert open_dataset(str(out), "t").version == 1


def test_all_zero_queries_are_refused_for_a_cosine_table(tmp_path, capsys, ray_executor):
    """They were normalised silently (left at zero: every row scores 0)."""
    from tests.conftest import write_vectors
    from vecpress.kernels.synthetic import ClusteredEmbeddings
    from vecpress.pipeline.errors import SourceError, VecpressError
    from vecpress.pipeline.search import read_query_vectors, search

    write_vectors(tmp_path / "src" / "a.parquet", ClusteredEmbeddings(32, seed=0).batch(0, 2000))
    out = tmp_path / "out"
    run_compress([str(tmp_path / "src")], str(out), "c", CompressOptions(**{**OPTS.__dict__, "metric": "cosine"}),
                 executor=ray_executor)
    xq = np.ones((3, 32), np.float32)
    xq[1] = 0
    with pytest.raises(VecpressError, match="1 of 3 queries are all-zero vectors \\(first: query 1\\)"):
        search(str(out), "c", xq, 5)
    np.save(tmp_path / "q.npy", xq)
    with pytest.raises(SourceError, match="1 of 3 rows are all-zero vectors"):
        read_query_vectors(str(tmp_path / "q.npy"), "embedding", 32, metric="cosine")
    last = one_line_error(capsys, main(["search", str(out), "--table", "c", "--queries", str(tmp_path / "q.npy")]))
    assert "q.npy" in last and "all-zero vectors" in last and "cosine" in last
