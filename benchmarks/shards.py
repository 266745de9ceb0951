"""The same rows cut into few and into many shards, or held in few and in many files: driver
memory, stage and job time, what is left behind, measured in one run.

    python benchmarks/shards.py --rows 400000 --dim 64

Generates the same clustered rows twice (not timed): in --files files and in --small-files
files, row groups of --row-group rows. Then runs the whole job (run_compress on a local Ray,
no Prefect) once per case, each in a fresh process so that its driver's peak memory is its own:
  few shards    --files files cut into shards of rows/files rows
  many shards   the same files cut into shards of --row-group rows (--shard-rows)
  many files    the --small-files files, shards of rows/files rows (small files share shards)
and prints a table (driver peak RSS, encode stage, whole job, fragments, bytes left in the run
folder) with each case's ratio to the first, writing JSON to --results. Ray's start is not
timed. Machines here are noisy: compare ratios from one run, not seconds across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("LANCE_LOG", "error")

from _results import write_results  # noqa: E402

#: one case, in its own process: prints one JSON line
CHILD = r'''
import json, os, resource, sys, time
from pathlib import Path
from vecpress.pipeline.distributed import RayExecutor
from vecpress.pipeline.options import CompressOptions
from vecpress.pipeline.run import run_compress

args = json.loads(sys.argv[1])
opts = CompressOptions(codec=args["codec"], metric="l2", num_train=args["num_train"], num_queries=args["num_queries"],
                       eval_k=args["eval_k"], shard_rows=args["shard_rows"], mode="full", gate_max_drop=1.0)
with RayExecutor(init_kwargs={"num_cpus": args["cpus"]}) as ex:
    ex.map(abs, range(2 * args["cpus"]), desc="warm-up")  # workers started before the clock
    start = time.perf_counter()
    result = run_compress([args["src"]], args["out"], "t", opts, executor=ex)
    seconds = time.perf_counter() - start
run_dir = Path(args["out"]) / "_vecpress" / "t" / "runs" / result.run_id
import lance
print("RESULT " + json.dumps({
    "driver_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "job_s": seconds, "stages": result.stage_seconds,
    "shards": len(json.loads((run_dir / "plan.json").read_text())["shards"]),
    "fragments": len(lance.dataset(args["out"] + "/t.lance").get_fragments()),
    "checkpoint_bytes": sum(p.stat().st_size for p in (run_dir / "shards").rglob("*") if p.is_file())
                        if (run_dir / "shards").exists() else 0,
    "recall_at_10": result.eval["recall_at_10"]}))
'''


def write_corpus(folder: Path, rows: int, dim: int, files: int, row_group: int) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vecpress.kernels.synthetic import ClusteredEmbeddings

    folder.mkdir(parents=True)
    gen = ClusteredEmbeddings(dim, seed=0)
    bounds = np.linspace(0, rows, files + 1).astype(int)
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:])):
        x = gen.batch(int(lo), int(hi - lo))
        pq.write_table(pa.table({"id": pa.array(np.arange(lo, hi, dtype=np.int64)),
                                 "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim)}),
                       folder / f"part-{i:05d}.parquet", row_group_size=row_group)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=400_000)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--small-files", type=int, default=800)
    ap.add_argument("--row-group", type=int, default=500, help="rows per row group (and per shard when many)")
    ap.add_argument("--codec", default="PQ16")
    ap.add_argument("--num-train", type=int, default=20_000)
    ap.add_argument("--num-queries", type=int, default=1000)
    ap.add_argument("--eval-k", type=int, default=100)
    ap.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--results", default="benchmarks/results/shards.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vecpress-shards-"))
    write_corpus(work / "few", args.rows, args.dim, args.files, args.row_group)
    write_corpus(work / "many", args.rows, args.dim, args.small_files, args.row_group)
    big = args.rows // args.files
    cases = [("few shards", "few", big), ("many shards", "few", args.row_group), ("many files", "many", big)]
    rows = []
    for name, src, shard_rows in cases:
        params = {"src": str(work / src), "out": str(work / f"out-{name.replace(' ', '-')}"), "codec": args.codec,
                  "num_train": args.num_train, "num_queries": args.num_queries, "eval_k": args.eval_k,
                  "shard_rows": shard_rows, "cpus": args.cpus}
        done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(params)], capture_output=True, text=True)
        line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
        rows.append({"case": name, "files": len(list((work / src).glob("*.parquet"))), "shard_rows": shard_rows,
                     **json.loads(line[len("RESULT "):])})
    base = rows[0]
    print(f"\n{args.rows:,} rows x {args.dim}-d, {args.codec}, {args.num_queries} held-out queries, top-{args.eval_k}, "
          f"{args.cpus} CPUs ({platform.processor() or platform.machine()})\n")
    print("| case | files | shards | driver peak MiB | encode s | job s | fragments | checkpoints left | recall@10 "
          "| peak / few | job / few |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        r["peak_ratio"] = r["driver_peak_mib"] / base["driver_peak_mib"]
        r["job_ratio"] = r["job_s"] / base["job_s"]
        print(f"| {r['case']} | {r['files']} | {r['shards']} | {r['driver_peak_mib']:.0f} | {r['stages']['encode']:.1f} "
              f"| {r['job_s']:.1f} | {r['fragments']} | {r['checkpoint_bytes'] / 2**20:.1f} MiB | "
              f"{r['recall_at_10']:.3f} | {r['peak_ratio']:.2f} | {r['job_ratio']:.2f} |")
    write_results(args.results, {"args": vars(args), "machine": platform.platform(), "cpus": args.cpus, "cases": rows})


if __name__ == "__main__":
    main()
