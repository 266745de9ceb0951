"""Query latency of a codes table through the Python API, against corpus size: what a user
waits for one query (p50 of `vecpress.open(...).search(q).limit(10).to_arrow()`), for a
batch of queries, and with 100 candidates re-ranked from the source Parquet, with recall@10
against exact neighbours. The baseline for issue 18's partitioned search.

    python benchmarks/query_latency.py --sizes 100000,1000000 --dim 128 --codec PQ16

Per size: a clustered corpus as Parquet (4 files, not timed), compressed on a local Ray (not
timed), then fresh queries (not in the corpus). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from _results import write_results  # noqa: E402

import vecpress  # noqa: E402
from vecpress.kernels._faiss import faiss  # noqa: E402
from vecpress.kernels.synthetic import ClusteredEmbeddings  # noqa: E402
from vecpress.pipeline.distributed import RayExecutor  # noqa: E402


def p50_ms(fn, repeats: int) -> float:
    fn()  # warm: files opened, codec loaded
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def recall_at_10(tbl, xq: np.ndarray, truth: np.ndarray, rerank: int = 0) -> float:
    q = tbl.search(xq).limit(10)
    if rerank:
        q = q.rerank(rerank, source=True)
    got = q.to_arrow()
    ids = [[] for _ in xq]
    for qi, i in zip(got.column("query_index").to_pylist(), got.column("id").to_pylist()):
        ids[qi].append(i)
    return float(np.mean([len(set(a) & set(b.tolist())) / 10 for a, b in zip(ids, truth)]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000")
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--codec", default="PQ16")
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=20, help="single queries timed per setting")
    ap.add_argument("--results", default="benchmarks/results/query_latency.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vecpress-query-"))
    gen = ClusteredEmbeddings(args.dim, seed=0)
    rows = []
    with RayExecutor() as ex:
        for n in [int(s) for s in args.sizes.split(",")]:
            src = work / f"src-{n}"
            src.mkdir()
            bounds = np.linspace(0, n, 5).astype(int)
            x = np.concatenate([gen.batch(lo, hi - lo) for lo, hi in zip(bounds[:-1], bounds[1:])])
            for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
                pq.write_table(pa.table({"id": np.arange(lo, hi), "embedding": pa.FixedSizeListArray.from_arrays(
                    pa.array(x[lo:hi].ravel()), args.dim)}), src / f"part-{i}.parquet", row_group_size=16_384)
            xq = gen.batch(10 * n, args.queries)
            truth = faiss.knn(xq, x, 10)[1]
            del x
            vecpress.compress(str(src), str(work / f"out-{n}"), "t", executor=ex, codec=args.codec, num_train=50_000,
                              num_queries=200, eval_k=10, gate_max_drop=1.0)
            tbl = vecpress.open(str(work / f"out-{n}"), "t")
            row = {"rows": n, "search": "exhaustive (every code)",
                   "single_p50_ms": p50_ms(lambda: tbl.search(xq[0]).limit(10).to_arrow(), args.repeats),
                   "batch_ms": p50_ms(lambda: tbl.search(xq).limit(10).to_arrow(), 3),
                   "rerank100_single_p50_ms": p50_ms(lambda: tbl.search(xq[0]).limit(10).rerank(10, source=True)
                                                     .to_arrow(), max(3, args.repeats // 4)),
                   "recall_at_10": recall_at_10(tbl, xq, truth),
                   "recall_at_10_rerank100": recall_at_10(tbl, xq, truth, rerank=10)}
            rows.append(row)
            print(row, flush=True)
    print(f"\n{args.codec}, {args.dim}-d, {args.queries} fresh queries (batch), {os.cpu_count()} CPUs "
          f"({platform.machine()})\n")
    print("| rows | search | 1 query p50 ms | batch of %d ms | 1 query + re-rank 100 from source, p50 ms "
          "| R@10 | R@10 re-ranked |" % args.queries)
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['rows']:,} | {r['search']} | {r['single_p50_ms']:.1f} | {r['batch_ms']:.1f} | "
              f"{r['rerank100_single_p50_ms']:.1f} | {r['recall_at_10']:.3f} | {r['recall_at_10_rerank100']:.3f} |")
    write_results(args.results, {"args": vars(args), "machine": platform.platform(), "cpus": os.cpu_count(),
                                 "rows": rows})


if __name__ == "__main__":
    main()
