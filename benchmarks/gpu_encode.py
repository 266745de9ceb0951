"""PQ encode throughput, kernel level: vecpress's encoders against the copy floor and faiss.

    python benchmarks/gpu_encode.py            # d in {384, 768, 1536} x PQ {32, 64, 96} bytes
    python benchmarks/gpu_encode.py --quick    # small n, for a smoke run

For each (d, bytes), on the same vectors (clustered, float32) and the same codebook:
  faiss-cpu    faiss IndexPQ.sa_encode, all cores
  numpy        kernels.pq_encode numpy reference (blocked GEMM + argmin)   (--engines numpy)
and where CuPy sees a GPU:
  h2d-pinned   host->GPU copy of the same bytes from pinned memory: the floor to compare with
  gpu-dev      the fused kernel (kernels.gpu_encode) on rows already on the GPU
  gpu-pinned   GpuEncoder.encode from a pinned host array (double-buffered copies + kernel
               + codes back): the figure the 0.8 x h2d target is about
  gpu-host     GpuEncoder.encode from a pageable numpy array (staged through pinned buffers
               by several host threads)
  torch-naive  batched GEMM + argmin in torch, rows on the GPU (kernels.pq_encode)  (if torch)
  faiss-gpu    faiss GpuIndexIVFPQ with one list (centroid 0, so residual = x), add() as encoder
               (if faiss sees a GPU)
The codebook is sampled from the data, not trained: encode speed does not depend on it.
`agree` is the share of sub-vector codes equal to faiss CPU's (on the faiss-cpu rows).
`/h2d` is the engine's rate over h2d-pinned's, measured in the same run. Prints a table and
writes JSON (--results).
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import time

import numpy as np
from _results import write_results

from vecpress.kernels._faiss import faiss, num_gpus
from vecpress.kernels.gpu_encode import GpuEncoder, GpuPlan, gpu_count
from vecpress.kernels.pq_encode import encode_pq
from vecpress.kernels.synthetic import ClusteredEmbeddings


def best_of(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def gpu_time(cp, fn, repeat: int) -> float:
    """Median seconds of `fn` between CUDA events on the current stream (after a warm-up)."""
    fn()
    cp.cuda.Device().synchronize()
    times = []
    for _ in range(repeat):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) / 1e3)
    return float(np.median(times))


def sampled_codebook(x: np.ndarray, M: int, seed: int = 0) -> np.ndarray:
    rs = np.random.default_rng(seed)
    d = x.shape[1]
    rows = np.stack([rs.choice(len(x), 256, replace=False) for _ in range(M)])  # (M, 256)
    sub = x.reshape(len(x), M, d // M)
    return np.ascontiguousarray(sub[rows, np.arange(M)[:, None]], dtype=np.float32)  # (M, 256, dsub)


def faiss_pq(d: int, M: int, centroids: np.ndarray):
    index = faiss.IndexPQ(d, M, 8)
    faiss.copy_array_to_vector(centroids.ravel(), index.pq.centroids)
    index.is_trained = True
    return index


@functools.lru_cache(maxsize=1)
def corpus(d: int, n: int) -> np.ndarray:
    """n clustered rows: 100k generated ones repeated (generation is slow; the encode cost does
    not depend on repeats, and 1M rows of 384+ dims are far larger than any GPU cache)."""
    base = ClusteredEmbeddings(d, seed=d).batch(0, min(n, 100_000))
    return np.ascontiguousarray(np.resize(base, (n, d)))


def run_config(d: int, M: int, n: int, n_cpu: int, repeat: int, engines: set[str]) -> list[dict]:
    x = corpus(d, n)
    centroids = sampled_codebook(x[: min(n, 50_000)], M)
    index = faiss_pq(d, M, centroids)
    x_cpu = x[:n_cpu]
    want = index.sa_encode(x_cpu)
    rows = []

    def add(engine, seconds, rows_done, codes=None, **extra):
        agree = None if codes is None else float((codes[:n_cpu] == want).mean())
        rows.append({"d": d, "bytes": M, "n": rows_done, "engine": engine, "seconds": seconds,
                     "vectors_per_s": rows_done / seconds, "gb_per_s": rows_done * d * 4 / seconds / 1e9,
                     "agree": agree, **extra})

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    add("faiss-cpu", best_of(lambda: index.sa_encode(x_cpu), repeat), n_cpu, want,
        threads=faiss.omp_get_max_threads())
    if "numpy" in engines:
        out = {}
        add("numpy", best_of(lambda: out.update(c=encode_pq(x_cpu, centroids, 8)), repeat), n_cpu, out["c"])
    if gpu_count() == 0:
        return rows
    import cupy as cp
    import cupyx

    pinned = cupyx.empty_pinned(x.shape, np.float32)
    pinned[:] = x
    dev_x = cp.empty(x.shape, cp.float32)
    copy_s = gpu_time(cp, lambda: dev_x.set(pinned), repeat)
    add("h2d-pinned", copy_s, n)
    enc = GpuEncoder(GpuPlan("pq", M, False, [], centroids=centroids, nbits=8))
    block = 1 << 16
    dev_out = {}

    def on_device():
        for lo in range(0, n, block):
            enc.encode_device(dev_x[lo:lo + block])
    s = gpu_time(cp, on_device, repeat)
    dev_out["c"] = cp.asnumpy(enc.encode_device(dev_x[:n_cpu]))
    add("gpu-dev", s, n, dev_out["c"], vs_h2d=copy_s / s)
    out = {}
    s = best_of(lambda: out.update(c=enc.encode(pinned)), repeat)
    add("gpu-pinned", s, n, out["c"], vs_h2d=copy_s / s, block_rows=enc.block_rows or "64 MiB")
    s = best_of(lambda: out.update(c=enc.encode(x)), repeat)
    add("gpu-host", s, n, out["c"], vs_h2d=copy_s / s, staging_threads=enc.staging_threads)
    enc.close()
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and torch.cuda.is_available():
        from torch_pq import device_tables, encode_block_torch

        ct, cnorm = device_tables(centroids, "cuda")
        tx = torch.as_tensor(dev_x, device="cuda")  # shares the cupy buffer (DLPack / CAI)
        tblock = 1 << 14

        def torch_naive():
            with torch.inference_mode():
                for lo in range(0, n, tblock):
                    encode_block_torch(tx[lo:lo + tblock], ct, cnorm, 8)
            torch.cuda.synchronize()
        s = best_of(torch_naive, repeat)
        add("torch-naive", s, n, None, vs_h2d=copy_s / s)
        del tx, ct, cnorm
        torch.cuda.empty_cache()
    dev_x = None  # free the device copy before faiss-gpu runs
    cp.get_default_memory_pool().free_all_blocks()
    if num_gpus() > 0:
        res = faiss.StandardGpuResources()
        quantizer = faiss.IndexFlatL2(d)
        quantizer.add(np.zeros((1, d), np.float32))
        cpu_ivf = faiss.IndexIVFPQ(quantizer, d, 1, M, 8)
        faiss.copy_array_to_vector(centroids.ravel(), cpu_ivf.pq.centroids)
        cpu_ivf.is_trained = True
        try:  # faiss GPU IVFPQ supports only some sub-vector sizes and code sizes
            co = faiss.GpuClonerOptions()
            co.useFloat16 = True  # float16 lookup tables: M = 64/96 fit in shared memory (search only)
            gpu_ivf = faiss.index_cpu_to_gpu(res, 0, cpu_ivf, co)

            def faiss_gpu_add():
                gpu_ivf.reset()
                gpu_ivf.add(x)
                cp.cuda.Device().synchronize()
            s = best_of(faiss_gpu_add, max(1, repeat // 2))
            add("faiss-gpu", s, n, None, vs_h2d=copy_s / s)
            del gpu_ivf
        except RuntimeError as exc:
            print(f"faiss-gpu d={d} PQ{M}: {str(exc).strip().splitlines()[-1]}")
    pinned = None
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", default="384,768,1536")
    ap.add_argument("--bytes", default="32,64,96", help="PQ sub-quantizers (8 bits each = bytes per vector)")
    ap.add_argument("--rows", type=int, default=None, help="vectors per config (default 1M with a GPU, 100k without)")
    ap.add_argument("--cpu-rows", type=int, default=200_000, help="vectors for the CPU engines (default %(default)s)")
    ap.add_argument("--quick", action="store_true", help="20k vectors, one repeat")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--engines", default="", help="extra CPU engines: numpy")
    ap.add_argument("--results", default="benchmarks/results/gpu_encode.json")
    args = ap.parse_args()
    gpu = gpu_count() > 0
    n = 20_000 if args.quick else args.rows or (1_000_000 if gpu else 100_000)
    n_cpu = min(n, args.cpu_rows)
    repeat = 1 if args.quick else args.repeat
    engines = set(args.engines.split(",")) if args.engines else set()
    all_rows = []
    for d in map(int, args.dims.split(",")):
        for M in map(int, args.bytes.split(",")):
            if d % M:
                continue
            all_rows += run_config(d, M, n, n_cpu, repeat, engines)
            print(f"done d={d} PQ{M}", flush=True)
    device = "cpu only"
    if gpu:
        from vecpress.kernels.gpu_encode import cupy_module

        props = cupy_module().cuda.runtime.getDeviceProperties(0)
        device = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    print(f"\nPQ encode, {n:,} vectors per config ({n_cpu:,} for CPU engines), {os.cpu_count()} CPU cores, "
          f"device: {device}")
    print(f"{'d':>5} {'bytes':>5} {'engine':<12}{'M vec/s':>9}{'GB/s':>8}{'agree':>9}{'/h2d':>7}")
    for r in all_rows:
        agree = "" if r["agree"] is None else f"{r['agree']:.5f}"
        ratio = f"{r['vs_h2d']:.2f}" if "vs_h2d" in r else ""
        print(f"{r['d']:>5} {r['bytes']:>5} {r['engine']:<12}{r['vectors_per_s'] / 1e6:>9.3f}"
              f"{r['gb_per_s']:>8.2f}{agree:>9}{ratio:>7}")
    write_results(args.results, {"cpus": os.cpu_count(), "machine": platform.machine(), "device": device,
                                 "n": n, "n_cpu": n_cpu, "rows": all_rows})


if __name__ == "__main__":
    main()
