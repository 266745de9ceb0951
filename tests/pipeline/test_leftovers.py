"""Issue 17, leftovers: a failed or interrupted run removes what it wrote and did not commit, the
next run sweeps what crashed runs left, run folders follow retention and keep no raw vectors,
and a missing run folder is handled."""

from __future__ import annotations

import logging
import os
import shutil

import lance
import numpy as np
import pyarrow as pa
import pytest

from vecpress.kernels.synthetic import ClusteredEmbeddings
from vecpress.pipeline.errors import QualityGateError, VecpressError
from vecpress.pipeline.executor import LocalExecutor
from vecpress.pipeline.options import CompressOptions
from vecpress.pipeline.run import run_compress
from vecpress.pipeline.stages import Stages
from tests.conftest import write_vectors

DIM = 16
OPTS = dict(codec="PQ4", num_train=1000, num_queries=50, eval_k=10, seed=1, shard_rows=1000, gate_max_drop=1.0)


def part(folder, name, lo, hi):
    x = ClusteredEmbeddings(DIM, seed=0, num_clusters=16).batch(lo, hi - lo)
    write_vectors(folder / name, x, np.arange(lo, hi, dtype=np.int64), row_group_size=500)


def run(src, out, stages=Stages(), **kw):
    return run_compress([str(src)], str(out), "t", CompressOptions(**{**OPTS, **kw}), executor=LocalExecutor(),
                        stages=stages)


def referenced(out) -> set[str]:
    ds = lance.dataset(str(out / "t.lance"))
    return {f.path for v in ds.versions() for frag in lance.dataset(str(out / "t.lance"), version=v["version"])
            .get_fragments() for f in frag.metadata.files}


def table_files(out) -> list[str]:
    return sorted(os.path.relpath(os.path.join(r, f), out / "t.lance") for r, _, fs in os.walk(out / "t.lance")
                  for f in fs)


def run_folders(out) -> list[str]:
    return sorted(os.listdir(out / "_vecpress" / "t" / "runs"))


@pytest.fixture
def src(tmp_path):
    folder = tmp_path / "src"
    for i in range(2):
        part(folder, f"p{i}.parquet", i * 1000, (i + 1) * 1000)
    return folder


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_a_failed_run_removes_what_it_wrote(src, tmp_path, error):
    """The run dies after its encode tasks wrote fragments (4 data files), before the commit:
    they, and the run's folder with its training sample, are removed (they stayed, and every
    later run kept them)."""
    out = tmp_path / "out"
    first = run(src, out)
    before = table_files(out)
    part(src, "p2.parquet", 2000, 3000)
    part(src, "p3.parquet", 3000, 4000)

    def dies(*args, **kwargs):
        raise error

    written = []

    def encode(*args, **kwargs):
        from vecpress.pipeline.stages import encode as real

        encoded = real(*args, **kwargs)
        written.extend(f["files"][0]["path"] for f in encoded.fragments)
        return encoded

    with pytest.raises(type(error)):
        run(src, out, Stages(encode=encode, commit=dies), mode="full")
    assert len(written) == 4 and not set(written) & set(os.listdir(out / "t.lance" / "data"))
    assert table_files(out) == before
    assert run_folders(out) == [first.run_id]  # the failed run's folder (its training sample) is gone
    assert lance.dataset(str(out / "t.lance")).count_rows() == 2000


def test_the_next_run_sweeps_what_a_crash_left(src, tmp_path):
    """A crashed run (killed: no cleanup) left uncommitted fragments and a staging file in the
    table's folder; the next run, holding the lease, removes them (they stayed for good)."""
    out = tmp_path / "out"
    run(src, out)
    uri = str(out / "t.lance")
    schema = lance.dataset(uri).schema
    frags = lance.fragment.write_fragments(pa.table({"id": pa.array([7], pa.int64()),
                                                     "code": pa.array([b"abcd"], pa.binary(4))}).cast(schema),
                                           uri, schema=schema, mode="overwrite")
    (out / "t.lance" / "data" / "0000crashed.lance#3").write_bytes(b"half a file")
    leftovers = {frags[0].files[0].path, "0000crashed.lance#3"}
    assert leftovers <= set(os.listdir(out / "t.lance" / "data"))
    again = run(src, out)  # nothing changed: nothing committed, and the leftovers are gone
    assert not again.committed
    assert not leftovers & set(os.listdir(out / "t.lance" / "data"))
    assert set(os.listdir(out / "t.lance" / "data")) == referenced(out)
    assert lance.dataset(uri).count_rows() == 2000


def test_run_folders_follow_retention_and_keep_no_raw_vectors(src, tmp_path):
    """Run folders keep what later runs and `evaluate` need (held-out queries, ground truth,
    plan), not the training sample; a run that commits nothing leaves no folder; folders of
    versions dropped by --keep-versions go (every run's folder stayed, training sample and all)."""
    from vecpress.pipeline.evaluate import evaluate_version

    out = tmp_path / "out"
    runs = [run(src, out, mode="full", keep_versions=2) for _ in range(3)]
    assert not any((out / "_vecpress" / "t" / "runs" / r / "train.npy").exists() for r in run_folders(out))
    kept = {v["version"] for v in lance.dataset(str(out / "t.lance")).versions()}
    assert kept == {2, 3}
    expected = sorted(r.run_id for r in runs if r.version in kept)
    assert run_folders(out) == expected
    assert run(src, out, keep_versions=2).committed is False
    assert run_folders(out) == expected  # the run with nothing to do left no folder
    ev = evaluate_version(str(out), "t", runs[-1].version, LocalExecutor(), recompute=True)
    assert ev["recall_at_10"] > 0.2


def test_a_missing_run_folder_falls_back_to_a_full_run(src, tmp_path, caplog):
    """The latest version's run folder removed by hand: the next run rebuilds in full with a
    one-line warning (every later incremental run failed with FileNotFoundError), and
    `evaluate` of a version without its folder says so in one line."""
    from vecpress.pipeline.evaluate import evaluate_version

    out = tmp_path / "out"
    first = run(src, out)
    shutil.rmtree(out / "_vecpress" / "t" / "runs" / first.run_id)
    with pytest.raises(VecpressError, match=r"queries.npy is missing \(its run folder was removed\?\)"):
        evaluate_version(str(out), "t", first.version, LocalExecutor(), recompute=True)
    from vecpress.pipeline.search import search

    xq = ClusteredEmbeddings(DIM, seed=0, num_clusters=16).batch(0, 2)
    assert len(search(str(out), "t", xq, 3)) == 6  # the codes need no run folder
    with pytest.raises(VecpressError, match=r"plan.json is missing .*re-ranking from the source needs it$"):
        search(str(out), "t", xq, 3, rerank=4)
    part(src, "p2.parquet", 2000, 3000)
    with caplog.at_level(logging.WARNING, logger="vecpress"):
        night = run(src, out)
    assert night.committed and night.mode == "full" and lance.dataset(str(out / "t.lance")).count_rows() == 3000
    assert any("layout" in r.message and "is gone (its run folder was removed)" in r.message for r in caplog.records)


def test_a_failed_gate_keeps_its_run_folder_and_retention_drops_old_failures(src, tmp_path):
    """A version that failed the gate stays inspectable (its run folder too); failed versions
    beyond --keep-versions go, tag, branch and folder."""
    from vecpress.pipeline.report import inspect_table

    out = tmp_path / "out"
    run(src, out)
    failed = []
    for _ in range(2):
        with pytest.raises(QualityGateError):
            run(src, out, mode="full", gate_min_recall=0.9999, keep_versions=1)
        failed.append(sorted(t for t in lance.dataset(str(out / "t.lance")).tags.list() if t.startswith("failed-")))
    assert len(failed[0]) == 1 and len(failed[1]) == 1 and failed[0] != failed[1]  # the older one dropped
    tag = failed[1][0]
    assert inspect_table(str(out), "t", version=tag)["gate"]["passed"] is False
    assert tag.removeprefix("failed-") in run_folders(out)
    assert failed[0][0].removeprefix("failed-") not in run_folders(out)
    assert not (out / "t.lance" / "tree" / failed[0][0]).exists()


def test_a_failed_versions_commit_is_once_per_run(tmp_path):
    """A retried commit of a version that failed the gate (Prefect retries the commit) finds it
    on its branch, tagged or not yet, and commits nothing twice; the table's latest is untouched."""
    from vecpress.pipeline.gated import commit_failed

    out, uri = tmp_path / "out", str(tmp_path / "out" / "t.lance")
    kept = pa.table({"id": pa.array(range(5), pa.int64())})
    lance.write_dataset(kept, uri)
    new = pa.table({"id": pa.array(range(100, 103), pa.int64())})
    frags = [lance.dataset(uri).get_fragments()[0].metadata.to_json()] + \
        [f.to_json() for f in lance.fragment.write_fragments(new, uri, schema=new.schema, mode="overwrite")]
    args = dict(run_id="r1", read_version=1, num_kept=1)
    tag, version = commit_failed(str(out), "t", kept.schema, frags, **args)
    assert tag == "failed-r1" and lance.dataset(uri).version == 1 and lance.dataset(uri).count_rows() == 5
    assert sorted(lance.dataset(uri, version=tag).to_table().column("id").to_pylist()) == [0, 1, 2, 3, 4, 100, 101, 102]
    assert commit_failed(str(out), "t", kept.schema, frags, **args) == (tag, version)
    lance.dataset(uri).tags.delete(tag)  # as if the first try died between its commit and its tag
    assert commit_failed(str(out), "t", kept.schema, frags, **args) == (tag, version)
    assert lance.dataset(uri, version=tag).count_rows() == 8
    assert (out / "t.lance" / "tree" / tag / "data").is_dir() and len(os.listdir(out / "t.lance" / "data")) == 1
    lance.dataset(uri).create_branch("failed-r9", 1)  # as if a first try died between its branch and its commit
    tag9, _ = commit_failed(str(out), "t", kept.schema, frags[:1], **{**args, "run_id": "r9"})
    assert lance.dataset(uri).version == 1 and lance.dataset(uri, version=tag9).count_rows() == 5  # main untouched


def test_a_served_candidate_is_promoted_or_filed_once_per_run(tmp_path):
    """A served run's candidate (rows and index, detached): a retried promotion finds its
    commit and makes no second version; a retried filing of a failed one (the first try died
    before its tag) finds its branch and commits its index there once; no candidate ever
    appears in main's history."""
    import numpy as np

    from vecpress.pipeline.gated import commit_candidate, commit_failed_candidate, promote, settled
    from vecpress.pipeline.served import commit_index

    out, uri = str(tmp_path / "out"), str(tmp_path / "out" / "t.lance")
    rng = np.random.default_rng(0)

    def rows(start, n):
        x = rng.normal(size=(n, 8)).astype(np.float32)
        return pa.table({"id": pa.array(range(start, start + n), pa.int64()),
                         "v": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 8)})

    def candidate(run_id, new):
        main = lance.dataset(uri) if os.path.isdir(uri) else None
        kept = [f.metadata.to_json() for f in main.get_fragments()] if main else []
        frags = kept + [f.to_json() for f in lance.fragment.write_fragments(new, uri, schema=new.schema)]
        data = commit_candidate(out, "t", new.schema, frags, run_id=run_id, read_version=main and main.version)
        ds = lance.dataset(uri, version=data)
        segs = [ds.create_index_uncommitted("v", "IVF_PQ", name="v_idx", num_partitions=2, num_sub_vectors=2,
                                            fragment_ids=[f.fragment_id]) for f in ds.get_fragments()]
        return commit_index(uri, data, segs)

    first = candidate("r1", rows(0, 600))
    assert [v["version"] for v in lance.dataset(uri).versions()] == [1] and lance.dataset(uri).count_rows() == 0
    assert promote(out, "t", first, run_id="r1") == promote(out, "t", first, run_id="r1") == 2
    assert settled(out, "t", "r1") == (2, None) and lance.dataset(uri).count_rows() == 600
    failed = candidate("r2", rows(1000, 300))
    assert settled(out, "t", "r2") is None and lance.dataset(uri).version == 2
    tag, version = commit_failed_candidate(out, "t", failed, run_id="r2")
    lance.dataset(uri).tags.delete(tag)  # as if the first try died between its commits and its tag
    assert commit_failed_candidate(out, "t", failed, run_id="r2") == (tag, version)
    assert settled(out, "t", "r2") == (version, tag)
    assert [v["version"] for v in lance.dataset(uri).versions()] == [1, 2]
    branch = lance.dataset(uri, version=tag)
    assert branch.count_rows() == 900 and len(branch.list_indices()) == 2
    assert len(lance.dataset(uri).get_fragments()) == 1  # (the kept one; the new one moved to the branch)
    q = branch.to_table(filter="id = 1000").column("v")[0].values.to_numpy()
    near = branch.to_table(nearest={"column": "v", "q": q, "k": 1, "nprobes": 2, "refine_factor": 50})
    assert near["id"][0].as_py() == 1000  # (its index found it: the moved index files resolve)
    # the candidates' detached manifests, which Lance's cleanup keeps, go once the run is done
    from vecpress.pipeline.tidy import remove_detached_manifests, sweep_table

    assert any(n.startswith("d") for n in os.listdir(os.path.join(uri, "_versions")))
    assert remove_detached_manifests(out, "t") >= 3
    assert not any(n.startswith("d") for n in os.listdir(os.path.join(uri, "_versions")))
    sweep_table(out, "t")
    assert lance.dataset(uri).count_rows() == 600 and lance.dataset(uri, version=tag).count_rows() == 900
    assert lance.dataset(uri, version=tag).to_table(nearest={"column": "v", "q": q, "k": 1, "nprobes": 2,
                                                              "refine_factor": 50})["id"][0].as_py() == 1000
