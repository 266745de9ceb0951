"""PQ encode throughput, kernel level: vecpress's encoders against faiss and the copy floor.

    python benchmarks/gpu_encode.py            # d in {384, 768, 1536} x PQ {32, 64, 96} bytes
    python benchmarks/gpu_encode.py --quick    # small n, for a smoke run

For each (d, bytes) it times, on the same vectors (clustered, float32) and the same codebook:
  faiss-cpu    faiss IndexPQ.sa_encode, all threads
  numpy        kernels.pq_encode numpy reference (blocked GEMM + argmin)
  torch-cpu    the torch kernel on the CPU                       (if torch is installed)
and with CUDA (torch sees a GPU):
  h2d-pinned   host->GPU copy of the same bytes from pinned memory (the floor to compare with)
  cuda-pinned  encode_pq from a pinned host tensor (double-buffered copies + kernel + codes back)
  cuda-host    encode_pq from a pageable numpy array (staged through pinned buffers)
  cuda-dev     the kernel on data already on the GPU
  faiss-gpu    faiss GpuIndexIVFPQ with one list (centroid 0, so residual = x), add() as encoder
                                                                  (if faiss sees a GPU)
The codebook is sampled from the data, not trained: encode speed does not depend on it.
`agree` is the share of sub-vector codes equal to faiss CPU's. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

from kernels._faiss import faiss, num_gpus
from kernels.pq_encode import cuda_device_count, device_tables, encode_block_torch, encode_pq
from kernels.synthetic import ClusteredEmbeddings


def best_of(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


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


def cuda_timer(torch, fn, repeat: int) -> float:
    fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeat):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        best = min(best, start.elapsed_time(stop) / 1e3)
    return best


def run_config(d: int, M: int, n: int, repeat: int, engines: set[str]) -> list[dict]:
    x = ClusteredEmbeddings(d, seed=d).batch(0, n)
    centroids = sampled_codebook(x[: min(n, 50_000)], M)
    index = faiss_pq(d, M, centroids)
    want = index.sa_encode(x)
    rows = []

    def add(engine, seconds, codes=None, **extra):
        agree = None if codes is None else float((codes == want).mean())
        rows.append({"d": d, "bytes": M, "n": n, "engine": engine, "seconds": seconds,
                     "vectors_per_s": n / seconds, "gb_per_s": n * d * 4 / seconds / 1e9, "agree": agree, **extra})

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    add("faiss-cpu", best_of(lambda: index.sa_encode(x), repeat), want, threads=faiss.omp_get_max_threads())
    if "numpy" in engines:
        out = {}
        add("numpy", best_of(lambda: out.setdefault("c", encode_pq(x, centroids, 8)), repeat), out["c"])
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None and "torch-cpu" in engines:
        out = {}
        add("torch-cpu", best_of(lambda: out.update(c=encode_pq(x, centroids, 8, engine="torch")), repeat), out["c"],
            threads=torch.get_num_threads())
    if torch is None or cuda_device_count() == 0:
        return rows
    pinned = torch.from_numpy(x).pin_memory()
    dev_x = torch.empty_like(pinned, device="cuda")
    copy_s = cuda_timer(torch, lambda: dev_x.copy_(pinned, non_blocking=True), repeat)
    add("h2d-pinned", copy_s, None)
    out = {}
    s = best_of(lambda: out.update(c=encode_pq(pinned, centroids, 8, device="cuda")), repeat)
    add("cuda-pinned", s, out["c"], vs_pinned_copy=copy_s / s)
    s = best_of(lambda: out.update(c=encode_pq(x, centroids, 8, device="cuda")), repeat)
    add("cuda-host", s, out["c"], vs_pinned_copy=copy_s / s)
    ct, cnorm = device_tables(centroids, "cuda")
    block = 1 << 14
    with torch.inference_mode():
        def on_device():
            for lo in range(0, n, block):
                encode_block_torch(dev_x[lo:lo + block], ct, cnorm, 8)
        s = cuda_timer(torch, on_device, repeat)
    add("cuda-dev", s, None, vs_pinned_copy=copy_s / s)
    if num_gpus() > 0:
        res = faiss.StandardGpuResources()
        quantizer = faiss.IndexFlatL2(d)
        quantizer.add(np.zeros((1, d), np.float32))
        cpu_ivf = faiss.IndexIVFPQ(quantizer, d, 1, M, 8)
        faiss.copy_array_to_vector(centroids.ravel(), cpu_ivf.pq.centroids)
        cpu_ivf.is_trained = True
        try:  # faiss GPU IVFPQ supports only some sub-vector sizes and code sizes
            gpu_ivf = faiss.index_cpu_to_gpu(res, 0, cpu_ivf)

            def faiss_gpu_add():
                gpu_ivf.reset()
                gpu_ivf.add(x)
                torch.cuda.synchronize()
            s = best_of(faiss_gpu_add, repeat)
            add("faiss-gpu", s, None, vs_pinned_copy=copy_s / s)
        except RuntimeError as exc:
            print(f"faiss-gpu d={d} PQ{M}: {str(exc).strip().splitlines()[-1]}")
    del dev_x, pinned
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", default="384,768,1536")
    ap.add_argument("--bytes", default="32,64,96", help="PQ sub-quantizers (8 bits each = bytes per vector)")
    ap.add_argument("--rows", type=int, default=None, help="vectors per config (default 1M on CUDA, 100k on CPU)")
    ap.add_argument("--quick", action="store_true", help="20k vectors, one repeat")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--engines", default="numpy,torch-cpu", help="CPU engines besides faiss-cpu")
    ap.add_argument("--results", default="benchmarks/results/gpu_encode.json")
    args = ap.parse_args()
    cuda = cuda_device_count() > 0
    n = 20_000 if args.quick else args.rows or (1_000_000 if cuda else 100_000)
    repeat = 1 if args.quick else args.repeat
    engines = set(args.engines.split(",")) if args.engines else set()
    all_rows = []
    for d in map(int, args.dims.split(",")):
        for M in map(int, args.bytes.split(",")):
            if d % M:
                continue
            all_rows += run_config(d, M, n, repeat, engines)
    head = f"{'d':>5} {'bytes':>5} {'engine':<12}{'M vec/s':>9}{'GB/s':>8}{'agree':>8}{'/h2d':>7}"
    print(f"\nPQ encode, {n:,} vectors per config, {os.cpu_count()} CPU cores, CUDA: {cuda}")
    print(head)
    for r in all_rows:
        agree = "" if r["agree"] is None else f"{r['agree']:.5f}"
        ratio = f"{r['vs_pinned_copy']:.2f}" if "vs_pinned_copy" in r else ""
        print(f"{r['d']:>5} {r['bytes']:>5} {r['engine']:<12}{r['vectors_per_s'] / 1e6:>9.3f}"
              f"{r['gb_per_s']:>8.2f}{agree:>8}{ratio:>7}")
    device = "cpu only"
    if cuda:
        import torch
        device = torch.cuda.get_device_name(0)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps({"cpus": os.cpu_count(), "machine": platform.machine(), "device": device,
                                              "n": n, "rows": all_rows}, indent=1))
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
