"""How many corpus rows does the advisor's second stage need to sweep? With --max-bytes it
trains the first stage's front-runners on the whole sample and sweeps about
SECOND_STAGE_ROWS rows of the corpus (pipeline.preselect) to rank them; the evaluate stage
then measures the pick over every row. Encoding those rows is most of the second stage's
cost past the pick's training (a residual quantizer of 64 stages encodes ~34,000 rows a
second on 2 cores at 128-d).

This trains every candidate of the default grid within the budget on the whole sample, as
the second stage does, encodes a base of --base rows once, and ranks the candidates over its
first n rows for several n (the generated rows are independent draws, so the first n are as
good a part as rows spread over a file set). For each n: the pick (the best recall@10 within
the budget), its recall over all --base rows against the best there, the best's lead over
the best of another family, and how many of the pairs within 0.02 of each other over all
rows keep their order (ties as ties).

    python benchmarks/second_stage.py --dim 128 --budget 64

Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
from _data import add_data_option, generator  # noqa: E402
from _results import write_results  # noqa: E402

from vecpress.kernels.codecs.grid import default_grid  # noqa: E402
from vecpress.kernels.codecs.nested import encode_all, nesting  # noqa: E402
from vecpress.kernels.knn import exact_knn, prepare_vectors  # noqa: E402
from vecpress.kernels.metrics import knn_hits  # noqa: E402
from vecpress.pipeline.sweep import load_trained, train_candidates  # noqa: E402


def recalls(codecs: dict, codes: dict, base: np.ndarray, q: np.ndarray, n: int) -> dict[str, float]:
    """{spec: recall@10 of its codes of base[:n] against the exact neighbours there}."""
    _, exact = exact_knn(prepare_vectors(q, "cosine"), prepare_vectors(base[:n], "cosine"), 10, "cosine")
    out = {}
    for spec, codec in codecs.items():
        _, found = codec.search_codes(q, codes[spec][:n], 10)
        hit, true = knn_hits(exact, found, 10)
        out[spec] = float(hit.sum() / true.sum())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--budget", type=int, default=64, help="the grid's candidates within this many bytes")
    ap.add_argument("--num-train", type=int, default=100_000, help="the training sample")
    ap.add_argument("--base", type=int, default=200_000, help="the corpus rows the codes are searched over")
    ap.add_argument("--rows", default="12500,25000,50000,100000", help="the parts of the base ranked over")
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--seed", type=int, default=5, help="the corpus's seed")
    add_data_option(ap)
    ap.add_argument("--clusters", type=int, default=300, help="the corpus's clusters, with --data clustered (more: families closer)")
    ap.add_argument("--results", default="benchmarks/results/second_stage.json")
    args = ap.parse_args()
    x = generator(args.data, args.dim, args.seed, args.clusters).batch(
        0, args.num_train + args.base + args.queries)
    xt, base, q = x[:args.num_train], x[args.num_train:-args.queries], x[-args.queries:]
    specs = default_grid(args.dim, "cosine", min_bytes=8, max_bytes=args.budget)
    start = time.perf_counter()
    trained = train_candidates(specs, xt, "cosine", seed=0, ngpu=0, failed=[])
    train_s = time.perf_counter() - start
    codecs = {tc.spec: load_trained(tc, "cosine") for tc in trained}
    start = time.perf_counter()
    codes = {spec: c for spec, (c, _) in zip(codecs, encode_all(list(codecs.values()), base))}
    encode_s = time.perf_counter() - start
    full = recalls(codecs, codes, base, q, len(base))
    best = max(full, key=full.get)
    # the best of another family (a residual quantizer's shorter lengths are its own first stages)
    heads = nesting(list(full), args.dim, greedy=True)
    family = {best} | {s for s, h in heads.items() if h == heads.get(best, best)} | {heads.get(best, best)}
    rival = max((s for s in full if s not in family), key=full.get)
    close = [(a, b) for a, b in itertools.combinations(full, 2) if abs(full[a] - full[b]) <= 0.02]
    rows = []
    for n in [int(v) for v in args.rows.split(",")] + [len(base)]:
        part = recalls(codecs, codes, base, q, n) if n < len(base) else full
        pick = max(part, key=part.get)
        kept = sum(bool(np.sign(part[a] - part[b]) == np.sign(full[a] - full[b])) for a, b in close)
        rows.append({"rows": n, "pick": pick, "pick_recall_all_rows": round(full[pick], 4),
                     "rival": rival, "lead_over_rival": round(part[best] - part[rival], 4),
                     "loss": round(full[best] - full[pick], 4), "close_pairs": len(close), "close_pairs_kept": kept,
                     "recalls": {s: round(r, 4) for s, r in part.items()}})
    print(f"\n{args.dim}-d (cosine, {args.clusters} clusters), {len(codecs)} candidates within {args.budget} B "
          f"trained on {args.num_train:,} rows ({train_s:.0f} s), {len(base):,} base rows encoded ({encode_s:.0f} s), "
          f"{args.queries} queries; "
          f"best over all rows {best} ({full[best]:.4f})\n")
    print(f"| rows ranked over | pick | its recall@10 over all rows | below the best | {best}'s lead over {rival} "
          "| close pairs in order |")
    print("| ---: | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['rows']:,} | {r['pick']} | {r['pick_recall_all_rows']:.4f} | {r['loss']:.4f} | "
              f"{r['lead_over_rival']:+.4f} | {r['close_pairs_kept']} of {r['close_pairs']} |")
    write_results(args.results, {"args": vars(args), "machine": platform.platform(), "train_seconds": round(train_s, 1),
                                 "encode_seconds": round(encode_s, 1), "best": best, "rows": rows})


if __name__ == "__main__":
    main()
