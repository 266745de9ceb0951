"""Running a stage function over many items: serially here, or on Ray via
`pipeline.distributed.RayExecutor`. Both report progress the same way."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
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


class Progress:
    """Logs `desc: done/total` at most every `every` seconds, and once at the end."""

    def __init__(self, desc: str, total: int, every: float = 2.0):
        self.desc, self.total, self.every = desc, total, every
        self.done = 0
        self.start = self.last = time.monotonic()

    def step(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.done == self.total or now - self.last >= self.every:
            self.last = now
            log.info("%s: %d/%d done (%.1fs)", self.desc, self.done, self.total, now - self.start)


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
            result = fn(item, **(shared or {}))
            progress.step()
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
        with concurrent.futures.ThreadPoolExecutor(min(self.max_workers, len(items))) as pool:
            futures = {pool.submit(fn, item, **(shared or {})): i for i, item in enumerate(items)}
            for future in concurrent.futures.as_completed(futures):
                progress.step()
                yield futures[future], future.result()


def collect(results: Iterable[tuple[int, Any]]) -> list:
    """imap's (index, result) pairs as a list in index order."""
    out: dict[int, Any] = dict(results)
    return [out[i] for i in range(len(out))]
