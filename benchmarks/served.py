"""vecpress's build of a LanceDB IVF_PQ index against LanceDB's own `create_index`, on the same
rows, in one run: build time, recall@10 at equal partitions, sub-vectors and nprobes, and
query latency.

    python benchmarks/served.py --rows 200000 --dim 128 --partitions 256 --sub-vectors 16

Generates a clustered corpus as Parquet (not timed) and the same rows as a Lance table (not
timed), then:
  vecpress   run_compress --serve lancedb on a local Ray: sample + train + encode (partitions
             and codes of every row, in parallel; the pass also finds exact neighbours of the
             held-out queries for its evaluation) + index (segments built in parallel, one
             commit). Its stage times are reported; build = train + encode + index.
  lance      create_index(IVF_PQ, same partitions and sub-vectors) on the Lance table
             (--accelerator cuda on a GPU machine).
Both tables are then searched with lancedb for --queries fresh queries (not in the corpus)
at each nprobes, and with the vecpress table's vector type (--vector-dtype float16 and
float32 when --both-dtypes). Prints a table, writes JSON to --results.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("LANCE_LOG", "error")

import lance  # noqa: E402
import lancedb  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from _results import write_results  # noqa: E402

from vecpress.kernels._faiss import faiss  # noqa: E402
from vecpress.kernels.synthetic import ClusteredEmbeddings  # noqa: E402
from vecpress.pipeline.distributed import RayExecutor  # noqa: E402
from vecpress.pipeline.options import CompressOptions  # noqa: E402
from vecpress.pipeline.run import run_compress  # noqa: E402

NPROBES = (10, 20, 50)


def recall_and_latency(table, xq: np.ndarray, truth: np.ndarray, nprobes: int, refine: int | None) -> tuple[float, float]:
    def query(q):
        s = table.search(q).nprobes(nprobes).select(["id", "_distance"]).limit(10)
        return s.refine_factor(refine) if refine else s

    got = query(xq).to_arrow()
    ids = [[] for _ in xq]
    for qi, i in zip(got.column("query_index").to_pylist(), got.column("id").to_pylist()):
        ids[qi].append(i)
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids, truth)]))
    query(xq[0]).to_arrow()
    times = []
    for q in xq[:100]:
        start = time.perf_counter()
        query(q).to_arrow()
        times.append(time.perf_counter() - start)
    return recall, float(np.median(times) * 1000)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--files", type=int, default=4)
    ap.add_argument("--partitions", type=int, default=256)
    ap.add_argument("--sub-vectors", type=int, default=16)
    ap.add_argument("--num-train", type=int, default=65_536, help="vecpress's training sample (Lance samples its own)")
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--metric", default="l2")
    ap.add_argument("--accelerator", default=None, help="LanceDB's create_index accelerator, e.g. cuda")
    ap.add_argument("--both-dtypes", action="store_true", help="also build the vecpress table with float32 vectors")
    ap.add_argument("--forms", default="PQ", help="comma-separated index forms to compare, of PQ, HNSW_PQ, SQ, "
                    "HNSW_SQ, FLAT, HNSW_FLAT, RaBitQ (each built by both, same partitions)")
    ap.add_argument("--workers", default="", help="also time the vecpress build (first form, float16) with at most "
                    "this many tasks at once, e.g. 1,2: its scaling with workers")
    ap.add_argument("--results", default="benchmarks/results/served.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vecpress-served-"))
    gen = ClusteredEmbeddings(args.dim, seed=0)
    x = gen.batch(0, args.rows)
    xq = gen.batch(10 * args.rows, args.queries)
    (work / "src").mkdir()
    bounds = np.linspace(0, args.rows, args.files + 1).astype(int)
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        pq.write_table(pa.table({"id": np.arange(lo, hi), "embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(x[lo:hi].ravel()), args.dim)}), work / "src" / f"part-{i}.parquet", row_group_size=16_384)
    truth = faiss.knn(xq, x, 10)[1] if args.metric == "l2" else None
    rows = []
    forms = [f.strip() for f in args.forms.split(",") if f.strip()]
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    for form in forms:
        spec, lance_type = served_form(form, args.partitions, args.sub_vectors)
        dtypes = ("float16", "float32") if args.both_dtypes and form == forms[0] else ("float16",)
        runs = [(dtype, None) for dtype in dtypes] + [("float16", w) for w in workers if form == forms[0]]
        for dtype, w in runs:
            with RayExecutor(max_in_flight=w) as ex:
                ex.map(abs, range(4), desc="warm-up")
                opts = CompressOptions(serve="lancedb", codec=spec, metric=args.metric, vector_dtype=dtype,
                                       num_train=args.num_train, num_queries=200, eval_k=10, mode="full",
                                       gate_max_drop=1.0)
                where = work / f"vecpress-{form}-{dtype}-{w}"
                start = time.perf_counter()
                result = run_compress([str(work / "src")], str(where), "t", opts, executor=ex)
                job = time.perf_counter() - start
            st = result.stage_seconds
            table = lancedb.connect(str(where)).open_table("t")
            row = {"form": lance_type, "builder": f"vecpress ({dtype}" + (f", {w} worker{'s' * (w > 1)})" if w else ")"),
                   "workers": w, "build_s": st["train"] + st["encode"] + st["index"], "train_s": st["train"],
                   "encode_s": st["encode"], "index_s": st["index"], "job_s": job}
            measure(row, table, xq, truth)
            rows.append(row)
        ds = lance.write_dataset(pa.table({"id": np.arange(args.rows), "embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(x.ravel().astype(np.float16)), args.dim)}), str(work / f"lance-{form}" / "t.lance"))
        start = time.perf_counter()
        kw = {"num_sub_vectors": args.sub_vectors} if "PQ" in form else {}
        ds.create_index("embedding", index_type=lance_type, num_partitions=args.partitions, metric=args.metric,
                        accelerator=args.accelerator if lance_type == "IVF_PQ" else None, **kw)
        build = time.perf_counter() - start
        table = lancedb.connect(str(work / f"lance-{form}")).open_table("t")
        row = {"form": lance_type, "builder": "lance create_index" + (f" ({args.accelerator})" if args.accelerator
                                                                       and lance_type == "IVF_PQ" else ""),
               "build_s": build}
        measure(row, table, xq, truth)
        rows.append(row)
        for r in rows:
            if r["form"] == lance_type:
                r["build_vs_lance"] = build / r["build_s"]
    print(f"\n{args.rows:,} x {args.dim}-d, {args.partitions} partitions, PQ{args.sub_vectors} for PQ forms, "
          f"{args.metric}, {args.queries} fresh queries, {os.cpu_count()} CPUs ({platform.machine()})\n")
    print("| index | builder | build s | vs lance | " + " | ".join(f"R@10 np={n} | p50 ms np={n}" for n in NPROBES)
          + " | R@10 np=20 refine 5 |")
    print("| --- | --- | ---: | ---: | " + " | ".join("---: | ---:" for _ in NPROBES) + " | ---: |")
    for r in rows:
        print(f"| {r['form']} | {r['builder']} | {r['build_s']:.1f} | {r['build_vs_lance']:.2f}x | "
              + " | ".join(f"{r[f'recall_{n}']:.3f} | {r[f'p50_ms_{n}']:.2f}" for n in NPROBES)
              + f" | {r['recall_20_refine5']:.3f} |")
    write_results(args.results, {"args": vars(args), "machine": platform.platform(), "cpus": os.cpu_count(),
                                 "rows": rows})


def served_form(form: str, partitions: int, sub_vectors: int) -> tuple[str, str]:
    """(vecpress's spec, Lance's index type) of a form name."""
    words = form.upper().split("_")
    body = {"PQ": f"PQ{sub_vectors}", "SQ": "SQ", "FLAT": "FLAT", "RABITQ": "RaBitQ"}[words[-1]]
    spec = f"IVF{partitions}," + ("HNSW," if words[0] == "HNSW" else "") + body
    from vecpress.kernels.codecs.ivf import parse_served_spec

    return spec, parse_served_spec(spec, 8 * sub_vectors).index_type


def measure(row: dict, table, xq: np.ndarray, truth: np.ndarray) -> None:
    for n in NPROBES:
        row[f"recall_{n}"], row[f"p50_ms_{n}"] = recall_and_latency(table, xq, truth, n, None)
    row["recall_20_refine5"], _ = recall_and_latency(table, xq, truth, 20, 5)


if __name__ == "__main__":
    main()
