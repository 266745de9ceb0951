"""Stage 10, gate: tag the new version `production` if it passes the quality gate, then drop the
versions beyond the retention rule. A codes table's run decided before its commit (a failed
version is on a branch of its own); a LanceDB-served table's version that fails is tagged
`failed-<run id>` and the last good version restored as the latest (pipeline.gated)."""

from __future__ import annotations

import json
import logging

from vecpress.pipeline import storage
from vecpress.pipeline.context import RunContext
from vecpress.pipeline.gated import failed_tag, restore_after_failure
from vecpress.pipeline.incremental import apply_retention, gate_version
from vecpress.pipeline.options import CompressOptions
from vecpress.pipeline.report import eval_uri, load_eval, store_gate
from vecpress.pipeline.stages.s07_commit import Committed
from vecpress.pipeline.tidy import prune_runs

log = logging.getLogger("vecpress")


def gate(ctx: RunContext, committed: Committed, ev: dict, opts: CompressOptions) -> dict:
    """Tag the new version `production` if it passes the quality gate (as decided before the
    commit, when it was); a failed version committed on main is replaced as the latest by the
    last good one. Then apply retention. The decision is added to the version's evaluation JSON."""
    decision = gate_version(ctx.out, ctx.table, committed.version, ev.get("recall_at_10"), floor=opts.gate_min_recall,
                            max_drop=opts.gate_max_drop, load_eval=load_eval, decided=committed.gate)
    if not decision["passed"] and committed.ref is None:
        good = decision["previous_version"]
        run_id = committed.manifest["run_id"]
        latest = restore_after_failure(ctx.out, ctx.table, run_id, committed.version, good)
        decision = {**decision, "failed_tag": failed_tag(run_id), "restored_version": latest,
                    "reason": decision["reason"] + f"; version {latest} restores " +
                    ("no rows (no version has passed yet)" if good is None else f"version {good}") + " as the latest"}
        if good is not None and (good_ev := load_eval(ctx.out, ctx.table, good)) is not None:
            restored = {**good_ev, "version": latest, "gate": {
                **(good_ev.get("gate") or {}), "passed": True, "restored_from": good,
                "reason": f"a restore of version {good}, after version {committed.version} failed the gate"}}
            storage.write_bytes(eval_uri(ctx.out, ctx.table, latest), json.dumps(restored, indent=1).encode())
    elif not decision["passed"]:
        decision = {**decision, "reason": decision["reason"] + f"; committed as tag {committed.ref} (a branch), "
                    "the table's latest version unchanged"}
    store_gate(ctx.out, ctx.table, committed.at, decision)
    retention = apply_retention(ctx.out, ctx.table, opts.keep_versions)
    decision = {**decision, "retention": {**retention, **prune_runs(ctx.out, ctx.table, ctx.run_id, opts.keep_versions)}}
    (log.info if decision["passed"] else log.warning)("gate: %s", decision["reason"])
    return decision
