"""A residual quantizer's greedy encoding (beam 1): vecpress's encode_greedy (one matrix product
per stage of 1,024-row blocks, the blocks on every core) against a faiss flat index's search per
stage (what encode_greedy did before), and faiss's own encoder (a beam search of width 1).

    python benchmarks/greedy_encode.py --rows 50000 --dims 128,384,768 --stages 32

Codebooks of rows of the corpus (`--data`) other than those encoded, scaled down stage by
stage (what a trained RQ's look like to the encoder's cost), rows encoded in Codec.encode's
blocks (kernels.codecs.codec.encode_block_rows), each way alternately, `--repeats` times, the
fastest kept; with as many faiss threads as the machine has, and with 1 (a Ray task of 1 CPU).
Prints a table (seconds, and the share of bytes that differ from the flat index's codes:
near-ties), writes JSON.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np
from _data import add_data_option, generator
from _results import write_results

from vecpress.kernels._faiss import faiss
from vecpress.kernels.codecs.codec import encode_block_rows
from vecpress.kernels.codecs.residual import encode_greedy


def flat_index_greedy(books: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Before: per stage the nearest centroid by a faiss flat index's search of 4,096-row blocks."""
    indexes = []
    for book in books:
        index = faiss.IndexFlatL2(books.shape[2])
        index.add(np.ascontiguousarray(book))
        indexes.append(index)
    codes = np.empty((len(x), len(books)), np.uint8)
    for i in range(0, len(x), 4096):
        residual = x[i:i + 4096].copy()
        for m, (index, book) in enumerate(zip(indexes, books)):
            nearest = index.search(residual, 1)[1][:, 0]
            codes[i:i + 4096, m] = nearest
            residual -= book[nearest]
    return codes


def faiss_encoder(books: np.ndarray, x: np.ndarray) -> np.ndarray:
    m, k, d = books.shape
    rq = faiss.ResidualQuantizer(d, m, 8)
    faiss.copy_array_to_vector(books.ravel(), rq.codebooks)
    rq.is_trained, rq.max_beam_size = True, 1
    rq.search_type = faiss.AdditiveQuantizer.ST_decompress
    rq.set_derived_values()
    return rq.compute_codes(np.ascontiguousarray(x, dtype=np.float32))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--dims", default="128,384,768")
    ap.add_argument("--stages", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--results", default="benchmarks/results/greedy_encode.json")
    add_data_option(ap)
    args = ap.parse_args()
    ways = {"flat index per stage (before)": flat_index_greedy, "encode_greedy (now)": encode_greedy,
            "faiss's encoder, beam 1": faiss_encoder}
    rows, cores = [], os.cpu_count() or 1
    for dim in map(int, args.dims.split(",")):
        x = generator(args.data, dim, seed=5).batch(0, args.rows + 256 * args.stages)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        # (each stage's centroids other rows than those encoded, smaller stage by stage: no row is a centroid)
        books = (x[args.rows:].reshape(args.stages, 256, dim) * 0.5 ** (np.arange(args.stages) / 8)[:, None, None])
        books, x = np.ascontiguousarray(books, dtype=np.float32), x[:args.rows]
        block = encode_block_rows(dim)
        for threads in sorted({cores, 1}, reverse=True):
            faiss.omp_set_num_threads(threads)
            best, codes = {}, {}
            for _ in range(args.repeats):
                for name, way in ways.items():
                    start = time.perf_counter()
                    codes[name] = np.concatenate([way(books, x[i:i + block]) for i in range(0, len(x), block)])
                    best[name] = min(best.get(name, np.inf), time.perf_counter() - start)
            base = codes["flat index per stage (before)"]
            for name in ways:
                rows.append({"dim": dim, "threads": threads, "way": name, "seconds": round(best[name], 3),
                             "rows_per_second": round(args.rows / best[name]),
                             "bytes_differing": float(f"{(codes[name] != base).mean():.2g}")})
                print(rows[-1], flush=True)
    faiss.omp_set_num_threads(cores)
    print(f"\nRQ{args.stages}x8 greedy encoding of {args.rows:,} rows ({args.data}, unit rows), {cores} CPUs\n")
    print("| dim | threads | way | seconds | rows/s | bytes differing from the flat index's |")
    print("| ---: | ---: | --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['dim']} | {r['threads']} | {r['way']} | {r['seconds']} | {r['rows_per_second']:,} | "
              f"{r['bytes_differing']} |")
    write_results(args.results, {"rows": args.rows, "stages": args.stages, "data": args.data, "cpus": cores,
                                 "machine": platform.processor() or platform.machine(), "results": rows})


if __name__ == "__main__":
    main()
