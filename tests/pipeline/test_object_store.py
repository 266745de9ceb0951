"""Inputs on a real local S3-compatible server (moto's server, over HTTP)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from vecpress.kernels.synthetic import ClusteredEmbeddings
from vecpress.pipeline.errors import SourceError
from vecpress.pipeline.options import CompressOptions
from vecpress.pipeline.run import run_compress
from vecpress.pipeline.source import list_parquet_files


@pytest.fixture(scope="module")
def s3():
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    fs = pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", region="us-east-1",
                           access_key="vecpress-test", secret_key="vecpress-test", allow_bucket_creation=True)
    fs.create_dir("corpus")
    yield fs, f"endpoint_override={host}:{port}&scheme=http&region=us-east-1"
    server.stop()


def put_parquet(fs, path, x, ids):
    buf = io.BytesIO()
    pq.write_table(pa.table({"id": pa.array(ids), "embedding": pa.FixedSizeListArray.from_arrays(
        pa.array(x.ravel()), x.shape[1])}), buf, row_group_size=500)
    with fs.open_output_stream(path) as f:
        f.write(buf.getvalue())


def test_compress_from_s3_uri(s3, tmp_path, ray_executor):
    fs, query = s3
    x = ClusteredEmbeddings(16, seed=4).batch(0, 3000)
    put_parquet(fs, "corpus/emb/b.parquet", x[1500:], np.arange(1500, 3000))
    put_parquet(fs, "corpus/emb/a.parquet", x[:1500], np.arange(1500))
    uri = f"s3://corpus/emb?{query}"
    files = list_parquet_files([uri])
    assert [f.split("?")[0] for f in files] == ["s3://corpus/emb/a.parquet", "s3://corpus/emb/b.parquet"]
    result = run_compress([uri], str(tmp_path / "out"), "corpus",
                          CompressOptions(codec="PQ4", num_train=1000, num_queries=100, eval_k=10),
                          executor=ray_executor)
    assert result.manifest["num_rows"] == 3000 and result.eval["recall_at_10"] > 0.2


def test_missing_s3_prefix_is_a_clear_error(s3):
    _, query = s3
    with pytest.raises(SourceError, match="does not exist"):
        list_parquet_files([f"s3://corpus/nothing-here?{query}"])


def test_s3_output_end_to_end(s3, tmp_path, ray_executor, monkeypatch):
    """Input and output on the S3-compatible server: compress, inspect, search, LanceDB open;
    credentials come from the environment and appear in no manifest or report."""
    import json

    import lancedb

    from vecpress.pipeline.report import inspect_table
    from vecpress.pipeline.search import search
    from vecpress.pipeline.storage import lance_location

    fs, query = s3
    fs.create_dir("lake")
    x = ClusteredEmbeddings(16, seed=6).batch(0, 2000)
    put_parquet(fs, "corpus/e2e/a.parquet", x, np.arange(2000))
    out = f"s3://lake/out?{query}"
    result = run_compress([f"s3://corpus/e2e?{query}"], out, "t",
                          CompressOptions(codec="PQ4", num_train=1000, num_queries=100, eval_k=10),
                          executor=ray_executor)
    assert result.version == 1 and fs.get_file_info("lake/out/t.lance/_versions").type == pafs.FileType.Directory
    info = inspect_table(out, "t")
    assert info["num_rows"] == 2000 and info["eval"]["recall_at_10"] > 0.2
    got = search(out, "t", x[:3], 5, rerank=10)
    assert got.filter(pa.compute.equal(got.column("rank"), 0)).column("id").to_pylist() == [0, 1, 2]
    target, options = lance_location(out)
    rows = lancedb.connect(target, storage_options=options).open_table("t").search().where("id < 3").to_pandas()
    assert sorted(rows["id"]) == [0, 1, 2]
    import os

    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    manifest = json.dumps(result.manifest) + json.dumps(info) + json.dumps(result.eval)
    assert secret not in manifest and "secret" not in manifest.lower()


@pytest.mark.parametrize("spec", ["IVF8,PQ4", "IVF8,HNSW,SQ"])
def test_s3_served_table_searches_from_lancedb(s3, tmp_path, ray_executor, spec):
    """--serve lancedb with the output on the S3-compatible server: the index segments are
    built and committed there (with partitions and codes, or partitions only), and a process
    importing only lancedb searches the table."""
    import json
    import os
    import subprocess
    import sys

    from vecpress.pipeline.storage import lance_location

    fs, query = s3
    bucket = "served-" + spec.replace(",", "-").lower()
    fs.create_dir(bucket)
    x = ClusteredEmbeddings(16, seed=7).batch(0, 3000)
    put_parquet(fs, f"corpus/{bucket}/a.parquet", x, np.arange(3000))
    out = f"s3://{bucket}/out?{query}"
    result = run_compress([f"s3://corpus/{bucket}?{query}"], out, "t",
                          CompressOptions(serve="lancedb", codec=spec, num_train=2000, num_queries=100, eval_k=10,
                                          gate_max_drop=1.0), executor=ray_executor)
    assert result.version == 2 and result.eval["served"]["grid"][-1]["recall_at_10"] > 0.8
    target, options = lance_location(out)
    user = ("import json, sys, lancedb\n"
            "a = json.loads(sys.argv[1])\n"
            "t = lancedb.connect(a['target'], storage_options=a['options']).open_table('t')\n"
            "print(json.dumps({'ids': [r['id'] for r in t.search(a['q']).nprobes(8).refine_factor(5).limit(1).to_list()],"
            " 'unindexed': t.list_indices()[0].num_unindexed_rows}))\n")
    done = subprocess.run([sys.executable, "-c", user, json.dumps({"target": target, "options": options,
                                                                   "q": x[123].tolist()})],
                          capture_output=True, text=True, check=True, env=os.environ)
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got == {"ids": [123], "unindexed": 0}


def test_s3_failed_gate_and_leftovers(s3, ray_executor):
    """Issue 17 on an object store: a version that fails the gate goes to its branch (its files
    moved there), the latest stays the good one; a crash's uncommitted fragment is swept by the
    next run."""
    import lance

    from vecpress.pipeline.errors import QualityGateError
    from vecpress.pipeline.lance_io import open_lance
    from vecpress.pipeline.report import inspect_table
    from vecpress.pipeline.storage import lance_location

    fs, query = s3
    fs.create_dir("gated")
    x = ClusteredEmbeddings(16, seed=7).batch(0, 3000)
    put_parquet(fs, "corpus/gated/a.parquet", x[:2000], np.arange(2000))
    out = f"s3://gated/out?{query}"
    opts = dict(codec="PQ4", num_train=1000, num_queries=100, eval_k=10)
    run_compress([f"s3://corpus/gated?{query}"], out, "t", CompressOptions(**opts), executor=ray_executor)
    put_parquet(fs, "corpus/gated/b.parquet", x[2000:], np.arange(2000, 3000))
    with pytest.raises(QualityGateError, match="tag failed-"):
        run_compress([f"s3://corpus/gated?{query}"], out, "t", CompressOptions(**opts, gate_min_recall=0.9999),
                     executor=ray_executor)
    table = f"s3://gated/out/t.lance?{query}"
    ds = open_lance(table)
    (tag,) = [t for t in ds.tags.list() if t.startswith("failed-")]
    assert ds.version == 1 and ds.count_rows() == 2000
    assert inspect_table(out, "t", tag)["num_rows"] == 3000 and inspect_table(out, "t")["num_rows"] == 2000
    assert fs.get_file_info(pafs.FileSelector(f"gated/out/t.lance/tree/{tag}/data"))  # the new files moved there
    target, options = lance_location(table)
    frags = lance.fragment.write_fragments(ds.to_table(limit=3), target, schema=ds.schema, mode="overwrite",
                                           storage_options=options)  # a crashed run's fragment
    leftover = f"gated/out/t.lance/data/{frags[0].files[0].path}"
    assert fs.get_file_info(leftover).type == pafs.FileType.File
    again = run_compress([f"s3://corpus/gated?{query}"], out, "t", CompressOptions(**opts, gate_max_drop=1.0),
                         executor=ray_executor)
    assert again.committed and fs.get_file_info(leftover).type == pafs.FileType.NotFound


def test_s3_served_failed_gate_never_reaches_main(s3, ray_executor):
    """Issue 17, --serve lancedb on an object store: the failed candidate (rows and index, built
    detached) goes to its branch with its files, main's history never holds it, LanceDB
    searches it by its tag; the next passing run is promoted and its files stay the ones built."""
    import lance
    import lancedb

    from vecpress.pipeline.errors import QualityGateError
    from vecpress.pipeline.lance_io import open_lance
    from vecpress.pipeline.storage import lance_location

    fs, query = s3
    fs.create_dir("served-gated")
    x = ClusteredEmbeddings(16, seed=7).batch(0, 3000)
    put_parquet(fs, "corpus/served-gated/a.parquet", x[:2000], np.arange(2000))
    out = f"s3://served-gated/out?{query}"
    opts = dict(serve="lancedb", codec="IVF8,PQ4", num_train=1000, num_queries=100, eval_k=10)
    first = run_compress([f"s3://corpus/served-gated?{query}"], out, "t", CompressOptions(**opts),
                         executor=ray_executor)
    put_parquet(fs, "corpus/served-gated/b.parquet", x[2000:], np.arange(2000, 3000))
    with pytest.raises(QualityGateError, match="latest version unchanged"):
        run_compress([f"s3://corpus/served-gated?{query}"], out, "t", CompressOptions(**opts, gate_min_recall=0.9999),
                     executor=ray_executor)
    table = f"s3://served-gated/out/t.lance?{query}"
    ds = open_lance(table)
    (tag,) = [t for t in ds.tags.list() if t.startswith("failed-")]
    assert [v["version"] for v in ds.versions()] == [1, first.version] and ds.count_rows() == 2000
    assert fs.get_file_info(pafs.FileSelector(f"served-gated/out/t.lance/tree/{tag}/_indices", recursive=True))
    target, options = lance_location(out)
    tbl = lancedb.connect(target, storage_options=options).open_table("t")
    assert tbl.version == first.version and tbl.count_rows() == 2000
    tbl.checkout(tag)
    assert tbl.count_rows() == 3000 and tbl.list_indices()[0].num_unindexed_rows == 0
    assert tbl.search(x[2500]).nprobes(8).refine_factor(5).limit(1).to_list()[0]["id"] == 2500
    again = run_compress([f"s3://corpus/served-gated?{query}"], out, "t", CompressOptions(**opts, gate_max_drop=1.0),
                         executor=ray_executor)
    assert again.gate["passed"] and open_lance(table).version == again.version == first.version + 1
    tbl = lancedb.connect(target, storage_options=options).open_table("t")
    assert tbl.count_rows() == 3000 and tbl.list_indices()[0].num_unindexed_rows == 0
    assert lance.dataset(target + "/t.lance", version=tag, storage_options=options).count_rows() == 3000
