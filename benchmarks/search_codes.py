"""Search over stored codes, as the evaluate stage runs it: faiss's own search (per-pair
look-up tables for PQ, per-pair decoding for SQ and additive quantizers) against
`Codec.search_codes`'s decode + BLAS GEMM path, and faiss's brute-force kNN with faiss 1.15's
default BLAS threshold against vecpress's (kernels/_faiss.py).

    python benchmarks/search_codes.py --rows 100000 --dim 384

One thread (as one Ray task), clustered vectors. For each codec and query count: seconds of
each path, speed-up, and `same`, the share of result ids both paths return in the same slot
(the rest are ties: codecs that give many rows the same code, like PQ24 here, have many),
`vecpress s` nan where the GEMM path does not apply, and `used`, the path search_codes takes by default. Prints a table,
writes JSON.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import numpy as np  # noqa: E402
from _results import write_results  # noqa: E402

import vecpress.kernels.codecs.search as ks  # noqa: E402
from vecpress.kernels._faiss import BLAS_THRESHOLD, faiss  # noqa: E402
from vecpress.kernels.codecs.build import _innermost  # noqa: E402
from vecpress.kernels.codecs.codec import Codec  # noqa: E402
from vecpress.kernels.synthetic import ClusteredEmbeddings  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--queries", default="32,100,1000")
    ap.add_argument("--codecs", default=None, help="comma-separated specs (default: a PQ, SQ8 and an RQ)")
    ap.add_argument("--metric", default="cosine")
    ap.add_argument("--k", type=int, default=101, help="101 = the evaluate stage's k + 1")
    ap.add_argument("--results", default="benchmarks/results/search_codes.json")
    args = ap.parse_args()
    faiss.omp_set_num_threads(1)

    gen = ClusteredEmbeddings(args.dim, seed=3)
    xb = gen.batch(0, args.rows)
    xt = gen.batch(10_000_000, 20_000)
    query_counts = [int(q) for q in args.queries.split(",")]
    xq = gen.batch(20_000_000, max(query_counts))
    codecs = args.codecs.split(",") if args.codecs else [f"PQ{args.dim // 8}", "SQ8", "RQ4x8"]

    rows = []
    print(f"{args.rows:,} codes, {args.dim}-d, {args.metric}, k={args.k}, 1 thread, {platform.node()}")
    print(f"{'what':24s} {'queries':>7s} {'faiss s':>9s} {'vecpress s':>10s} {'speed-up':>8s} {'same':>6s} {'used':>8s}")
    for spec in codecs:
        codec = Codec.train(xt, spec, args.metric, seed=0)
        codes = codec.encode(xb)
        for nq in query_counts:
            defaults = ks.GEMM_MIN_QUERIES, ks.TABLE_GEMM_MIN_QUERIES, ks.ADDITIVE_GEMM_MIN_QUERIES
            inner = _innermost(codec._searched)[1]  # (what search_codes searches: cosine's L2 view)
            chosen = "vecpress" if ks._decoded_search_pays(inner, nq) else "faiss"
            ks.GEMM_MIN_QUERIES = ks.TABLE_GEMM_MIN_QUERIES = ks.ADDITIVE_GEMM_MIN_QUERIES = 10**9
            t_faiss, (_, I_ref) = timed(lambda: codec.search_codes(xq[:nq], codes, args.k))
            # the decode + GEMM path, where exact
            ks.GEMM_MIN_QUERIES = ks.TABLE_GEMM_MIN_QUERIES = ks.ADDITIVE_GEMM_MIN_QUERIES = 1
            if ks._decoded_search_pays(inner, nq):
                t_gemm, (_, I) = timed(lambda: codec.search_codes(xq[:nq], codes, args.k))
            else:  # fewer than one table per 16 dims: vecpress never decodes these
                t_gemm, I = float("nan"), I_ref
            ks.GEMM_MIN_QUERIES, ks.TABLE_GEMM_MIN_QUERIES, ks.ADDITIVE_GEMM_MIN_QUERIES = defaults
            rows.append({"what": f"search_codes {spec}", "queries": nq, "faiss_s": t_faiss, "vecpress_s": t_gemm,
                         "speedup": t_faiss / t_gemm, "same": float((I == I_ref).mean()),
                         "chosen": chosen})
    # brute-force kNN (the exact ground truth of the encode pass) under both BLAS thresholds
    xbf = np.ascontiguousarray(xb, np.float32)
    for nq in query_counts:
        faiss.cvar.distance_compute_blas_threshold = 128_000
        t_faiss, (_, I_ref) = timed(lambda: faiss.knn(xq[:nq], xbf, args.k, metric=faiss.METRIC_INNER_PRODUCT))
        faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD
        t_blas, (_, I) = timed(lambda: faiss.knn(xq[:nq], xbf, args.k, metric=faiss.METRIC_INNER_PRODUCT))
        rows.append({"what": "faiss.knn (exact)", "queries": nq, "faiss_s": t_faiss, "vecpress_s": t_blas,
                     "speedup": t_faiss / t_blas, "same": float((I == I_ref).mean()),
                     "chosen": "vecpress"})
    for r in rows:
        print(f"{r['what']:24s} {r['queries']:7d} {r['faiss_s']:9.3f} {r['vecpress_s']:10.3f} "
              f"{r['speedup']:7.1f}x {r['same']:6.3f} {r['chosen']:>8s}")
    write_results(args.results, {"rows": args.rows, "dim": args.dim, "metric": args.metric, "k": args.k,
                                 "machine": platform.node(), "cores": os.cpu_count(), "results": rows})


if __name__ == "__main__":
    main()
