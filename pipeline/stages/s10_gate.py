"""Stage 9, gate: tag the new version `production` if it passes the quality gate, then drop the
versions beyond the retention rule."""

from __future__ import annotations

import logging

from vecpress.pipeline.context import RunContext
from vecpress.pipeline.incremental import apply_retention, gate_version
from vecpress.pipeline.options import CompressOptions
from vecpress.pipeline.report import load_eval, store_gate
from vecpress.pipeline.stages.s07_commit import Committed

log = logging.getLogger("vecpress")


def gate(ctx: RunContext, committed: Committed, ev: dict, opts: CompressOptions) -> dict:
    """Tag the new version `production` if it passes the quality gate; then apply retention.
    The decision is added to the version's evaluation JSON."""
    decision = gate_version(ctx.out, ctx.table, committed.version, ev.get("recall_at_10"), floor=opts.gate_min_recall,
                            max_drop=opts.gate_max_drop, load_eval=load_eval)
    store_gate(ctx.out, ctx.table, committed.version, decision)
    decision = {**decision, "retention": apply_retention(ctx.out, ctx.table, opts.keep_versions)}
    (log.info if decision["passed"] else log.warning)("gate: %s", decision["reason"])
    return decision
