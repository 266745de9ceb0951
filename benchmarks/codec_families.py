"""Recall@10 against bytes for every codec family, with training time: the real SIFT sample
(128-d, L2) and a generated 384-d embedding set (cosine), each codec trained on the base
rows and searched the way vecpress searches stored codes (`Codec.search_codes`: ADC, or
the codec's own search for RaBitQ and fast-scan PQ) for held-out queries, against their exact
neighbours among the base rows.

    python benchmarks/codec_families.py                       # both sets, the default specs
    python benchmarks/codec_families.py --sets sift --specs 'PQ16;SQeden4'
    python benchmarks/codec_families.py --sets text384,sift-cosine   # cosine: both rankings

Under cosine, each codec's recall is also given as vecpress ranked the codes before it ranked
them by L2 to their reconstruction: by the inner product with it ("R@10 by IP").
Prints a table per set, writes JSON.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
from _results import write_results

from vecpress.kernels._faiss import faiss
from vecpress.kernels.codecs.build import code_size_of
from vecpress.kernels.codecs.codec import Codec
from vecpress.kernels.codecs.search import search_codes
from vecpress.kernels.codecs.spec import CodecSpecError
from vecpress.kernels.knn import prepare_vectors
from vecpress.kernels.metrics import knn_recall, relative_error
from vecpress.kernels.synthetic import ClusteredEmbeddings

SIFT = Path(__file__).resolve().parents[2] / "shared" / "data" / "sift5k" / "sift-dataset-5k.tsv"
SPECS = {
    "sift": "PQ8;PQ16;PQ32;OPQ16,PQ16;PQ32x4fs;RQ8x8,beam=1;RQ16x8,beam=1;LSQ8x8,ils=4;SQ4;SQ8;SQeden2;SQeden4;"
            "RR128,SQeden4;SQtq2;SQtq4;RaBitQ;RaBitQ2;RaBitQ4;BIN",
    "sift-cosine": "PQ8;PQ16;PQ32;PQ32x4fs;RQ8x8,beam=1;RQ16x8,beam=1;LSQ8x8,ils=4;SQ4;SQ8;SQeden2;SQeden4;"
                   "SQtqmse2;SQtqmse4;RaBitQ;RaBitQ4;BIN",
    "text384": "PQ16;PQ48;PQ64;PQ96x4fs;PQ128x4fs;PCA64,RQ8x8,beam=1;RQ16x8,beam=1;RQ32x8,beam=1;RQ48x8,beam=1;"
               "RQ64x8,beam=1;SQ4;SQ8;SQeden1;SQeden2;SQeden4;SQtqmse1;"
               "SQtqmse2;SQtqmse4;RaBitQ;RaBitQ4;BIN;MRL192,SQ8",
}


def load_set(name: str, queries: int):
    """(base, queries, metric) of a set."""
    if name in ("sift", "sift-cosine"):
        if not SIFT.exists():
            raise SystemExit(f"the SIFT sample is not at {SIFT}")
        x = np.ascontiguousarray(np.loadtxt(SIFT, delimiter="\t", dtype=np.float32)[:, :-1])
        rng = np.random.default_rng(0)
        held = rng.choice(len(x), queries, replace=False)
        return np.delete(x, held, axis=0), x[held], "l2" if name == "sift" else "cosine"
    gen = ClusteredEmbeddings(384, seed=3, num_clusters=200)
    return gen.batch(0, 30_000), gen.batch(1_000_000, queries), "cosine"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default="sift,text384")
    ap.add_argument("--specs", default=None, help="semicolon-separated specs (default: each set's list)")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--results", default="benchmarks/results/codec_families.json")
    args = ap.parse_args()
    out = {"machine": platform.platform(), "cpus": os.cpu_count(), "faiss": faiss.__version__, "sets": {}}
    for name in args.sets.split(","):
        xb, xq, metric = load_set(name, args.queries)
        exact = faiss.knn(prepare_vectors(xq, metric), prepare_vectors(xb, metric), 10,
                          metric=faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT)[1]
        rows = []
        for spec in (args.specs or SPECS[name]).split(";"):
            try:
                size = code_size_of(spec, xb.shape[1], metric)
            except CodecSpecError as exc:
                print(f"{name}: {spec}: {exc}")
                continue
            start = time.perf_counter()
            codec = Codec.train(xb, spec, metric, seed=0)
            train_s = time.perf_counter() - start
            codes = codec.encode(xb)
            _, I = codec.search_codes(xq, codes, 10)
            by_ip = {}
            if metric == "cosine":  # (as vecpress searched cosine codes before: by the inner product)
                _, I_ip = search_codes(codec.index, "ip", prepare_vectors(xq, metric), codes, 10)
                by_ip = {"recall_at_10_by_ip": round(knn_recall(exact, I_ip, 10), 4)}
            rows.append({"codec": spec, "code_bytes": size, "recall_at_10": round(knn_recall(exact, I, 10), 4), **by_ip,
                         "relative_error": round(relative_error(prepare_vectors(xq, metric),
                                                                codec.decode(codec.encode(xq))), 4),
                         "train_seconds": round(train_s, 2)})
            print(f"{name}: {rows[-1]}", flush=True)
        rows.sort(key=lambda r: (r["code_bytes"], -r["recall_at_10"]))
        out["sets"][name] = {"rows": len(xb), "dim": xb.shape[1], "metric": metric, "queries": len(xq),
                             "codecs": rows}
        print(f"\n{name}: {len(xb):,} x {xb.shape[1]}-d, {metric}, {len(xq)} held-out queries\n")
        ip = metric == "cosine"
        print("| codec | bytes | recall@10 |" + (" R@10 by IP |" if ip else "") + " relative error | train s |")
        print("| --- | ---: | ---: |" + (" ---: |" if ip else "") + " ---: | ---: |")
        for r in rows:
            print(f"| {r['codec']} | {r['code_bytes']} | {r['recall_at_10']:.3f} |"
                  + (f" {r['recall_at_10_by_ip']:.3f} |" if ip else "")
                  + f" {r['relative_error']:.4f} | {r['train_seconds']:.2f} |")
    write_results(args.results, out)


if __name__ == "__main__":
    main()
