"""Running a stage function over many items: serially here, or on Ray via
`pipeline.distributed.RayExecutor`. Both report progress the same way."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Protocol

log = logging.getLogger("vecpress")


class Executor(Protocol):
    def imap(self, fn: Callable, items: Iterable, *, desc: str,
             shared: dict[str, Any] | None = None) -> Iterator[tuple[int, Any]]:
        """`(i, fn(items[i], **shared))` for every item, as each finishes (in any order), so
        that the caller folds results as they come and holds none it has folded. `shared`
        holds large read-only values (query vectors) sent to workers once."""

    def map(self, fn: Callable, items: Iterable, *, desc: str, shared: dict[str, Any] | None = None) -> list:
        """`[fn(item, **shared) for item in items]`, in item order (`imap`, collected)."""

    # optional: `gpu_compute(spec, queries, *, ngpu)` -> GPU compute actors for an encode stage
    # (or None); executors without it compute in their workers


_task = threading.local()
#: seconds between two progress lines while tasks run (their reported share, time left)
RUNNING_SECONDS = 10.0


def report_progress(done: int, total: int) -> None:
    """Called by a stage function while it runs: `done` of its `total` rows (or other units)
    are done. The executor running it shows the stage's progress from them (running tasks'
    share, time left); a no-op where nothing listens."""
    sink = getattr(_task, "sink", None)
    if sink is not None:
        sink(done, total)


@contextmanager
def reporting_to(sink: Callable[[int, int], None] | None):
    """Route this thread's report_progress calls to `sink` for the duration."""
    before = getattr(_task, "sink", None)
    _task.sink = sink
    try:
        yield
    finally:
        _task.sink = before


class Progress:
    """Logs `desc: done/total` at most every `every` seconds, and once at the end; while
    tasks run, at most every `every_running` seconds (RUNNING_SECONDS) with their reported
    share (update) and the time left at the pace so far, so that a stage of few long tasks
    never goes quiet."""

    def __init__(self, desc: str, total: int, every: float = 2.0, every_running: float | None = None):
        self.desc, self.total, self.every = desc, total, every
        self.every_running = RUNNING_SECONDS if every_running is None else every_running
        self.done = 0
        self.start = self.last = time.monotonic()
        self.running: dict[int, float] = {}  # task -> share of it done
        self._lock = threading.Lock()

    def step(self, n: int = 1, *, index: int | None = None) -> None:
        with self._lock:
            self.done += n
            self.running.pop(index, None)
            now = time.monotonic()
            if self.done == self.total or now - self.last >= self.every:
                self.last = now
                log.info("%s: %d/%d done (%.1fs)", self.desc, self.done, self.total, now - self.start)

    def update(self, index: int, done: int, total: int) -> None:
        """Task `index` reports `done` of its `total` units."""
        with self._lock:
            self.running[index] = min(done / total, 1.0) if total > 0 else 0.0
        self.tick()

    def tick(self) -> None:
        """Log the running tasks' progress when due (call it while waiting for results)."""
        with self._lock:
            now = time.monotonic()
            if now - self.last < self.every_running or self.done == self.total:
                return
            self.last = now
            elapsed = now - self.start
            shares = sorted(self.running.values(), reverse=True)
            finished = self.done + sum(shares)
            left = f", about {elapsed / finished * (self.total - finished):.0f}s left" if finished else ""
            running = f", {len(shares)} running ({', '.join(f'{s:.0%}' for s in shares[:4])}" \
                      f"{', ...' if len(shares) > 4 else ''})" if shares else ""
            log.info("%s: %d/%d done%s, %.0fs%s", self.desc, self.done, self.total, running, elapsed, left)


class LocalExecutor:
    """Runs everything in this process, one item after another. For small inputs, tests and
    interactive use; a job uses RayExecutor."""

    def gpu_compute(self, spec, queries, *, ngpu: int = -1):
        """No actors here: the stage computes in this process, on its GPU if it has one."""
        return None

    def imap(self, fn, items, *, desc, shared=None):
        items = list(items)
        progress = Progress(desc, len(items))
        for i, item in enumerate(items):
            with reporting_to(lambda done, total, i=i: progress.update(i, done, total)):
                result = fn(item, **(shared or {}))
            progress.step(index=i)
            yield i, result

    def map(self, fn, items, *, desc, shared=None):
        return collect(self.imap(fn, items, desc=desc, shared=shared))


class ThreadExecutor(LocalExecutor):
    """Runs items on a pool of threads in this process: for work that waits on I/O or runs
    in native code that releases the GIL (Parquet decoding, faiss, Lance reads), such as one
    query's re-rank reads, where starting Ray would cost more than the work."""

    def __init__(self, max_workers: int | None = None):
        self.max_workers = max_workers or os.cpu_count() or 1

    def imap(self, fn, items, *, desc, shared=None):
        items = list(items)
        if len(items) < 2 or self.max_workers < 2:
            yield from super().imap(fn, items, desc=desc, shared=shared)
            return
        progress = Progress(desc, len(items))

        def run(i, item):
            with reporting_to(lambda done, total: progress.update(i, done, total)):
                return fn(item, **(shared or {}))

        with concurrent.futures.ThreadPoolExecutor(min(self.max_workers, len(items))) as pool:
            futures = {pool.submit(run, i, item): i for i, item in enumerate(items)}
            for future in concurrent.futures.as_completed(futures):
                progress.step(index=futures[future])
                yield futures[future], future.result()


def collect(results: Iterable[tuple[int, Any]]) -> list:
    """imap's (index, result) pairs as a list in index order."""
    out: dict[int, Any] = dict(results)
    return [out[i] for i in range(len(out))]
