"""Where one encode worker's time goes: the parts of s06_encode.encode_shards, timed
one after another in one process over the same shard.

    python benchmarks/encode_profile.py --rows 200000 --dim 384 --codec PQ48

Parts, per batch of `--batch-size` rows: Parquet decode (iter_batches), vectors_as_numpy
(the exact Arrow -> numpy conversion and its NaN/null checks), codec encode, the exact top-k
of the held-out queries (faiss knn + TopK merge), and the Lance fragment write of the codes.
Single-threaded faiss (one Ray task = 1 CPU), as in a run. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LANCE_LOG", "error")

import lance.fragment  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
from _results import write_results  # noqa: E402
from _setup import encode_setup  # noqa: E402

from vecpress.kernels._faiss import faiss  # noqa: E402
from vecpress.kernels.knn import TopK, exact_knn, prepare_vectors  # noqa: E402
from vecpress.pipeline.codec_store import load_codec  # noqa: E402
from vecpress.pipeline.schema import codes_array, codes_schema  # noqa: E402
from vecpress.pipeline.parquet import iter_shard_batches, vectors_as_numpy  # noqa: E402
from vecpress.pipeline.sampling import sample_rows  # noqa: E402
from vecpress.pipeline.scan import batch_rows  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--codec", default="PQ48")
    ap.add_argument("--batch-size", type=int, default=0, help="rows per batch (0 = a CPU run's automatic size)")
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=1, help="faiss threads (a Ray task of 1 CPU gets 1)")
    ap.add_argument("--results", default="benchmarks/results/encode_profile.json")
    args = ap.parse_args()
    faiss.omp_set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="vecpress-profile-"))
    plan, job = encode_setup(work, rows=args.rows, dim=args.dim, files=1, codec=args.codec,
                             shard_rows=args.rows, batch_size=batch_rows(args.batch_size, args.dim, gpu=False))
    shard = plan.shards[0]
    codec = load_codec(job.compute.codec)
    local = np.sort(np.random.default_rng(0).choice(shard.num_rows, args.queries, replace=False))
    xq = prepare_vectors(sample_rows((shard, local), columns=job.columns), codec.metric)
    cols = job.columns
    parts = dict.fromkeys(["parquet decode", "vectors_as_numpy", "encode", "exact top-k", "lance write"], 0.0)
    batches = []
    faiss_only = {"seconds": 0.0}
    t = time.perf_counter()
    for piece, _, first_row, batch, _ in iter_shard_batches(shard, [cols.vector, cols.id], job.batch_size):
        now = time.perf_counter()
        parts["parquet decode"] += now - t
        x = vectors_as_numpy(batch.column(0), cols.dim, where=piece.file_uri, column=cols.vector, first_row=first_row)
        t = time.perf_counter()
        parts["vectors_as_numpy"] += t - now
        codes = codec.encode(x)
        now = time.perf_counter()
        parts["encode"] += now - t
        if codec.numpy_pq_codebook() is not None:  # what faiss alone would have taken (not in the total)
            xp = prepare_vectors(x, codec.metric)
            t0 = time.perf_counter()
            codec.index.sa_encode(xp)
            faiss_only["seconds"] += time.perf_counter() - t0
            now = time.perf_counter()
        topk = TopK(len(xq), job.compute.k, exclude=shard.row_offset + local)
        D, I = exact_knn(xq, prepare_vectors(x, codec.metric), job.compute.k + 1, codec.metric)
        topk.add(D, I, offset=first_row)
        t = time.perf_counter()
        parts["exact top-k"] += t - now
        batches.append((batch.column(1), codes))
    schema = codes_schema(cols.out_fields.field(0), codec.code_size, [], binary=False, rerank_size=None)
    start = time.perf_counter()
    reader = pa.RecordBatchReader.from_batches(
        schema, (pa.record_batch([ids, codes_array(c)], schema=schema) for ids, c in batches))
    lance.fragment.write_fragments(reader, job.table_uri, schema=schema, mode="overwrite")
    parts["lance write"] = time.perf_counter() - start
    total = sum(parts.values())
    n = shard.num_rows
    print(f"\n{n:,} x {args.dim}-d, codec {args.codec}, batch {job.batch_size}, {args.queries} queries, "
          f"faiss threads {args.threads}")
    print(f"{'part':<18}{'seconds':>9}{'share':>8}{'rows/s':>12}")
    for name, s in parts.items():
        print(f"{name:<18}{s:>9.2f}{s / total:>8.1%}{n / s if s else 0:>12,.0f}")
    print(f"{'total':<18}{total:>9.2f}{1:>8.0%}{n / total:>12,.0f}")
    if faiss_only["seconds"]:
        print(f"(encode ran the numpy PQ encoder; faiss sa_encode of the same batches: {faiss_only['seconds']:.2f}s, "
              f"{parts['encode'] / faiss_only['seconds']:.2f}x of it)")
    write_results(args.results, {"rows": n, "dim": args.dim, "codec": args.codec, "threads": args.threads,
                                 "queries": args.queries, "seconds": parts,
                                 "faiss_sa_encode_seconds": faiss_only["seconds"] or None})
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
