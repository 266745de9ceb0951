"""The advisor against a full sweep of the same grid: its pick, its recall@10 in the full
sweep's table against the best there, and the time each takes, beside the time to train one
PQ at the budget (the issue's yardstick: the advisor in at most ~3x that).

    python benchmarks/advisor.py --rows 50000 --dim 384 --budgets 16,32
    python benchmarks/advisor.py --rows 200000 --num-train 100000 --dim 384 --budgets 16,32,64 --data powerlaw

A generated corpus (cosine; `--data`: clustered near a low-dimensional surface, or with a
power-law spectrum) as Parquet, then per budget: `compress --codec auto --max-bytes B`
(the two-stage advisor, timed as its advise stage), a full sweep of the default grid within B
(`vecpress sweep`'s code), and PQ training at B bytes. The advisor's overhead is what
`--codec auto` adds to a run naming its pick: its advise stage, less the pick's training
there when the train stage takes that codec (trained on the whole sample in the second stage).
The compress runs as a user runs it: the `vecpress compress` command, each time in a fresh
process (this machine's first touch of fresh memory costs seconds that a process's later runs
do not pay), twice; the slower of the two is reported against the faster of two PQ trainings.
Both runs must pick the same codec. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
from _data import add_data_option, generator  # noqa: E402
from _results import write_results  # noqa: E402

from vecpress.kernels.codecs.codec import Codec  # noqa: E402
from vecpress.kernels.codecs.grid import default_grid  # noqa: E402
from vecpress.pipeline.distributed import RayExecutor  # noqa: E402
from vecpress.pipeline.options import CompressOptions  # noqa: E402
from vecpress.pipeline.report import inspect_table  # noqa: E402
from vecpress.pipeline.sweep import choose  # noqa: E402
from vecpress.pipeline.sweep_report import sweep_corpus  # noqa: E402


def _advised(src: Path, out: Path, budget: int, common: dict) -> dict:
    """One `vecpress compress --codec auto --max-bytes budget` run in a fresh process (with
    its own local Ray): its report, advisor record, stages' seconds, and overhead (the advise
    stage less the pick's training there where the train stage takes that codec)."""
    flags = [a for k, v in {**common, "max_bytes": budget, "gate_max_drop": 1.0}.items()
             for a in (f"--{k.replace('_', '-')}", str(v))]  # (the options' CLI names: theirs with dashes)
    cli = [sys.executable, "-m", "vecpress.flows.cli", "compress", "--table", "t", "--codec", "auto", "--no-prefect",
           *flags, str(src), str(out)]
    done = subprocess.run(cli, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{budget} B: vecpress compress failed ({done.returncode}):\n{done.stderr[-3000:]}")
    report = inspect_table(str(out), "t")
    advisor, seconds = report["advisor"], report["stage_seconds"]
    taken = next(r["train_seconds"] for r in advisor["table"] if r["codec"] == advisor["chosen"]) \
        if advisor.get("pick_trained_here") else 0
    return {"report": report, "advisor": advisor, "stage_seconds": seconds, "overhead": seconds["advise"] - taken}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=50_000)
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--budgets", default="16,32")
    ap.add_argument("--num-train", type=int, default=50_000)
    add_data_option(ap)
    ap.add_argument("--results", default="benchmarks/results/advisor.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vecpress-advisor-"))
    x = generator(args.data, args.dim, seed=5).batch(0, args.rows)
    src = work / "src"
    src.mkdir()
    for i, part in enumerate(np.array_split(np.arange(args.rows), 4)):
        pq.write_table(pa.table({"id": part, "embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(x[part].ravel()), args.dim)}), src / f"p{i}.parquet", row_group_size=8192)
    common = dict(metric="cosine", num_train=min(args.num_train, args.rows // 2), num_queries=500, eval_k=10)
    rows, advised = [], {}
    for budget in map(int, args.budgets.split(",")):  # (before this process starts Ray of its own)
        advised[budget] = [_advised(src, work / f"out-{budget}-{i}", budget, common) for i in range(2)]
        print(f"{budget} B: overhead {[round(r['overhead'], 1) for r in advised[budget]]} s", flush=True)
        if len({r["advisor"]["chosen"] for r in advised[budget]}) != 1:
            raise SystemExit(f"{budget} B: two runs picked {[r['advisor']['chosen'] for r in advised[budget]]}")
    with RayExecutor() as ex:
        for budget, runs in advised.items():
            slower = max(runs, key=lambda r: r["overhead"])
            report, advisor = slower["report"], slower["advisor"]
            parts = report.get("partitions") or {}
            advise_s, train_s = slower["stage_seconds"]["advise"], slower["stage_seconds"]["train"]
            grid = default_grid(args.dim, "cosine", min_bytes=8, max_bytes=budget)
            start = time.perf_counter()
            full, _ = sweep_corpus([str(src)], str(work / f"sweep-{budget}"), CompressOptions(**common), codecs=grid,
                                   budgets=[budget], executor=ex)
            sweep_s = time.perf_counter() - start
            best = choose(full.rows, max_bytes=budget)
            recall = {r["codec"]: r["recall_at_10"] for r in full.rows}
            pick_train = next(r["train_seconds"] for r in full.rows if r["codec"] == advisor["chosen"])
            m = max(d for d in (8, 16, 24, 32, 48, 64, 96, 128) if d <= budget and args.dim % d == 0)
            pq_runs = []  # (twice, the faster taken: the machine's first touch of fresh memory costs seconds)
            for _ in range(2):
                start = time.perf_counter()
                Codec.train(x[:common["num_train"]], f"PQ{m}", "cosine")
                pq_runs.append(round(time.perf_counter() - start, 1))
            pq_s = min(pq_runs)
            row = {"budget": budget, "candidates": len(grid), "pick": advisor["chosen"],
                   "pick_recall_full_sweep": recall.get(advisor["chosen"]), "best": best["codec"],
                   "best_recall": best["recall_at_10"], "advise_seconds": round(advise_s, 1),
                   "full_sweep_seconds": round(sweep_s, 1), f"train_PQ{m}_seconds": round(pq_s, 1),
                   "pq_spec": f"PQ{m}", "pq_seconds": round(pq_s, 1), "pq_runs_seconds": pq_runs,
                   "first_stage_seconds": (advisor.get("first_stage") or {}).get("seconds"),
                   "front_runners": (advisor.get("first_stage") or {}).get("kept"),
                   # what the first stage tried and what each cost (seconds), and what it did not try
                   "first_stage_costs": {r["codec"]: r.get("seconds") for r in
                                         (advisor.get("first_stage") or {}).get("rows", [])},
                   "held_by_finer": advisor.get("held_by_finer"),
                   "decided_in": advisor.get("decided_in"), "reason": advisor.get("reason"),
                   # what --codec auto adds to a run naming its pick: the advise stage, less the pick's
                   # training there where the train stage takes that codec (trained on the whole sample in
                   # the second stage); otherwise (decided in the first stage, or trained on fewer rows)
                   # the train stage trains the pick as for a named codec
                   "train_stage_seconds": round(train_s, 1), "pick_train_seconds": pick_train,
                   "stage_seconds": slower["stage_seconds"],
                   "advise_runs_seconds": [round(r["stage_seconds"]["advise"], 1) for r in runs],
                   "overhead_runs_seconds": [round(r["overhead"], 1) for r in runs],
                   # the run's lists: residual codes or the table's, and a single query's time
                   "lists_residual": (parts.get("residual") or {}).get("spec"),
                   "lists_p50_ms": {g["nprobes"]: g.get("p50_ms") for g in parts.get("grid", [])},
                   "pick_trained_here": advisor.get("pick_trained_here"),
                   "trained_on_fewer_rows": advisor.get("trained_on_fewer_rows"),
                   "overhead_seconds": round(slower["overhead"], 1)}
            rows.append(row)
            print(row, flush=True)
    print(f"\n{args.rows:,} x {args.dim}-d ({args.data}, cosine), {common['num_train']:,} training vectors, "
          f"{os.cpu_count()} CPUs\n")
    print("| budget | candidates | advisor's pick (full-sweep R@10) | full sweep's best (R@10) | decided in | "
          "advise s | train stage s | overhead s, the slower run (both) | full sweep s | one PQ's training s (both runs) |")
    print("| ---: | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['budget']} | {r['candidates']} | {r['pick']} ({r['pick_recall_full_sweep']:.3f}) | {r['best']} "
              f"({r['best_recall']:.3f}) | {r['decided_in']} | {r['advise_seconds']} | {r['train_stage_seconds']} | "
              f"{r['overhead_seconds']} ({', '.join(map(str, r['overhead_runs_seconds']))}) | "
              f"{r['full_sweep_seconds']} | "
              f"{r['pq_seconds']} ({r['pq_spec']}; {', '.join(map(str, r['pq_runs_seconds']))}) |")
    write_results(args.results, {"args": vars(args), "machine": platform.platform(), "rows": rows})


if __name__ == "__main__":
    main()
