"""A nightly run: a full build, then an incremental run after one new file, on local Ray.

    python benchmarks/nightly.py --rows 1000000 --dim 128 --files 100 --new-rows 10000

Times every stage of both runs, and for the incremental version also what its evaluation
costs when it searches the stored codes and reads the re-rank candidates back from the source
(`evaluate_version(recompute=True)`, how evaluation worked before the search moved into the
runs' reads), against a raw scan of the same files. The same incremental run is also made on
a copy of the output whose full run's record of results is removed (pipeline/reuse.py: as a
version made before it, the kept files are read again), and every run's bytes read (rchar of
every process of this user: the driver and the Ray workers) are compared with the source's
size and the new file's. Prints a table, writes JSON.
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


def bytes_read() -> int:
    """Bytes read through read syscalls by every process this user can see (rchar)."""
    total = 0
    for io in Path("/proc").glob("[0-9]*/io"):
        try:
            total += int(next(line for line in io.read_text().splitlines() if line.startswith("rchar")).split()[1])
        except (OSError, StopIteration, ValueError):
            pass
    return total


def timed_run(spec, out, opts, ex):
    read, start = bytes_read(), time.perf_counter()
    result = run_compress(spec, str(out), "bench", opts, executor=ex)
    return result, time.perf_counter() - start, bytes_read() - read


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
        full, full_s, full_read = timed_run(spec, out, opts, ex)

        x = ClusteredEmbeddings(args.dim, seed=0).batch(args.rows, args.new_rows)
        ids = np.arange(args.rows, args.rows + args.new_rows, dtype=np.int64)
        pq.write_table(pa.table({"id": ids, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), args.dim),
                                 "text": pa.array([f"doc {i}" for i in ids])}),
                       src / "part-new.parquet", row_group_size=args.row_group_rows)
        files = sorted(str(p) for p in src.glob("*.parquet"))
        scan(files, "embedding")  # warm the page cache
        scans = sorted(scan(files, "embedding") for _ in range(3))
        scan_s = scans[1]
        before = work / "out-before"
        shutil.copytree(out, before)
        (before / full.manifest["sample"]["units_uri"]).unlink()  # as a version from before the record
        night, night_s, night_read = timed_run(spec, out, opts, ex)
        old, old_s, old_read = timed_run(spec, before, opts, ex)
        start = time.perf_counter()
        stored = evaluate_version(str(out), "bench", night.version, ex, recompute=True)
        stored_s = time.perf_counter() - start
    assert night.mode == old.mode == "incremental", (night.mode, old.mode)
    source_bytes = sum(p.stat().st_size for p in src.glob("*.parquet"))
    new_bytes = (src / "part-new.parquet").stat().st_size

    n = full.manifest["num_rows"]
    print(f"\n{n:,} x {args.dim}-d in {args.files} files, then +{args.new_rows:,} rows in one file; codec {args.codec}, "
          f"{os.cpu_count()} cores")
    print(f"{'stage (s)':<40}{'full run':>10}{'incremental':>13}{'incr., kept files read':>24}")
    for name in STAGES:
        cells = [r.stage_seconds.get(name) for r in (full, night, old)]
        print(f"{name:<40}" + "".join(f"{'' if c is None else f'{c:.2f}':>{w}}" for c, w in zip(cells, (10, 13, 24))))
    print(f"{'whole run':<40}{full_s:>10.2f}{night_s:>13.2f}{old_s:>24.2f}")
    print(f"{'MB read (all processes)':<40}{full_read / 1e6:>10.1f}{night_read / 1e6:>13.1f}{old_read / 1e6:>24.1f}")
    print(f"{'kept rows read / not read':<40}{'':>10}"
          f"{'{read:,} / {not_read:,}'.format(**night.manifest['sample']['kept_rows']):>13}"
          f"{'{read:,} / {not_read:,}'.format(**old.manifest['sample']['kept_rows']):>24}")
    print(f"source {source_bytes / 1e6:.1f} MB in {args.files + 1} files, the new file {new_bytes / 1e6:.1f} MB")
    print(f"{'scan of all files (read_table, median of 3)':<40}{'':>10}{scan_s:>13.2f}")
    print(f"{'evaluate from the stored codes instead':<40}{'':>10}{stored_s:>13.2f}")
    print(f"\nincremental recall@10 {night.eval['recall_at_10']:.3f} (searched in the {night.eval['searched']}); "
          f"from the stored codes {stored['recall_at_10']:.3f}")
    write_results(args.results, {
        "rows": n, "new_rows": args.new_rows, "dim": args.dim, "files": args.files, "codec": args.codec,
        "cpus": os.cpu_count(), "machine": platform.machine(), "scan_seconds": scan_s,
        "source_bytes": source_bytes, "new_file_bytes": new_bytes,
        "full": {"stage_seconds": full.stage_seconds, "seconds": full_s, "bytes_read": full_read},
        "incremental": {"stage_seconds": night.stage_seconds, "seconds": night_s, "bytes_read": night_read,
                        "recall_at_10": night.eval["recall_at_10"], "kept_rows": night.manifest["sample"]["kept_rows"]},
        "incremental_kept_files_read": {"stage_seconds": old.stage_seconds, "seconds": old_s, "bytes_read": old_read,
                                        "recall_at_10": old.eval["recall_at_10"],
                                        "kept_rows": old.manifest["sample"]["kept_rows"]},
        "evaluate_from_stored_codes_seconds": stored_s, "recall_at_10_from_stored_codes": stored["recall_at_10"],
    })
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
