"""Does a first-stage lead hold at full size? The advisor's first stage (pipeline.preselect)
trains every candidate on STAGE1_TRAIN_ROWS rows and judges it on STAGE1_BASE_ROWS others;
this trains the same candidates on the whole sample and judges them over a base ten times
larger, then compares, for every pair the first stage ranks, its lead there with the lead at
full size.

    python benchmarks/first_stage.py --dim 128 --budget 32
    python benchmarks/first_stage.py --dim 768 --budget 32 --data powerlaw --stages 10000x20000,10000x200000

Pairs are split by which of the two has the k-means that fits more parameters
(kernels.codecs.build.codebook_parameters: centroids times the dims each spans): the first
stage judges that one on fewer training rows per parameter, the more roughly. The question is whether such a "rougher"
leader's lead keeps its sign at full size once it is ROUGH_LEAD_Z standard errors of the
per-query difference or more (the rule preselect applies inside LEAD_MARGIN), and whether the
other way round it does not. Prints a table, writes JSON.
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
from vecpress.kernels.knn import exact_knn, prepare_vectors  # noqa: E402
from vecpress.kernels.metrics import difference_standard_error  # noqa: E402
from vecpress.pipeline import preselect as ps  # noqa: E402


def judge(specs: list[str], xt: np.ndarray, base: np.ndarray, q: np.ndarray, seed: int) -> tuple[dict, dict]:
    """({spec: row}, {spec: per-query recall@10}): the first stage's own judgement."""
    _, exact = exact_knn(prepare_vectors(q, "cosine"), prepare_vectors(base, "cosine"), 10, "cosine")
    hits: dict = {}
    rows, _ = ps._judge(specs, xt=xt, base=base, q=q, exact=exact, metric="cosine", seed=seed, ngpu=0, hits=hits,
                        seen={}, encoded={})
    return rows, hits


def summarise(pairs: list[dict]) -> dict:
    """Per kind of leader (the rougher of the two or not): the pairs it leads by more than
    ROUGH_LEAD_Z standard errors (all of them, and those within LEAD_MARGIN, which the rule
    decides), how many kept their sign at full size, and the least full-size lead."""
    out = {}
    for rougher in (True, False):
        for scope in ("all", "within_margin"):
            beyond = [p for p in pairs if p["rougher_leader"] == rougher and p["standard_errors"] > ps.ROUGH_LEAD_Z
                      and p["first_stage_lead"] > ps.MIN_LEAD
                      and (scope == "all" or p["first_stage_lead"] <= ps.LEAD_MARGIN)]
            out[f"{'rougher' if rougher else 'other'}_leader_{scope}"] = {
                "pairs": len(beyond), "kept_sign": sum(p["full_size_lead"] > 0 for p in beyond),
                "least_full_size_lead": min((p["full_size_lead"] for p in beyond), default=None)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--budget", type=int, default=32, help="the grid's candidates within this many bytes")
    ap.add_argument("--num-train", type=int, default=100_000, help="the full-size training sample")
    ap.add_argument("--base", type=int, default=200_000, help="rows the full-size codes are searched over")
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--seed", type=int, default=5, help="the corpus's seed")
    ap.add_argument("--stages", default=f"{ps.STAGE1_TRAIN_ROWS}x{ps.STAGE1_BASE_ROWS}",
                    help="first stages to compare, TRAINxBASE rows, comma-separated (default: the advisor's own); "
                         "e.g. 10000x20000,10000x200000,100000x20000 tells the training rows' effect from the base's")
    add_data_option(ap)
    ap.add_argument("--results", default="benchmarks/results/first_stage.json")
    args = ap.parse_args()
    stages = [tuple(map(int, s.split("x"))) for s in args.stages.split(",")]
    stages = [(min(t, args.num_train), min(b, args.base)) for t, b in stages]  # (a toy run's smaller sets)
    n = args.num_train + args.base + args.queries
    x = generator(args.data, args.dim, args.seed).batch(0, n)
    xt, base, q = x[:args.num_train], x[args.num_train:-args.queries], x[-args.queries:]
    specs = default_grid(args.dim, "cosine", max_bytes=args.budget)
    start = time.perf_counter()
    full, _ = judge(specs, xt, base, q, 0)
    timed = {"full_size_seconds": round(time.perf_counter() - start, 1)}
    results = []
    for train_rows, base_rows in stages:
        start = time.perf_counter()
        small, small_hits = judge(specs, xt[:train_rows], base[:base_rows], q[:ps.STAGE1_QUERIES], 0)
        seconds = round(time.perf_counter() - start, 1)
        pairs = compare(small, small_hits, full)
        print(f"\n{args.dim}-d (cosine), candidates within {args.budget} B: first stage {train_rows:,} training "
              f"rows, {base_rows:,} base rows, {ps.STAGE1_QUERIES} queries; full size {args.num_train:,}, "
              f"{args.base:,}, {args.queries}; {os.cpu_count()} CPUs\n")
        print("| leader | rival | leader rougher | centroids | parameters | first-stage lead | standard errors "
              "| full-size lead |")
        print("| --- | --- | --- | --- | --- | ---: | ---: | ---: |")
        for p in pairs:
            if p["first_stage_lead"] <= ps.LEAD_MARGIN:
                print(f"| {p['leader']} | {p['rival']} | {'yes' if p['rougher_leader'] else 'no'} | "
                      f"{p['centroids'][0]} vs {p['centroids'][1]} | {p['parameters'][0]} vs {p['parameters'][1]} | "
                      f"{p['first_stage_lead']:.4f} | "
                      f"{p['standard_errors']} | {p['full_size_lead']:+.4f} |")
        summary = summarise(pairs)
        print(f"\nleads beyond {ps.ROUGH_LEAD_Z} standard errors, all and those within LEAD_MARGIN: {summary}")
        print(f"first stage {seconds} s; {timed}")
        results.append({"train_rows": train_rows, "base_rows": base_rows, "seconds": seconds, "summary": summary,
                        "first_stage": list(small.values()), "pairs": pairs})
    write_results(args.results, {"args": vars(args), "machine": platform.platform(), **timed,
                                 "full_size": list(full.values()), "stages": results})


def compare(small: dict, small_hits: dict, full: dict) -> list[dict]:
    """Every pair the first stage ranks (leader first): its lead there, in standard errors of
    the per-query difference, and the same pair's lead at full size."""
    pairs = []
    for a, b in itertools.permutations(sorted(set(small) & set(full)), 2):
        ra, rb = small[a], small[b]
        if "error" in ra or "error" in rb or "error" in full[a] or "error" in full[b]:
            continue
        lead = ra["recall_at_10"] - rb["recall_at_10"]
        if lead <= 0:
            continue
        se = difference_standard_error(small_hits[a], small_hits[b])
        centroids = [ra["centroids_per_codebook"], rb["centroids_per_codebook"]]
        parameters = [ra["codebook_parameters"], rb["codebook_parameters"]]
        pairs.append({"leader": a, "rival": b, "rougher_leader": parameters[0] > parameters[1], "centroids": centroids,
                      "parameters": parameters,
                      "first_stage_lead": round(lead, 4), "standard_errors": round(lead / max(se, 1e-9), 1),
                      "full_size_lead": round(full[a]["recall_at_10"] - full[b]["recall_at_10"], 4)})
    pairs.sort(key=lambda p: (not p["rougher_leader"], p["first_stage_lead"]))
    return pairs


if __name__ == "__main__":
    main()
