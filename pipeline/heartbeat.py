"""Progress of one long step inside a stage (a codec's training): its own steps with the time
left where it reports them, else a line every `every` seconds saying it is still at work, so
that a run's log (the CLI's, Prefect's) never goes quiet for minutes."""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger("vecpress")


def train_logged(kind, xt, spec: str, metric: str, *, seed: int, ngpu: int, what: str):
    """`kind.train` (a Codec or an IvfModel) with its progress in the log: `what` names it."""
    with Heartbeat(f"{what}{spec} on {len(xt):,} vectors") as beat:
        return kind.train(xt, spec, metric, seed=seed, ngpu=ngpu, progress=beat.step)


class Heartbeat:
    """`with Heartbeat("train: RQ16x8 on 100,000 vectors") as beat:` ... `beat.step(done, total)`."""

    def __init__(self, what: str, *, every: float = 15.0, step_every: float = 2.0):
        self.what, self.every, self.step_every = what, every, step_every
        self.start = self.last = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, daemon=True)

    def step(self, done: int, total: int) -> None:
        """One more of `total` steps done: logged at most every `step_every` seconds, with the
        time left at the pace so far."""
        now = time.monotonic()
        if done < total and now - self.last < self.step_every:
            return
        self.last = now
        elapsed = now - self.start
        left = elapsed / done * (total - done) if done else float("nan")
        log.info("%s: %d/%d steps, %.1fs, about %.0fs left", self.what, done, total, elapsed, left)

    def _beat(self) -> None:
        while not self._stop.wait(self.every):
            if time.monotonic() - self.last >= self.every:
                self.last = time.monotonic()
                log.info("%s: still at work, %.0fs so far", self.what, self.last - self.start)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
