"""The compress flow: plan -> [drift] -> sample -> [advise] -> train -> encode -> commit ->
evaluate -> gate, as Prefect tasks.

Runs against Prefect's temporary local server when no PREFECT_API_URL is configured. Ray is
started (or joined, with `ray_address` / RAY_ADDRESS) by the pipeline inside the flow, not by a
Prefect task runner: every task here is coarse and passes URIs, never arrays.
"""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NONE

from vecpress.flows.locking import table_lock
from vecpress.flows.reporting import publish_run_report
from vecpress.pipeline.distributed import RayExecutor
from vecpress.pipeline.errors import VecpressError
from vecpress.pipeline.job import (
    RunContext, Stages, advise_run, check_gate, commit_run, drift_run, encode_run, evaluate_run, gate_run, plan_run,
    run_stages, sample_run, specs_from_params, train_run,
)
from vecpress.pipeline.report import run_report
from vecpress.pipeline.sampling import SAMPLE_ROW_GROUPS


def _retry_unless_user_error(task, task_run, state) -> bool:
    """Retry crashes and I/O hiccups, not bad input: retrying a VecpressError cannot help."""
    try:
        state.result()
    except VecpressError:
        return False
    except Exception:
        return True
    return True


_common = dict(cache_policy=NONE, retry_condition_fn=_retry_unless_user_error, retry_delay_seconds=5)

plan_task = task(plan_run, name="plan", retries=1, **_common)
drift_task = task(drift_run, name="drift", retries=1, **_common)
sample_task = task(sample_run, name="sample", retries=1, **_common)
advise_task = task(advise_run, name="advise", retries=1, **_common)
train_task = task(train_run, name="train", retries=1, **_common)
encode_task = task(encode_run, name="encode", retries=2, **_common)
commit_task = task(commit_run, name="commit", retries=3, **_common)  # idempotent per run id
evaluate_task = task(evaluate_run, name="evaluate", retries=1, **_common)
gate_task = task(gate_run, name="gate", retries=1, **_common)


@flow(name="vecpress-compress")
def compress_flow(
    inputs: list[str],
    out: str,
    table: str = "corpus",
    codec: str | None = None,
    metric: str = "l2",
    vector_column: str | None = None,
    id_column: str = "id",
    keep: list[str] | None = None,
    num_train: int = 100_000,
    num_queries: int = 1_000,
    seed: int = 0,
    sample_row_groups: int = SAMPLE_ROW_GROUPS,
    eval_k: int = 100,
    batch_size: int = 0,
    shard_rows: int = 500_000,
    ngpu: int = -1,
    device: str = "auto",
    allow_schema_change: bool = False,
    rerank_codec: str | None = None,
    eval_rerank: bool = True,
    max_bytes: int | None = None,
    min_recall: float | None = None,
    advise_rerank: int = 0,
    advise_codecs: list[str] | None = None,
    mode: str = "auto",
    drift_threshold: float = 0.10,
    force_retrain: bool = False,
    gate_min_recall: float | None = None,
    gate_max_drop: float = 0.02,
    keep_versions: int = 20,
    ray_address: str | None = None,
    run_id: str | None = None,
) -> dict:
    """Compress Parquet embeddings under `inputs` into the Lance table `out/<table>.lance`
    (incrementally when the table already exists), evaluate it and gate the `production` tag.
    Returns the run report: `vecpress inspect --json` of the version plus a `run` section."""
    source, opts = specs_from_params(locals())
    ctx = RunContext.new(out, table, run_id)
    stages = Stages(plan=plan_task, drift=drift_task, sample=sample_task, advise=advise_task, train=train_task,
                    encode=encode_task, commit=commit_task, evaluate=evaluate_task, gate=gate_task)
    with table_lock(ctx.out, table, run_id=ctx.run_id), RayExecutor(ray_address) as executor:
        result = run_stages(ctx, source, opts, executor, stages)
    report = run_report(ctx.out, table, result)
    publish_run_report(report)  # before the gate check, so a failed gate is reported too
    check_gate(result)
    return report
