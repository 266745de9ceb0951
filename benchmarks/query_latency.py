"""Query latency of a codes table through the Python API, against corpus size: what a user
waits for one query (p50 of `vecpress.open(...).search(q).limit(10).to_arrow()`), for a
batch of queries, and with 100 candidates re-ranked from the source Parquet, with recall@10
against exact neighbours: partitioned search at the table's default nprobes (and the other
--nprobes) against the exhaustive search over the same codes (every partition probed: every
code scored), in the same run.

    python benchmarks/query_latency.py --sizes 100000,1000000,10000000 --dim 128 --codec PQ16

Per size: a clustered corpus as Parquet (4 files, not timed), compressed on a local Ray with
the default partitions (--partitions auto; timed, reported), then fresh queries (not in the
corpus). Prints a table, writes JSON.
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
from vecpress.pipeline import parquet  # noqa: E402
from vecpress.pipeline.distributed import RayExecutor  # noqa: E402


def p50_ms(fn, repeats: int) -> float:
    fn()  # warm: files opened, codec loaded
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def p50_each_ms(fn, queries: np.ndarray) -> float:
    """p50 of fn(q) over distinct queries (after a warm call on the first): each touches rows
    of its own, as a stream of users' queries does."""
    fn(queries[0])
    times = []
    for q in queries[1:]:
        start = time.perf_counter()
        fn(q)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def recall_at_10(query, xq: np.ndarray, truth: np.ndarray, rerank: int = 0) -> float:
    got = query(xq, rerank)
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
    ap.add_argument("--nprobes", default="", help="more nprobes to measure beside the default and all (e.g. 8,32)")
    ap.add_argument("--partitions", type=int, default=None, help="--partitions of the compress (default: auto)")
    ap.add_argument("--num-train", type=int, default=50_000)
    ap.add_argument("--rerank-codec", default=None,
                    help="compress with this warm column (e.g. SQ8) and re-rank from it instead of the source")
    ap.add_argument("--no-exhaustive", action="store_true", help="skip the every-partition row (slow at 10^7)")
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
            start = time.perf_counter()
            vecpress.compress(str(src), str(work / f"out-{n}"), "t", executor=ex, codec=args.codec,
                              num_train=args.num_train, num_queries=200, eval_k=10, gate_max_drop=1.0,
                              partitions=args.partitions, rerank_codec=args.rerank_codec)
            compress_s = time.perf_counter() - start
            tbl = vecpress.open(str(work / f"out-{n}"), "t")
            part = tbl.manifest["partitions"] or {}
            settings = [(f"default nprobes {part['default_nprobes']} of {part['nlist']}", part["default_nprobes"])] \
                if part else []
            settings += [(f"nprobes {p} of {part['nlist']}", p) for p in map(int, filter(None, args.nprobes.split(",")))
                         if part and p not in (part["default_nprobes"], part["nlist"])]
            if not args.no_exhaustive:
                settings.append(("exhaustive (every code)", part.get("nlist")))
            source = args.rerank_codec is None
            for name, nprobes in settings:
                def query(q, rerank=0, nprobes=nprobes):
                    qb = tbl.search(q).limit(10)
                    qb = qb.nprobes(nprobes) if nprobes else qb
                    return (qb.rerank(rerank, source=source, column=not source) if rerank else qb).to_arrow()

                row = {"rows": n, "search": name, "nprobes": nprobes, "partitions": part.get("nlist"),
                       "rerank_from": "source" if source else f"warm column {args.rerank_codec}",
                       "compress_seconds": round(compress_s, 1),
                       "single_p50_ms": p50_ms(lambda: query(xq[0]), args.repeats),
                       "batch_ms": p50_ms(lambda: query(xq), 3),
                       "rerank100_single_p50_ms": p50_each_ms(lambda q: query(q, 10), xq[:args.repeats + 1]),
                       "recall_at_10": recall_at_10(query, xq, truth),
                       "recall_at_10_rerank100": recall_at_10(query, xq, truth, rerank=10)}
                if source and name == settings[0][0]:  # the same queries, rows read by Arrow alone
                    parquet.USE_PAGES = False
                    row["rerank100_arrow_p50_ms"] = p50_each_ms(lambda q: query(q, 10), xq[:args.repeats + 1])
                    parquet.USE_PAGES = True
                rows.append(row)
                print(row, flush=True)
    print(f"\n{args.codec}, {args.dim}-d, {args.queries} fresh queries (batch), {os.cpu_count()} CPUs "
          f"({platform.machine()})\n")
    print("| rows | search | 1 query p50 ms | batch of %d ms | 1 query + re-rank 100, p50 ms (from) "
          "| same, rows read by Arrow alone | R@10 | R@10 re-ranked |" % args.queries)
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        arrow = f"{r['rerank100_arrow_p50_ms']:.1f}" if "rerank100_arrow_p50_ms" in r else ""
        print(f"| {r['rows']:,} | {r['search']} | {r['single_p50_ms']:.1f} | {r['batch_ms']:.1f} | "
              f"{r['rerank100_single_p50_ms']:.1f} ({r['rerank_from']}) | {arrow} | {r['recall_at_10']:.3f} | "
              f"{r['recall_at_10_rerank100']:.3f} |")
    write_results(args.results, {"args": vars(args), "machine": platform.platform(), "cpus": os.cpu_count(),
                                 "rows": rows})


if __name__ == "__main__":
    main()
