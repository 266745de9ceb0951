"""`import vecpress`: the job from Python, and one table handle over codes tables (vecpress's
search) and LanceDB-served tables (LanceDB's), shaped after LanceDB's query builder."""

from __future__ import annotations

import numpy as np
import pytest

import vecpress
from vecpress.kernels.synthetic import ClusteredEmbeddings
from vecpress.pipeline.errors import VecpressError
from vecpress.pipeline.search import search
from tests.conftest import write_split

N, DIM = 6000, 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("api")
    x = ClusteredEmbeddings(DIM, seed=11, num_clusters=24).batch(0, N)
    write_split(root / "src", x, [0, 3000, N], "part-{}", row_group_size=1000)
    return root, x


@pytest.fixture(scope="module")
def codes(corpus, ray_executor):
    root, x = corpus
    out = str(root / "codes")
    report = vecpress.compress([str(root / "src")], out, "t", executor=ray_executor, codec="PQ8", metric="cosine",
                               keep=["text"], num_train=3000, num_queries=100, gate_max_drop=1.0)
    return out, x, report


@pytest.fixture(scope="module")
def served(corpus, ray_executor):
    root, x = corpus
    out = str(root / "served")
    report = vecpress.compress([str(root / "src")], out, "t", executor=ray_executor, serve="lancedb",
                               codec="IVF16,PQ8", keep=["text"], num_train=3000, num_queries=100, gate_max_drop=1.0)
    return out, x, report


def test_public_names():
    assert set(vecpress.__all__) >= {"compress", "open", "Table", "Query", "CompressOptions"}
    assert vecpress.open is vecpress.pipeline.api.open_table
    with pytest.raises(AttributeError):
        vecpress.no_such_name  # noqa: B018


def test_compress_returns_the_report_and_open_reads_production(codes):
    out, _, report = codes
    assert report["version"] == 1 and report["codec"] == "PQ8" and "production" in report["tags"]
    tbl = vecpress.open(out, "t")
    assert tbl.version == 1 and tbl.serve == "codes" and tbl.count_rows() == N
    assert tbl.tags() == {"production": 1} and [v["version"] for v in tbl.versions()] == [1]
    assert tbl.versions()[0]["tags"] == ["production"]
    assert tbl.report()["eval"]["recall_at_10"] == report["eval"]["recall_at_10"]
    assert tbl.codec.encode(np.zeros((3, DIM), np.float32) + 1).shape == (3, 8)
    with pytest.raises(VecpressError, match="no version"):
        vecpress.open(out, "t", version=7)
    with pytest.raises(VecpressError, match="not both"):
        vecpress.open(out, "t", version=1, tag="production")


def test_codes_search_is_vecpress_s_search_in_lancedb_s_shape(codes):
    out, x, _ = codes
    tbl = vecpress.open(out, "t")
    one = tbl.search(x[42]).limit(5).to_arrow()
    assert one.column_names == ["id", "text", "_distance"]  # no query_index for one vector
    batch = tbl.search(x[[42, 43]]).limit(5).to_arrow()
    assert batch.column_names == ["query_index", "id", "text", "_distance"]
    want = search(out, "t", x[[42, 43]], 5)
    assert batch.column("id").to_pylist() == want.column("id").to_pylist()
    assert batch.column("query_index").to_pylist() == [0] * 5 + [1] * 5
    d = batch.column("_distance").to_numpy()
    assert (d > -0.05).all() and (d < 2.05).all()  # cosine: 1 - similarity (estimated from codes), as LanceDB's
    np.testing.assert_allclose(d, 1 + want.column("distance").to_numpy(), rtol=1e-6)


def test_rerank_where_and_select(codes):
    out, x, _ = codes
    tbl = vecpress.open(out, "t")
    exact = tbl.search(x[10]).limit(3).rerank(4, source=True).to_list()
    assert exact[0]["id"] == 10 and exact[0]["_distance"] == pytest.approx(0.0, abs=1e-5)  # the row itself
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert exact[1]["_distance"] == pytest.approx(1 - float(xn[10] @ xn[exact[1]["id"]]), abs=1e-4)
    only = tbl.search(x[10]).limit(20).where("id >= 3000 AND id < 3100").select([]).to_arrow()
    assert only.column_names == ["id", "_distance"] and only.num_rows == 20
    assert all(3000 <= i < 3100 for i in only.column("id").to_pylist())
    few = tbl.search(x[10]).limit(20).where("id < 4").to_arrow()
    assert sorted(few.column("id").to_pylist()) == [0, 1, 2, 3]  # all the rows it selects, no more
    with pytest.raises(VecpressError, match="without partitions"):
        tbl.search(x[0]).nprobes(10)
    with pytest.raises(VecpressError, match="no warm re-rank column"):
        tbl.search(x[0]).rerank(2, column=True).to_arrow()
    with pytest.raises(VecpressError, match="where 'no_such_column > 1'"):
        tbl.search(x[0]).where("no_such_column > 1").to_arrow()
    with pytest.raises(VecpressError, match="holds 32-d vectors"):
        tbl.search(np.zeros(31))


def test_a_served_table_searches_with_lancedb(served):
    import lancedb

    out, x, report = served
    tbl = vecpress.open(out, "t")
    assert tbl.serve == "lancedb" and tbl.version == report["version"] == 2
    got = tbl.search(x[[5, 6]]).limit(4).nprobes(8).rerank(3).where("id < 5000").to_arrow()
    assert got.column_names == ["query_index", "id", "text", "_distance"]
    plain = lancedb.connect(out).open_table("t")
    want = plain.search(x[[5, 6]]).limit(4).nprobes(8).refine_factor(3).where("id < 5000", prefilter=True).to_arrow()
    assert got.column("id").to_pylist() == want.column("id").to_pylist()
    assert tbl.search(x[5]).limit(1).rerank(5).nprobes(16).to_list()[0]["id"] == 5
    with pytest.raises(VecpressError, match="stored vectors"):
        tbl.search(x[0]).rerank(2, source=True)
    assert tbl.codec.index_type == "IVF_PQ"
