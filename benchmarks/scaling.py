"""Encode-stage scaling: the same corpus encoded by 1, 2, 4 and 8 Ray workers.

    python benchmarks/scaling.py                       # 240k x 384-d, PQ48, 15 shards
    python benchmarks/scaling.py --workers 1,2 --rows 120000

Each worker is one Ray task of 1 CPU running vecpress.pipeline.stages.s06_encode.encode_shards (read + validate +
encode + exact top-k of the held-out queries + Lance fragment write), at most `n` in flight.
Ray is started with max(8, cores) CPUs declared, so 8 workers run even on a smaller machine:
there, counts above the core count measure oversubscription, not scaling. Efficiency is
t1 / (n * tn). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("LANCE_LOG", "error")

import numpy as np  # noqa: E402
from _results import write_results  # noqa: E402
from _setup import encode_setup  # noqa: E402

from vecpress.pipeline.distributed import RayExecutor  # noqa: E402
from vecpress.pipeline.sampling import sample_rows  # noqa: E402
from vecpress.pipeline.stages.s06_encode import encode_shards  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=240_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--codec", default="PQ48")
    ap.add_argument("--shard-rows", type=int, default=16_384)
    ap.add_argument("--batch-size", type=int, default=16_384)
    ap.add_argument("--queries", type=int, default=1000, help="held-out queries for the exact top-k (0 = off)")
    ap.add_argument("--workers", default="1,2,4,8")
    ap.add_argument("--device", default="cpu", help="where workers encode: cpu, cuda or auto (default: %(default)s)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--results", default="benchmarks/results/scaling.json")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vecpress-scaling-"))
    plan, job = encode_setup(work, rows=args.rows, dim=args.dim, files=args.files, codec=args.codec,
                             shard_rows=args.shard_rows, batch_size=args.batch_size)
    job = dataclasses.replace(job, device=args.device)
    shared = {"job": job}
    if args.queries:
        shard = plan.shards[-1]
        local = np.sort(np.random.default_rng(0).choice(shard.num_rows, args.queries, replace=False))
        shared["queries"] = sample_rows((shard, local), columns=job.columns)
        shared["query_positions"] = shard.row_offset + local
    counts = [int(w) for w in args.workers.split(",")]
    declared = max(max(counts), os.cpu_count() or 1)
    rows = []
    with RayExecutor(init_kwargs={"num_cpus": declared}) as ex:
        ex.map(lambda i: i, range(declared), desc="warm-up")
        for n in counts:
            shutil.rmtree(work / "out", ignore_errors=True)
            ex.max_in_flight = n
            # workers import and load the codec
            ex.map(encode_shards, [(s,) for s in plan.shards[:n]], desc="warm-up", shared=shared)
            start = time.perf_counter()
            results = ex.map(encode_shards, [(s,) for s in plan.shards], desc=f"encode x{n}", shared=shared)
            seconds = time.perf_counter() - start
            assert sum(r.num_rows for r in results) == plan.num_rows
            rows.append({"workers": n, "seconds": seconds, "rows_per_s": plan.num_rows / seconds})
    t1 = next((r["seconds"] for r in rows if r["workers"] == 1), None)
    for r in rows:
        r["efficiency"] = None if t1 is None else t1 / (r["workers"] * r["seconds"])
    cores = os.cpu_count()
    print(f"\n{plan.num_rows:,} x {args.dim}-d, {len(plan.shards)} shards, codec {args.codec}, "
          f"{args.queries} queries, {cores} cores ({declared} CPUs declared to Ray)")
    print(f"{'workers':>8}{'seconds':>10}{'rows/s':>12}{'efficiency':>12}")
    for r in rows:
        eff = "" if r["efficiency"] is None else f"{r['efficiency']:.2f}"
        note = "  (more workers than cores)" if r["workers"] > cores else ""
        print(f"{r['workers']:>8}{r['seconds']:>10.2f}{r['rows_per_s']:>12,.0f}{eff:>12}{note}")
    write_results(args.results, {
        "rows": plan.num_rows, "dim": args.dim, "shards": len(plan.shards), "codec": args.codec,
        "queries": args.queries, "cpus": cores, "declared_cpus": declared, "machine": platform.machine(),
        "results": rows})
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
