"""Pipeline throughput against a raw Parquet scan of the same files, measured in one run.

    python benchmarks/pipeline_throughput.py --rows 400000 --dim 384 --codec PQ48

Generates a clustered corpus (not timed), then times on the same files:
  scan       pyarrow read_table of the vector column, all threads (the I/O + decode floor)
  sample     the sample stage
  train      codec training
  encode     the encode stage over local Ray (read + validate + encode + exact top-k + the
             search of the held-out queries over the new codes + write)
  evaluate   recall from the encode pass's results (a version from before that: a search of
             the committed codes and re-rank reads)
and prints a table plus ratios (encode rows/s / scan rows/s), writing JSON to --results.
Machines here are noisy: compare ratios from one run, not absolute seconds across runs.
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

import pyarrow.parquet as pq  # noqa: E402
from _results import write_results  # noqa: E402

from vecpress.pipeline.demo import write_corpus  # noqa: E402
from vecpress.pipeline.distributed import RayExecutor  # noqa: E402
from vecpress.pipeline.options import CompressOptions
from vecpress.pipeline.run import run_compress


def scan(files: list[str], column: str) -> float:
    start = time.perf_counter()
    rows = 0
    for f in files:
        t = pq.read_table(f, columns=[column], use_threads=True)
        rows += t.num_rows
        t.column(0).combine_chunks().values.to_numpy()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=400_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--codec", default="PQ48")
    ap.add_argument("--metric", default="cosine")
    ap.add_argument("--num-train", type=int, default=50_000)
    ap.add_argument("--num-queries", type=int, default=1000, help="held-out queries (the exact top-k costs 2 x dim flops per query and row)")
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu (CompressOptions.device)")
    ap.add_argument("--shard-rows", type=int, default=500_000)
    ap.add_argument("--batch-size", type=int, default=0, help="rows per batch (0 = automatic, as compress)")
    ap.add_argument("--no-eval-rerank", action="store_true", help="skip the re-ranked recall in evaluate")
    ap.add_argument("--row-group-rows", type=int, default=16_384, help="rows per Parquet row group of the corpus")
    ap.add_argument("--sample-row-groups", type=int, default=None,
                    help="CompressOptions.sample_row_groups (default: the pipeline's)")
    ap.add_argument("--scans", type=int, default=3, help="raw scans to take the median of")
    ap.add_argument("--workdir", default=None, help="where to write the corpus (default: a temp dir)")
    ap.add_argument("--results", default="benchmarks/results/pipeline_throughput.json")
    args = ap.parse_args()

    work = Path(args.workdir or tempfile.mkdtemp(prefix="vecpress-bench-"))
    src, out = work / "src", work / "out"
    shutil.rmtree(out, ignore_errors=True)
    if not src.exists():
        write_corpus(str(src), num_rows=args.rows, dim=args.dim, num_files=args.files,
                     row_group_size=args.row_group_rows)
    files = sorted(str(p) for p in src.glob("*.parquet"))
    scan(files, "embedding")  # warm the page cache
    scans = sorted(scan(files, "embedding") for _ in range(args.scans))
    scan_s = scans[len(scans) // 2]  # the median: one scan of a few hundred MiB is noisy here

    opts = CompressOptions(codec=args.codec, metric=args.metric, num_train=args.num_train, num_queries=args.num_queries,
                           device=args.device, shard_rows=args.shard_rows, batch_size=args.batch_size,
                           eval_rerank=not args.no_eval_rerank,
                           **({} if args.sample_row_groups is None else {"sample_row_groups": args.sample_row_groups}))
    with RayExecutor() as ex:
        ex.map(lambda i: i, range(4), desc="warm-up")
        start = time.perf_counter()
        result = run_compress([str(src)], str(out), "bench", opts, executor=ex)
        total_s = time.perf_counter() - start
    st = result.stage_seconds
    n = result.manifest["num_rows"]
    raw_bytes = n * args.dim * 4
    rows = [("scan (read_table)", scan_s), *((k, st[k]) for k in ("plan", "sample", "train", "encode", "commit", "evaluate")),
            ("whole job", total_s)]
    print(f"\n{n:,} x {args.dim}-d float32 ({raw_bytes / 2**20:.0f} MiB) in {len(files)} files, codec {args.codec}, "
          f"{os.cpu_count()} cores")
    print(f"raw scans (s): {', '.join(f'{x:.2f}' for x in scans)}; the table uses the median")
    print(f"{'stage':<20}{'seconds':>10}{'rows/s':>14}{'MB/s':>10}")
    for name, s in rows:
        print(f"{name:<20}{s:>10.2f}{n / s if s else 0:>14,.0f}{raw_bytes / s / 1e6 if s else 0:>10.1f}")
    ratios = {
        "encode_over_scan": scan_s / st["encode"],
        "job_over_scan": scan_s / total_s,
    }
    print(f"\nencode throughput / raw scan throughput: {ratios['encode_over_scan']:.3f}")
    print(f"whole job throughput / raw scan throughput: {ratios['job_over_scan']:.3f}")
    print(f"recall@10 {result.eval['recall_at_10']:.3f}; the sample read {result.manifest['sample']['row_groups_read']} "
          f"row groups (limit {result.manifest['sample']['max_row_groups']})")
    devices = result.manifest["devices"]
    print(f"encode placement: {devices['placement']}; " + "; ".join(
        f"{c['rows']:,} rows encoded on {c.get('encode')}" + (f" ({c['gpu_name']})" if c.get("gpu_name") else "")
        + f", neighbours on {c.get('exact_knn')}, search over the codes on {c.get('code_search')}"
        for c in devices["compute"][:4]) + (" ..." if len(devices["compute"]) > 4 else ""))
    for a in devices["actors"]:  # a GPU actor's busy time against the encode stage's
        print(f"GPU actor {a.get('gpu_ids')}: busy {a.get('busy_seconds')} s of the {st['encode']:.2f} s encode stage")
    write_results(args.results, {
        "rows": n, "dim": args.dim, "files": len(files), "codec": args.codec, "cpus": os.cpu_count(),
        "machine": platform.machine(), "scan_seconds": scan_s, "scan_seconds_all": scans, "stage_seconds": st, "job_seconds": total_s,
        "ratios": ratios, "recall_at_10": result.eval["recall_at_10"], "devices": devices,
        "options": {"device": args.device, "shard_rows": args.shard_rows, "eval_rerank": not args.no_eval_rerank,
                    "row_group_rows": args.row_group_rows, "sample_row_groups": result.manifest["sample"]["max_row_groups"]},
        "sample_row_groups_read": result.manifest["sample"]["row_groups_read"],
    })


if __name__ == "__main__":
    main()
