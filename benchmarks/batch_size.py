"""One encode worker at different batch sizes: whole `encode_shards` runs (read, encode, exact
top-k, the search over the codes, Lance write) over the same shard, the sizes taken in turn
`--rounds` times so that the machine's drift hits them alike.

    python benchmarks/batch_size.py --dim 384 --codec PQ48
    python benchmarks/batch_size.py --dim 768 --codec PQ96

One faiss and BLAS thread, as in a 1-CPU Ray task; 1000 held-out queries. `0` is the automatic
size (vecpress.pipeline.scan.batch_rows). Prints a table (median seconds per size, and its ratio to the
first size), writes JSON.
"""

from __future__ import annotations

import os

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from _results import write_results  # noqa: E402
from _setup import encode_setup  # noqa: E402

from vecpress.kernels._faiss import faiss  # noqa: E402
from vecpress.pipeline.sampling import sample_rows  # noqa: E402
from vecpress.pipeline.scan import batch_rows  # noqa: E402
from vecpress.pipeline.stages.s06_encode import encode_shards  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--codec", default="PQ48")
    ap.add_argument("--sizes", default="65536,0", help="comma-separated batch sizes (0 = automatic)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--results", default="benchmarks/results/batch_size.json")
    args = ap.parse_args()
    faiss.omp_set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="vecpress-batch-"))
    try:
        plan, job = encode_setup(work, rows=args.rows, dim=args.dim, files=1, codec=args.codec,
                                 shard_rows=args.rows, batch_size=0)
        shard = plan.shards[0]
        qpos = np.linspace(0, shard.num_rows - 1, args.queries).astype(np.int64)
        xq = sample_rows((shard, qpos), columns=job.columns)
        sizes = [int(v) for v in args.sizes.split(",")]
        seconds: dict[int, list[float]] = {s: [] for s in sizes}
        for r in range(args.rounds):
            for size in sizes:
                run = dataclasses.replace(job, batch_size=size, table_uri=str(work / "out" / f"r{r}-{size}.lance"))
                start = time.perf_counter()
                encode_shards((shard,), job=run, queries=xq, query_positions=qpos)
                seconds[size].append(time.perf_counter() - start)
                print(f"round {r}: batch {size or 'auto'}: {seconds[size][-1]:.2f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    first = float(np.median(seconds[sizes[0]]))
    print(f"\n{args.rows:,} x {args.dim}-d, {args.codec}, {args.queries} queries, one thread")
    print(f"{'batch rows':>12} {'MiB':>6} {'median s':>9} {'rows/s':>9} {'vs first':>9}")
    rows = []
    for size in sizes:
        n = batch_rows(size, args.dim, gpu=False)
        med = float(np.median(seconds[size]))
        rows.append({"batch_size": size, "rows": n, "mib": round(n * args.dim * 4 / 2**20, 1),
                     "seconds": seconds[size], "median_seconds": med, "speedup_over_first": first / med})
        print(f"{n:>12,} {n * args.dim * 4 / 2**20:>6.0f} {med:>9.2f} {args.rows / med:>9,.0f} {first / med:>8.2f}x")
    write_results(args.results, {"rows": args.rows, "dim": args.dim, "codec": args.codec, "queries": args.queries,
                                 "cpus": os.cpu_count(), "machine": platform.machine(), "results": rows})


if __name__ == "__main__":
    main()
