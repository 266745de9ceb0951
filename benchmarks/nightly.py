"""A nightly run: a full build, then an incremental run after one new file, on local Ray.

    python benchmarks/nightly.py --rows 400000 --dim 384 --files 8 --new-rows 50000

Times every stage of both runs, and for the incremental version also what its evaluation
costs when it searches the stored codes and reads the re-rank candidates back from the source
(`evaluate_version(recompute=True)`, how evaluation worked before the search moved into the
runs' reads), against a raw scan of the same files. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("LANCE_LOG", "error")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from _results import write_results  # noqa: E402
from pipeline_throughput import scan  # noqa: E402

from vecpress.kernels.synthetic import ClusteredEmbeddings  # noqa: E402
from vecpress.pipeline.demo import write_corpus  # noqa: E402
from vecpress.pipeline.distributed import RayExecutor  # noqa: E402
from vecpress.pipeline.options import CompressOptions
from vecpress.pipeline.evaluate import evaluate_version
from vecpress.pipeline.run import run_compress

STAGES = ("plan", "drift", "sample", "train", "encode", "commit", "evaluate")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=400_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--new-rows", type=int, default=50_000, help="rows of the file added before the second run")
    ap.add_argument("--row-group-rows", type=int, default=16_384)
    ap.add_argument("--codec", default="PQ48")
    ap.add_argument("--metric", default="cosine")
    ap.add_argument("--num-train", type=int, default=50_000)
    ap.add_argument("--results", default="benchmarks/results/nightly.json")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="vecpress-nightly-"))
    src, out = work / "src", work / "out"
    write_corpus(str(src), num_rows=args.rows, dim=args.dim, num_files=args.files, row_group_size=args.row_group_rows)
    opts = CompressOptions(codec=args.codec, metric=args.metric, num_train=args.num_train, num_queries=1000,
                           gate_max_drop=1.0)  # other queries each night: the benchmark does not gate
    spec = [str(src)]
    with RayExecutor() as ex:
        ex.map(lambda i: i, range(4), desc="warm-up")
        start = time.perf_counter()
        full = run_compress(spec, str(out), "bench", opts, executor=ex)
        full_s = time.perf_counter() - start

        x = ClusteredEmbeddings(args.dim, seed=0).batch(args.rows, args.new_rows)
        ids = np.arange(args.rows, args.rows + args.new_rows, dtype=np.int64)
        pq.write_table(pa.table({"id": ids, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), args.dim),
                                 "text": pa.array([f"doc {i}" for i in ids])}),
                       src / "part-new.parquet", row_group_size=args.row_group_rows)
        files = sorted(str(p) for p in src.glob("*.parquet"))
        scan(files, "embedding")  # warm the page cache
        scans = sorted(scan(files, "embedding") for _ in range(3))
        scan_s = scans[1]
        start = time.perf_counter()
        night = run_compress(spec, str(out), "bench", opts, executor=ex)
        night_s = time.perf_counter() - start
        start = time.perf_counter()
        stored = evaluate_version(str(out), "bench", night.version, ex, recompute=True)
        stored_s = time.perf_counter() - start
    assert night.mode == "incremental", night.mode

    n = full.manifest["num_rows"]
    print(f"\n{n:,} x {args.dim}-d in {args.files} files, then +{args.new_rows:,} rows in one file; codec {args.codec}, "
          f"{os.cpu_count()} cores")
    print(f"{'stage (s)':<40}{'full run':>10}{'incremental':>13}")
    for name in STAGES:
        a, b = full.stage_seconds.get(name), night.stage_seconds.get(name)
        print(f"{name:<40}{'' if a is None else f'{a:.2f}':>10}{'' if b is None else f'{b:.2f}':>13}")
    print(f"{'whole run':<40}{full_s:>10.2f}{night_s:>13.2f}")
    print(f"{'scan of all files (read_table, median of 3)':<40}{'':>10}{scan_s:>13.2f}")
    print(f"{'evaluate from the stored codes instead':<40}{'':>10}{stored_s:>13.2f}")
    print(f"\nincremental recall@10 {night.eval['recall_at_10']:.3f} (searched in the {night.eval['searched']}); "
          f"from the stored codes {stored['recall_at_10']:.3f}")
    write_results(args.results, {
        "rows": n, "new_rows": args.new_rows, "dim": args.dim, "files": args.files, "codec": args.codec,
        "cpus": os.cpu_count(), "machine": platform.machine(), "scan_seconds": scan_s,
        "full": {"stage_seconds": full.stage_seconds, "seconds": full_s},
        "incremental": {"stage_seconds": night.stage_seconds, "seconds": night_s,
                        "recall_at_10": night.eval["recall_at_10"]},
        "evaluate_from_stored_codes_seconds": stored_s, "recall_at_10_from_stored_codes": stored["recall_at_10"],
    })
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
