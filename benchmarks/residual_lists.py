"""Residual codes or the table's codes in a partitioned table's lists: what the train stage's
judgement (pipeline/lists.py `judge_residual`, on the sample) chose against what each choice
gives over the whole table (the nprobes grid's best recall@10, and the exhaustive search over
the table's codes), per codec, on the same data in one run.

    python benchmarks/residual_lists.py --rows 20000 --dim 128 --codecs SQeden1,SQeden2,PQ16,RQ8x8

Each codec is compressed three times with the same partitions: residual codes always (as
before the judgement), the table's codes (`--no-residual`), and as shipped (judged). Clustered
rows, cosine, LocalExecutor. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from _results import write_results

import vecpress
from vecpress.kernels.synthetic import ClusteredEmbeddings
from vecpress.pipeline import lists
from vecpress.pipeline.executor import LocalExecutor
from vecpress.pipeline.stages import s05_train


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--codecs", default="SQeden1,SQeden2,PQ16,RQ8x8")
    ap.add_argument("--partitions", type=int, default=64)
    ap.add_argument("--metric", default="cosine")
    ap.add_argument("--results", default="benchmarks/results/residual_lists.json")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vecpress-residual-"))
    x = ClusteredEmbeddings(args.dim, seed=5, num_clusters=300).batch(0, args.rows)
    (work / "src").mkdir()
    for i, part in enumerate(np.array_split(np.arange(args.rows), 2)):
        pq.write_table(pa.table({"id": part, "embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(x[part].ravel()), args.dim)}), work / "src" / f"p{i}.parquet", row_group_size=4096)
    judge = s05_train.judge_residual

    def always_residual(*a, **kw):  # as before the judgement: residual codes whatever they rank
        return {**judge(*a, **kw), "residual_codes_recall_at_10": 1.0, "table_codes_recall_at_10": 0.0}

    rows = []
    for spec in args.codecs.split(","):
        row = {"codec": spec}
        for name, residual, judged in (("residual", True, always_residual), ("table", False, judge),
                                       ("shipped", True, judge)):
            s05_train.judge_residual = judged
            out = work / f"{spec}-{name}"
            start = time.perf_counter()
            vecpress.compress([str(work / "src")], str(out), "t", executor=LocalExecutor(), codec=spec,
                              partitions=args.partitions, num_train=min(50_000, args.rows // 2), num_queries=200,
                              gate_max_drop=1.0, residual=residual, metric=args.metric)
            p = vecpress.open(str(out), "t").manifest["partitions"]
            row[f"{name}_best_recall_at_10"] = max(g["recall_at_10"] for g in p["grid"])
            row[f"{name}_seconds"] = round(time.perf_counter() - start, 1)
            row["exhaustive_recall_at_10"] = p["exhaustive"]["recall_at_10"]
            if name == "shipped":
                row["shipped_lists"] = "residual" if p["residual"] else "table"
                row["judged"] = p.get("residual_judged")
        s05_train.judge_residual = judge
        rows.append(row)
        print(row, flush=True)
    print(f"\n{args.rows:,} x {args.dim}-d ({args.metric}), {args.partitions} partitions, {os.cpu_count()} CPUs\n")
    print("| codec | judged on the sample: table / residual R@10 | lists chosen | lists' best R@10: residual | "
          "table's codes | chosen | exhaustive over the table's codes |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        j = r["judged"] or {}
        print(f"| {r['codec']} | {j.get('table_codes_recall_at_10')} / {j.get('residual_codes_recall_at_10')} | "
              f"{r['shipped_lists']} | {r['residual_best_recall_at_10']:.3f} | {r['table_best_recall_at_10']:.3f} | "
              f"{r['shipped_best_recall_at_10']:.3f} | {r['exhaustive_recall_at_10']:.3f} |")
    write_results(args.results, {"args": vars(args), "machine": platform.platform(), "rows": rows,
                                 "judge_rows": s05_train.JUDGE_ROWS, "plateau": lists.PLATEAU})


if __name__ == "__main__":
    main()
