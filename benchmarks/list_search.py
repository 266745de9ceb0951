"""Searching an RQ's or LSQ's lists by look-up tables against decoding each code
(pipeline/lists.py, kernels/codecs/tables.py): one query's latency and a batch's time, per
nprobes, on the same lists in one run; lists of residual codes, or of the table's codes
(`--lists table`).

    python benchmarks/list_search.py --rows 100000 --dim 768 --codec RQ32x8,beam=1 --data powerlaw

The table is compressed once (cosine; residual lists whatever the train stage's judgement of
them, `lists.residual_leads`, or with --no-residual). Its lists are copied without their code
terms, as lists built before the terms were stored are read: those are searched by faiss
decoding each code for every query that probes it. The two are timed alternating, and their
neighbours compared. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from _data import add_data_option, generator
from _results import write_results

import vecpress
from vecpress.pipeline.buckets import open_batches
from vecpress.pipeline.executor import LocalExecutor
from vecpress.pipeline.lance_io import require_dataset, version_manifest
from vecpress.pipeline.lists import InvertedLists, search_lists, version_lists
from vecpress.pipeline.stages import s05_train


def without_terms(spec, folder: Path):
    """A copy of the lists `spec` names, each partition's positions and codes only."""
    folder.mkdir()
    copy = dataclasses.replace(spec, uri=str(folder))
    for g in range(spec.num_groups):
        reader = open_batches(spec.group_uri(g))
        schema = pa.schema([reader.schema.field(i) for i in range(2)])
        with pa.ipc.new_file(copy.group_uri(g), schema) as writer:
            for i in range(reader.num_record_batches):
                writer.write_batch(pa.RecordBatch.from_arrays(reader.get_batch(i).columns[:2], schema=schema))
    return InvertedLists(copy)


def timed(fn, repeat: int = 1) -> float:
    best = np.inf
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--codec", default="RQ32x8,beam=1")
    ap.add_argument("--partitions", type=int, default=256)
    ap.add_argument("--num-train", type=int, default=50_000)
    ap.add_argument("--queries", type=int, default=200, help="the batch's queries")
    ap.add_argument("--single", type=int, default=10, help="queries timed one at a time")
    ap.add_argument("--nprobes", default="4,16,64")
    ap.add_argument("--lists", choices=("residual", "table"), default="residual",
                    help="the lists hold residual codes, or the table's codes (--no-residual)")
    add_data_option(ap)
    ap.add_argument("--results", default="benchmarks/results/list_search.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vecpress-list-search-"))
    gen = generator(args.data, args.dim, seed=5)
    (work / "src").mkdir()
    for i, start in enumerate(range(0, args.rows, 50_000)):
        n = min(50_000, args.rows - start)
        x = gen.batch(start, n)
        pq.write_table(pa.table({"id": np.arange(start, start + n), "embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(x.ravel()), args.dim)}), work / "src" / f"p{i}.parquet", row_group_size=8192)
    s05_train.residual_leads = lambda judged: True  # (residual codes, whatever they rank)
    start = time.perf_counter()
    vecpress.compress([str(work / "src")], str(work / "out"), "t", executor=LocalExecutor(), codec=args.codec,
                      partitions=args.partitions, num_train=args.num_train, num_queries=200, gate_max_drop=1.0,
                      metric="cosine", residual=args.lists == "residual")
    compress_seconds = time.perf_counter() - start
    m = version_manifest(require_dataset(str(work / "out"), "t"))
    now = version_lists(str(work / "out"), m)
    before = without_terms(now.spec, work / "lists-without-terms")
    codec = vecpress.open(str(work / "out"), "t").codec
    xq = gen.batch(args.rows, args.queries) + 0.0  # (rows past the corpus: held-out queries)
    rows = []
    for nprobes in [int(n) for n in args.nprobes.split(",")]:
        row = {"nprobes": nprobes}
        for name, lists in (("decode", before), ("tables", now), ("decode", before), ("tables", now)):
            one = np.median([timed(lambda q=q: search_lists(lists, codec, xq[q:q + 1], 10, nprobes))
                             for q in range(args.single)])
            batch = timed(lambda: search_lists(lists, codec, xq, 10, nprobes))
            row.setdefault(f"{name}_single_ms", []).append(round(1000 * float(one), 2))
            row.setdefault(f"{name}_batch_s", []).append(round(batch, 3))
        D0, I0 = search_lists(before, codec, xq, 10, nprobes)
        D1, I1 = search_lists(now, codec, xq, 10, nprobes)
        row["same_neighbours"] = round(float((I0 == I1).mean()), 5)
        row["max_distance_difference"] = float(np.abs(D0 - D1).max())
        rows.append(row)
        print(row, flush=True)
    print(f"\n{args.rows:,} x {args.dim}-d {args.data} rows, cosine, {args.codec} lists of {args.lists} codes, "
          f"{args.partitions} partitions, {os.cpu_count()} CPUs; compressed in {compress_seconds:.0f} s\n")
    print("| nprobes | one query: decoding | tables | ratio | batch of "
          f"{args.queries}: decoding | tables | ratio | same neighbours |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        d1, t1, db, tb = (min(r[k]) for k in ("decode_single_ms", "tables_single_ms", "decode_batch_s",
                                               "tables_batch_s"))
        print(f"| {r['nprobes']} | {d1:.1f} ms | {t1:.1f} ms | {d1 / t1:.0f}x | {db:.2f} s | {tb:.2f} s | "
              f"{db / tb:.1f}x | {r['same_neighbours']:.4f} |")
    write_results(args.results, {"args": vars(args), "machine": platform.platform(), "rows": rows,
                                 "compress_seconds": round(compress_seconds, 1)})


if __name__ == "__main__":
    main()
