"""Codec training time, as the train stage runs it (`Codec.train` on the sampled vectors):
faiss's own PQ training (sub-quantizers one after another, each k-means on every thread),
vecpress's (the sub-quantizers' k-means side by side, one per thread; the same bytes), and,
where faiss sees a GPU, faiss's GPU k-means assignment (`ngpu=1`).

    python benchmarks/train.py                                   # CPU machine
    python benchmarks/train.py --dims 768 --specs 'PQ64;PQ96'     # GPU machine: + the GPU column

Clustered vectors, all threads. For each spec: seconds of each path, the speed-up of the
parallel path over faiss's, and whether both CPU paths gave the same bytes. Prints a table,
writes JSON.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from _results import write_results

import vecpress.kernels.codecs.train as kt

from vecpress.kernels._faiss import faiss, num_gpus
from vecpress.kernels.codecs.build import check_codec_spec
from vecpress.kernels.codecs.codec import Codec
from vecpress.kernels.codecs.spec import CodecSpecError
from vecpress.kernels.synthetic import ClusteredEmbeddings


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def train(x, spec, *, parallel: bool, ngpu: int):
    """Codec.train with vecpress's parallel PQ training on or off."""
    original = kt._trains_pq_in_parallel
    if not parallel:
        kt._trains_pq_in_parallel = lambda inner: False
    try:
        return Codec.train(x, spec, "l2", seed=0, ngpu=ngpu)
    finally:
        kt._trains_pq_in_parallel = original


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=50_000, help="training vectors (the default --num-train)")
    ap.add_argument("--dims", default="384", help="comma-separated dimensions")
    ap.add_argument("--specs", default="PQ24;PQ48;PQ96;PQ32x4fs", help="semicolon-separated codec specs")
    ap.add_argument("--results", default="benchmarks/results/train.json")
    args = ap.parse_args()
    gpus = num_gpus()
    rows = []
    print(f"{args.rows:,} training vectors, {os.cpu_count()} cores, faiss {faiss.__version__}, {gpus} GPU(s)")
    print(f"{'spec':<14} {'dim':>5} {'faiss s':>9} {'vecpress s':>11} {'speed-up':>9} {'same':>5}"
          + (f" {'GPU s':>8}" if gpus else ""))
    for d in (int(v) for v in args.dims.split(",")):
        x = ClusteredEmbeddings(d, seed=1).batch(0, args.rows)
        for spec in args.specs.split(";"):
            try:
                check_codec_spec(spec, d, "l2", args.rows)
            except CodecSpecError as exc:
                print(f"{spec:<14} {d:>5} skipped: {exc}")
                continue
            train(x[:2000], spec, parallel=True, ngpu=0)  # warm-up: imports, thread pools
            t_faiss, ref = timed(lambda: train(x, spec, parallel=False, ngpu=0))
            t_par, got = timed(lambda: train(x, spec, parallel=True, ngpu=0))
            same = ref.to_bytes() == got.to_bytes()
            row = {"spec": spec, "dim": d, "faiss_seconds": round(t_faiss, 3), "vecpress_seconds": round(t_par, 3),
                   "speedup": round(t_faiss / t_par, 2), "same_bytes": same}
            line = f"{spec:<14} {d:>5} {t_faiss:>9.2f} {t_par:>11.2f} {t_faiss / t_par:>8.2f}x {str(same):>5}"
            if gpus:
                t_gpu, _ = timed(lambda: train(x, spec, parallel=True, ngpu=1))
                row["gpu_seconds"] = round(t_gpu, 3)
                line += f" {t_gpu:>8.2f}"
            rows.append(row)
            print(line, flush=True)
    write_results(args.results, {"rows": args.rows, "cpus": os.cpu_count(), "machine": platform.machine(),
                                 "faiss": faiss.__version__, "gpus": gpus, "results": rows})


if __name__ == "__main__":
    main()
