"""Stage 8, evaluate: the committed version's recall on its held-out queries (found in the
encode pass), stored beside it as JSON and as a row of the LanceDB table `<table>_eval`."""

from __future__ import annotations

import logging
import time

from vecpress.kernels.metrics import RECALL_KS
from vecpress.pipeline.context import RunContext
from vecpress.pipeline.evaluate import evaluate_version
from vecpress.pipeline.executor import Executor
from vecpress.pipeline.report import store_eval
from vecpress.pipeline.stages.s07_commit import Committed

log = logging.getLogger("vecpress")


def evaluate(ctx: RunContext, committed: Committed, executor: Executor, stage_seconds: dict) -> dict:
    """Evaluate the committed version and store the result beside it (JSON + LanceDB table).
    A LanceDB-served version was gated before (by the index stage: pipeline.gated); this
    measures it over the grid of search settings too."""
    start = time.perf_counter()
    ev = evaluate_version(ctx.out, ctx.table, committed.at, executor,
                          rerank=committed.manifest["options"]["eval_rerank"])
    seconds = {**stage_seconds, "evaluate": round(time.perf_counter() - start, 3)}
    ev = store_eval(ctx.out, ctx.table, committed.at, committed.manifest, ev, seconds)
    log.info("evaluate: recall@1 %s recall@10 %s recall@100 %s relative error %.4f", *(
        "n/a" if ev.get(f"recall_at_{k}") is None else f"{ev[f'recall_at_{k}']:.3f}" for k in RECALL_KS),
        ev["relative_error"])
    return ev
