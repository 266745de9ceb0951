"""The whole job on real Parquet and Lance files with a real local Ray: reported recall checked
independently, against faiss alone, determinism, LanceDB access, search and re-rank."""

from __future__ import annotations

import json
from dataclasses import replace

import faiss
import lance
import lancedb
import numpy as np
import pyarrow as pa
import pytest

from vecpress.kernels.synthetic import ClusteredEmbeddings
from vecpress.pipeline.errors import ConfigError
from vecpress.pipeline.options import CompressOptions
from vecpress.pipeline.evaluate import evaluate_version
from vecpress.pipeline.context import load_array
from vecpress.pipeline.run import run_compress
from vecpress.pipeline.report import inspect_table
from vecpress.pipeline.search import search
from tests.conftest import assert_same_evaluation, write_split, write_vectors

N, DIM = 8000, 32
OPTS = CompressOptions(codec="PQ8", metric="l2", num_train=4000, num_queries=200, eval_k=100, seed=7)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("job")
    x = ClusteredEmbeddings(DIM, seed=11, num_clusters=64).batch(0, N)
    write_split(root / "src", x, [0, 2500, 5000, N], "part-{}", row_group_size=700)
    return root, x


@pytest.fixture(scope="module")
def compressed(corpus, ray_executor):
    root, x = corpus
    result = run_compress([str(root / "src")], str(root / "out"), "corpus", replace(OPTS, keep=("text",)),
                          executor=ray_executor)
    return root / "out", x, result


def brute_force(xq, xb, k, exclude):
    D = ((xq[:, None, :] - xb[None, :, :]) ** 2).sum(-1)
    D[np.arange(len(xq)), exclude] = np.inf
    return np.argsort(D, axis=1, kind="stable")[:, :k]


def recall(truth, found, k):
    return np.mean([len(set(t[:k]) & set(f[:k])) / k for t, f in zip(truth, found)])


def test_reported_recall_matches_independent_computation(compressed):
    out, x, result = compressed
    info = inspect_table(str(out), "corpus")
    assert info["version"] == result.version == 1
    assert info["num_rows"] == N and info["dim"] == DIM and info["code_bytes"] == 8
    assert info["source_bytes"] == DIM * 4 and info["codec"] == "PQ8" and info["metric"] == "l2"

    # independently: the output's own codes, the codec file, numpy brute force
    table = lance.dataset(str(out / "corpus.lance")).to_table()
    ids = table.column("id").to_numpy()
    codes = np.stack([np.frombuffer(c, np.uint8) for c in table.column("code").to_pylist()])
    index = faiss.read_index(info["codec_uri"])
    index.add_sa_codes(codes)
    manifest = json.loads(lance.dataset(str(out / "corpus.lance")).schema.metadata[b"vecpress.manifest"])
    qpos = load_array(str(out / manifest["sample"]["query_positions_uri"]))
    xq = x[ids[qpos]]
    _, found = index.search(xq, 101)
    found = np.array([[ids[j] for j in row if j >= 0 and j != q][:100] for row, q in zip(found, qpos)])
    truth = ids[brute_force(xq, x[ids], 100, qpos)]
    ev = info["eval"]
    assert ev["num_queries"] == 200
    for k in (1, 10, 100):
        assert ev[f"recall_at_{k}"] == pytest.approx(recall(truth, found, k), abs=0.02)
    assert 0 < ev["relative_error"] < 0.5
    assert ev["recall_at_100"] > ev["recall_at_1"] * 0.5 > 0


def test_recall_no_worse_than_faiss_alone(compressed):
    out, x, result = compressed
    manifest = result.manifest
    qpos = load_array(str(out / manifest["sample"]["query_positions_uri"]))
    rs = np.random.default_rng(123)
    pool = np.setdiff1d(np.arange(N), qpos)
    index = faiss.index_factory(DIM, "PQ8np")
    index.train(x[rs.choice(pool, manifest["sample"]["num_train"], replace=False)])
    index.add(x)
    _, found = index.search(x[qpos], 11)
    found = np.array([[j for j in row if j != q][:10] for row, q in zip(found, qpos)])
    faiss_recall = recall(brute_force(x[qpos], x, 10, qpos), found, 10)
    assert result.eval["recall_at_10"] >= faiss_recall - 0.02


def test_output_opens_with_lancedb(compressed):
    out, _, result = compressed
    db = lancedb.connect(str(out))
    rows = db.open_table("corpus").search().where("id < 5").select(["id", "text"]).to_pandas()
    assert sorted(rows["id"]) == [0, 1, 2, 3, 4] and rows["text"].str.startswith("doc ").all()
    ev = db.open_table("corpus_eval").search().where("version = 1").to_pandas()
    assert len(ev) == 1 and ev["recall_at_10"][0] == pytest.approx(result.eval["recall_at_10"])
    assert json.loads((out / "_vecpress/corpus/eval/version-1.json").read_text())["recall_at_10"] == result.eval["recall_at_10"]


def test_search_and_exact_rerank(compressed):
    out, x, _ = compressed
    xq = ClusteredEmbeddings(DIM, seed=11, num_clusters=64).batch(50_000, 40)  # new vectors, not in the corpus
    truth = np.argsort(((xq[:, None] - x[None]) ** 2).sum(-1), axis=1)[:, :10]
    plain = search(str(out), "corpus", xq, 10)
    reranked = search(str(out), "corpus", xq, 10, rerank=10)
    assert plain.num_rows == reranked.num_rows == 400
    assert set(plain.column_names) >= {"query", "rank", "id", "distance", "text"}

    def as_ids(t):
        return t.column("id").to_numpy().reshape(40, 10)

    r_plain, r_rerank = recall(truth, as_ids(plain), 10), recall(truth, as_ids(reranked), 10)
    assert r_rerank > r_plain and r_rerank > 0.9
    d = reranked.column("distance").to_numpy().reshape(40, 10)
    exact = ((xq[:, None] - x[as_ids(reranked)]) ** 2).sum(-1)
    np.testing.assert_allclose(d, exact, rtol=1e-4, atol=1e-4)


def test_same_seed_same_codes(corpus, compressed, ray_executor):
    root, _ = corpus
    out, _, first = compressed
    again = run_compress([str(root / "src")], str(root / "out2"), "corpus", replace(OPTS, keep=("text",)),
                         executor=ray_executor)
    a = lance.dataset(str(out / "corpus.lance"), version=first.version).to_table(columns=["id", "code"])
    b = lance.dataset(str(root / "out2" / "corpus.lance"), version=again.version).to_table(columns=["id", "code"])
    assert a.equals(b)
    assert first.manifest["codec"]["sha256"] == again.manifest["codec"]["sha256"]


def test_string_ids_list_vectors_and_new_version(tmp_path, ray_executor):
    x = ClusteredEmbeddings(16, seed=2).batch(0, 3000)
    ids = np.array([f"doc-{i:05d}" for i in range(3000)], dtype=object)
    write_vectors(tmp_path / "src" / "a.parquet", x[:1700], ids[:1700], fixed=False, value_type=pa.float16())
    write_vectors(tmp_path / "src" / "b.parquet", x[1700:], ids[1700:], fixed=False, value_type=pa.float16())
    opts = CompressOptions(codec="SQ8", metric="ip", num_train=1000, num_queries=100, eval_k=10)
    out = str(tmp_path / "out")
    r1 = run_compress([str(tmp_path / "src")], out, "t", opts, executor=ray_executor)
    same = run_compress([str(tmp_path / "src")], out, "t", opts, executor=ray_executor)
    assert not same.committed and same.version == 1 and "no change" in same.reason
    r2 = run_compress([str(tmp_path / "src")], out, "t", replace(opts, mode="full"), executor=ray_executor)
    assert (r1.version, r2.version) == (1, 2)
    ds = lance.dataset(f"{out}/t.lance")
    assert ds.count_rows() == 3000 and ds.schema.field("id").type == pa.string()
    assert ds.to_table(columns=["id"]).column(0).to_pylist() == list(ids)
    assert r2.eval["recall_at_10"] > 0.8  # SQ8 keeps almost all neighbours
    assert inspect_table(out, "t", version=1)["run_id"] == r1.run_id


def test_real_sift_data(tmp_path, sift5k, ray_executor):
    ids, x = sift5k
    write_vectors(tmp_path / "sift" / "sift.parquet", x, ids, row_group_size=1000)
    result = run_compress([str(tmp_path / "sift")], str(tmp_path / "out"), "sift",
                          CompressOptions(codec="PQ16", num_train=4000, num_queries=300, eval_k=100),
                          executor=ray_executor)
    ev = result.eval
    assert ev["num_queries"] == 300 and result.manifest["num_rows"] == 5000
    # PQ16 (16 B vs 512 B) on SIFT keeps a real but lossy share of the true neighbours
    assert 0.2 < ev["recall_at_10"] < 0.95 and ev["recall_at_100"] > ev["recall_at_10"]
    assert ev["relative_error"] < 0.2


class FailAfter:
    """An executor that runs `n` items of the given stage for real, then dies like a killed driver."""

    def __init__(self, stage: str, n: int):
        self.stage, self.n = stage, n

    def imap(self, fn, items, *, desc, shared=None):
        items = list(items)
        for index, item in enumerate(items):
            if desc == self.stage and index == self.n:
                raise KeyboardInterrupt
            yield index, fn(item, **(shared or {}))

    def map(self, fn, items, *, desc, shared=None):
        return [r for _, r in self.imap(fn, items, desc=desc, shared=shared)]


def test_retried_encode_skips_finished_shards(corpus, tmp_path):
    from vecpress.pipeline.executor import LocalExecutor
    from vecpress.pipeline.context import RunContext
    from vecpress.pipeline.stages.s01_plan import plan
    from vecpress.pipeline.stages.s03_sample import sample
    from vecpress.pipeline.stages.s04_advise import Advised
    from vecpress.pipeline.stages.s05_train import train
    from vecpress.pipeline.stages.s06_encode import encode
    from vecpress.pipeline.stages.s07_commit import commit

    root, _ = corpus
    # batch_size: shards of one batch or more are encoded one per task (smaller ones go together)
    opts = CompressOptions(codec="PQ8", num_train=2000, num_queries=50, eval_k=10, shard_rows=1400, batch_size=700)
    ctx = RunContext.new(str(tmp_path / "out"), "corpus")
    planned = plan(ctx, opts.source([str(root / "src")]), opts)
    assert len(planned.plan.shards) > 3
    sampled = sample(ctx, planned, opts, LocalExecutor())
    trained = train(ctx, Advised(planned), sampled, opts)
    with pytest.raises(KeyboardInterrupt):
        encode(ctx, planned, sampled, trained, opts, FailAfter("encode", 2))
    done = sorted((tmp_path / "out/_vecpress/corpus/runs" / ctx.run_id / "shards").iterdir())
    assert len(done) == 2
    first_fragments = [fs for p in done for fs in json.loads(np.load(p)["meta"].tobytes())["fragments"]]
    assert not (tmp_path / "out/corpus.lance/_versions").exists()  # nothing committed

    encoded = encode(ctx, planned, sampled, trained, opts, LocalExecutor())
    assert list(encoded.fragments[: sum(map(len, first_fragments))]) == [f for fs in first_fragments for f in fs]
    committed = commit(ctx, planned, sampled, trained, encoded, opts, stage_seconds={})
    ids = lance.dataset(str(tmp_path / "out/corpus.lance")).to_table(columns=["id"]).column(0).to_numpy()
    assert committed.version == 1 and np.array_equal(ids, np.arange(N))
    # a retried commit of the same run does not commit again
    again = commit(ctx, planned, sampled, trained, encoded, opts, stage_seconds={})
    assert again.version == 1 and lance.dataset(str(tmp_path / "out/corpus.lance")).count_rows() == N


def test_warm_rerank_column(corpus, tmp_path, ray_executor):
    root, x = corpus
    opts = CompressOptions(codec="PQ4", rerank_codec="SQ8", num_train=3000, num_queries=100, eval_k=100)
    out = str(tmp_path / "out")
    result = run_compress([str(root / "src")], out, "corpus", opts, executor=ray_executor)
    ds = lance.dataset(f"{out}/corpus.lance")
    assert ds.schema.field("rerank_code").type == pa.binary(DIM)
    info = inspect_table(out, "corpus")
    assert info["rerank_codec"] == "SQ8" and info["rerank_bytes"] == DIM
    ev = result.eval
    assert ev["rerank_from"] == "column"
    assert ev["rerank"]["1"]["recall_at_10"] == pytest.approx(ev["recall_at_10"])
    assert ev["rerank"]["10"]["recall_at_10"] > ev["rerank"]["2"]["recall_at_10"] > ev["recall_at_10"]
    assert ev["rerank"]["10"]["recall_at_10"] > 0.95  # SQ8 distances are nearly exact
    xq = ClusteredEmbeddings(DIM, seed=11, num_clusters=64).batch(60_000, 20)
    truth = np.argsort(((xq[:, None] - x[None]) ** 2).sum(-1), axis=1)[:, :10]
    warm = search(out, "corpus", xq, 10, rerank=10).column("id").to_numpy().reshape(20, 10)
    source = search(out, "corpus", xq, 10, rerank=10, rerank_from="source").column("id").to_numpy().reshape(20, 10)
    assert recall(truth, source, 10) > 0.9 and recall(truth, warm, 10) > 0.9
    assert_same_evaluation(ev, evaluate_version(out, "corpus", result.version, ray_executor, recompute=True))


def test_eval_rerank_from_source_matches_search(compressed):
    _, _, result = compressed
    ev = result.eval
    assert ev["rerank_from"] == "source"
    r = [ev["rerank"][f]["recall_at_10"] for f in ("1", "2", "4", "10")]
    assert r == sorted(r) and r[0] == pytest.approx(ev["recall_at_10"]) and r[-1] > 0.9


def test_evaluation_in_the_encode_pass_equals_search_over_stored_codes(compressed, ray_executor):
    """A full run searches the held-out queries over the codes while it encodes them, with the
    candidates' exact distances from the source rows in hand; evaluate then reads nothing."""
    out, _, result = compressed
    sample = result.manifest["sample"]
    assert sample["search_ids_uri"].endswith("search_ids.npy") and sample["search_exact_uri"]
    assert_same_evaluation(result.eval, evaluate_version(str(out), "corpus", result.version, ray_executor,
                                                         recompute=True))
    plain = evaluate_version(str(out), "corpus", result.version, ray_executor, rerank=False)
    assert plain["searched"] == "encode pass" and "rerank" not in plain and plain["rerank_from"] is None
    assert plain["recall_at_10"] == result.eval["recall_at_10"]
    # another k than the recorded one searches the stored codes
    assert evaluate_version(str(out), "corpus", result.version, ray_executor, k=10)["searched"] == "stored codes"
    for bad in (0, -1, result.eval["k"] + 1):  # (0 meant the recorded k, larger ones were cut to it)
        with pytest.raises(ConfigError, match="k must be from 1 to"):
            evaluate_version(str(out), "corpus", result.version, ray_executor, k=bad)


def test_sample_reads_only_its_row_group_budget(tmp_path, ray_executor, compressed):
    """--sample-row-groups: the sample stage reads at most that many row groups (recorded in the
    manifest), and the codec trained on it still compresses the whole corpus well."""
    _, _, full = compressed
    assert full.manifest["sample"]["row_groups_read"] == 13  # under the default limit: all 4 + 4 + 5
    x = ClusteredEmbeddings(DIM, seed=11, num_clusters=64).batch(0, N)
    write_split(tmp_path / "src", x, [0, 4000, N], "part-{}", row_group_size=200)  # 40 row groups
    opts = replace(OPTS, num_train=2000, num_queries=100, sample_row_groups=25)
    result = run_compress([str(tmp_path / "src")], str(tmp_path / "out"), "t", opts,
                          executor=ray_executor)
    sample = result.manifest["sample"]
    assert sample["max_row_groups"] == 25 and 20 <= sample["row_groups_read"] <= 25
    assert result.eval["recall_at_10"] > full.eval["recall_at_10"] - 0.1
