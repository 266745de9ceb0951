"""--duplicate-ids keep-first / keep-last: the committed version holds each id once (its first
or last row by position), and everything that maps table rows to source rows (re-ranking from
the source, the evaluation's exact neighbours, the queries' own rows) goes through the run's
RowMap. Real Parquet and Lance files, a real local Ray."""

from __future__ import annotations

import dataclasses

import lance
import numpy as np
import pyarrow as pa
import pytest

from vecpress.kernels.knn import exact_knn
from vecpress.pipeline.codec_store import load_codec
from vecpress.pipeline.context import load_array, manifest_codec
from vecpress.pipeline.errors import ConfigError, SourceError
from vecpress.pipeline.evaluate import evaluate_version
from vecpress.pipeline.options import CompressOptions
from vecpress.pipeline.report import inspect_table
from vecpress.pipeline.rowmap import RowMap
from vecpress.pipeline.run import run_compress
from vecpress.pipeline.schema import CODE_COLUMN, codes_as_numpy
from vecpress.pipeline.search import search
from tests.conftest import write_vectors

TABLE = "t"
OPTS = CompressOptions(codec="PQ4", num_train=500, num_queries=40, eval_k=10, shard_rows=1000, gate_max_drop=1.0,
                       keep=("text",))
ROWS, DIM = 400, 16


def corpus(folder, ids, *, seed=0, first=0, name="part-{}", rows=ROWS):
    """Files of `rows` rows: clustered vectors, the given ids, a `text` column naming each row's
    position (first + row number)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((8, DIM)) * 3
    x = (centers[rng.integers(0, 8, len(ids))] + rng.standard_normal((len(ids), DIM))).astype(np.float32)
    for i in range(0, len(ids), rows):
        write_vectors(folder / f"{name.format(i // rows)}.parquet", x[i:i + rows], ids[i:i + rows],
                      extra={"text": pa.array([f"pos {first + p}" for p in range(i, min(i + rows, len(ids)))])},
                      row_group_size=200)
    return x


def duplicated_ids():
    ids = np.arange(1200, dtype=np.int64)
    ids[800:1100] = np.arange(300)  # part-2's first 300 rows repeat part-0's ids
    ids[1150] = 5  # and one of them a third time
    return ids


def kept_positions(ids: np.ndarray, keep: str) -> np.ndarray:
    """The positions a keep option keeps: each id's first (or last) row, in position order."""
    if keep == "keep-first":
        return np.sort(np.unique(ids, return_index=True)[1])
    return np.sort(len(ids) - 1 - np.unique(ids[::-1], return_index=True)[1])


def read_table(out):
    return lance.dataset(str(out / f"{TABLE}.lance")).to_table()


def test_rowmap_maps_both_ways():
    rows = RowMap(np.array([2, 3, 7], np.int64))
    positions = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, -1])
    assert rows.rows_of(positions).tolist() == [0, 1, -1, -1, 2, 3, 4, -1, 5, -1]
    assert rows.positions_of(np.array([0, 1, 2, 3, 4, 5, -1])).tolist() == [0, 1, 4, 5, 6, 8, -1]
    assert rows.dropped_in(3, 8).tolist() == [0, 4]
    assert not RowMap.identity() and RowMap.identity().rows_of(np.array([4, -1])).tolist() == [4, -1]


def test_kept_top_takes_dropped_rows_out_of_a_deeper_top_k():
    from vecpress.pipeline.dedup import kept_top

    rows = RowMap(np.array([1, 4], np.int64))
    I = np.array([[4, 0, 1, 2, 3, 5], [0, 2, 3, 5, -1, -1], [1, 4, 0, -1, -1, -1]])
    E = np.where(I >= 0, np.arange(18).reshape(3, 6), np.inf).astype(np.float32)  # (as TopK holds them)
    top, (e,), complete = kept_top(I, rows, 3, E)
    assert top.tolist() == [[0, 1, 2], [0, 1, 2], [0, -1, -1]]  # (table rows: 2 -> 1, 3 -> 2, 5 -> 3)
    assert e.tolist() == [[1, 3, 4], [6, 7, 8], [14, np.inf, np.inf]]
    assert complete.tolist() == [True, True, True]  # (the last: every row of the corpus was in it)
    assert kept_top(I[:, :4], rows, 3)[2].tolist() == [False, True, True]


def test_bad_value_is_one_line():
    with pytest.raises(ConfigError, match=r"^--duplicate-ids must be one of refuse, keep-first, keep-last, got "
                                          r"'keep'$"):
        CompressOptions(duplicate_ids="keep")
    assert CompressOptions().duplicate_ids == "refuse"


@pytest.mark.parametrize("keep", ["keep-first", "keep-last"])
def test_keep_commits_each_id_once_with_its_row(tmp_path, ray_executor, keep):
    src, out = tmp_path / "src", tmp_path / "out"
    ids = duplicated_ids()
    x = corpus(src, ids)
    with pytest.raises(SourceError, match="occur more than once"):  # the default refuses
        run_compress([str(src)], str(out), TABLE, OPTS, executor=ray_executor)
    r = run_compress([str(src)], str(out), TABLE, dataclasses.replace(OPTS, duplicate_ids=keep),
                     executor=ray_executor)
    kept = kept_positions(ids, keep)
    assert len(kept) == 1200 - 301
    t = read_table(out)
    assert t.column("id").to_numpy().tolist() == ids[kept].tolist()
    assert t.column("text").to_pylist() == [f"pos {p}" for p in kept]
    codec = load_codec(manifest_codec(str(out), r.manifest["codec"]))
    assert np.array_equal(codes_as_numpy(t.column(CODE_COLUMN)), codec.encode(x[kept]))
    check = inspect_table(str(out), TABLE)["id_check"]
    assert check["duplicate_ids"] == keep and check["rows_dropped"] == 301 and check["num_ids_duplicated"] == 300
    assert check["examples"][0] == [0, [0, 800]] and check["rows"] == 1200
    assert r.manifest["num_rows"] == 899
    ds = lance.dataset(str(out / f"{TABLE}.lance"))
    assert {p.name for p in (out / f"{TABLE}.lance" / "data").iterdir()} == \
        {d.path for f in ds.get_fragments() for d in f.metadata.files}  # the replaced files are gone

    # search, re-ranked from the source: the kept rows' ids and exact distances
    xq = x[kept[[0, 5, 300, 600, 850]]] + 0.01
    res = search(str(out), TABLE, xq, k=5, rerank=200, rerank_from="source", executor=ray_executor)
    D, I = exact_knn(xq, x[kept], 5, "l2")
    for q in range(len(xq)):
        got = res.filter(pa.compute.equal(res.column("query"), q))
        assert got.column("id").to_pylist() == ids[kept][I[q]].tolist()
        assert np.allclose(got.column("distance").to_numpy(), D[q], rtol=1e-4, atol=1e-4)

    # the evaluation's exact neighbours: table rows, over the kept rows only
    base = str(out) + "/"
    sample = r.manifest["sample"]
    truth = load_array(base + sample["ground_truth_uri"])
    qpos = load_array(base + sample["query_positions_uri"])
    own = RowMap(np.setdiff1d(np.arange(1200), kept)).rows_of(qpos)
    D, I = exact_knn(x[qpos], x[kept], 11, "l2")
    want = np.array([[i for i in row if i != o][:10] for row, o in zip(I, own)])
    assert np.array_equal(truth, want)
    again = evaluate_version(str(out), TABLE, r.version, ray_executor, recompute=True)
    assert again["searched"] == "stored codes"  # (the run's own: the encode pass's, unless too shallow)
    assert again["recall_at_10"] == pytest.approx(r.eval["recall_at_10"], abs=0.01)
    assert again["rerank"]["10"]["recall_at_1"] == pytest.approx(r.eval["rerank"]["10"]["recall_at_1"], abs=0.01)


def test_truth_read_again_when_the_pass_was_not_deep_enough(tmp_path, ray_executor):
    """Every row repeated 3 times with the same vector: a query's top-20 holds 2 dropped rows
    for each kept one, so its exact neighbours are read again over the kept rows."""
    src, out = tmp_path / "src", tmp_path / "out"
    base = np.random.default_rng(4).standard_normal((400, DIM)).astype(np.float32)
    x = np.concatenate([base, base, base])
    ids = np.tile(np.arange(400, dtype=np.int64), 3)
    for i in range(3):
        write_vectors(src / f"part-{i}.parquet", x[i * 400:(i + 1) * 400], ids[i * 400:(i + 1) * 400],
                      row_group_size=200)
    r = run_compress([str(src)], str(out), TABLE, dataclasses.replace(OPTS, duplicate_ids="keep-last", keep=()),
                     executor=ray_executor)
    assert read_table(out).column("id").to_numpy().tolist() == list(range(400))
    sample = r.manifest["sample"]
    truth = load_array(str(out) + "/" + sample["ground_truth_uri"])
    qpos = load_array(str(out) + "/" + sample["query_positions_uri"])
    own = np.where(qpos >= 800, qpos - 800, -1)  # (the third copy is kept)
    _, I = exact_knn(x[qpos], base, 11, "l2")
    want = np.array([[i for i in row if i != o][:10] for row, o in zip(I, own)])
    assert np.array_equal(truth, want)


def test_incremental_run_after_keep_decides_again(tmp_path, ray_executor):
    src, out = tmp_path / "src", tmp_path / "out"
    ids = duplicated_ids()
    x = corpus(src, ids)
    opts = dataclasses.replace(OPTS, duplicate_ids="keep-first")
    run_compress([str(src)], str(out), TABLE, opts, executor=ray_executor)
    new_ids = np.arange(5000, 5400, dtype=np.int64)
    new_ids[:2] = [7, 5003]  # one of version 1's ids, and one repeated within the new file
    x_new = corpus(src, new_ids, seed=1, first=1200, name="zz-{}")
    second = run_compress([str(src)], str(out), TABLE, opts, executor=ray_executor)
    assert second.version == 2
    all_ids = np.concatenate([ids, new_ids])
    kept = kept_positions(all_ids, "keep-first")
    t = read_table(out)
    assert t.column("id").to_numpy().tolist() == all_ids[kept].tolist()
    assert len(np.unique(t.column("id").to_numpy())) == t.num_rows
    assert t.column("text").to_pylist() == [f"pos {p}" for p in kept]
    x_all = np.concatenate([x, x_new])
    res = search(str(out), TABLE, x_all[kept[[3, 1000]]], k=1, rerank=100, rerank_from="source",
                 executor=ray_executor)
    assert res.column("id").to_pylist() == all_ids[kept[[3, 1000]]].tolist()
    assert np.allclose(res.column("distance").to_numpy(), 0, atol=1e-4)


def test_keep_with_serve_lancedb_indexes_the_kept_rows(tmp_path, ray_executor):
    """--serve lancedb: the stored vectors are the kept rows', and the index (built from the
    encode tasks' buffers, filtered like their fragments) covers exactly those rows."""
    import lancedb

    src, out = tmp_path / "src", tmp_path / "out"
    ids = duplicated_ids()
    x = corpus(src, ids)
    opts = dataclasses.replace(OPTS, duplicate_ids="keep-last", serve="lancedb", codec="IVF4,PQ4")
    r = run_compress([str(src)], str(out), TABLE, opts, executor=ray_executor)
    kept = kept_positions(ids, "keep-last")
    t = read_table(out)
    assert t.column("id").to_numpy().tolist() == ids[kept].tolist()
    assert t.column("text").to_pylist() == [f"pos {p}" for p in kept]
    vectors = np.stack(t.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    assert np.allclose(vectors, x[kept], atol=1e-2)
    ds = lance.dataset(str(out / f"{TABLE}.lance"))
    (index,) = ds.list_indices()
    assert ds.stats.index_stats(index["name"])["num_indexed_rows"] == len(kept)
    tbl = lancedb.connect(str(out)).open_table(TABLE)
    q = x[kept[[10, 700]]]
    got = [tbl.search(v).limit(1).nprobes(4).refine_factor(50).to_arrow().column("id")[0].as_py() for v in q]
    assert got == ids[kept[[10, 700]]].tolist()
    assert r.eval["recall_at_10"] is not None


def test_keep_last_in_an_incremental_run_drops_a_kept_row(tmp_path, ray_executor):
    """Version 1 has unique ids; a new file repeats two of its ids: the incremental run keeps
    the old files' fragments but writes again the kept ones that hold a row it now drops."""
    src, out = tmp_path / "src", tmp_path / "out"
    ids = np.arange(1200, dtype=np.int64)
    x = corpus(src, ids, rows=600)  # (files of at least half a shard: shards of their own, kept whole)
    opts = dataclasses.replace(OPTS, duplicate_ids="keep-last", drift_threshold=100.0)  # (the codec kept)
    first = run_compress([str(src)], str(out), TABLE, opts, executor=ray_executor)
    assert first.manifest["id_check"]["unique"] and "dropped_uri" not in first.manifest["id_check"]
    new_ids = np.arange(2000, 2400, dtype=np.int64)
    new_ids[[0, 399]] = [3, 1000]
    x_new = corpus(src, new_ids, seed=1, first=1200, name="zz-{}", rows=600)
    second = run_compress([str(src)], str(out), TABLE, opts, executor=ray_executor)
    assert second.mode == "incremental" and second.incremental["files_unchanged"] == 2 and second.manifest["id_check"]["rows_dropped"] == 2
    all_ids = np.concatenate([ids, new_ids])
    kept = kept_positions(all_ids, "keep-last")
    t = read_table(out)
    assert t.column("id").to_numpy().tolist() == all_ids[kept].tolist()
    assert t.column("text").to_pylist() == [f"pos {p}" for p in kept]
    x_all = np.concatenate([x, x_new])
    res = search(str(out), TABLE, x_all[kept[[3, 998, 1500]]], k=1, rerank=100, rerank_from="source",
                 executor=ray_executor)
    assert res.column("id").to_pylist() == all_ids[kept[[3, 998, 1500]]].tolist()
    assert np.allclose(res.column("distance").to_numpy(), 0, atol=1e-4)
