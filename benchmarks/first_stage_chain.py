"""How the advisor's first stage judges the residual family (pipeline.preselect), per corpus
and budget: the recall@10 each length of the family reaches there (what each doubling of its
stages gains), and, per budget, the lengths the first stage trained, its seconds and its
front-runners.

    python benchmarks/first_stage_chain.py --dims 128,384,768 --budgets 32,48,64 --data powerlaw

The first stage's own sample split: STAGE1_TRAIN_ROWS training rows, STAGE1_BASE_ROWS base
rows, STAGE1_QUERIES queries, all drawn from the generated corpus (`--data`, cosine). The
gains are what `_goes_on_as_it_is` leans on: a doubling gains less than the one before it.
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

from vecpress.kernels.codecs.grid import held_by_finer  # noqa: E402
from vecpress.kernels.knn import exact_knn, prepare_vectors  # noqa: E402
from vecpress.pipeline import preselect as ps  # noqa: E402
from vecpress.pipeline.sweep import candidate_specs  # noqa: E402

LENGTHS = (4, 8, 16, 32, 64)


def family_recalls(xt, base, q) -> dict[str, float]:
    """{RQ<m>x8: its first-stage recall@10} for each of LENGTHS (one training, the rest cut)."""
    _, exact = exact_knn(prepare_vectors(q, "cosine"), prepare_vectors(base, "cosine"), 10, "cosine")
    specs = [f"RQ{m}x8,beam=1" for m in reversed(LENGTHS)]
    rows, _ = ps._judge(specs, xt=xt, base=base, q=q, exact=exact, metric="cosine", seed=0, ngpu=0, hits={}, seen={},
                        encoded={})
    return {s.split(",")[0]: rows[s]["recall_at_10"] for s in reversed(specs)}


def first_stage(dim: int, budget: int, xt, xq) -> dict:
    """The first stage as `compress --codec auto --max-bytes budget` runs it on this sample."""
    specs = candidate_specs(dim, "cosine", len(xt), codecs=None, budgets=[budget])
    held = held_by_finer(specs)
    start = time.perf_counter()
    kept, record, _ = ps.preselect([s for s in specs if s not in held], xt, xq, metric="cosine", seed=0, ngpu=0,
                                max_bytes=budget, min_recall=None)
    rq = {r["codec"]: r for r in record["rows"] if r["codec"].startswith("RQ")}
    return {"budget": budget, "seconds": round(time.perf_counter() - start, 1), "front_runners": kept,
            # (the lengths trained: the shortest, each trained on from the one before, or alone)
            "trained": [c for c, r in rq.items() if "trained_on_from" in r
                        or any(o.get("trained_on_from") == c for o in rq.values())]
            or [c for c, r in rq.items() if "judged_by" not in r and "cut_from" not in r],
            "judged_by": {c: r["judged_by"] for c, r in rq.items() if "judged_by" in r},
            "rows": record["rows"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dims", default="128,384,768")
    ap.add_argument("--budgets", default="32,48,64")
    add_data_option(ap)
    ap.add_argument("--results", default="benchmarks/results/first_stage_chain.json")
    args = ap.parse_args()
    n1, nb, nq = ps.STAGE1_TRAIN_ROWS, ps.STAGE1_BASE_ROWS, ps.STAGE1_QUERIES
    out = []
    for dim in map(int, args.dims.split(",")):
        x = generator(args.data, dim, seed=5).batch(0, n1 + nb + nq)
        gains = family_recalls(x[:n1], x[n1:n1 + nb], x[n1 + nb:])
        print(f"{args.data} {dim}-d, the family's first-stage recall@10: {gains}", flush=True)
        stages = [first_stage(dim, b, x[:n1 + nb], x[n1 + nb:]) for b in map(int, args.budgets.split(","))]
        out.append({"dim": dim, "family_recall_at_10": gains, "budgets": stages})
    print(f"\n{args.data}, cosine; first stage: {n1:,} training rows, {nb:,} base rows, {nq} queries\n")
    print("| dim | " + " | ".join(f"RQ{m}x8" for m in LENGTHS) + " | budget | RQ lengths trained | judged by | "
          "first stage s | front-runners |")
    print("| ---: | " + " | ".join("---:" for _ in LENGTHS) + " | ---: | --- | --- | ---: | --- |")
    for d in out:
        recalls = " | ".join(f"{v:.3f}" for v in d["family_recall_at_10"].values())
        for s in d["budgets"]:
            judged = ", ".join(f"{k} by {v}" for k, v in s["judged_by"].items()) or "-"
            print(f"| {d['dim']} | {recalls} | {s['budget']} | {', '.join(s['trained'])} | {judged} | "
                  f"{s['seconds']} | {', '.join(s['front_runners'])} |")
    write_results(args.results, {"args": vars(args), "machine": platform.platform(), "rows": out})


if __name__ == "__main__":
    main()
