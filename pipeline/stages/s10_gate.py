"""Stage 10, gate: tag the new version `production` if it passes the quality gate, then drop the
versions beyond the retention rule. A run decided before its evaluation (a codes table's before
its commit, a LanceDB-served table's once its index was built: a failed version is on a branch
of its own); a version found on main unevaluated (its run stopped after the commit) that fails
is tagged `failed-<run id>` and the last good version restored as the latest (pipeline.gated)."""

from __future__ import annotations

import logging

from vecpress.pipeline.context import RunContext
from vecpress.pipeline.gated import replace_failed
from vecpress.pipeline.incremental import apply_retention, gate_version
from vecpress.pipeline.options import CompressOptions
from vecpress.pipeline.report import load_eval, store_gate
from vecpress.pipeline.stages.s07_commit import Committed
from vecpress.pipeline.tidy import prune_runs

log = logging.getLogger("vecpress")


def gate(ctx: RunContext, committed: Committed, ev: dict, opts: CompressOptions) -> dict:
    """Tag the new version `production` if it passes the quality gate (as decided before the
    evaluation, when it was); a failed version committed on main is replaced as the latest by
    the last good one. Then apply retention. The decision is added to the version's evaluation JSON."""
    decision = gate_version(ctx.out, ctx.table, committed.version, ev.get("recall_at_10"), floor=opts.gate_min_recall,
                            max_drop=opts.gate_max_drop, load_eval=load_eval,
                            decided=committed.gate)
    if not decision["passed"] and committed.ref is None:
        decision = {**decision, **replace_failed(ctx.out, ctx.table, committed, decision)}
    elif not decision["passed"]:
        decision = {**decision, "reason": decision["reason"] + f"; committed as tag {committed.ref} (a branch), "
                    "the table's latest version unchanged"}
    store_gate(ctx.out, ctx.table, committed.at, decision)
    retention = apply_retention(ctx.out, ctx.table, opts.keep_versions)
    decision = {**decision, "retention": {**retention, **prune_runs(ctx.out, ctx.table, ctx.run_id, opts.keep_versions)}}
    (log.info if decision["passed"] else log.warning)("gate: %s", decision["reason"])
    return decision
