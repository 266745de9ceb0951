"""The compress job as stages, one module each, in the order they run:

    s01_plan -> [s02_drift] -> s03_sample -> [s04_advise] -> s05_train -> s06_encode -> s07_commit
    -> [s08_index] -> s09_evaluate -> s10_gate

Each stage is a function from frozen inputs to a frozen result: it never edits what it was
given, so a retried stage (Prefect's retry, or a person's) sees what its first try saw. Stage
results are small (URIs, manifests, fragment metadata); arrays travel through files in the
run's folder. `run_stages` calls them in order; the Prefect flow passes the same functions
wrapped as tasks (`Stages`), so both paths run exactly the same sequence.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Callable

from vecpress.pipeline.context import RunContext
from vecpress.pipeline.errors import QualityGateError
from vecpress.pipeline.executor import Executor
from vecpress.pipeline.options import CompressOptions
from vecpress.pipeline.report import load_eval
from vecpress.pipeline.source import SourceSpec
from vecpress.pipeline.stages.s01_plan import plan
from vecpress.pipeline.stages.s02_drift import drift
from vecpress.pipeline.stages.s03_sample import sample
from vecpress.pipeline.stages.s04_advise import Advised, advise
from vecpress.pipeline.stages.s05_train import carried_codec, train
from vecpress.pipeline.stages.s06_encode import encode
from vecpress.pipeline.stages.s07_commit import Committed, commit
from vecpress.pipeline.stages.s08_index import index
from vecpress.pipeline.stages.s09_evaluate import evaluate
from vecpress.pipeline.stages.s10_gate import gate
from vecpress.pipeline.tidy import remove

log = logging.getLogger("vecpress")


@dataclass(frozen=True)
class Stages:
    """The stage functions a run calls, by name; the Prefect flow passes them wrapped as tasks."""

    plan: Callable = plan
    drift: Callable = drift
    sample: Callable = sample
    advise: Callable = advise
    train: Callable = train
    encode: Callable = encode
    commit: Callable = commit
    index: Callable = index
    evaluate: Callable = evaluate
    gate: Callable = gate


@dataclass(frozen=True)
class RunResult:
    run_id: str
    version: int | None
    manifest: dict | None
    eval: dict | None
    stage_seconds: dict = dataclasses.field(default_factory=dict)
    #: False when the run had nothing to do (no source change) and committed nothing
    committed: bool = True
    reason: str = ""
    mode: str = "full"
    incremental: dict | None = None
    drift: dict | None = None
    gate: dict | None = None
    retention: dict | None = None
    #: what the run did, for people and Prefect artifacts (report.run_report; set by run_compress)
    report: dict | None = None

    def summary(self) -> dict:
        """The `run` section of a run report."""
        inc = self.incremental or {}
        return {"run_id": self.run_id, "committed": self.committed, "version": self.version, "reason": self.reason,
                "mode": self.mode, "rows_added": inc.get("rows_added"), "rows_removed": inc.get("rows_removed"),
                "rows_reencoded": inc.get("rows_reencoded"),
                "files_added": inc.get("files_added"), "files_removed": inc.get("files_removed"),
                "files_rewritten": inc.get("files_rewritten"), "files_unchanged": inc.get("files_unchanged"),
                "drift": self.drift, "gate": self.gate, "retention": self.retention,
                "stage_seconds": self.stage_seconds, "devices": (self.manifest or {}).get("devices")}


def gate_fields(decision: dict) -> dict:
    """The gate stage's decision as RunResult's `gate` and `retention` fields."""
    return {"gate": {k: v for k, v in decision.items() if k != "retention"}, "retention": decision["retention"]}


def run_stages(ctx: RunContext, source: SourceSpec, opts: CompressOptions, executor: Executor,
               stages: Stages = Stages()) -> RunResult:
    """plan -> [drift] -> sample -> [advise] -> train -> encode -> commit -> [index] -> evaluate -> gate.

    With a previous version to extend, an unchanged source commits nothing; otherwise the drift
    check decides between an incremental run (codec kept, only changed files encoded) and a
    full rebuild (retrain, re-encode everything)."""
    planned = stages.plan(ctx, source, opts)
    times = {"plan": round(planned.seconds, 3)}
    sampled = decision = None
    if planned.diff is not None:
        if planned.diff.no_change and not opts.force_retrain:
            prev = planned.diff.previous_version
            log.info("no change since version %d: nothing to commit", prev)
            result = RunResult(ctx.run_id, prev, None, None, committed=False, reason=f"no change since version {prev}",
                               mode="none", incremental=planned.diff.summary())
            return finish_stopped_run(ctx, planned.diff, result, opts, executor, stages)
        drifted = stages.drift(ctx, planned, opts, executor)
        planned, sampled, decision = drifted.planned, drifted.sampled, drifted.decision
        times["drift"] = round(drifted.seconds, 3)
    prestart = getattr(executor, "prestart_gpu", None)  # GPU actors warm up while we sample and train
    if prestart is not None and opts.device != "cpu":
        prestart(ngpu=opts.ngpu)
    advised = Advised(planned)
    if planned.diff is None:
        sampled = stages.sample(ctx, planned, opts, executor)
        times["sample"] = round(sampled.seconds, 3)
        advised = stages.advise(ctx, planned, sampled, opts, executor)
        if advised.advisor is not None:
            times["advise"] = round(advised.seconds, 3)
        planned = advised.planned
        trained = stages.train(ctx, advised, sampled, opts)
        times["train"] = round(trained.seconds, 3)
        remove(sampled.train_uri)  # the raw training sample: of no use once trained
    else:
        trained = carried_codec(ctx, planned)
    encoded = stages.encode(ctx, planned, sampled, trained, opts, executor)
    times["encode"] = round(encoded.seconds, 3)
    committed = stages.commit(ctx, planned, sampled, trained, encoded, opts, advisor=advised.advisor, drift=decision,
                              stage_seconds=dict(times))
    times["commit"] = round(committed.seconds, 3)
    if opts.serve == "lancedb":
        committed = stages.index(ctx, committed, encoded, opts, executor)
        times["index"] = round(committed.seconds, 3)
    ev = stages.evaluate(ctx, committed, executor, times)
    decided = stages.gate(ctx, committed, ev, opts)
    return RunResult(ctx.run_id, committed.version, committed.manifest, ev, ev["stage_seconds"],
                     reason="committed" if decided["passed"] else decided["reason"],
                     mode="incremental" if planned.diff else "full",
                     incremental=planned.diff.summary() if planned.diff else None, drift=decision,
                     **gate_fields(decided))


def finish_stopped_run(ctx: RunContext, diff, result: RunResult, opts: CompressOptions, executor: Executor,
                       stages: Stages) -> RunResult:
    """A run with nothing to commit first finishes the run that committed the latest version,
    if that one stopped after its commit (a lost worker, a killed flow): it evaluates and gates
    that version, which would otherwise never be evaluated nor tagged. Else `result` as is."""
    manifest = diff.previous_manifest
    ev = load_eval(ctx.out, ctx.table, diff.previous_version)
    if ev is not None and "gate" in ev:
        return result
    if ev is None and diff.layout_lost:  # a compacted copy of an evaluated version, not a stopped run's
        return result
    committed = Committed(diff.previous_version, manifest)
    if ev is None:
        log.warning("version %d was committed by run %s, which stopped before evaluating it: evaluating it now",
                    diff.previous_version, manifest["run_id"])
        ev = stages.evaluate(ctx, committed, executor, manifest.get("stage_seconds") or {})
    decided = stages.gate(ctx, committed, ev, opts)
    return dataclasses.replace(result, manifest=manifest, eval=ev, reason=f"{result.reason}; evaluated and gated it "
                               f"(its run stopped after the commit)" + ("" if decided["passed"] else
                                                                        f": {decided['reason']}"),
                               **gate_fields(decided))


def check_gate(result: RunResult) -> RunResult:
    """Raise QualityGateError when the run's version failed the gate (it stays inspectable as
    the tag `failed-<run id>`; readers by default still get the last good version)."""
    if result.gate is not None and not result.gate["passed"]:
        tag = result.gate.get("failed_tag")
        raise QualityGateError(f"version {result.version} of {result.manifest['table']}"
                               + (f" (tag {tag})" if tag else "") + f" failed the quality gate: {result.gate['reason']}")
    return result
