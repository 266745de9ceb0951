"""Partitioned codes tables (pipeline.lists): coarse partitions trained with the codec, every
row in exactly one inverted list with its stored code, search that reads only the probed
partitions (and equals the exhaustive search when it probes them all), the default nprobes
chosen by measured recall, incremental runs, filters and errors."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pyarrow as pa
import pytest

import vecpress
from vecpress.kernels.metrics import knn_recall
from vecpress.kernels.synthetic import ClusteredEmbeddings
from vecpress.pipeline import storage
from vecpress.pipeline.buckets import open_batches
from vecpress.pipeline.codec_store import load_codec
from vecpress.pipeline.context import load_array
from vecpress.pipeline.errors import ConfigError, VecpressError
from vecpress.pipeline.executor import LocalExecutor
from vecpress.pipeline.lance_io import require_dataset, version_manifest
from vecpress.pipeline.lists import InvertedLists, auto_partitions, nprobes_grid, search_lists, version_lists
from vecpress.pipeline.schema import CODE_COLUMN, codes_as_numpy
from tests.conftest import write_split, write_vectors

N, DIM, NLIST = 12_000, 32, 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("partitions")
    x = ClusteredEmbeddings(DIM, seed=5, num_clusters=40).batch(0, N)
    write_split(root / "src", x, [0, 5000, N], "part-{}", row_group_size=1000)
    return root, x


def _compress(root, x_name, out, executor, **options):
    return vecpress.compress([str(root / x_name)], str(out), "t", executor=executor,
                             **{"codec": "PQ8", "partitions": NLIST, "num_train": 4000, "num_queries": 200,
                                "keep": ["text"], "gate_max_drop": 1.0, "shard_rows": 3000, **options})


@pytest.fixture(scope="module")
def table(corpus, ray_executor):
    """Lists of the table's own codes (--no-residual)."""
    root, x = corpus
    out = root / "out"
    report = _compress(root, "src", out, ray_executor, residual=False)
    return str(out), x, report


@pytest.fixture(scope="module")
def residual_table(corpus, ray_executor):
    """Lists of residual codes (the default)."""
    root, x = corpus
    out = root / "residual"
    report = _compress(root, "src", out, ray_executor)
    return str(out), x, report


@pytest.fixture(scope="module")
def rq_table(corpus):
    """Lists of a residual quantizer's residual codes, cosine: scored by look-up tables. The
    train stage's judgement is forced to residual codes: on these rows it is a near tie
    (recall@10 0.747 against the table codes' 0.760, 1.3 standard errors, and the other way
    with other rounding), and what the tests here read is the search over such lists."""
    from vecpress.pipeline.stages import s05_train

    root, x = corpus
    out = root / "rq"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(s05_train, "residual_leads", lambda judged: True)
        _compress(root, "src", out, LocalExecutor(), codec="RQ4x8", metric="cosine")
    return str(out), x


@pytest.fixture(scope="module")
def rq_table_codes(corpus):
    """Lists of a residual quantizer's table codes (--no-residual), cosine: scored by look-up tables."""
    root, x = corpus
    out = root / "rq-table"
    _compress(root, "src", out, LocalExecutor(), codec="RQ4x8", metric="cosine", residual=False)
    return str(out), x


def _lists(out):
    m = version_manifest(require_dataset(out, "t"))
    return version_lists(out, m), m


def test_every_row_is_in_one_list_with_its_stored_code_and_nearest_partition(table):
    out, x, _ = table
    lists, m = _lists(out)
    assert lists.spec.nlist == NLIST and m["partitions"]["nlist"] == NLIST
    coarse = load_codec(lists.spec.coarse)
    stored = codes_as_numpy(require_dataset(out, "t").to_table(columns=[CODE_COLUMN]).column(0))
    seen = np.zeros(N, np.int64)
    for p in range(NLIST):
        pos, codes = lists.read(p)
        assert (np.diff(pos) > 0).all()  # in position order, no repeat
        seen[pos] += 1
        np.testing.assert_array_equal(codes, stored[pos])
        np.testing.assert_array_equal(coarse.assign(x[pos])[0], p)
    np.testing.assert_array_equal(seen, 1)  # nothing missing, nothing twice
    assert m["partitions"]["sizes"]["min"] >= 0 and m["partitions"]["sizes"]["max"] < N


def test_probing_every_partition_equals_the_exhaustive_search(table):
    out, x, _ = table
    lists, m = _lists(out)
    codec = vecpress.open(out, "t").codec
    xq = x[:40] + 0.01
    D, I = search_lists(lists, codec, xq, 10, NLIST)
    stored = codes_as_numpy(require_dataset(out, "t").to_table(columns=[CODE_COLUMN]).column(0))
    De, Ie = codec.search_codes(xq, stored, 10)
    np.testing.assert_allclose(D, De, rtol=1e-5, atol=1e-5)
    assert (I == Ie).mean() > 0.99  # (ties among equal distances aside)
    # the API at nprobes = all partitions gives the same ids
    got = vecpress.open(out, "t").search(xq).nprobes(NLIST).limit(10).to_arrow()
    assert (got.column("id").to_numpy().reshape(40, 10) == I).mean() > 0.99


def test_default_nprobes_is_the_fewest_within_tolerance_of_scoring_every_code(table):
    out, x, report = table
    p = vecpress.open(out, "t").manifest["partitions"]
    every = p["exhaustive"]["recall_at_10"]
    assert every == pytest.approx(report["eval"]["recall_at_10"])
    grid = {g["nprobes"]: g["recall_at_10"] for g in p["grid"]}
    assert list(grid) == nprobes_grid(NLIST)[:len(grid)]
    default = p["default_nprobes"]
    assert grid[default] >= every - p["tolerance"]
    assert all(r < every - p["tolerance"] for n, r in grid.items() if n < default)
    assert default < NLIST  # clustered data: a few partitions suffice
    # the recorded recall is what the search gives: re-measure it at the default
    m = vecpress.open(out, "t")
    base = storage.normalize(out)
    xq = load_array(storage.join(base, m.manifest["sample"]["queries_uri"]))
    qpos = load_array(storage.join(base, m.manifest["sample"]["query_positions_uri"]))
    truth = load_array(storage.join(base, m.manifest["sample"]["ground_truth_uri"]))
    lists, _ = _lists(out)
    _, I = search_lists(lists, m.codec, xq, truth.shape[1], default, exclude=qpos)
    assert knn_recall(truth, I, 10) == pytest.approx(grid[default])


def test_search_reads_only_the_probed_partitions(table, monkeypatch):
    out, x, _ = table
    read = []
    original = InvertedLists.read
    monkeypatch.setattr(InvertedLists, "read", lambda self, p: read.append(int(p)) or original(self, p))
    tbl = vecpress.open(out, "t")
    res = tbl.search(x[7]).nprobes(3).limit(5).to_list()
    coarse = load_codec(_lists(out)[0].spec.coarse)
    assert sorted(read) == sorted(coarse.probe(x[7][None], 3)[0].tolist())
    assert res[0]["id"] == 7 and len(res) == 5
    read.clear()
    tbl.search(x[7]).limit(5).to_list()
    assert len(read) == tbl.manifest["partitions"]["default_nprobes"]


def test_batch_equals_single_queries_and_filters_apply(table):
    out, x, _ = table
    tbl = vecpress.open(out, "t")
    batch = tbl.search(x[:6]).nprobes(4).limit(5).to_arrow()
    for q in range(6):
        single = tbl.search(x[q]).nprobes(4).limit(5).to_arrow()
        rows = batch.filter(batch.column("query_index").to_numpy() == q)
        assert rows.column("id").to_pylist() == single.column("id").to_pylist()
        np.testing.assert_allclose(rows.column("_distance").to_numpy(), single.column("_distance").to_numpy(),
                                   rtol=1e-5)
    filtered = tbl.search(x[:6]).nprobes(NLIST).where("id >= 6000").limit(5).to_arrow()
    assert filtered.num_rows == 30 and min(filtered.column("id").to_pylist()) >= 6000
    reranked = tbl.search(x[:3]).limit(3).rerank(4, source=True).to_arrow()
    assert reranked.column("id").to_pylist()[::3] == [0, 1, 2]
    assert reranked.column("_distance").to_numpy()[::3] == pytest.approx(0.0, abs=1e-4)


def test_nprobes_out_of_range_and_without_partitions_are_errors(table, corpus, tmp_path):
    out, x, _ = table
    with pytest.raises(VecpressError, match=f"nprobes must be from 1 to {NLIST}"):
        vecpress.open(out, "t").search(x[0]).nprobes(NLIST + 1).to_arrow()
    root, _ = corpus
    plain = tmp_path / "plain"
    _compress(root, "src", plain, LocalExecutor(), partitions=0)
    assert vecpress.open(str(plain), "t").manifest["partitions"] is None
    with pytest.raises(VecpressError, match="without partitions"):
        vecpress.open(str(plain), "t").search(x[0]).nprobes(2)


def test_bad_partitions_option():
    with pytest.raises(ConfigError, match="--partitions must be from 0"):
        vecpress.CompressOptions(partitions=-1)
    with pytest.raises(ConfigError, match="--partitions partitions a codes table"):
        vecpress.CompressOptions(partitions=16, serve="lancedb")


def test_more_partitions_than_training_vectors_is_refused_before_encoding(corpus, tmp_path):
    root, _ = corpus
    with pytest.raises(ConfigError, match="--partitions 5000 needs at least as many training vectors"):
        _compress(root, "src", tmp_path / "o", LocalExecutor(), partitions=5000, num_train=1000)


def test_auto_partitions():
    assert auto_partitions(50_000, 100_000) == 0
    assert auto_partitions(1_000_000, 100_000) == 1024
    assert auto_partitions(10_000_000, 100_000) == 2048  # (39 training vectors per partition at least)
    assert auto_partitions(100_000, 100_000) == 256


@pytest.mark.parametrize("codec", ["PQ8", "RQ4x8"])
def test_incremental_run_lists_kept_and_new_rows_with_the_same_centroids(corpus, tmp_path, codec, monkeypatch):
    """Kept rows are listed from the previous version's lists, new ones from their encoding;
    a residual quantizer's code terms are those of every listed row's code (kept or new)."""
    from vecpress.pipeline.stages import s05_train

    monkeypatch.setattr(s05_train, "residual_leads", lambda judged: True)  # (residual codes, whatever they rank)
    root, x = corpus
    src = tmp_path / "src"
    write_split(src, x[:8000], [0, 4000, 8000], "part-{}", row_group_size=1000)
    out = tmp_path / "out"
    options = {"codec": codec} if codec == "PQ8" else {"codec": codec, "metric": "cosine"}
    first = _compress(tmp_path, "src", out, LocalExecutor(), **options)
    extra = ClusteredEmbeddings(DIM, seed=5, num_clusters=40).batch(8000, 3000)
    write_vectors(src / "part-9.parquet", extra, np.arange(8000, 11000, dtype=np.int64),
                  extra={"text": pa.array([f"doc {j}" for j in range(8000, 11000)])})
    second = _compress(tmp_path, "src", out, LocalExecutor(), **options)
    assert second["mode"] == "incremental" and first["version"] < second["version"]
    lists, m = _lists(str(out))
    assert m["partitions"]["coarse"]["sha256"] == vecpress.open(str(out), "t", version=first["version"]) \
        .manifest["partitions"]["coarse"]["sha256"]
    positions = np.concatenate([lists.read(p)[0] for p in range(NLIST)])
    np.testing.assert_array_equal(np.sort(positions), np.arange(11_000))
    assert lists.spec.has_terms == (codec == "RQ4x8")
    if lists.spec.has_terms:
        coarse, residual = load_codec(lists.spec.coarse), load_codec(lists.spec.residual)
        for p in range(NLIST):
            _, codes, terms = lists.read_listed(p)
            r = residual.decode(codes).astype(np.float64)
            np.testing.assert_allclose(terms, (r * r).sum(1) + 2 * r @ coarse.centroids[p], rtol=1e-4, atol=1e-5)
    res = vecpress.open(str(out), "t").search(extra[5]).limit(1).to_list()
    assert res[0]["id"] == 8005


def test_same_inputs_and_seed_give_the_same_lists(corpus, tmp_path):
    root, _ = corpus
    a = _compress(root, "src", tmp_path / "a", LocalExecutor())
    b = _compress(root, "src", tmp_path / "b", LocalExecutor())
    la, ma = _lists(str(tmp_path / "a"))
    lb, mb = _lists(str(tmp_path / "b"))
    assert ma["partitions"]["coarse"]["sha256"] == mb["partitions"]["coarse"]["sha256"]
    for p in range(NLIST):
        pa_, ca = la.read(p)
        pb, cb = lb.read(p)
        np.testing.assert_array_equal(pa_, pb)
        np.testing.assert_array_equal(ca, cb)
    assert a["eval"]["recall_at_10"] == b["eval"]["recall_at_10"]


def test_real_sift_partitioned_recall_close_to_exhaustive(sift5k, tmp_path):
    ids, x = sift5k
    write_vectors(tmp_path / "sift" / "a.parquet", x, ids, row_group_size=500)
    report = vecpress.compress([str(tmp_path / "sift")], str(tmp_path / "out"), "sift", executor=LocalExecutor(),
                               codec="PQ16", partitions=16, num_train=4000, num_queries=200, gate_max_drop=1.0)
    p = vecpress.open(str(tmp_path / "out"), "sift").manifest["partitions"]
    grid = {g["nprobes"]: g["recall_at_10"] for g in p["grid"]}
    assert grid[p["default_nprobes"]] >= report["eval"]["recall_at_10"] - 0.01
    assert grid[1] < grid[p["default_nprobes"]] or p["default_nprobes"] == 1


def test_evaluate_remeasures_the_grid_from_the_stored_codes(table):
    from vecpress.pipeline.evaluate import evaluate_version

    out, _, _ = table
    stored = vecpress.open(out, "t").manifest["partitions"]
    ev = evaluate_version(out, "t", None, LocalExecutor(), rerank=False, recompute=True)
    assert ev["searched"] == "stored codes"
    assert ev["partitions"]["default_nprobes"] == stored["default_nprobes"]
    assert [g["recall_at_10"] for g in ev["partitions"]["grid"]] == \
        pytest.approx([g["recall_at_10"] for g in stored["grid"]], abs=0.005)
    quick = evaluate_version(out, "t", None, LocalExecutor(), rerank=False)
    assert quick["partitions"]["grid"] == stored["grid"]


def test_cli_search_probes_the_given_partitions(table, tmp_path, capsys):
    from vecpress.flows.cli import main

    out, x, _ = table
    np.save(tmp_path / "q.npy", x[:2])
    assert main(["search", out, "--table", "t", "--queries", str(tmp_path / "q.npy"), "-k", "3", "--nprobes",
                 str(NLIST), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["id"] for r in lines if r["rank"] == 0] == [0, 1]
    assert main(["search", out, "--table", "t", "--queries", str(tmp_path / "q.npy"), "--nprobes", "0"]) != 0
    assert "nprobes must be from 1" in capsys.readouterr().err


def test_residual_lists_hold_the_codes_of_each_rows_residual_to_its_centroid(residual_table):
    out, x, _ = residual_table
    lists, m = _lists(out)
    assert m["partitions"]["residual"]["spec"] == "PQ8" and lists.spec.residual is not None
    coarse, residual = load_codec(lists.spec.coarse), load_codec(lists.spec.residual)
    assert residual.metric == "l2" and residual.code_size == 8
    for p in range(0, NLIST, 5):
        pos, codes = lists.read(p)
        np.testing.assert_array_equal(codes, residual.encode(coarse.residuals(x[pos], np.full(len(pos), p))))


def test_residual_search_ranks_by_the_distance_to_centroid_plus_residual(residual_table):
    out, x, _ = residual_table
    lists, _ = _lists(out)
    coarse, residual = load_codec(lists.spec.coarse), load_codec(lists.spec.residual)
    recon = np.zeros_like(x)
    for p in range(NLIST):
        pos, codes = lists.read(p)
        recon[pos] = coarse.centroids[p] + residual.decode(codes)
    xq = x[100:120] + 0.02
    D, I = search_lists(lists, vecpress.open(out, "t").codec, xq, 10, NLIST)
    exact = ((xq[:, None, :] - recon[None]) ** 2).sum(-1)
    np.testing.assert_allclose(D, np.sort(exact, axis=1)[:, :10], rtol=1e-4, atol=1e-3)
    assert (I == np.argsort(exact, axis=1, kind="stable")[:, :10]).mean() > 0.98


@pytest.mark.parametrize("codec", ["PQ8", "RQ4x8", "RQ4x8 table codes"])
def test_a_batch_over_residual_lists_finds_what_each_query_alone_finds(corpus, residual_table, request, codec):
    """A batch is searched a partition at a time for all the queries probing it (a residual
    quantizer's codes scored by each query's look-up tables): the same neighbours and
    distances as one query at a time, with each query's own row excluded and an allow-list."""
    root, x = corpus
    fixture = {"PQ8": "residual_table", "RQ4x8": "rq_table", "RQ4x8 table codes": "rq_table_codes"}[codec]
    out = request.getfixturevalue(fixture)[0]
    lists, m = _lists(out)
    assert (m["partitions"]["residual"] or {}).get("spec") == (None if "table" in codec else codec)
    tbl = vecpress.open(out, "t")
    own = np.arange(200, 240)
    xq = x[own] + 0.01
    allowed = np.sort(np.random.default_rng(0).choice(N, N // 2, replace=False))
    for kw in ({"exclude": own}, {"allowed": allowed}):
        D, I = search_lists(lists, tbl.codec, xq, 10, 6, **kw)
        for q in range(len(xq)):
            one = {"exclude": own[q:q + 1]} if "exclude" in kw else kw
            d, i = search_lists(lists, tbl.codec, xq[q:q + 1], 10, 6, **one)
            np.testing.assert_array_equal(I[q], i[0])
            np.testing.assert_array_equal(D[q], d[0])
        assert (I >= 0).all()
        if "exclude" in kw:
            assert not (I == own[:, None]).any()
        else:
            assert np.isin(I, allowed).all()


def test_rq_lists_store_each_row_s_code_term_and_rank_by_centroid_plus_residual(rq_table):
    """A residual quantizer's lists hold |r|^2 + 2<c, r> per row, and its look-up-table search
    ranks by the distance to centroid plus decoded residual, reported as cosine distances."""
    out, x = rq_table
    lists, m = _lists(out)
    assert m["partitions"]["residual"]["spec"] == "RQ4x8" and lists.spec.has_terms
    coarse, residual = load_codec(lists.spec.coarse), load_codec(lists.spec.residual)
    recon = np.zeros(x.shape, np.float64)
    for p in range(NLIST):
        pos, codes, terms = lists.read_listed(p)
        r, c = residual.decode(codes).astype(np.float64), coarse.centroids[p].astype(np.float64)
        np.testing.assert_allclose(terms, (r * r).sum(1) + 2 * r @ c, rtol=1e-4, atol=1e-5)
        recon[pos] = c + r
    xq = x[100:120] + 0.02
    D, I = search_lists(lists, vecpress.open(out, "t").codec, xq, 10, NLIST)
    qn = xq / np.linalg.norm(xq, axis=1, keepdims=True)
    exact = ((qn[:, None, :] - recon[None]) ** 2).sum(-1) / 2 - 1
    np.testing.assert_allclose(D, np.sort(exact, axis=1)[:, :10], atol=1e-4)
    assert (I == np.argsort(exact, axis=1, kind="stable")[:, :10]).mean() > 0.98


def test_rq_table_code_lists_store_each_code_s_norm_and_search_as_the_table_s_codes(rq_table_codes):
    """Lists of an RQ's table codes hold |r|^2 per row, and probing every partition finds what
    the search over all the table's codes finds, at the same distances (cosine)."""
    out, x = rq_table_codes
    lists, m = _lists(out)
    assert m["partitions"]["residual"] is None and lists.spec.has_terms
    codec = vecpress.open(out, "t").codec
    stored = codes_as_numpy(require_dataset(out, "t").to_table(columns=[CODE_COLUMN]).column(0))
    for p in range(0, NLIST, 3):
        pos, codes, terms = lists.read_listed(p)
        r = codec.decode(codes).astype(np.float64)
        np.testing.assert_array_equal(codes, stored[pos])
        np.testing.assert_allclose(terms, (r * r).sum(1), rtol=1e-5, atol=1e-6)
    xq = x[500:530] + 0.02
    D, I = search_lists(lists, codec, xq, 10, NLIST)
    D0, I0 = codec.search_codes(xq, stored, 10)
    np.testing.assert_allclose(D, D0, atol=1e-5)
    assert (I == I0).mean() > 0.98


def test_rq_lists_under_inner_product_rank_by_the_product_with_centroid_plus_residual(corpus, tmp_path,
                                                                                     monkeypatch):
    """Under inner product a residual quantizer's codes are scored by look-up tables with no
    term: -<q, c + r>, the same alone as in a batch."""
    from vecpress.pipeline.stages import s05_train

    root, x = corpus
    monkeypatch.setattr(s05_train, "residual_leads", lambda judged: True)  # (residual codes, whatever they rank)
    _compress(root, "src", tmp_path / "ip", LocalExecutor(), codec="RQ4x8", metric="ip")
    lists, m = _lists(str(tmp_path / "ip"))
    assert m["partitions"]["residual"]["spec"] == "RQ4x8" and lists.spec.books is not None and not lists.spec.has_terms
    coarse, residual = load_codec(lists.spec.coarse), load_codec(lists.spec.residual)
    recon = np.zeros(x.shape, np.float64)
    for p in range(NLIST):
        pos, codes = lists.read(p)
        recon[pos] = coarse.centroids[p] + residual.decode(codes)
    xq, codec = x[100:130] + 0.02, vecpress.open(str(tmp_path / "ip"), "t").codec
    D, I = search_lists(lists, codec, xq, 10, NLIST)
    exact = -(xq @ recon.T)
    np.testing.assert_allclose(D, np.sort(exact, axis=1)[:, :10], rtol=1e-5, atol=1e-4)
    assert (I == np.argsort(exact, axis=1, kind="stable")[:, :10]).mean() > 0.98
    for q in (0, 17):
        d, i = search_lists(lists, codec, xq[q:q + 1], 10, 5)
        np.testing.assert_array_equal((d[0], i[0]), [a[q] for a in search_lists(lists, codec, xq, 10, 5)])


@pytest.mark.parametrize("fixture", ["rq_table", "rq_table_codes"])
def test_lists_built_without_code_terms_are_searched_by_decoding_with_the_same_results(request, fixture, tmp_path):
    """Lists written before they stored code terms (only positions and codes): searched by
    faiss's decoding, to the same neighbours and distances up to rounding."""
    out, x = request.getfixturevalue(fixture)
    lists, _ = _lists(out)
    old = dataclasses.replace(lists.spec, uri=str(tmp_path / "lists"))
    (tmp_path / "lists").mkdir()
    for g in range(lists.spec.num_groups):
        reader = open_batches(lists.spec.group_uri(g))
        batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
        assert batches[0].schema.names == ["position", "code", "term"]
        schema = pa.schema([batches[0].schema.field(i) for i in range(2)])
        with pa.ipc.new_file(old.group_uri(g), schema) as writer:
            for b in batches:
                writer.write_batch(pa.RecordBatch.from_arrays(b.columns[:2], schema=schema))
    before = InvertedLists(old)
    assert before.read_listed(0)[2] is None
    codec, xq = vecpress.open(out, "t").codec, x[300:340] + 0.01
    for nprobes in (4, NLIST):
        D0, I0 = search_lists(before, codec, xq, 10, nprobes)
        D1, I1 = search_lists(lists, codec, xq, 10, nprobes)
        np.testing.assert_allclose(D0, D1, atol=1e-5)
        assert (I0 == I1).mean() > 0.98 and (I1 >= 0).all()


def test_residual_lists_reach_at_least_the_recall_of_the_table_codes(residual_table, table):
    res = vecpress.open(residual_table[0], "t").manifest["partitions"]
    plain = vecpress.open(table[0], "t").manifest["partitions"]
    best = {name: max(g["recall_at_10"] for g in p["grid"]) for name, p in (("res", res), ("plain", plain))}
    assert best["res"] >= best["plain"] - 0.005
    grid = {g["nprobes"]: g["recall_at_10"] for g in res["grid"]}
    assert grid[res["default_nprobes"]] >= max(grid.values()) - res["tolerance"]
    hits = vecpress.open(residual_table[0], "t").search(residual_table[1][9]).limit(3).to_list()
    assert hits[0]["id"] == 9


def test_cosine_residual_search_gives_cosine_distances(corpus, tmp_path):
    root, x = corpus
    _compress(root, "src", tmp_path / "cos", LocalExecutor(), metric="cosine")
    tbl = vecpress.open(str(tmp_path / "cos"), "t")
    assert tbl.manifest["partitions"]["residual"]["metric"] == "l2"  # (cosine residuals rank by L2, as the codes)
    got = tbl.search(x[3]).nprobes(NLIST).limit(5).to_arrow()
    assert got.column("id")[0].as_py() == 3
    d = got.column("_distance").to_numpy()
    assert (np.diff(d) >= -1e-6).all() and 0 <= d[0] < 0.05 and (d < 2.01).all()


def test_residual_codes_are_listed_only_where_they_rank_the_sample_better(corpus, residual_table, tmp_path):
    judged = vecpress.open(residual_table[0], "t").manifest["partitions"]["residual_judged"]
    assert judged["residual_codes_recall_at_10"] > judged["table_codes_recall_at_10"]  # PQ8 here: residual codes
    root, x = corpus
    # SQ4 on this corpus: the table's codes rank the sample's neighbours better (measured 0.897 against 0.866)
    _compress(root, "src", tmp_path / "sq4", LocalExecutor(), codec="SQ4", metric="cosine")
    p = vecpress.open(str(tmp_path / "sq4"), "t").manifest["partitions"]
    assert p["residual"] is None
    judged = p["residual_judged"]
    assert judged["table_codes_recall_at_10"] >= judged["residual_codes_recall_at_10"]
    assert judged["base_rows"] == 4000 and judged["queries"] == 200
    assert max(g["recall_at_10"] for g in p["grid"]) == pytest.approx(p["exhaustive"]["recall_at_10"], abs=0.005)


@pytest.mark.parametrize("leads", [True, False])
def test_a_residual_quantizer_s_lists_are_judged_by_its_first_half(corpus, monkeypatch, leads):
    """A residual quantizer's residual codes are judged by their first half first (against
    the table codec's first half): where it does not lead the rest is never trained and the
    lists hold the table's codes; where it leads (as here: RQ2x6 of L2 residuals), the rest
    trains on from that half, and is judged as the codec trained whole is."""
    from vecpress.kernels.codecs.codec import Codec
    from vecpress.kernels.codecs.ivf import IvfModel
    from vecpress.pipeline.lists import coarse_spec, judge_residual
    from vecpress.pipeline.options import CompressOptions
    from vecpress.pipeline.stages import s05_train

    _, x = corpus
    xt, xq = x[:4000], x[-200:]
    table = Codec.train(xt, "RQ4x6", "l2", seed=0, ngpu=0)
    model = IvfModel.train(xt, coarse_spec(NLIST), "l2", seed=0, ngpu=0)
    trained, real = [], s05_train.train_logged
    monkeypatch.setattr(s05_train, "train_logged", lambda kind, xs, spec, metric, **kw: trained.append(
        (spec, kw["start"].spec if kw.get("start") else None)) or real(kind, xs, spec, metric, **kw))
    if not leads:  # (the half's judgement only: the rest is never judged)
        monkeypatch.setattr(s05_train, "residual_leads", lambda judged: False)
    codec, judged = s05_train._residual_codec(table, model, xt, xq, CompressOptions(metric="l2", ngpu=0, seed=0))
    part = model.assign(xt)[0]
    r = model.residuals(xt, part)
    whole = judge_residual(table, Codec.train(r, "RQ4x6", "l2", seed=0, ngpu=0), model, xt, part, r, xq, "l2")
    if leads:
        assert trained == [("RQ2x6", None), ("RQ4x6", "RQ2x6")]
        assert judged == whole and "judged_by" not in judged
        assert (codec is not None) == (whole["residual_codes_recall_at_10"] > whole["table_codes_recall_at_10"])
    else:
        assert trained == [("RQ2x6", None)] and codec is None and judged["judged_by"] == "RQ2x6"
        assert judged["residual_codes_recall_at_10"] > judged["table_codes_recall_at_10"]  # (measured: it leads)
        assert judged["gain_standard_error"] > 0


def test_the_nprobes_grid_stops_where_recall_stops_rising():
    from vecpress.pipeline.lists import _grid_done

    def done(recalls, target=0.6):
        return _grid_done([{"recall_at_10": r} for r in recalls], target)

    assert not done([0.4, 0.5])
    assert done([0.5, 0.595, 0.596])  # reached the exhaustive search's, less 0.01, and flat
    assert not done([0.4, 0.5, 0.501])  # flat once, below it: one doubling more
    assert done([0.4, 0.5, 0.501, 0.5015])  # flat twice running: the lists cannot reach it
    assert not done([0.4, 0.5, 0.501, 0.55])
    assert done([0.4, None]) and done([0.4, 0.401], target=None)


def test_binary_codecs_list_their_own_codes(corpus, tmp_path):
    root, _ = corpus
    _compress(root, "src", tmp_path / "bin", LocalExecutor(), codec="BIN")
    assert vecpress.open(str(tmp_path / "bin"), "t").manifest["partitions"]["residual"] is None


def test_rows_dropped_as_duplicated_ids_are_not_listed(corpus, tmp_path):
    root, x = corpus
    src = tmp_path / "src"
    write_split(src, x[:6000], [0, 3000, 6000], "part-{}", row_group_size=1000)
    shifted = x[:500] + 5.0  # the same ids again, other vectors, in a file read last
    write_vectors(src / "zz-dup.parquet", shifted, np.arange(500, dtype=np.int64),
                  extra={"text": pa.array([f"dup {j}" for j in range(500)])})
    report = _compress(tmp_path, "src", tmp_path / "out", LocalExecutor(), duplicate_ids="keep-first")
    assert report["id_check"]["rows_dropped"] == 500
    lists, m = _lists(str(tmp_path / "out"))
    positions = np.concatenate([lists.read(p)[0] for p in range(NLIST)])
    np.testing.assert_array_equal(np.sort(positions), np.arange(6000))  # table rows, the dropped ones left out
    tbl = vecpress.open(str(tmp_path / "out"), "t")
    hit = tbl.search(shifted[3]).nprobes(NLIST).limit(1).to_list()[0]
    assert hit["text"] != "dup 3"
    assert tbl.search(x[4321]).limit(1).to_list()[0]["id"] == 4321
