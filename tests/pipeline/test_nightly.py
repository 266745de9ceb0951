"""Issue 4: nightly recompression on real files -- incremental runs, drift, the quality gate."""

from __future__ import annotations

import json
from pathlib import Path

import lance
import numpy as np
import pyarrow as pa
import pytest

from vecpress.kernels.synthetic import ClusteredEmbeddings
from vecpress.pipeline.errors import VecpressError
from vecpress.pipeline.errors import QualityGateError
from vecpress.pipeline.options import CompressOptions
from vecpress.pipeline.evaluate import evaluate_version
from vecpress.pipeline.run import run_compress
from vecpress.pipeline.report import inspect_table, load_eval, summary_table
from tests.conftest import assert_same_evaluation, write_vectors

DIM = 32
# shard_rows: each 1000-row file has shards of its own (a file of at least half a shard), so an
# incremental run keeps or drops files one by one
OPTS = CompressOptions(codec="PQ8", num_train=2000, num_queries=100, eval_k=20, seed=5, keep=("text",), shard_rows=1000)


def part(folder, name, lo, hi, *, seed=0, scale=1.0):
    x = ClusteredEmbeddings(DIM, seed=seed, num_clusters=32).batch(lo, hi - lo) * scale
    write_vectors(folder / name, x, np.arange(lo, hi, dtype=np.int64),
                  extra={"text": pa.array([f"doc {j}" for j in range(lo, hi)])}, row_group_size=400)


def data_files(ds):
    return {f.path for frag in ds.get_fragments() for f in frag.metadata.files}


def run(folder, out, executor=None, **kw):
    return run_compress([str(folder)], str(out), "t",
                        CompressOptions(**{**OPTS.__dict__, **kw}), executor=executor)


@pytest.fixture
def src(tmp_path):
    folder = tmp_path / "src"
    for i, name in enumerate("abc"):
        part(folder, f"{name}.parquet", i * 1000, (i + 1) * 1000)
    return folder


def test_four_nights(src, tmp_path, ray_executor):
    out = tmp_path / "out"
    uri = str(out / "t.lance")
    opts = lambda **kw: CompressOptions(**{**OPTS.__dict__, **kw})  # noqa: E731
    spec = [str(src)]

    # night 1: full build
    n1 = run_compress(spec, str(out), "t", opts(), executor=ray_executor)
    assert n1.committed and n1.mode == "full" and n1.version == 1
    assert n1.gate["passed"] and lance.dataset(uri, version="production").version == 1
    v1_files = data_files(lance.dataset(uri))

    # night 2: d is new, b deleted, c rewritten -> only c and d are encoded
    part(src, "d.parquet", 3000, 3500)
    (src / "b.parquet").unlink()
    part(src, "c.parquet", 2000, 3000, seed=0, scale=1.001)
    # (the margin: 100 queries' recall@10 moves by about 0.05 between samples, README)
    n2 = run_compress(spec, str(out), "t", opts(gate_max_drop=0.1), executor=ray_executor)
    assert n2.committed and n2.mode == "incremental" and n2.version == 2
    inc = n2.incremental
    assert (inc["files_added"], inc["files_removed"], inc["files_rewritten"], inc["files_unchanged"]) == (1, 1, 1, 1)
    assert inc["rows_added"] == 1500 and inc["rows_removed"] == 2000
    ds = lance.dataset(uri)
    ids = ds.to_table(columns=["id"]).column(0).to_numpy()
    assert ds.count_rows() == 2500 and len(np.unique(ids)) == 2500
    assert sorted(ids.tolist()) == list(range(1000)) + list(range(2000, 3500))
    kept = data_files(ds) & v1_files
    assert kept and len(kept) == 1  # a's data file reused untouched; b's and c's old files dropped
    assert not n2.drift["retrain"]
    assert n2.manifest["codec"]["sha256"] == n1.manifest["codec"]["sha256"]  # codec reused
    assert n2.eval["recall_at_10"] > 0.2 and n2.gate["passed"]
    # the kept rows' one read also searched their stored codes: evaluate read nothing again
    assert_same_evaluation(n2.eval, evaluate_version(str(out), "t", 2, ray_executor, recompute=True))
    # search over the new layout re-ranks against the right source rows
    info = inspect_table(str(out), "t")
    assert info["mode"] == "incremental" and info["tags"] == ["production"]

    # night 3: nothing changed -> nothing committed
    n3 = run_compress(spec, str(out), "t", opts(), executor=ray_executor)
    assert not n3.committed and "no change" in n3.reason and lance.dataset(uri).version == 2

    # night 4: the distribution shifted -> drift detected, codec retrained, everything re-encoded
    for name, (lo, hi) in {"a": (0, 1000), "c": (2000, 3000), "d": (3000, 3500)}.items():
        part(src, f"{name}.parquet", lo, hi, seed=99, scale=2.0)
    n4 = run_compress(spec, str(out), "t", opts(gate_max_drop=1.0), executor=ray_executor)
    assert n4.committed and n4.mode == "full" and n4.version == 3
    assert n4.drift["retrain"] and "grew" in n4.drift["reason"]
    assert n4.manifest["codec"]["sha256"] != n1.manifest["codec"]["sha256"]
    assert not (data_files(lance.dataset(uri)) & v1_files)  # all re-encoded
    assert lance.dataset(uri).count_rows() == 2500


def test_search_after_incremental_rerank_uses_new_layout(src, tmp_path, ray_executor):
    from vecpress.pipeline.search import search

    out = tmp_path / "out"
    spec = [str(src)]
    opts = CompressOptions(**{**OPTS.__dict__, "gate_max_drop": 1.0})  # not testing the gate here
    run_compress(spec, str(out), "t", opts, executor=ray_executor)
    (src / "a.parquet").unlink()
    part(src, "e.parquet", 5000, 6000)
    assert run_compress(spec, str(out), "t", opts, executor=ray_executor).mode == "incremental"
    xq = ClusteredEmbeddings(DIM, seed=0, num_clusters=32).batch(5000, 1000)[:5]  # rows 5000..5004, in e
    got = search(str(out), "t", xq, 3, rerank=10).to_pandas()
    assert got[got["rank"] == 0]["id"].tolist() == [5000, 5001, 5002, 5003, 5004]
    assert got[got["rank"] == 0]["distance"].max() < 1e-6


def test_gate_failure_keeps_production_on_the_previous_version(src, tmp_path, ray_executor):
    """Issue 17: a codes table's version that fails the gate is decided before its commit and
    committed on a branch of its own (tag failed-<run id>): LanceDB's latest and vecpress's
    default reads stay on the good version, with no window (it was the table's latest)."""
    import lancedb

    from vecpress.pipeline.search import search

    out = tmp_path / "out"
    uri = str(out / "t.lance")
    spec = [str(src)]
    first = run_compress(spec, str(out), "t", OPTS, executor=ray_executor)
    part(src, "d.parquet", 3000, 3600)
    with pytest.raises(QualityGateError, match=r"\(tag failed-.*below the floor.*'production' stays on version 1"):
        run_compress(spec, str(out), "t", CompressOptions(**{**OPTS.__dict__, "gate_min_recall": 0.9999}),
                     executor=ray_executor)
    assert lance.dataset(uri).version == 1  # never the latest ...
    assert lancedb.connect(str(out)).open_table("t").count_rows() == 3000
    (tag,) = [t for t in lance.dataset(uri).tags.list() if t.startswith("failed-")]
    failed = lance.dataset(uri, version=tag)  # ... but inspectable by its tag, with the reason
    assert failed.count_rows() == 3600
    ev = load_eval(str(out), "t", tag)
    assert ev["gate"]["passed"] is False and "below the floor" in ev["gate"]["reason"]
    info = inspect_table(str(out), "t", version=tag)
    assert info["num_rows"] == 3600 and info["branch"] == tag and info["gate"]["passed"] is False
    assert info["latest_version"] == 1 and info["tags"] == [tag]
    prod = lance.dataset(uri, version="production")  # readers of production see version 1
    assert prod.version == 1 and prod.count_rows() == 3000
    assert inspect_table(str(out), "t", version="production")["eval"]["recall_at_10"] == first.eval["recall_at_10"]
    assert inspect_table(str(out), "t")["num_rows"] == 3000  # vecpress's default read: production
    xq = ClusteredEmbeddings(DIM, seed=0, num_clusters=32).batch(3000, 600)[:3]  # rows of the failed version only
    assert not set(search(str(out), "t", xq, 5).column("id").to_pylist()) & set(range(3000, 3600))
    assert set(search(str(out), "t", xq, 1, version=tag).column("id").to_pylist()) == {3000, 3001, 3002}
    text = summary_table(info)  # the human inspect says why
    assert "gate            recall@10" in text and "'production' stays on version 1" in text
    assert "drift " in text and "incremental     on version 1: +600 rows" in text
    for missing in (9, "nightly"):  # what the table has, instead of Lance's source paths
        with pytest.raises(VecpressError, match=r"no version .* \(it has versions 1, tags failed-.*, production\)$"):
            inspect_table(str(out), "t", version=missing)
    # the next run extends the good version, not the failed one, and passes
    again = run_compress(spec, str(out), "t", CompressOptions(**{**OPTS.__dict__, "gate_max_drop": 1.0}),
                         executor=ray_executor)
    assert again.mode == "incremental" and again.incremental["previous_version"] == 1 and again.version == 2
    assert lance.dataset(uri, version=tag).count_rows() == 3600  # the failed version is still readable


def test_first_run_that_fails_the_gate_creates_an_empty_table(src, tmp_path, ray_executor):
    """Issue 17: the first run on a new table fails the gate: the table exists with no rows
    (LanceDB readers get an empty table), vecpress's default read says no version passed,
    and the failed data is tag failed-<run id>."""
    import lancedb

    out = tmp_path / "out"
    with pytest.raises(QualityGateError, match="below the floor"):
        run(src, out, ray_executor, gate_min_recall=0.9999)
    tbl = lancedb.connect(str(out)).open_table("t")
    assert tbl.count_rows() == 0 and "code" in tbl.schema.names
    (tag,) = [t for t in lance.dataset(str(out / "t.lance")).tags.list() if t.startswith("failed-")]
    with pytest.raises(VecpressError, match=r"no version has passed the quality gate yet.*tags failed-.*--version"):
        inspect_table(str(out), "t")
    assert inspect_table(str(out), "t", version=tag)["num_rows"] == 3000
    ok = run(src, out, ray_executor)  # a full build on the empty version
    assert ok.mode == "full" and ok.gate["passed"] and lancedb.connect(str(out)).open_table("t").count_rows() == 3000
    assert inspect_table(str(out), "t")["tags"] == ["production"]


def test_gate_without_recall_at_10_fails_only_a_check_that_applies(src, tmp_path, ray_executor):
    """--eval-k 5 measures no recall@10: no floor and no earlier recall to compare, so the
    version passes (it failed every such run); a floor cannot be checked, so it fails."""
    out = tmp_path / "out"
    first = run(src, out, ray_executor, eval_k=5)
    assert first.eval["recall_at_10"] is None and first.eval["recall_at_1"] is not None
    assert first.gate["passed"] and lance.dataset(str(out / "t.lance"), version="production").version == 1
    with pytest.raises(QualityGateError, match="recall@10 was not measured.*floor"):
        run(src, out, ray_executor, eval_k=5, mode="full", gate_min_recall=0.5)


def test_runs_after_a_compaction(src, tmp_path, ray_executor):
    """LanceDB's optimize() merges vecpress's fragments, so which rows came from which file is
    lost: unchanged sources still commit nothing, changed ones rebuild (it failed every run)."""
    out = tmp_path / "out"
    uri = str(out / "t.lance")
    run(src, out, ray_executor)
    lance.dataset(uri).optimize.compact_files(target_rows_per_fragment=1 << 20)
    compacted = lance.dataset(uri)
    assert len(compacted.get_fragments()) == 1
    same = run(src, out, ray_executor)
    assert not same.committed and same.version == compacted.version
    part(src, "d.parquet", 3000, 3500)
    grown = run(src, out, ray_executor)
    assert grown.committed and grown.mode == "full" and lance.dataset(uri).count_rows() == 3500
    assert run(src, out, ray_executor).reason.startswith("no change")  # the new layout is vecpress's again


def test_options_that_change_the_codecs_rebuild(src, tmp_path, ray_executor):
    """An incremental run keeps the table's codecs, so a new --rerank-codec, or a new codec=auto
    criterion, makes the run a full rebuild (both were ignored: the run stayed incremental)."""
    out = tmp_path / "out"
    run(src, out, ray_executor)
    part(src, "d.parquet", 3000, 3500)
    warm = run(src, out, ray_executor, rerank_codec="SQ8", allow_schema_change=True)
    assert warm.mode == "full" and warm.manifest["rerank_codec"]["spec"] == "SQ8"
    assert "rerank_code" in lance.dataset(str(out / "t.lance")).schema.names
    part(src, "e.parquet", 3500, 4000)
    auto = dict(codec="auto", advise_codecs=("PQ4", "PQ8"), rerank_codec="SQ8", allow_schema_change=True,
                gate_max_drop=1.0)  # the gate is not what this test is about
    first = run(src, out, ray_executor, max_bytes=8, **auto)
    assert first.mode == "full" and first.manifest["codec"]["spec"] == "PQ8"
    part(src, "f.parquet", 4000, 4500)
    same = run(src, out, ray_executor, max_bytes=8, **auto)  # same criterion: incremental
    assert same.mode == "incremental" and same.manifest["codec"]["spec"] == "PQ8"
    part(src, "g.parquet", 4500, 5000)
    smaller = run(src, out, ray_executor, max_bytes=4, **auto)
    assert smaller.mode == "full" and smaller.manifest["codec"]["spec"] == "PQ4"


def test_a_run_that_stopped_after_its_commit_is_finished_by_the_next(src, tmp_path, ray_executor):
    """Night 2 commits, then dies in evaluate: its version has no evaluation and no gate. Night 3
    has nothing to commit; it evaluates and gates version 2 (it left it untagged for good)."""
    from vecpress.pipeline.stages import Stages

    out = tmp_path / "out"
    uri = str(out / "t.lance")
    run(src, out, ray_executor)
    part(src, "d.parquet", 3000, 3500)

    def lost(*args, **kwargs):
        raise RuntimeError("worker lost during evaluate")

    with pytest.raises(RuntimeError, match="worker lost"):
        run_compress([str(src)], str(out), "t", CompressOptions(**{**OPTS.__dict__, "gate_max_drop": 1.0}),
                     executor=ray_executor, stages=Stages(evaluate=lost))
    assert lance.dataset(uri).version == 2 and load_eval(str(out), "t", 2) is None
    assert lance.dataset(uri, version="production").version == 1
    night3 = run(src, out, ray_executor, gate_max_drop=1.0)  # (new held-out queries: recall moves)
    assert not night3.committed and night3.version == 2 and "evaluated and gated" in night3.reason
    ev = load_eval(str(out), "t", 2)
    assert ev["recall_at_10"] == night3.eval["recall_at_10"] > 0.3 and ev["gate"]["passed"]
    assert lance.dataset(uri, version="production").version == 2
    assert run(src, out, ray_executor).reason == "no change since version 2"  # nothing left to finish


def test_incremental_evaluation_with_ties_equals_a_search_of_the_stored_codes(src, tmp_path, ray_executor):
    """PQ1 codes tie all the time: the incremental run merges new and kept shards in layout
    order, as a search of the stored codes does (kept shards merged last differed by 0.03)."""
    out = tmp_path / "out"
    run(src, out, ray_executor, codec="PQ1")
    part(src, "d.parquet", 3000, 4000)
    night = run(src, out, ray_executor, codec="PQ1", gate_max_drop=1.0)
    assert night.mode == "incremental"
    assert_same_evaluation(night.eval, evaluate_version(str(out), "t", night.version, ray_executor, recompute=True))


def test_retention_keeps_tagged_versions(src, tmp_path, ray_executor):
    out = tmp_path / "out"
    uri = str(out / "t.lance")
    spec = [str(src)]
    opts = CompressOptions(**{**OPTS.__dict__, "mode": "full", "keep_versions": 1})
    run_compress(spec, str(out), "t", opts, executor=ray_executor)  # v1, production
    lance.dataset(uri).tags.create("pinned", 1)
    with pytest.raises(QualityGateError):  # fails the gate: on a branch, production stays on v1
        run_compress(spec, str(out), "t", CompressOptions(**{**opts.__dict__, "gate_min_recall": 0.9999}),
                     executor=ray_executor)
    for _ in range(2):  # v2, v3
        run_compress(spec, str(out), "t", CompressOptions(**{**opts.__dict__, "gate_max_drop": 1.0}),
                     executor=ray_executor)
    versions = [v["version"] for v in lance.dataset(uri).versions()]
    assert 1 in versions and 3 in versions and 2 not in versions  # untagged old version dropped
    (tag,) = [t for t in lance.dataset(uri).tags.list() if t.startswith("failed-")]
    assert lance.dataset(uri, version=tag).count_rows() == 3000  # the failed version's files survived it


def test_incremental_queries_are_held_out_from_the_kept_codecs_training_rows(src, tmp_path, ray_executor):
    """An incremental run keeps the codec trained on night 1's sample. Its fresh queries (the
    drift probe and the evaluation) avoid those training rows, wherever the new layout puts
    them: 2000 of 3000 rows trained it, so about 57 of 100 uniform queries would be training
    rows, and the codec's error on them would look smaller than it is."""
    import json

    from vecpress.pipeline.context import load_array, load_arrays
    from vecpress.pipeline.sampling import layout_positions
    from vecpress.pipeline.source import SourcePlan

    from vecpress.pipeline.stages import Stages, train

    out = tmp_path / "out"
    seen = {}

    def train_and_keep_the_sample(ctx, advised, sampled, opts):
        seen["xt"] = load_array(sampled.train_uri)  # (the run deletes its training sample once trained)
        return train(ctx, advised, sampled, opts)

    n1 = run_compress([str(src)], str(out), "t", OPTS, executor=ray_executor,
                      stages=Stages(train=train_and_keep_the_sample))
    assert not (out / n1.manifest["sample"]["queries_uri"]).with_name("train.npy").exists()
    (src / "a.parquet").unlink()  # the kept rows move: b and c now start the layout
    part(src, "d.parquet", 3000, 4000)
    n2 = run(src, out, ray_executor, gate_max_drop=1.0)  # (100 queries: recall moves by a few points)
    assert n2.mode == "incremental" and not n2.drift["retrain"]
    rows_uri = n1.manifest["sample"]["train_rows_uri"]
    assert rows_uri and n2.manifest["sample"]["train_rows_uri"] == rows_uri  # carried to later nights
    rows = load_arrays(str(out / rows_uri))
    # the kept file rows: the training vectors, read again through the new layout
    plan = SourcePlan.from_dict(json.loads((out / n2.manifest["source"]["plan_uri"]).read_bytes()))
    trained = layout_positions(plan, rows)
    assert len(trained) == (np.char.find(rows["uris"][rows["file_index"]], "a.parquet") < 0).sum() > 1000
    ids = lance.dataset(str(out / "t.lance")).to_table(columns=["id"]).column(0).to_numpy()
    train_ids = {int(ids[p]) for p in trained}
    x = np.concatenate([ClusteredEmbeddings(DIM, seed=0, num_clusters=32).batch(lo, 1000) for lo in (0, 1000, 2000)])
    xt = seen["xt"]
    assert {tuple(v) for v in x[sorted(train_ids)].round(4)} <= {tuple(v) for v in xt.round(4)}
    queries = load_array(str(out / n2.manifest["sample"]["query_positions_uri"]))
    assert len(queries) == 100 and not np.isin(queries, trained).any()
    # night 1's run folder removed by hand: the next night warns and goes on
    import shutil

    shutil.rmtree((out / rows_uri).parent)
    part(src, "e.parquet", 4000, 4500)
    n3 = run(src, out, ray_executor, gate_max_drop=1.0)
    assert n3.committed and n3.mode == "incremental"


def test_bad_new_file_in_an_incremental_run_commits_nothing(src, tmp_path, ray_executor):
    from vecpress.pipeline.errors import SourceError

    out = tmp_path / "out"
    uri = str(out / "t.lance")
    spec = [str(src)]
    run_compress(spec, str(out), "t", OPTS, executor=ray_executor)
    x = ClusteredEmbeddings(DIM, seed=0, num_clusters=32).batch(7000, 300)
    x[17, 3] = np.nan
    write_vectors(src / "z.parquet", x, np.arange(7000, 7300, dtype=np.int64),
                  extra={"text": pa.array(["t"] * 300)})
    with pytest.raises(SourceError, match=r"z.parquet.*'embedding'.*1 of 300 rows contain NaN or Inf \(first at row 17\)"):
        run_compress(spec, str(out), "t", OPTS, executor=ray_executor)
    ds = lance.dataset(uri)
    assert ds.version == 1 and ds.count_rows() == 3000 and lance.dataset(uri, version="production").version == 1


def test_incremental_evaluation_reranks_kept_rows_from_their_warm_codes(src, tmp_path, ray_executor):
    """With a warm column, the kept rows' candidates are re-ranked from their stored warm codes,
    as a search over the stored version would."""
    out = tmp_path / "out"
    run(src, out, rerank_codec="SQ8", executor=ray_executor)
    part(src, "d.parquet", 3000, 3500)
    night = run(src, out, rerank_codec="SQ8", gate_max_drop=1.0, executor=ray_executor)  # other queries each night
    assert night.mode == "incremental" and night.eval["rerank_from"] == "column"
    assert_same_evaluation(night.eval, evaluate_version(str(out), "t", night.version, ray_executor, recompute=True))


def test_a_run_that_lost_its_lease_commits_nothing(src, tmp_path):
    """The lease is checked right before the commit: a run whose lease another run took over
    (it stalled past the expiry) stops with LeaseLostError, and the table keeps its version."""
    from vecpress.pipeline.executor import LocalExecutor
    from vecpress.pipeline.locking import LeaseLostError, lock_uri
    from vecpress.pipeline.stages import Stages, encode

    out = tmp_path / "out"
    run(src, out, LocalExecutor())
    part(src, "d.parquet", 3000, 3500)

    def encode_then_lose_the_lease(*args, **kwargs):
        encoded = encode(*args, **kwargs)
        lock = Path(lock_uri(str(out), "t"))
        lock.write_text(json.dumps({**json.loads(lock.read_text()), "token": "another-run", "run_id": "other"}))
        return encoded

    with pytest.raises(LeaseLostError, match="lost the lease of table 't'.*run other.*nothing was committed"):
        run_compress([str(src)], str(out), "t", OPTS, executor=LocalExecutor(),
                     stages=Stages(encode=encode_then_lose_the_lease))
    assert lance.dataset(str(out / "t.lance")).version == 1


def test_small_files_share_shards_and_small_shards_are_packed_again(tmp_path, ray_executor):
    """Files under half a shard share shards; a night that adds one small file encodes it, and
    the next one packs that small shard again with its own new rows (compaction), so fragments
    stay about shard-sized. A deleted file's shard-mates are encoded again, with the same
    codes. Every night holds exactly the source rows, in file order."""
    src, out = tmp_path / "src", tmp_path / "out"
    for i in range(6):
        part(src, f"f{i}.parquet", i * 100, (i + 1) * 100)
    opts = dict(num_train=500, num_queries=50, shard_rows=1000, gate_max_drop=1.0)
    nights = [run(src, out, ray_executor, **opts)]
    assert nights[0].manifest["num_rows"] == 600
    for name, lo in (("g", 600), ("h", 700)):
        part(src, f"{name}.parquet", lo, lo + 100)
        nights.append(run(src, out, ray_executor, **opts))
    part(src, "i.parquet", 800, 900)
    (src / "f2.parquet").unlink()
    nights.append(run(src, out, ray_executor, **opts))

    def fragments(version):
        return [f.count_rows() for f in lance.dataset(str(out / "t.lance"), version=version).get_fragments()]

    def codes(version):
        t = lance.dataset(str(out / "t.lance"), version=version).to_table(columns=["id", "code"])
        return dict(zip(t.column("id").to_pylist(), t.column("code").to_pylist()))

    assert [n.mode for n in nights] == ["full", "incremental", "incremental", "incremental"]
    assert fragments(1) == [600]                 # six small files, one shard
    assert fragments(2) == [600, 100]            # g alone
    assert fragments(3) == [600, 200]            # g's small shard packed again with h
    assert [n.incremental["rows_reencoded"] for n in nights[1:]] == [0, 100, 500 + 200]
    assert fragments(4) == [800]                 # f2 gone: its shard-mates, g, h and i in one shard
    ids = lance.dataset(str(out / "t.lance")).to_table(columns=["id"]).column(0).to_pylist()
    assert ids == [*range(0, 200), *range(300, 900)]
    assert all(codes(4)[i] == codes(3)[i] for i in codes(3) if i in codes(4))  # encoded again, the same codes
    assert nights[-1].eval["recall_at_10"] > 0.3
