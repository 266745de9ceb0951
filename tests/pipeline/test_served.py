"""`--serve lancedb`: the output holds the vectors and a Lance IVF_PQ index built from
vecpress's model and codes; LanceDB's own search over it, from a process that imports only
lancedb, finds what vecpress reports."""

from __future__ import annotations

import json
import subprocess
import sys

import lance
import numpy as np
import pyarrow as pa
import pytest

from vecpress.kernels.codecs.ivf import IvfModel
from vecpress.kernels.synthetic import ClusteredEmbeddings
from vecpress.pipeline.codec_store import CodecRef, load_codec
from vecpress.pipeline.context import load_array
from vecpress.pipeline.errors import ConfigError
from vecpress.pipeline.options import CompressOptions
from vecpress.pipeline.report import inspect_table, summary_table
from vecpress.pipeline.run import run_compress
from tests.conftest import write_split, write_vectors

N, DIM = 9000, 32
OPTS = dict(serve="lancedb", codec="IVF32,PQ8", keep=("text",), num_train=4000, num_queries=150, eval_k=100,
            shard_rows=3000, batch_size=1000, gate_max_drop=1.0)

#: what a user runs: a fresh process, lancedb alone, the held-out queries searched as documented
USER = r'''
import json, sys
import lancedb
args = json.load(open(sys.argv[1]))
tbl = lancedb.connect(args["out"]).open_table(args["table"])
hits = []
for q, own, want in zip(args["queries"], args["own"], args["truth"]):
    s = tbl.search(q)
    if args["nprobes"] is not None:
        s = s.nprobes(args["nprobes"])
    if args["refine"] is not None:
        s = s.refine_factor(args["refine"])
    got = [r["id"] for r in s.limit(11).to_list() if r["id"] != own][:10]
    hits.append(len(set(got) & set(want[:10])) / 10)
print(json.dumps({"recall_at_10": sum(hits) / len(hits),
                  "unindexed": tbl.list_indices()[0].num_unindexed_rows}))
'''


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    x = ClusteredEmbeddings(DIM, seed=5, num_clusters=48).batch(0, N)
    write_split(root / "src", x, [0, 3000, 6000, N], "part-{}", row_group_size=1000)
    return root, x


@pytest.fixture(scope="module")
def served(corpus, ray_executor):
    root, x = corpus
    result = run_compress([str(root / "src")], str(root / "out"), "t", CompressOptions(**OPTS), executor=ray_executor)
    return root, x, result


def user_recall(tmp_path, out: str, manifest: dict, nprobes, refine) -> dict:
    """What a user measures with lancedb alone, for the version's held-out queries."""
    sample = manifest["sample"]
    xq = load_array(f"{out}/{sample['queries_uri']}")
    qpos = load_array(f"{out}/{sample['query_positions_uri']}")
    truth = load_array(f"{out}/{sample['ground_truth_uri']}")
    ids = lance.dataset(f"{out}/t.lance").to_table(columns=["id"]).column(0).to_numpy()  # (ids = positions here)
    args = {"out": out, "table": "t", "queries": xq.tolist(), "own": ids[qpos].tolist(),
            "truth": [ids[row[row >= 0]].tolist() for row in truth], "nprobes": nprobes, "refine": refine}
    path = tmp_path / "args.json"
    path.write_text(json.dumps(args))
    done = subprocess.run([sys.executable, "-c", USER, str(path)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_served_table_holds_vectors_and_an_index_over_every_row(served):
    root, x, result = served
    ds = lance.dataset(str(root / "out" / "t.lance"))
    assert ds.schema.names == ["id", "embedding", "text"]
    assert ds.schema.field("embedding").type == pa.list_(pa.float16(), DIM)  # the default --vector-dtype
    stored = np.stack(ds.to_table(columns=["embedding"]).column(0).to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(stored, x.astype(np.float16).astype(np.float32))
    info = inspect_table(str(root / "out"), "t", "production")
    assert info["version"] == result.version == ds.version == 2  # empty (1), then the candidate promoted (2)
    assert [v["version"] for v in ds.versions()] == [1, 2] and lance.dataset(ds.uri, version=1).count_rows() == 0
    # promoted as it was built: every file in the folder is the version's own, none copied
    table_dir = root / "out" / "t.lance"
    assert {p.name for p in (table_dir / "data").iterdir()} == {
        f.path for frag in ds.get_fragments() for f in frag.data_files()}
    assert {p.name for p in (table_dir / "_indices").iterdir()} == {i["uuid"] for i in ds.list_indices()}
    assert not (table_dir / "tree").exists()
    assert info["index"] == {"type": "IVF_PQ", "name": "embedding_idx", "column": "embedding", "segments": 3,
                             "covers_all_rows": True}
    assert info["serve"] == "lancedb" and info["code_bytes"] == 8 and info["vector_bytes"] == 2 * DIM
    assert "served by       LanceDB: IVF_PQ IVF32,PQ8 over column embedding" in summary_table(info)


def test_the_index_is_vecpress_s_model(served):
    """Lance trained nothing: LanceDB's search over every partition, without re-ranking,
    ranks as an exhaustive search over the model's own reconstructions does."""
    root, x, result = served
    model = load_codec(CodecRef(**{**result.manifest["codec"], "uri": str(root / "out" / result.manifest["codec"]["uri"])}))
    assert isinstance(model, IvfModel) and len(model.centroids) == 32 and model.num_sub_vectors == 8
    import lancedb

    tbl = lancedb.connect(str(root / "out")).open_table("t")
    xq = ClusteredEmbeddings(DIM, seed=5, num_clusters=48).batch(50_000, 20)
    got = tbl.search(xq).nprobes(32).select(["id", "_distance"]).limit(10).to_arrow()
    _, want = model.search_codes(xq, model.encode(x), 10)
    got_ids = [got.filter(pa.compute.equal(got["query_index"], i))["id"].to_pylist() for i in range(20)]
    assert np.mean([len(set(g) & set(w)) / 10 for g, w in zip(got_ids, want)]) > 0.95


@pytest.mark.parametrize("nprobes,refine", [(None, None), (10, None), (20, 2)])
def test_reported_recall_is_what_a_user_measures(served, tmp_path, nprobes, refine):
    root, _, result = served
    served_ev = result.eval["served"]
    if nprobes is None:
        reported = served_ev["defaults"]["recall_at_10"]
    else:
        reported = next(g for g in served_ev["grid"] if g["nprobes"] == nprobes and g["refine_factor"] == refine)[
            "recall_at_10"]
    user = user_recall(tmp_path, str(root / "out"), result.manifest, nprobes, refine)
    assert user["unindexed"] == 0
    assert user["recall_at_10"] == pytest.approx(reported, abs=0.01)
    assert result.eval["searched"] == "lancedb" and result.eval["recall_at_10"] == served_ev["defaults"]["recall_at_10"]


def test_the_grid_and_its_cheapest_settings(served):
    _, _, result = served
    grid = result.eval["served"]["grid"]
    assert {g["nprobes"] for g in grid} == {10, 20, 50} and {g["refine_factor"] for g in grid} == {None, 2, 5}
    assert all(g["p50_ms"] > 0 for g in grid)
    best = {(g["nprobes"], g["refine_factor"]): g["recall_at_10"] for g in grid}
    assert best[(20, 5)] > best[(20, None)]  # re-ranking with the stored vectors pays
    cheapest = result.eval["served"]["cheapest"]["0.9"]
    assert cheapest is not None and cheapest["recall_at_10"] >= 0.9
    assert result.stage_seconds["index"] > 0 and result.stage_seconds["evaluate"] > 0


def test_cosine_float32_and_a_run_with_nothing_new(corpus, tmp_path, ray_executor):
    root, x = corpus
    out = str(tmp_path / "out")
    opts = CompressOptions(**{**OPTS, "metric": "cosine", "vector_dtype": "float32"})
    first = run_compress([str(root / "src")], out, "t", opts, executor=ray_executor)
    assert lance.dataset(f"{out}/t.lance").schema.field("embedding").type == pa.list_(pa.float32(), DIM)
    assert first.eval["served"]["grid"][-1]["recall_at_10"] > 0.9  # nprobes 50, refine 5
    again = run_compress([str(root / "src")], out, "t", opts, executor=ray_executor)
    assert not again.committed and again.version == first.version


@pytest.mark.parametrize("kw,needle", [
    (dict(codec="IVF32,PQ8"), "add --serve lancedb"),
    (dict(serve="lancedb", codec="PQ8"), "must name it"),
    (dict(serve="lancedb", codec="auto"), "needs a target"),
    (dict(serve="lancedb", rerank_codec="SQ8"), "refine_factor"),
    (dict(serve="cloud"), "--serve must be"),
])
def test_serving_options_are_checked(kw, needle):
    with pytest.raises(ConfigError, match=needle):
        CompressOptions(**kw)


def test_served_specs_are_checked_before_reading(corpus, tmp_path, ray_executor):
    root, _ = corpus
    with pytest.raises(ConfigError, match="PQ7 must divide dim=32"):
        run_compress([str(root / "src")], str(tmp_path / "o"), "t",
                     CompressOptions(**{**OPTS, "codec": "IVF32,PQ7"}), executor=ray_executor)
    with pytest.raises(ConfigError, match="needs at least 5000 training vectors"):
        run_compress([str(root / "src")], str(tmp_path / "o"), "t",
                     CompressOptions(**{**OPTS, "codec": "IVF5000,PQ8"}), executor=ray_executor)


def test_nightly_runs_keep_the_index_current(corpus, tmp_path, ray_executor):
    """A new file is encoded with the same model and indexed; a deleted file's rows leave the
    table and its index; kept rows keep their data files; the production version's index
    covers every row, night after night."""
    import shutil

    import lancedb

    root, x = corpus
    src, out = tmp_path / "src", str(tmp_path / "out")
    shutil.copytree(root / "src", src)
    opts = CompressOptions(**OPTS)
    first = run_compress([str(src)], out, "t", opts, executor=ray_executor)
    files = lambda v: {f.path for fr in lance.dataset(f"{out}/t.lance", version=v).get_fragments()  # noqa: E731
                       for f in fr.metadata.files}
    extra = ClusteredEmbeddings(DIM, seed=5, num_clusters=48).batch(N, 3000)  # (the same distribution: no drift)
    write_split(src, extra, [0, 3000], "part-new{}", row_group_size=1000)
    (src / "part-0.parquet").unlink()
    night = run_compress([str(src)], out, "t", opts, executor=ray_executor)
    assert night.mode == "incremental", night.drift
    assert night.manifest["codec"]["sha256"] == first.manifest["codec"]["sha256"]
    assert night.incremental["rows_added"] == 3000 and night.incremental["rows_removed"] == 3000
    info = inspect_table(out, "t", "production")
    assert info["version"] == night.version and info["index"]["covers_all_rows"] and info["num_rows"] == N
    assert len(files(first.version) & files(night.version)) == 2  # the two kept files' data, not rewritten
    tbl = lancedb.connect(out).open_table("t")
    assert tbl.list_indices()[0].num_unindexed_rows == 0
    hit = tbl.search(extra[7]).nprobes(32).refine_factor(5).limit(1).to_list()[0]
    np.testing.assert_allclose(np.asarray(hit["embedding"], np.float32), extra[7], atol=1e-2)
    gone = tbl.search(x[5]).nprobes(32).refine_factor(5).limit(1).to_list()[0]
    assert gone["id"] != 5 and tbl.count_rows("id < 3000") == 3000  # (ids 0..2999 now: the new file's)


def test_a_served_version_that_fails_the_gate_is_not_served(corpus, tmp_path, ray_executor):
    """Issue 17: a LanceDB-served run builds its version (rows and index) as a detached
    candidate, which LanceDB's search gates; one that fails goes to its branch failed-<run id>,
    and main never changes: no reader of latest, polling through the run, and no version of
    main's history ever holds the failed rows. The failed version stays searchable by its tag."""
    import shutil
    import threading

    import lancedb

    from vecpress.pipeline.errors import QualityGateError

    root, _ = corpus
    src, out = tmp_path / "src", str(tmp_path / "out")
    shutil.copytree(root / "src", src)
    first = run_compress([str(src)], out, "t", CompressOptions(**OPTS), executor=ray_executor)
    extra = ClusteredEmbeddings(DIM, seed=5, num_clusters=48).batch(N, 1000)
    write_vectors(src / "part-new0.parquet", extra, np.arange(N, N + 1000),
                  extra={"text": pa.array([f"doc {j}" for j in range(N, N + 1000)])})
    seen, stop = [], threading.Event()

    def read_latest():  # a LanceDB user, opening the table over and over during the run
        while not stop.is_set():
            tbl = lancedb.connect(out).open_table("t")
            seen.append((tbl.version, tbl.count_rows(f"id >= {N}")))
            stop.wait(0.05)

    reader = threading.Thread(target=read_latest)
    reader.start()
    try:
        with pytest.raises(QualityGateError, match=r"\(tag failed-.*below the floor.*latest version unchanged"):
            run_compress([str(src)], out, "t", CompressOptions(**{**OPTS, "gate_min_recall": 0.9999}),
                         executor=ray_executor)
    finally:
        stop.set()
        reader.join()
    assert len(seen) > 10 and {s for s in seen} == {(first.version, 0)}
    ds = lance.dataset(f"{out}/t.lance")
    assert [v["version"] for v in ds.versions()] == list(range(1, first.version + 1))  # main: no new version
    assert all(lance.dataset(f"{out}/t.lance", version=v["version"]).count_rows(f"id >= {N}") == 0
               for v in ds.versions())
    (tag,) = [t for t in ds.tags.list() if t.startswith("failed-")]
    failed = inspect_table(out, "t", tag)
    assert failed["num_rows"] == N + 1000 and failed["gate"]["passed"] is False and failed["index"]["covers_all_rows"]
    assert len(failed["eval"]["served"]["grid"]) == 9
    assert inspect_table(out, "t")["version"] == first.version  # vecpress's default: production
    tbl = lancedb.connect(out).open_table("t")
    tbl.checkout(tag)  # the failed version, searched by LanceDB with its own index
    assert tbl.list_indices()[0].num_unindexed_rows == 0
    assert tbl.search(extra[7]).nprobes(32).refine_factor(5).limit(1).to_list()[0]["id"] == N + 7
    again = run_compress([str(src)], out, "t", CompressOptions(**OPTS), executor=ray_executor)
    assert again.mode == "incremental" and again.gate["passed"] and again.version == first.version + 1
    assert lancedb.connect(out).open_table("t").count_rows() == N + 1000
    assert lance.dataset(f"{out}/t.lance", version=tag).count_rows() == N + 1000  # its files survived the sweep


def test_a_first_served_run_that_fails_the_gate_leaves_an_empty_table(corpus, tmp_path, ray_executor):
    """Issue 17: a new table is created empty (the candidate is a detached version of that);
    a failed candidate goes to its branch: LanceDB readers get no rows, never the failed ones;
    the failed version keeps its tag and index."""
    import lancedb

    from vecpress.pipeline.errors import QualityGateError

    root, _ = corpus
    out = str(tmp_path / "out")
    with pytest.raises(QualityGateError, match="latest version unchanged"):
        run_compress([str(root / "src")], out, "t", CompressOptions(**{**OPTS, "gate_min_recall": 0.9999}),
                     executor=ray_executor)
    assert lancedb.connect(out).open_table("t").count_rows() == 0
    ds = lance.dataset(f"{out}/t.lance")
    assert [v["version"] for v in ds.versions()] == [1]
    (tag,) = [t for t in ds.tags.list() if t.startswith("failed-")]
    info = inspect_table(out, "t", tag)
    assert info["num_rows"] == N and info["index"]["covers_all_rows"] and info["gate"]["passed"] is False


def test_the_advisor_chooses_among_index_forms(corpus, tmp_path, ray_executor):
    """--codec auto with --serve lancedb sweeps IVF<n>,PQ<m> forms (judged by their search over
    every partition) and builds the one it chose: the best recall@10 within the bytes."""
    root, _ = corpus
    out = str(tmp_path / "out")
    opts = CompressOptions(**{**OPTS, "codec": None, "max_bytes": 8})
    result = run_compress([str(root / "src")], out, "t", opts, executor=ray_executor)
    advisor = result.manifest["advisor"]
    table = {r["codec"]: r for r in advisor["table"]}
    assert set(table) == {"IVF128,PQ4", "IVF128,PQ8"}  # sqrt(9000) ~ 2^6.6 -> 128 partitions; PQ within 8 bytes
    assert advisor["chosen"] == result.manifest["codec"]["spec"] == "IVF128,PQ8"
    assert table["IVF128,PQ8"]["recall_at_10"] > table["IVF128,PQ4"]["recall_at_10"]
    info = inspect_table(out, "t")
    assert info["codec"] == "IVF128,PQ8" and info["index"]["covers_all_rows"] and info["code_bytes"] == 8
    with pytest.raises(ConfigError, match="sweeps LanceDB index forms"):
        run_compress([str(root / "src")], str(tmp_path / "o2"), "t",
                     CompressOptions(**{**OPTS, "codec": "auto", "max_bytes": 8, "advise_codecs": ("PQ8",)}),
                     executor=ray_executor)
    with pytest.raises(ConfigError, match="the advisor judges the PQ forms"):  # (Lance's codes: only a build tells)
        run_compress([str(root / "src")], str(tmp_path / "o3"), "t",
                     CompressOptions(**{**OPTS, "codec": "auto", "max_bytes": 64, "advise_codecs": ("IVF32,SQ",)}),
                     executor=ray_executor)


FORMS = {"IVF32,HNSW,PQ8": "IVF_HNSW_PQ", "IVF32,SQ": "IVF_SQ", "IVF32,HNSW,SQ": "IVF_HNSW_SQ",
         "IVF32,FLAT": "IVF_FLAT", "IVF32,HNSW,FLAT": "IVF_HNSW_FLAT", "IVF32,RaBitQ": "IVF_RQ"}


@pytest.mark.parametrize("spec", list(FORMS))
def test_every_served_form(corpus, tmp_path, ray_executor, spec, monkeypatch):
    """Each of Lance's index forms, built with vecpress's centroids (and codebook), one segment
    per encode task: LanceDB searches it from a process that imports only lancedb and finds
    what vecpress reports."""
    monkeypatch.setenv("LANCE_INCLUDE_VECTOR_CENTROIDS", "true")  # (index_stats: the centroids)
    root, x = corpus
    out = str(tmp_path / "out")
    result = run_compress([str(root / "src")], out, "t", CompressOptions(**{**OPTS, "codec": spec}),
                          executor=ray_executor)
    info = inspect_table(out, "t", "production")
    assert info["index"]["type"] == FORMS[spec] == result.eval["served"]["index"] and info["index"]["covers_all_rows"]
    model = load_codec(CodecRef(**{**result.manifest["codec"], "uri": f"{out}/{result.manifest['codec']['uri']}"}))
    stats = lance.dataset(f"{out}/t.lance").stats.index_stats("embedding_idx")
    for segment in stats["indices"]:  # Lance's partitions are vecpress's: its centroids, its assignment
        np.testing.assert_allclose(np.asarray(segment["centroids"], np.float32), model.centroids, atol=1e-2)
    sizes = np.sum([[p["size"] for p in s["partitions"]] for s in stats["indices"]], axis=0)
    assert sizes.sum() == N and (np.abs(sizes - np.bincount(model.assign(x)[0], minlength=32)) <= 2).all()
    grid = {(g["nprobes"], g["refine_factor"]): g["recall_at_10"] for g in result.eval["served"]["grid"]}
    user = user_recall(tmp_path, out, result.manifest, 20, None)
    assert user["unindexed"] == 0 and user["recall_at_10"] == pytest.approx(grid[(20, None)], abs=0.01)
    assert grid[(50, 5)] > 0.9
    if "FLAT" in spec:  # the vectors themselves, every partition probed: exact but for float16
        assert grid[(50, None)] > 0.97


@pytest.mark.parametrize("spec", ["IVF8,PQ4", "IVF8,SQ"])
def test_lance_takes_the_partitions_vecpress_gives(tmp_path, spec):
    """The segment holds each row in the partition the encode pass gave it, even where that is
    not the nearest centroid (Lance computes no assignment of its own)."""
    from vecpress.kernels.codecs.ivf import IvfModel
    from vecpress.pipeline.codec_store import save_codec
    from vecpress.pipeline.context import save_arrays
    from vecpress.pipeline.served import IndexJob, build_index_segment, commit_index

    x = ClusteredEmbeddings(16, seed=2, num_clusters=8).batch(0, 2000)
    uri = str(tmp_path / "t.lance")
    lance.write_dataset(pa.table({"v": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 16)}), uri,
                        max_rows_per_file=1000)
    model = IvfModel.train(x, spec, "l2", seed=0, ngpu=0)
    parts, codes = IvfModel.split(model.encode(x))
    given = (parts + 1) % 8  # every row one partition off
    buffers = [save_arrays(str(tmp_path / f"b{i}.npz"), {"partitions": given[i * 1000:(i + 1) * 1000],
                                                         "codes": codes[i * 1000:(i + 1) * 1000]}) for i in range(2)]
    job = IndexJob(uri, 1, "v", save_codec(model, str(tmp_path / "codecs")), "float32")
    segments = [build_index_segment((i, 1, b), job=job) for i, b in enumerate(buffers)]
    stats = lance.dataset(uri, version=commit_index(uri, 1, segments)).stats.index_stats("v_idx")
    sizes = np.sum([[p["size"] for p in s["partitions"]] for s in stats["indices"]], axis=0)
    np.testing.assert_array_equal(sizes, np.bincount(given, minlength=8))
    assert stats["index_type"] == model.index_type
