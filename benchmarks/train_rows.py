"""Does the advisor's second stage need the whole sample to judge a front-runner? It trains each
on the rows past which its kind of codec comes out no better (pipeline.preselect.
second_stage_rows, kernels.codecs.build.rows_to_train): PQ_ROWS_PER_PARAMETER rows per
parameter of a product quantizer's k-means (PQ64 at 768-d: 24,576), the first stage's own
training (STAGE1_TRAIN_ROWS rows) where that is as many, and the whole sample only for
residual and additive quantizers.

This trains every candidate of the default grid within --max-bytes but the residual ones
three times: on those rows (as the second stage does), and on the whole --num-train sample
with two seeds, the second seed giving the training's own noise. Each is judged the same way:
its codes of --base held-out rows searched for --queries held-out queries, recall@10 against
their exact neighbours there (cosine).

    python benchmarks/train_rows.py --dims 128,384,768 --data powerlaw

Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from _data import add_data_option, generator  # noqa: E402
from _results import write_results  # noqa: E402

from vecpress.kernels.codecs.codec import Codec  # noqa: E402
from vecpress.kernels.codecs.grid import default_grid  # noqa: E402
from vecpress.kernels.knn import exact_knn, prepare_vectors  # noqa: E402
from vecpress.kernels.metrics import knn_hits  # noqa: E402
from vecpress.pipeline import preselect as ps  # noqa: E402
from vecpress.pipeline.sampling import sample_subset  # noqa: E402


def judged(xt, spec: str, seed: int, base, q, exact) -> tuple[float, float]:
    """(recall@10 of `spec` trained on xt with `seed`, its training seconds)."""
    start = time.perf_counter()
    codec = Codec.train(xt, spec, "cosine", seed=seed)
    seconds = time.perf_counter() - start
    _, found = codec.search_codes(q, codec.encode(base), 10)
    hit, true = knn_hits(exact, found, 10)
    return round(float(hit.sum() / true.sum()), 4), round(seconds, 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", default="128,384,768")
    ap.add_argument("--num-train", type=int, default=100_000)
    ap.add_argument("--base", type=int, default=50_000)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--min-bytes", type=int, default=8)
    ap.add_argument("--max-bytes", type=int, default=64)
    add_data_option(ap)
    ap.add_argument("--results", default="benchmarks/results/train_rows.json")
    args = ap.parse_args()
    n1 = min(ps.STAGE1_TRAIN_ROWS, args.num_train // 2)
    rows = []
    for dim in map(int, args.dims.split(",")):
        x = generator(args.data, dim, seed=5).batch(0, args.num_train + args.base + args.queries)
        xt, base, q = x[:args.num_train], x[args.num_train:-args.queries], x[-args.queries:]
        _, exact = exact_knn(prepare_vectors(q, "cosine"), prepare_vectors(base, "cosine"), 10, "cosine")
        for spec in default_grid(dim, "cosine", min_bytes=args.min_bytes, max_bytes=args.max_bytes):
            n = ps.second_stage_rows(spec, dim, "cosine", n1, len(xt))
            if n == len(xt):
                continue  # (trained on the whole sample: residual quantizers)
            ours, ours_s = judged(xt[sample_subset(len(xt), n, 0)], spec, 0, base, q, exact)
            whole, whole_s = judged(xt, spec, 0, base, q, exact)
            other, _ = judged(xt, spec, 1, base, q, exact)
            row = {"dim": dim, "codec": spec, "train_rows": n, "first_stage_rows": n == n1, "recall_at_10": ours,
                   "train_seconds": ours_s, "whole_recall_at_10": whole, "whole_train_seconds": whole_s,
                   "whole_other_seed_recall_at_10": other, "behind_whole": round(whole - ours, 4),
                   "seed_noise": round(abs(whole - other), 4)}
            rows.append(row)
            print(row, flush=True)
    print(f"\n{args.data}, cosine; {args.num_train:,}-row sample, {args.base:,} base rows, {args.queries} queries\n")
    print("| dim | codec | rows trained on | recall@10 | whole sample (seed 0 / 1) | behind whole | seed noise | "
          "train s (whole) |")
    print("| ---: | --- | ---: | ---: | --- | ---: | ---: | --- |")
    for r in rows:
        print(f"| {r['dim']} | {r['codec']} | {r['train_rows']:,}{' (first stage)' if r['first_stage_rows'] else ''} | "
              f"{r['recall_at_10']:.3f} | {r['whole_recall_at_10']:.3f} / {r['whole_other_seed_recall_at_10']:.3f} | "
              f"{r['behind_whole']:+.3f} | {r['seed_noise']:.3f} | {r['train_seconds']} ({r['whole_train_seconds']}) |")
    worst = max(rows, key=lambda r: r["behind_whole"] - r["seed_noise"], default=None)
    if worst:
        print(f"\nfurthest behind the whole sample past its seed noise: {worst['dim']}-d {worst['codec']}, "
              f"{worst['behind_whole']:+.3f} (noise {worst['seed_noise']:.3f})")
    write_results(args.results, {"args": vars(args), "machine": platform.platform(), "rows": rows})


if __name__ == "__main__":
    main()
