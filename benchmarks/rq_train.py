"""Residual quantizer training on the CPU: vecpress's (greedy, on at most the rows one stage's
k-means samples, progressive-dimension k-means in few steps: kernels/codecs/train.py
`_residual_training`) against faiss's default as vecpress ran it before (progressive-
dimension k-means of 10 steps on every training row, beam 5), on the same data, one run.

    python benchmarks/rq_train.py --rows 300000 --dim 768 --codec RQ16x8 \
        --variants vecpress,vecpress-10x10,faiss-default

Variants: `vecpress` (as shipped: stage by stage, kernels/codecs/residual.py, on the CPU),
`vecpress-gpu` (as shipped on a machine with a GPU: the same stage by stage, GPU flat indexes
assigning in each k-means and stage; an LSQ with faiss's GPU ICM encoder), `faiss-gpu` (how
vecpress trained a residual quantizer on a GPU before: faiss's one call, every training row,
the spec's beam, faiss's GPU index factory for the k-means),
`vecpress-faiss-pca` (stage by stage with faiss's ProgressiveDimClustering, whose PCAMatrix
vecpress replaced with numpy's principal axes), `vecpress-onecall` (faiss's one
ResidualQuantizer.train call, as shipped before: the same bytes as `vecpress-faiss-pca`),
`vecpress-axes-all` (each stage's principal axes from every training row's covariance, as
shipped before they came from AXES_ROWS of them),
`vecpress-<steps>x<iterations>` (another per-stage k-means:
`vecpress-10x10` is faiss's, as shipped before that), `faiss-default`.
Each variant trains in a process of its own: train seconds, the process's peak RSS while it
trains (the data held, 0.9 GB at 300k x 768-d, and what training adds) and what training
adds over the RSS before it, and recall@10 of ADC search (faiss's own,
for both) of 500 queries over 50,000 other rows against exact neighbours. Unit-normalised
clustered vectors (text-embedding-like, cosine). Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import numpy as np

QUERIES = 500


def status_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field)) / 1024


def reset_peak() -> None:
    """Start the process's peak RSS (VmHWM) afresh from its RSS now (Linux clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def variant(name: str, rows: int, dim: int, codec: str, seed: int, base_rows: int) -> dict:
    from vecpress.kernels._faiss import faiss
    from vecpress.kernels.codecs import train as vtrain
    from vecpress.kernels.codecs.build import _innermost, build_index
    from vecpress.kernels.synthetic import ClusteredEmbeddings

    gen = ClusteredEmbeddings(dim, seed=0)

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    xt, xb, xq = unit(gen.batch(0, rows)), unit(gen.batch(10 * rows, base_rows)), unit(gen.batch(20 * rows, QUERIES))
    reset_peak()
    before = status_mb("VmRSS")
    start = time.perf_counter()
    if name == "vecpress-gpu":
        index = vtrain.train_index(xt, codec, "l2", seed=seed, ngpu=-1)
    elif name == "vecpress-faiss-pca":  # stage by stage with faiss's ProgressiveDimClustering (its PCAMatrix)
        from vecpress.kernels.codecs import residual

        residual.progressive_kmeans = residual.faiss_progressive_kmeans
        index = vtrain.train_index(xt, codec, "l2", seed=seed, ngpu=0)
    elif name == "vecpress-axes-all":  # each stage's principal axes from every row's covariance, as before AXES_ROWS
        from vecpress.kernels.codecs import residual

        residual.AXES_ROWS = len(xt)
        index = vtrain.train_index(xt, codec, "l2", seed=seed, ngpu=0)
    elif name == "vecpress-onecall":  # the same training in faiss's one call, no stage heard of
        vtrain.trains_stagewise = lambda inner: False
        index = vtrain.train_index(xt, codec, "l2", seed=seed, ngpu=0)
    elif name.startswith("vecpress"):  # vecpress-<steps>x<iterations>: another per-stage k-means
        if name != "vecpress":
            vtrain.RQ_PROGRESSIVE = tuple(int(v) for v in name.split("-")[1].split("x"))
        index = vtrain.train_index(xt, codec, "l2", seed=seed, ngpu=0)
    else:  # as before: the factory's defaults, every training row (faiss-gpu: faiss's GPU factory assigning)
        ngpu = -1 if name == "faiss-gpu" else 0
        index = build_index(codec, dim, "l2")
        chain, inner = _innermost(index)
        keep_alive = vtrain._configure_training(chain, inner, seed=seed, ngpu=ngpu)
        assert ngpu == 0 or (keep_alive is not None and not vtrain.trains_stagewise(inner)), \
            "faiss-gpu needs a GPU and a beam over 1"
        index.train(xt)
        vtrain._release_gpu(inner)
    seconds = time.perf_counter() - start
    peak = status_mb("VmHWM")  # (the peak while training: the data held, and what training adds)
    index.add(xb)
    truth = faiss.knn(xq, xb, 10)[1]
    found = index.search(xq, 10)[1]
    recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth)]))
    return {"variant": name, "train_seconds": round(seconds, 1), "peak_rss_mb": round(peak),
            "rss_growth_mb": round(peak - before), "recall_at_10": round(recall, 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=300_000)
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--codec", default="RQ16x8")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", default="vecpress,faiss-default")
    ap.add_argument("--base-rows", type=int, default=50_000)
    ap.add_argument("--timeout", type=float, default=None)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # (a variant, in its own process)
    ap.add_argument("--results", default="benchmarks/results/rq_train.json")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(variant(args.one, args.rows, args.dim, args.codec, args.seed, args.base_rows)))
        return
    rows = []
    for name in args.variants.split(","):
        try:
            out = subprocess.run([sys.executable, __file__, "--one", name, "--rows", str(args.rows), "--dim",
                                  str(args.dim), "--codec", args.codec, "--seed", str(args.seed), "--base-rows",
                                  str(args.base_rows)], capture_output=True, text=True, check=True,
                                 timeout=args.timeout).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
        except subprocess.TimeoutExpired:
            rows.append({"variant": name, "timed_out_after_s": args.timeout})
        except subprocess.CalledProcessError as e:  # one variant failing (no GPU, say) leaves the others
            rows.append({"variant": name, "failed": (e.stderr or "").strip().splitlines()[-1:]})
        print(rows[-1], flush=True)
    print(f"\n{args.codec} on {args.rows:,} x {args.dim}-d (unit vectors), {os.cpu_count()} CPUs\n")
    print("| training | train s | peak RSS while training, MB (added by training) | recall@10 |")
    print("| --- | ---: | ---: | ---: |")
    for r in rows:
        if "timed_out_after_s" in r:
            print(f"| {r['variant']} | over {r['timed_out_after_s']:.0f} (the whole process) | - | - |")
            continue
        if "failed" in r:
            print(f"| {r['variant']} | failed: {' '.join(r['failed'])} | - | - |")
            continue
        print(f"| {r['variant']} | {r['train_seconds']:.1f} | {r['peak_rss_mb']} ({r['rss_growth_mb']}) "
              f"| {r['recall_at_10']:.3f} |")
    from _results import write_results
    write_results(args.results, {"args": vars(args), "machine": platform.platform(), "cpus": os.cpu_count(),
                                 "rows": rows})


if __name__ == "__main__":
    main()
