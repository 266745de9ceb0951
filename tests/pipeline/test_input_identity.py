"""Input identity: each real file is read once, and each id is committed once.

Links inside the input are refused unless --follow-links, which then reads each real file once
(a link to a parent folder walks it once). Ids that repeat, within the input or against the
rows an incremental run keeps, are found by the encode tasks (ids bucketed by hash, one check
per bucket) and refused: nothing is committed.
"""

from __future__ import annotations

import dataclasses
import json
import os

import lance
import numpy as np
import pytest

from vecpress.pipeline.errors import SourceError
from vecpress.pipeline.options import CompressOptions
from vecpress.pipeline.report import inspect_table
from vecpress.pipeline.run import run_compress
from vecpress.pipeline.source import SourceSpec, list_parquet_files, plan_sources
from tests.conftest import write_vectors

TABLE = "t"
OPTS = CompressOptions(codec="PQ4", num_train=500, num_queries=20, eval_k=10, shard_rows=1000)


def corpus(folder, num_files=3, rows=400, dim=16, seed=0, first_id=0, ids=None):
    x = np.random.default_rng(seed).standard_normal((num_files * rows, dim)).astype(np.float32)
    all_ids = np.arange(first_id, first_id + num_files * rows, dtype=np.int64) if ids is None else ids
    for i in range(num_files):
        write_vectors(folder / f"part-{i}.parquet", x[i * rows:(i + 1) * rows], all_ids[i * rows:(i + 1) * rows],
                      row_group_size=200)
    return x, all_ids


# ---- links ------------------------------------------------------------------------------------

def test_link_to_a_listed_file_is_refused_and_followed_once(tmp_path):
    src = tmp_path / "src"
    corpus(src)
    os.symlink(src / "part-0.parquet", src / "again.parquet")
    with pytest.raises(SourceError, match=r"1 symbolic link\(s\) inside the input: .*again\.parquet -> .*part-0\.parquet"
                                          r".*--follow-links") as err:
        plan_sources(SourceSpec((str(src),)))
    assert "\n" not in str(err.value)
    plan = plan_sources(SourceSpec((str(src),), follow_links=True))
    assert plan.num_rows == 1200 and [f.uri for f in plan.files] == [str(src / f"part-{i}.parquet") for i in range(3)]
    assert plan.aliases == ((str(src / "again.parquet"), str(src / "part-0.parquet")),)


def test_link_to_a_parent_folder_is_refused_and_walked_once(tmp_path):
    src = tmp_path / "src"
    corpus(src)
    (src / "sub").mkdir()
    os.symlink(src, src / "sub" / "loop")  # a cycle: src/sub/loop/sub/loop/...
    os.symlink(tmp_path, src / "up")  # and the folder above it
    with pytest.raises(SourceError, match=r"2 symbolic link\(s\)"):
        list_parquet_files([str(src)])
    plan = plan_sources(SourceSpec((str(src),), follow_links=True))
    assert plan.num_rows == 1200 and len(plan.files) == 3


def test_followed_link_reads_the_real_file_once_by_its_resolved_path(tmp_path):
    src, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    corpus(src, num_files=2)
    corpus(elsewhere, num_files=1, seed=1, first_id=800)
    os.symlink(elsewhere, src / "more")  # a folder link
    os.symlink(elsewhere / "part-0.parquet", src / "x.parquet")  # and a file link to the same file
    os.link(src / "part-0.parquet", src / "zz-hard.parquet")  # a hard link is the same real file too
    plan = plan_sources(SourceSpec((str(src), str(src / "part-1.parquet")), follow_links=True))
    real = str(elsewhere / "part-0.parquet")
    assert [f.uri for f in plan.files] == sorted([real, str(src / "part-0.parquet"), str(src / "part-1.parquet")])
    assert plan.num_rows == 1200
    assert [link for link, _ in plan.links] in ([str(src / "more" / "part-0.parquet")], [str(src / "x.parquet")])
    assert (str(src / "zz-hard.parquet"), str(src / "part-0.parquet")) in plan.aliases


def test_an_input_that_is_not_a_regular_file_is_refused(tmp_path):
    src = tmp_path / "src"
    corpus(src, num_files=1)
    os.mkfifo(src / "pipe.parquet")  # opening it would block the run forever
    with pytest.raises(SourceError, match=r"pipe\.parquet \(a named pipe\).*regular Parquet files only"):
        list_parquet_files([str(src)])
    with pytest.raises(SourceError, match="input is not a regular file or a folder"):
        list_parquet_files([str(src / "pipe.parquet")])


def test_run_with_follow_links_commits_each_row_once_and_reports_the_files(tmp_path, ray_executor):
    src, elsewhere = tmp_path / "src", tmp_path / "elsewhere"
    corpus(src, num_files=2)
    corpus(elsewhere, num_files=1, seed=1, first_id=800)
    os.symlink(elsewhere, src / "more")
    os.symlink(src, src / "loop")
    out = tmp_path / "out"
    with pytest.raises(SourceError, match="symbolic link"):
        run_compress([str(src)], str(out), TABLE, OPTS, executor=ray_executor)
    assert not (out / f"{TABLE}.lance").exists()
    r = run_compress([str(src)], str(out), TABLE, dataclasses.replace(OPTS, follow_links=True), executor=ray_executor)
    ids = lance.dataset(str(out / f"{TABLE}.lance")).to_table(columns=["id"]).column(0).to_numpy()
    assert len(ids) == 1200 and len(np.unique(ids)) == 1200
    info = inspect_table(str(out), TABLE)
    assert info["source"]["files"] == sorted([str(elsewhere / "part-0.parquet"), str(src / "part-0.parquet"),
                                              str(src / "part-1.parquet")])
    assert info["source"]["links"] == [[str(src / "more" / "part-0.parquet"), str(elsewhere / "part-0.parquet")]]
    assert r.manifest["source"]["links_followed"] == 1
    assert json.loads(json.dumps(r.report))["source"]["files"] == info["source"]["files"]
