"""Peak memory of one encode worker as its shard grows 10x, at a fixed batch size.

    python benchmarks/memory.py                     # shards of 20k, 50k, 100k, 200k rows x 384-d
    python benchmarks/memory.py --sizes 20000,200000 --dim 768

For each size it writes a one-file corpus (one shard), then runs vecpress.pipeline.stages.s06_encode.encode_shards
on it in a fresh subprocess (with 1000 held-out queries and eval_k=100, as a run does) and
reads that process's peak RSS (getrusage ru_maxrss) before and after the call. A worker that
streams batches holds one batch, so its peak should not grow with the shard (target: within
+-20% of the smallest shard's). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, pickle, resource, sys, time
import numpy as np
from vecpress.pipeline.sampling import sample_rows
from vecpress.pipeline.stages.s06_encode import encode_shards
plan, job = pickle.load(open(sys.argv[1], "rb"))
shard = plan.shards[0]
local = np.sort(np.random.default_rng(0).choice(shard.num_rows, 1000, replace=False))
xq = sample_rows((shard, local), columns=job.columns)
from vecpress.pipeline.codec_store import load_codec
load_codec(job.compute.codec)  # codec load and imports are counted in `before`
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
result = encode_shards((shard,), job=job, queries=xq, query_positions=shard.row_offset + local)
seconds = time.perf_counter() - start
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("RESULT " + json.dumps({"rows": result.num_rows, "before_kib": before, "peak_kib": after,
                              "seconds": seconds}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="20000,50000,100000,200000")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--codec", default="PQ48")
    ap.add_argument("--batch-size", type=int, default=16_384)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--device", default="cpu", help="where workers encode: cpu, cuda or auto (default: %(default)s)")
    ap.add_argument("--results", default="benchmarks/results/memory.json")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    import pickle

    from _results import write_results
    from _setup import encode_setup

    base = Path(args.workdir or tempfile.mkdtemp(prefix="vecpress-memory-"))
    rows = []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "LANCE_LOG": "error"}
    for size in map(int, args.sizes.split(",")):
        work = base / f"rows-{size}"
        plan, job = encode_setup(work, rows=size, dim=args.dim, files=1, codec=args.codec, shard_rows=size,
                                 batch_size=args.batch_size, num_train=min(size, 20_000))
        assert len(plan.shards) == 1
        job = dataclasses.replace(job, device=args.device)
        spec = work / "job.pkl"  # a benchmark-local hand-over to the child, not a stored artifact
        spec.write_bytes(pickle.dumps((plan, job)))
        proc = subprocess.run([sys.executable, "-c", CHILD, str(spec)], capture_output=True, text=True, env=env)
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode or not line:
            raise SystemExit(f"child failed for {size} rows:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
        r = json.loads(line[-1][7:])
        r["shard_mib"] = size * args.dim * 4 / 2**20
        rows.append(r)
        shutil.rmtree(work / "out", ignore_errors=True)
    first = rows[0]["peak_kib"]
    print(f"\nencode_shard peak RSS, {args.dim}-d float32, codec {args.codec}, batch_size {args.batch_size}, "
          f"{os.cpu_count()} cores")
    print(f"{'rows':>9}{'shard MiB':>11}{'before MiB':>12}{'peak MiB':>10}{'vs first':>10}{'seconds':>9}")
    for r in rows:
        r["peak_vs_first"] = r["peak_kib"] / first
        print(f"{r['rows']:>9,}{r['shard_mib']:>11.0f}{r['before_kib'] / 1024:>12.0f}{r['peak_kib'] / 1024:>10.0f}"
              f"{r['peak_vs_first']:>10.2f}{r['seconds']:>9.2f}")
    write_results(args.results, {"dim": args.dim, "codec": args.codec, "batch_size": args.batch_size,
                                 "cpus": os.cpu_count(), "machine": platform.machine(),
                                 "results": rows})
    if not args.workdir:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
