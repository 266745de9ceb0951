"""Prefect orchestration of vecpress jobs and the `vecpress` command line.

Thin by design: flows and tasks call `pipeline` stage functions and pass small results
(URIs, manifests, fragment metadata) between them."""

import os as _os

# Prefect's temporary local server: a fresh home migrates its database, which can take longer
# than Prefect's default 20 s startup timeout on small machines; no telemetry, no network.
_os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
_os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
_os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "vecpress")
_os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
_os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
