"""Stage functions as Ray tasks.

Connects to `address` (or RAY_ADDRESS) when given, else starts a local Ray with the dashboard
off; reuses an already-initialised Ray and only shuts down what it started. Large shared
inputs go to the object store once. Task results are small (fragment metadata, per-shard
top-k), never shard data.

Tasks in flight are capped at twice the tasks the cluster's CPUs hold, and the cap follows the
cluster as it runs: an autoscaling cluster that starts with no worker CPUs (a head with
`--num-cpus=0` and `min_workers: 0`, as infra/ray-cluster.yaml) first sees two tasks of demand,
adds nodes, and each node added raises the cap, so demand stays ahead of capacity up to the
cluster's maximum.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from typing import Any

from vecpress.pipeline.executor import Progress, collect, reporting_to

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402


class _TokenAuthNotice(logging.Filter):
    """Drops Ray's warning that a new local Ray has token authentication on (Ray 2.60's default:
    it writes ~/.ray/auth_token; RAY_AUTH_MODE=disabled opts out, the README says so): it came
    with every command, even with -q, and asks nothing of the user."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_TokenAuthNotice())


#: seconds between two reads of the cluster's CPUs while a map runs (the in-flight cap)
LIMIT_REFRESH_SECONDS = 2.0
#: the least tasks kept in flight, whatever the cluster holds now: the demand an autoscaler
#: needs to see to add the first node
MIN_IN_FLIGHT = 2


#: seconds between two of a task's progress reports (report_progress), and between two reads
#: of them by the driver
REPORT_SECONDS = 5.0


@ray.remote(num_cpus=0)
class _ProgressBoard:
    """Where running tasks post their progress (report_progress) for the driver to read."""

    def __init__(self):
        self.reports: dict[str, dict[int, tuple[int, int]]] = {}

    def report(self, key: str, index: int, done: int, total: int) -> None:
        self.reports.setdefault(key, {})[index] = (done, total)

    def take(self, key: str) -> dict[int, tuple[int, int]]:
        return self.reports.pop(key, {})


class _Reporter:
    """A task's report_progress sink: posts to the board at most every REPORT_SECONDS
    (fire and forget: progress never slows or fails a task)."""

    def __init__(self, board, key: str, index: int, every: float):
        self.board, self.key, self.index, self.every, self.last = board, key, index, every, time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last >= self.every:
            self.last = now
            self.board.report.remote(self.key, self.index, done, total)


@ray.remote(max_retries=2, retry_exceptions=False)
def _call(fn, item, shared, board=None, key: str = "", index: int = 0, every: float = REPORT_SECONDS):
    with reporting_to(None if board is None else _Reporter(board, key, index, every)):
        return fn(item, **shared)


class RayExecutor:
    """`map` runs one Ray task per item with `num_cpus` each (faiss then uses as many threads).

    `max_in_flight` fixes the cap on tasks in flight; by default it is twice the tasks that the
    cluster's CPUs hold, re-read every LIMIT_REFRESH_SECONDS. `gpu_wait_seconds` bounds the wait
    for GPU encoder actors (pipeline.distributed.gpu_pool; default $VECPRESS_GPU_WAIT_S, else
    600 s: an autoscaler's GPU node takes minutes to start)."""

    def __init__(self, address: str | None = None, *, num_cpus_per_task: float = 1,
                 max_in_flight: int | None = None, init_kwargs: dict | None = None,
                 gpu_wait_seconds: float | None = None):
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.num_cpus_per_task = num_cpus_per_task
        self.max_in_flight = max_in_flight
        self.gpu_wait_seconds = gpu_wait_seconds
        self.init_kwargs = init_kwargs or {}
        self._started = False
        self._gpu_pool = None  # prestarted GPU actors not yet taken by an encode stage
        self._board = None  # the tasks' progress board, started with the first map
        self._maps = 0

    def start(self) -> "RayExecutor":
        if not ray.is_initialized():
            kwargs = {"include_dashboard": False, "logging_level": "WARNING", "log_to_driver": True}
            kwargs.update(self.init_kwargs)
            with _signal_handlers_kept():
                if self.address:
                    ray.init(address=self.address, **kwargs)
                else:
                    ray.init(**kwargs)
            self._started = True
        return self

    def shutdown(self) -> None:
        if self._gpu_pool is not None:  # prestarted but never used (the run failed or had nothing to encode)
            self._gpu_pool.close()
            self._gpu_pool = None
        if self._board is not None and ray.is_initialized():
            ray.kill(self._board)
        self._board = None
        if self._started and ray.is_initialized():
            ray.shutdown()
        self._started = False

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.shutdown()

    def prestart_gpu(self, *, ngpu: int = -1) -> None:
        """Start the GPU compute actors now (one per GPU, if the cluster has GPUs) so that
        they warm up while earlier stages run; the next `gpu_compute` takes them."""
        self.start()
        from vecpress.pipeline.distributed.gpu_pool import GpuComputePool

        if self._gpu_pool is None:
            self._gpu_pool = GpuComputePool.prestart(ngpu=ngpu, may_grow=self.may_grow)

    def gpu_compute(self, spec, queries, *, ngpu: int = -1):
        """GPU compute actors for an encode stage (pipeline.distributed.gpu_pool), or None when
        the cluster has no GPUs. The caller closes them."""
        self.start()
        from vecpress.pipeline.distributed.gpu_pool import GpuComputePool

        pool, self._gpu_pool = self._gpu_pool, None  # the prestarted actors, else ask now
        if pool is None:
            pool = GpuComputePool.prestart(ngpu=ngpu, may_grow=self.may_grow)
        return None if pool is None else pool.setup(spec, queries, wait_seconds=self.gpu_wait_seconds)

    @property
    def may_grow(self) -> bool:
        """Whether the cluster may add nodes while the run goes on: a cluster joined by address
        (it may autoscale), not a local Ray this executor started."""
        return self.address is not None

    def in_flight_limit(self) -> int:
        """`max_in_flight`, else in_flight_cap of the CPUs the cluster has now."""
        return self.max_in_flight or in_flight_cap(ray.cluster_resources().get("CPU", 0), self.num_cpus_per_task)

    def imap(self, fn, items, *, desc: str, shared: dict[str, Any] | None = None):
        """Results as tasks finish, in any order: the caller folds each as it comes, so the
        driver holds a task's result only until then, whatever the number of tasks."""
        self.start()
        items = list(items)
        shared_ref = ray.put(shared or {})
        task = _call.options(num_cpus=self.num_cpus_per_task)
        limit, checked = self.in_flight_limit(), time.monotonic()
        progress = Progress(desc, len(items))
        if self._board is None:
            self._board = _ProgressBoard.remote()
        self._maps += 1
        key = f"{os.getpid()}-{self._maps}"
        pending: dict = {}
        next_item, polled = 0, time.monotonic()
        try:
            while next_item < len(items) or pending:
                while next_item < len(items) and len(pending) < limit:
                    pending[task.remote(fn, items[next_item], shared_ref, self._board, key, next_item,
                                                  REPORT_SECONDS)] = next_item
                    next_item += 1
                with _RAY_WAIT:
                    ready, _ = ray.wait(list(pending), num_returns=1, timeout=REPORT_SECONDS)
                for ref in ready:
                    index = pending.pop(ref)
                    with _RAY_WAIT:
                        result = _unwrap(ref)
                    progress.step(index=index)
                    yield index, result
                if time.monotonic() - polled >= REPORT_SECONDS:
                    polled = time.monotonic()
                    self._read_progress(key, set(pending.values()), progress)
                if time.monotonic() - checked > LIMIT_REFRESH_SECONDS:  # nodes come and go
                    limit, checked = self.in_flight_limit(), time.monotonic()
        except (Exception, GeneratorExit):
            # No ray.cancel: under Ray 2.60 cancelling a task that is finishing aborts the driver
            # (task_manager.cc "Tried to complete task that was not pending"). Give the few tasks
            # in flight a moment to finish, drop their results, raise the first error. (Their
            # uncommitted fragments are never referenced by a commit.)
            if pending:
                ray.wait(list(pending), num_returns=len(pending), timeout=10)
            raise

    def map(self, fn, items, *, desc: str, shared: dict[str, Any] | None = None) -> list:
        return collect(self.imap(fn, items, desc=desc, shared=shared))

    def _read_progress(self, key: str, running: set[int], progress: Progress) -> None:
        """The running tasks' reports into `progress`, which logs them when due. Progress is
        only shown: a board that does not answer is skipped."""
        try:
            with _RAY_WAIT:
                reports = ray.get(self._board.take.remote(key), timeout=REPORT_SECONDS)
        except (ray.exceptions.RayError, TimeoutError):
            reports = {}
        for index, (done, total) in reports.items():
            if index in running:
                progress.update(index, done, total)
        progress.tick()


class _signal_handlers_kept:
    """Keep the process's own SIGINT/SIGTERM handlers across `ray.init`. ray.init replaces the
    SIGTERM handler (and the driver's core worker then aborts the process on SIGTERM, SIGABRT),
    which took a run's interrupt away from whoever set one up (the command line stops a run on
    SIGTERM as on Ctrl-C; Prefect's flow engine reports the run as crashed). A signal without a
    Python handler (SIG_DFL, SIG_IGN) is left to Ray. The handlers come back wrapped for Ray's
    waits (_RAY_WAIT)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        main = threading.current_thread() is threading.main_thread()
        self.kept = {s: h for s in self.SIGNALS if main and callable(h := signal.getsignal(s))}
        return self

    def __exit__(self, *exc):
        for s, handler in self.kept.items():
            signal.signal(s, _RAY_WAIT.passing(handler))


class _RayWait:
    """`with _RAY_WAIT:` around the driver's blocking Ray calls (ray.wait, ray.get). Ray runs
    signal handlers inside them and lets only a KeyboardInterrupt out: another exception a
    handler raises came out as a SystemError ("returned a result with an exception set"), so
    Prefect's TerminationSignal on SIGTERM became an ordinary failure, and Prefect retried the
    task. Handlers made `passing` raise such an exception as a KeyboardInterrupt inside the
    block, and the block raises it again as itself."""

    def __init__(self):
        self.depth = 0
        self.raised: BaseException | None = None

    def __enter__(self):
        self.depth += 1

    def __exit__(self, kind, exc, tb):
        self.depth -= 1
        raised, self.raised = self.raised, None
        if raised is not None and isinstance(exc, KeyboardInterrupt):
            raise raised

    def passing(self, handler):
        """`handler`, its exceptions carried through the blocks' Ray calls."""
        if getattr(handler, "passes_ray_waits", False):
            return handler

        def passed(signum, frame):
            if not self.depth:
                return handler(signum, frame)
            try:
                return handler(signum, frame)
            except KeyboardInterrupt:
                raise
            except BaseException as exc:
                self.raised = exc
                raise KeyboardInterrupt(f"{type(exc).__name__} from the handler of signal {signum}") from exc

        passed.passes_ray_waits = True
        return passed


_RAY_WAIT = _RayWait()


def in_flight_cap(cpus: float, num_cpus_per_task: float) -> int:
    """Tasks to keep in flight on a cluster with `cpus` CPUs: twice what they hold at once (so
    that a task is queued behind each running one), and never fewer than MIN_IN_FLIGHT."""
    return max(MIN_IN_FLIGHT, int(2 * cpus / max(num_cpus_per_task, 1e-9)))


def _unwrap(ref):
    """ray.get, re-raising a task's own exception (e.g. SourceError) instead of RayTaskError."""
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException):
            raise cause from None
        raise
