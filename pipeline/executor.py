"""Running a stage function over many items: serially here, or on Ray via
`pipeline.distributed.RayExecutor`. Both report progress the same way."""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Iterable, Protocol

log = logging.getLogger("vecpress")


class Executor(Protocol):
    def map(self, fn: Callable, items: Iterable, *, desc: str, shared: dict[str, Any] | None = None) -> list:
        """`[fn(item, **shared) for item in items]`, in item order. `shared` holds large
        read-only values (query vectors) sent to workers once."""

    # optional: `gpu_compute(job, queries, *, ngpu)` -> GPU compute actors for an encode stage
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

    def gpu_compute(self, job, queries, *, ngpu: int = -1):
        """No actors here: the stage computes in this process, on its GPU if it has one."""
        return None

    def map(self, fn, items, *, desc, shared=None):
        items = list(items)
        progress = Progress(desc, len(items))
        out = []
        for item in items:
            out.append(fn(item, **(shared or {})))
            progress.step()
        return out
