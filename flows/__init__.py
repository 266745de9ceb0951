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
# numpy's advice that its large arrays take transparent huge pages: where the kernel compacts
# memory at fault time for advised regions (transparent_hugepage/defrag "madvise", a common
# default), a fresh process's first touch of each new array stalls. The advisor's advise stage
# in a fresh process (25,000-vector sample, 16 B) took 2.69-3.05 s with the advice and
# 2.04-2.15 s without, about a warm process's time (BENCHMARKS.md). Read when numpy is first
# imported (this process, and Ray's local workers, which inherit it); set it to 1 to keep it.
_os.environ.setdefault("NUMPY_MADVISE_HUGEPAGE", "0")
