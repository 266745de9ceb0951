"""The compress flow: plan -> [drift] -> sample -> [advise] -> train -> encode -> commit ->
evaluate -> gate, as Prefect tasks.

The flow is `vecpress.pipeline.run.run_compress` with the stages wrapped as tasks; its
parameters are `inputs`, `out`, `table`, `run_id` and every option of the options model
(`vecpress.pipeline.options`), flat, with their defaults and help texts, so a deployment's
parameters and the Prefect UI's form follow the one declaration.

Runs against Prefect's temporary local server when no PREFECT_API_URL is configured. Ray is
started (or joined, with `ray_address` / RAY_ADDRESS) by the pipeline inside the flow, not by a
Prefect task runner: every task here is coarse and passes URIs, never arrays.
"""

from __future__ import annotations

import inspect

from prefect import flow, task
from prefect.cache_policies import NONE

from vecpress.flows.reporting import publish_run_report
from vecpress.pipeline.errors import VecpressError
from vecpress.pipeline.options import OPTIONS, CompressOptions
from vecpress.pipeline.run import run_compress
from vecpress.pipeline.stages import Stages


def _retry_unless_user_error(task, task_run, state) -> bool:
    """Retry crashes and I/O hiccups, not bad input: retrying a VecpressError cannot help."""
    try:
        state.result()
    except VecpressError:
        return False
    except Exception:
        return True
    return True


#: retries per stage; the commit is idempotent per run id, the encode stage resumes from its
#: shards' checkpoints
RETRIES = {"plan": 1, "drift": 1, "sample": 1, "advise": 1, "train": 1, "encode": 2, "commit": 3, "index": 2,
           "evaluate": 1, "gate": 1}

TASKS = Stages(**{name: task(getattr(Stages(), name), name=name, retries=retries, cache_policy=NONE,
                             retry_condition_fn=_retry_unless_user_error, retry_delay_seconds=5)
                  for name, retries in RETRIES.items()})


def compress_flow(inputs: list[str], out: str, table: str = "corpus", run_id: str | None = None, **options) -> dict:
    """Compress Parquet embeddings under `inputs` into the Lance table `out/<table>.lance`
    (incrementally when the table already exists), evaluate it and gate the `production` tag.
    Returns the run report: `vecpress inspect --json` of the version plus a `run` section."""
    # publish the report before a failed gate raises, so that a failed gate is reported too
    result = run_compress(inputs, out, table, CompressOptions.from_params(options), stages=TASKS, run_id=run_id,
                          on_report=publish_run_report)
    return result.report


def _flow_signature(fn):
    """`fn` with the flow's full signature: inputs, out, table, run_id, then every option as a
    keyword with its default, typed for JSON (tuples as lists), and its help text in the
    docstring's Args section (Prefect shows both)."""
    params = [p for p in inspect.signature(fn).parameters.values() if p.kind != p.VAR_KEYWORD]
    args = ["inputs: Parquet files or folders (local paths or URIs)", "out: the output folder (a LanceDB database)",
            "table: the output table, out/<table>.lance", "run_id: the run's id (default: a fresh one)"]
    for o in OPTIONS.values():
        t = list[o.item_type] if o.type is not o.item_type else o.type
        default = list(o.default) if isinstance(o.default, tuple) else o.default
        params.append(inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=t | None if o.optional else t))
        args.append(f"{o.name}: {o.info.help}")
    fn.__signature__ = inspect.Signature(params, return_annotation=dict)
    fn.__annotations__ = {p.name: p.annotation for p in params} | {"return": dict}
    fn.__doc__ = inspect.cleandoc(fn.__doc__) + "\n\nArgs:\n" + "\n".join(f"    {a}" for a in args)
    return fn


compress_flow = flow(name="vecpress-compress")(_flow_signature(compress_flow))
