"""Nightly recompression: the schedule, the deployment parameters, and serving them on one machine.

Two ways to run `compress_flow` every night, with the same parameters:
- with a Prefect server and a work pool: `infra/prefect.yaml` (`prefect deploy`, then
  `prefect worker start --pool vecpress`);
- on one machine without a server: `vecpress schedule INPUT... OUT --table T` (`serve_nightly`),
  which serves the flow with its cron schedule until Ctrl-C.

Overlap: each deployment has a concurrency limit of 1 with collision strategy CANCEL_NEW: when
last night's run is still going at 02:00, tonight's run is cancelled rather than queued (ENQUEUE
would start it right after, pushing every later night back; an incremental run the next night
picks up everything anyway). A crashed run's slot is a lease that the run renews (every 300 s
in Prefect 3.8); it expires and frees the slot when the process dies. Independently, the flow
holds the table's lease file (`flows.locking.table_lock`), which also stops ad hoc
`vecpress compress` runs and runs from other deployments or servers.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

from pipeline.errors import ConfigError

log = logging.getLogger("vecpress")

DEFAULT_CRON = "0 2 * * *"
DEFAULT_TIMEZONE = "UTC"
DEPLOYMENT_NAME = "vecpress-nightly"
WORK_POOL = "vecpress"
#: what a run that finds the previous one still running does: "CANCEL_NEW" or "ENQUEUE"
COLLISION_STRATEGY = "CANCEL_NEW"

#: the incremental/drift/gate knobs a nightly deployment spells out, named as the pipeline's
#: CompressOptions fields (compress_flow passes its parameters to them by name). Not `min_recall`:
#: that one is the advisor's target (`--codec auto`), not the quality gate's floor.
THRESHOLDS = ("drift_threshold", "force_retrain", "gate_min_recall", "gate_max_drop")


def _threshold_defaults() -> dict[str, Any]:
    from pipeline.job import CompressOptions

    fields = CompressOptions.__dataclass_fields__
    return {name: fields[name].default for name in THRESHOLDS}


#: {"drift_threshold": 0.1, "force_retrain": False, "gate_min_recall": None, "gate_max_drop": 0.02}
THRESHOLD_DEFAULTS: dict[str, Any] = _threshold_defaults()
#: parameters every nightly deployment spells out, even at their defaults
NIGHTLY_DEFAULTS: dict[str, Any] = {"codec": None, "metric": "l2", **THRESHOLD_DEFAULTS}


def flow_signature_defaults() -> dict[str, Any]:
    """compress_flow's parameters and their defaults (inspect.Parameter.empty when required)."""
    from flows.compress import compress_flow

    return {name: p.default for name, p in inspect.signature(compress_flow.fn).parameters.items()}


def nightly_parameters(inputs: list[str] | str, out: str, table: str, **options: Any) -> dict[str, Any]:
    """The deployment's parameters: inputs, out, table, the `NIGHTLY_DEFAULTS` keys, and any other
    compress_flow option whose value differs from the flow's default (defaults are left to the
    code, so a deployment does not pin values it never chose).

    The CLI (`vecpress schedule`), `infra/prefect.yaml` and the docs agree through this function.
    """
    from pipeline.lance_io import check_table_name

    check_table_name(table)
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    if not inputs:
        raise ConfigError("a nightly run needs at least one input")
    defaults = flow_signature_defaults()
    unknown = sorted(set(options) - set(defaults) - set(NIGHTLY_DEFAULTS))
    if unknown:
        raise ConfigError(f"compress_flow has no parameter(s) {', '.join(unknown)}")
    params: dict[str, Any] = {"inputs": inputs, "out": out, "table": table}
    for name, default in NIGHTLY_DEFAULTS.items():
        params[name] = options.get(name, default)
    for name, value in options.items():
        if name in params or name in ("run_id",):
            continue
        if value != defaults.get(name):
            params[name] = list(value) if isinstance(value, tuple) else value
    return params


def flow_parameters(params: dict[str, Any]) -> dict[str, Any]:
    """The subset of `params` that compress_flow accepts today (thresholds may not be wired yet)."""
    accepted = flow_signature_defaults()
    dropped = {k: v for k, v in params.items() if k not in accepted}
    for name, value in dropped.items():
        if value != THRESHOLD_DEFAULTS.get(name, object()):
            log.warning("compress_flow has no parameter %r yet: %r is not applied", name, value)
    return {k: v for k, v in params.items() if k in accepted}


def cron_schedule(cron: str = DEFAULT_CRON, timezone: str = DEFAULT_TIMEZONE):
    """A Prefect cron schedule, validated by Prefect (bad cron or timezone -> ConfigError)."""
    from prefect.client.schemas.schedules import CronSchedule

    try:
        return CronSchedule(cron=cron, timezone=timezone)
    except ValueError as exc:
        raise ConfigError(f"invalid schedule cron={cron!r} timezone={timezone!r}: {exc}") from exc


def concurrency_config(strategy: str = COLLISION_STRATEGY):
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy

    return ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy(strategy))


def nightly_deployment(*, cron: str = DEFAULT_CRON, timezone: str = DEFAULT_TIMEZONE, name: str | None = None,
                       inputs: list[str] | str, out: str, table: str, **flow_params: Any):
    """The RunnerDeployment that `serve_nightly` serves: one per table (default name
    `vecpress-nightly-<table>`), cron schedule, at most one run at a time (CANCEL_NEW)."""
    from flows.compress import compress_flow

    schedule = cron_schedule(cron, timezone)
    params = nightly_parameters(inputs, out, table, **flow_params)
    return compress_flow.to_deployment(
        name=name or f"{DEPLOYMENT_NAME}-{table}".lower(),
        schedules=[schedule],
        parameters=flow_parameters(params),
        concurrency_limit=concurrency_config(),
        tags=["vecpress", f"table:{table}"],
        description=f"Nightly recompression of table {table!r} into {out} ({cron} {timezone}).",
    )


def serve_nightly(*, cron: str = DEFAULT_CRON, timezone: str = DEFAULT_TIMEZONE, name: str | None = None,
                  inputs: list[str] | str, out: str, table: str, **flow_params: Any) -> None:
    """Serve compress_flow on this machine with a cron schedule; blocks until Ctrl-C.

    Works with Prefect's temporary local server (no PREFECT_API_URL; it lives as long as this
    process) or a real one. The runner itself also runs one flow at a time (`limit=1`).
    """
    from prefect import serve

    deployment = nightly_deployment(cron=cron, timezone=timezone, name=name, inputs=inputs, out=out, table=table,
                                    **flow_params)
    serve(deployment, limit=1)
