"""Stage 8, evaluate: the committed version's recall on its held-out queries (found in the
encode pass), stored beside it as JSON and as a row of the LanceDB table `<table>_eval`."""

from __future__ import annotations

import logging
import time

from vecpress.kernels.metrics import RECALL_KS
from vecpress.pipeline.context import RunContext
from vecpress.pipeline.evaluate import evaluate_version
from vecpress.pipeline.executor import Executor
from vecpress.pipeline.gated import replace_failed
from vecpress.pipeline.incremental import gate_decision
from vecpress.pipeline.options import CompressOptions
from vecpress.pipeline.report import load_eval, store_eval
from vecpress.pipeline.stages.s07_commit import Committed

log = logging.getLogger("vecpress")


def evaluate(ctx: RunContext, committed: Committed, executor: Executor, stage_seconds: dict,
             opts: CompressOptions | None = None) -> dict:
    """Evaluate the committed version and store the result beside it (JSON + LanceDB table).

    A LanceDB-served version is the table's latest from its commit until its gate: with
    `opts`, LanceDB's search at its defaults (what the gate reads) is measured first and
    gated at once, and a failed version is replaced as the latest (pipeline.gated) before the
    grid of settings is measured, which keeps that window to the index build and a tenth of
    the evaluation. The decision rides in the result (`gate_decided`) for the gate stage."""
    start = time.perf_counter()
    decided = None
    if opts is not None and committed.gate is None and committed.manifest.get("serve") == "lancedb":
        quick = evaluate_version(ctx.out, ctx.table, committed.at, executor, rerank=False, served_grid=False)
        decided = gate_decision(ctx.out, ctx.table, quick.get("recall_at_10"), floor=opts.gate_min_recall,
                                max_drop=opts.gate_max_drop, load_eval=load_eval)
        if not decided["passed"]:
            decided = {**decided, **replace_failed(ctx.out, ctx.table, committed, decided)}
    ev = evaluate_version(ctx.out, ctx.table, committed.at, executor,
                          rerank=committed.manifest["options"]["eval_rerank"])
    seconds = {**stage_seconds, "evaluate": round(time.perf_counter() - start, 3)}
    ev = store_eval(ctx.out, ctx.table, committed.at, committed.manifest, ev, seconds)
    if decided is not None:
        ev = {**ev, "gate_decided": decided}
    log.info("evaluate: recall@1 %s recall@10 %s recall@100 %s relative error %.4f", *(
        "n/a" if ev.get(f"recall_at_{k}") is None else f"{ev[f'recall_at_{k}']:.3f}" for k in RECALL_KS),
        ev["relative_error"])
    return ev
