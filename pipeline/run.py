"""The one entry point of a compress run. The command line (`vecpress compress`, with or
without Prefect), the Prefect flow and Python callers all call `run_compress`: it takes the
table's lease, runs the stages (`vecpress.pipeline.stages`) on an executor, and reports."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from typing import Callable, Sequence

from vecpress.pipeline import storage
from vecpress.pipeline.context import RunContext
from vecpress.pipeline.executor import Executor
from vecpress.pipeline.locking import LeaseRef, check_lease, table_lock
from vecpress.pipeline.options import CompressOptions
from vecpress.pipeline.report import run_report
from vecpress.pipeline.stages import RunResult, Stages, check_gate, run_stages
from vecpress.pipeline.tidy import discard_run, remove_detached_manifests, sweep_table

log = logging.getLogger("vecpress")


def run_compress(inputs: Sequence[str] | str, out: str, table: str, opts: CompressOptions = CompressOptions(), *,
                 executor: Executor | None = None, stages: Stages = Stages(), run_id: str | None = None,
                 on_report: Callable[[dict], None] | None = None) -> RunResult:
    """Compress the Parquet files under `inputs` into a new version of the Lance table
    `out/<table>.lance` (incrementally when it can extend the latest one), evaluate it and
    gate the `production` tag.

    Holds the table's lease for the whole run (a second run of the table fails at once with
    TableBusyError), and commits only while it still holds it (LeaseLostError otherwise,
    nothing committed). Runs on `executor`, else on the Ray cluster `opts.ray_address` names
    (or $RAY_ADDRESS, or a local Ray). `on_report` gets the run report before a failed gate
    raises QualityGateError (the version stays committed, untagged); the report is also the
    result's `report`."""
    ctx = RunContext.new(out, table, run_id)
    with table_lock(ctx.out, table, run_id=ctx.run_id) as lease, _executor(executor, opts) as ex:
        ctx = dataclasses.replace(ctx, lease=LeaseRef.of(lease))
        if not storage.exists(ctx.run_file("shards")):  # (a run resumed by its id keeps its checkpoints' files)
            sweep_table(ctx.out, table)  # what crashed runs left
        try:
            result = run_stages(ctx, opts.source(inputs), opts, ex, stages)
        except BaseException:  # (KeyboardInterrupt too)
            _discard(ctx)
            raise
        if not result.committed:
            discard_run(ctx.out, table, ctx.run_id)
        remove_detached_manifests(ctx.out, table)  # (a served run's candidate: promoted or filed by now)
    result = dataclasses.replace(result, report=run_report(ctx.out, table, result))
    if on_report is not None:
        on_report(result.report)
    return check_gate(result)


def _discard(ctx: RunContext) -> None:
    """A failed run removes what it wrote and did not commit: the fragments' data files and
    other unreferenced files in the table's folder (only while it still holds the lease: else
    they may be the new holder's), and its run folder or working files. Errors here are
    logged, never raised over the run's own."""
    try:
        check_lease(ctx.lease)
    except Exception as exc:
        log.warning("not cleaning up after the failed run %s: %s", ctx.run_id, exc)
        return
    try:
        sweep_table(ctx.out, ctx.table)
        discard_run(ctx.out, ctx.table, ctx.run_id)
    except Exception as exc:
        log.warning("could not clean up after the failed run %s (the next run will): %s", ctx.run_id, exc)


@contextlib.contextmanager
def _executor(executor: Executor | None, opts: CompressOptions):
    """`executor` as it is, else a RayExecutor on `opts.ray_address`, shut down after the run.
    It starts (or joins) Ray at its first use, after planning: input that planning refuses
    (schemas, another dimension than the table's, an impossible codec) fails before Ray starts."""
    if executor is not None:
        yield executor
        return
    from vecpress.pipeline.distributed import RayExecutor

    ex = RayExecutor(opts.ray_address)
    try:
        yield ex
    finally:
        ex.shutdown()
