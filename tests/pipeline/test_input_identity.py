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
import re

import lance
import numpy as np
import pyarrow as pa
import pytest

from vecpress.pipeline.errors import SourceError
from vecpress.pipeline.options import CompressOptions
from vecpress.pipeline.report import inspect_table
from vecpress.pipeline.run import run_compress
from vecpress.pipeline.source import SourceSpec, list_parquet_files, plan_sources
from tests.conftest import write_vectors

TABLE = "t"
OPTS = CompressOptions(codec="PQ4", num_train=500, num_queries=20, eval_k=10, shard_rows=1000, gate_max_drop=1.0)


def corpus(folder, num_files=3, rows=400, dim=16, seed=0, first_id=0, ids=None):
    x = np.random.default_rng(seed).standard_normal((num_files * rows, dim)).astype(np.float32)
    all_ids = np.arange(first_id, first_id + num_files * rows, dtype=np.int64) if ids is None else ids
    for i in range(num_files):
        write_vectors(folder / f"part-{i}.parquet", x[i * rows:(i + 1) * rows], all_ids[i * rows:(i + 1) * rows],
                      row_group_size=200)
    return x, all_ids


def data_files(ds) -> set[str]:
    return {d.path for f in ds.get_fragments() for d in f.metadata.files}


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


# ---- duplicate ids ------------------------------------------------------------------------------

@pytest.mark.parametrize("id_type", [pa.int64(), pa.string()])
def test_bucketed_check_finds_every_duplicate(tmp_path, id_type):
    """Ids of 5 tasks, 7 buckets: the per-bucket checks together find exactly the duplicated
    ids a global count finds, and name the earliest ones with their positions."""
    from vecpress.pipeline.executor import LocalExecutor
    from vecpress.pipeline.identity import find_duplicate_ids, hash_ids, write_id_buckets

    rng = np.random.default_rng(3)
    values = rng.integers(0, 3000, 5000)  # about 1,000 values repeat
    ids = pa.array(values) if id_type == pa.int64() else pa.array([f"doc-{v}" for v in values])
    assert np.array_equal(hash_ids(ids.slice(10, 5)), hash_ids(ids)[10:15])  # slices hash as their values
    files = []
    for t, lo in enumerate(range(0, 5000, 1000)):
        files.append(write_id_buckets(str(tmp_path / f"task-{t}.arrow"), [ids.slice(lo, 600), ids.slice(lo + 600, 400)],
                                      [np.arange(lo, lo + 600), np.arange(lo + 600, lo + 1000)], 7, id_type))
    found = find_duplicate_ids(LocalExecutor(), files, 7)
    uniq, first, counts = np.unique(values, return_index=True, return_counts=True)
    assert found.num_ids == int((counts > 1).sum()) and found.num_surplus_rows == int((counts - 1).sum())
    earliest = sorted(first[counts > 1])[:3]
    assert [rows[0] for _, rows in found.examples] == earliest
    for value, rows in found.examples:
        expect = np.nonzero(values == values[rows[0]])[0][:4].tolist()
        assert rows == expect and value == ids[rows[0]].as_py()


@pytest.mark.parametrize("serve", ["codes", "lancedb"])
def test_duplicate_ids_in_the_input_are_refused_and_nothing_is_committed(tmp_path, ray_executor, serve, monkeypatch):
    from vecpress.pipeline import identity

    monkeypatch.setattr(identity, "ID_BUCKET_ROWS", 250)  # 5 buckets of ids, checked by 5 Ray tasks
    src, out = tmp_path / "src", tmp_path / "out"
    opts = OPTS if serve == "codes" else dataclasses.replace(OPTS, serve="lancedb", codec="IVF4,PQ4")
    ids = np.arange(1200, dtype=np.int64)
    ids[800:1100] = np.arange(300)  # part-2's first 300 rows repeat part-0's ids
    ids[1150] = 5  # and one of them a third time
    corpus(src, ids=ids)
    with pytest.raises(SourceError, match="occur more than once") as err:
        run_compress([str(src)], str(out), TABLE, opts, executor=ray_executor)
    msg = str(err.value)
    assert "\n" not in msg and "column 'id': 300 id(s) occur more than once in the 3 input file(s) (301 surplus rows " \
        "of 1200)" in msg
    assert re.search(r"e\.g\. id 0 at rows 0 \(.*part-0\.parquet row 0\), 800 \(.*part-2\.parquet row 0\); id 1 at "
                     r"rows 1 \(.*part-0\.parquet row 1\), 801", msg)
    assert re.search(r"id 5 at rows 5 \(.*\), 805 \(.*\), 1150 \(.*part-2\.parquet row 350\)", msg) is None  # (3 shown)
    assert not (out / f"{TABLE}.lance").exists()  # no version, no data file written for one
    runs = out / "_vecpress" / TABLE / "runs"
    assert not [p for p in runs.glob("*/*") if p.is_dir()]  # nor ids files, checkpoints or index buffers


def test_duplicates_against_kept_rows_in_an_incremental_run(tmp_path, ray_executor):
    """Version 1 from two files; a new file repeats ids of one of them: the incremental run
    (which keeps the old files' fragments and does not re-encode them) refuses it, naming the
    kept rows, and version 1 stays the latest."""
    src, out = tmp_path / "src", tmp_path / "out"
    corpus(src, num_files=2, rows=1000)
    first = run_compress([str(src)], str(out), TABLE, OPTS, executor=ray_executor)
    assert first.version == 1
    x = np.random.default_rng(9).standard_normal((600, 16)).astype(np.float32)
    write_vectors(src / "part-9.parquet", x, np.concatenate([np.arange(2000, 2590), np.arange(1500, 1510)]),
                  row_group_size=200)
    kept_codec = dataclasses.replace(OPTS, drift_threshold=1e6)  # (the new rows are unlike the old: no retrain)
    with pytest.raises(SourceError, match=r"10 id\(s\) occur more than once in the 3 input file\(s\) and the rows kept "
                                          r"from version 1 \(10 surplus rows of 2600\), e\.g\. id 1500 at rows 1500 "
                                          r"\(kept row: .*part-1\.parquet row 500\), 2590 \(.*part-9\.parquet row 590\)"):
        run_compress([str(src)], str(out), TABLE, kept_codec, executor=ray_executor)
    ds = lance.dataset(str(out / f"{TABLE}.lance"))
    assert ds.version == 1 and ds.count_rows() == 2000
    assert {p.name for p in (out / f"{TABLE}.lance" / "data").iterdir()} == data_files(ds)  # none of the failed run's
    (src / "part-9.parquet").unlink()
    write_vectors(src / "part-9.parquet", x, np.arange(2000, 2600), row_group_size=200)
    again = run_compress([str(src)], str(out), TABLE, kept_codec, executor=ray_executor)
    assert again.mode == "incremental" and again.version == 2
    ids = lance.dataset(str(out / f"{TABLE}.lance")).to_table(columns=["id"]).column(0).to_numpy()
    assert sorted(ids.tolist()) == list(range(2600))
    check = inspect_table(str(out), TABLE)["id_check"]  # (the kept rows' ids checked too)
    assert check["unique"] and check["rows"] == 2600 and check["buckets"] == 1 and check["task_files"] >= 2
