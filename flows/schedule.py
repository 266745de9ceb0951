"""Nightly recompression: the schedule, the deployment parameters, and serving them on one machine.

Two ways to run `compress_flow` every night, with the same parameters:
- with a Prefect server and a work pool: `infra/prefect.yaml` (`prefect deploy`, then
  `prefect worker start --pool vecpress`);
- on one machine: `vecpress schedule INPUT... OUT --table T` (`serve_nightly`), which serves the
  flow with its cron schedule until Ctrl-C, on the server PREFECT_API_URL names or on a local
  `prefect server start` it runs meanwhile (Prefect's temporary server schedules nothing).

Overlap: each deployment has a concurrency limit of 1 with collision strategy CANCEL_NEW: when
last night's run is still going at 02:00, tonight's run is cancelled rather than queued (ENQUEUE
would start it right after, pushing every later night back; an incremental run the next night
picks up everything anyway). A crashed run's slot is a lease that the run renews (every 300 s
in Prefect 3.8); it expires and frees the slot when the process dies. Independently, the flow
holds the table's lease file (`vecpress.pipeline.locking.table_lock`), which also stops ad hoc
`vecpress compress` runs and runs from other deployments or servers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

from vecpress.pipeline.errors import ConfigError
from vecpress.pipeline.options import OPTIONS, CompressOptions

log = logging.getLogger("vecpress")

DEFAULT_CRON = "0 2 * * *"
DEFAULT_TIMEZONE = "UTC"
DEPLOYMENT_NAME = "vecpress-nightly"
WORK_POOL = "vecpress"
#: what a run that finds the previous one still running does: "CANCEL_NEW" or "ENQUEUE"
COLLISION_STRATEGY = "CANCEL_NEW"

#: the incremental/drift/gate knobs a nightly deployment spells out, even at their defaults (the
#: options model's fields). Not `min_recall`: that one is the advisor's target (`--codec auto`),
#: not the quality gate's floor.
THRESHOLDS = ("drift_threshold", "force_retrain", "gate_min_recall", "gate_max_drop")
#: {"drift_threshold": 0.1, "force_retrain": False, "gate_min_recall": None, "gate_max_drop": 0.02}
THRESHOLD_DEFAULTS: dict[str, Any] = {name: OPTIONS[name].default for name in THRESHOLDS}
#: parameters every nightly deployment spells out, even at their defaults
NIGHTLY_DEFAULTS: dict[str, Any] = {name: OPTIONS[name].default for name in ("codec", "metric", *THRESHOLDS)}


def nightly_parameters(inputs: list[str] | str, out: str, table: str,
                       opts: CompressOptions = CompressOptions()) -> dict[str, Any]:
    """The deployment's parameters: inputs, out, table, the `NIGHTLY_DEFAULTS` keys, and every
    other option whose value differs from its default (defaults are left to the code, so a
    deployment does not pin values it never chose).

    The CLI (`vecpress schedule`), `infra/prefect.yaml` and the docs agree through this function.
    """
    from vecpress.pipeline.lance_io import check_table_name

    check_table_name(table)
    inputs = [inputs] if isinstance(inputs, str) else list(inputs)
    if not inputs:
        raise ConfigError("a nightly run needs at least one input")
    values = opts.to_params()
    return {"inputs": inputs, "out": out, "table": table, **{name: values[name] for name in NIGHTLY_DEFAULTS},
            **opts.changed()}


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


def nightly_deployment(inputs: list[str] | str, out: str, table: str, opts: CompressOptions = CompressOptions(), *,
                       cron: str = DEFAULT_CRON, timezone: str = DEFAULT_TIMEZONE, name: str | None = None):
    """The RunnerDeployment that `serve_nightly` serves: one per table (default name
    `vecpress-nightly-<table>`), cron schedule, at most one run at a time (CANCEL_NEW)."""
    from vecpress.flows.compress import compress_flow

    schedule = cron_schedule(cron, timezone)
    params = nightly_parameters(inputs, out, table, opts)
    return compress_flow.to_deployment(
        name=name or f"{DEPLOYMENT_NAME}-{table}".lower(),
        schedules=[schedule],
        parameters=params,
        concurrency_limit=concurrency_config(),
        tags=["vecpress", f"table:{table}"],
        description=f"Nightly recompression of table {table!r} into {out} ({cron} {timezone}).",
    )


#: seconds to wait for a local `prefect server start` to answer (a fresh Prefect home migrates
#: its database first, which takes tens of seconds on small machines)
SERVER_START_TIMEOUT = 180.0


@contextlib.contextmanager
def scheduling_api(timeout: float = SERVER_START_TIMEOUT):
    """The Prefect API a served schedule registers with: PREFECT_API_URL when one is set, else a
    `prefect server start` of this machine's Prefect home on a free local port, for as long as
    the block lasts. Not Prefect's temporary server: it runs no scheduler service, so a
    deployment served on it never gets a run. Yields the API URL."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if PREFECT_API_URL.value():
        yield PREFECT_API_URL.value()
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/api"
    server_log = tempfile.NamedTemporaryFile("w+b", prefix="vecpress-prefect-server-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
           "--analytics-off"]
    env = {**os.environ, "PREFECT_SERVER_UI_ENABLED": "false"}
    env.pop("PREFECT__SERVER_EPHEMERAL", None)
    log.info("starting a local Prefect server for the schedule on %s (its log: %s)", url, server_log.name)
    proc = subprocess.Popen(cmd, stdout=server_log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    previous = os.environ.get("PREFECT_API_URL")
    try:
        _wait_for_server(proc, url, timeout, server_log.name)
        os.environ["PREFECT_API_URL"] = url  # (flow-run processes the runner starts inherit it)
        with temporary_settings({PREFECT_API_URL: url}):
            yield url
    finally:
        if previous is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = previous
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        server_log.close()


def _wait_for_server(proc: subprocess.Popen, url: str, timeout: float, log_path: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ConfigError(f"the local Prefect server exited with status {proc.returncode} before it answered; "
                              f"its log: {log_path}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise ConfigError(f"the local Prefect server did not answer on {url} within {timeout:.0f} s; its log: {log_path}. "
                      "Start one yourself (prefect server start) and set PREFECT_API_URL")


def serve_nightly(inputs: list[str] | str, out: str, table: str, opts: CompressOptions = CompressOptions(), *,
                  cron: str = DEFAULT_CRON, timezone: str = DEFAULT_TIMEZONE, name: str | None = None) -> None:
    """Serve compress_flow on this machine with a cron schedule; blocks until Ctrl-C.

    Registers with the server PREFECT_API_URL names, or starts one on this machine for as long
    as it serves (scheduling_api). The runner itself also runs one flow at a time (`limit=1`).
    """
    from prefect import serve

    deployment = nightly_deployment(inputs, out, table, opts, cron=cron, timezone=timezone, name=name)
    with scheduling_api():
        serve(deployment, limit=1)
