"""Progress of one long step inside a stage (a codec's training): its own steps with the time
left where it reports them, else a line every `every` seconds saying it is still at work, so
that a run's log (the CLI's, Prefect's) never goes quiet for minutes.

Trainings that run inside one faiss call (LSQ's iterations; on a GPU, a PQ's
sub-quantizers; an RQ's stages where faiss trains it, e.g. with codebook refinement) report
their steps only as faiss's own verbose lines, which its C code prints to the process's
standard output. `Heartbeat.faiss_lines` reads them there while the
call runs (file descriptor 1 through a pipe, kernels.codecs.train saying which lines are
steps): each step line is a step with the time left, faiss's other lines are dropped, and
anything else written to standard output meanwhile goes on to it."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import os
import re
import sys
import threading
import time

log = logging.getLogger("vecpress")

#: one reader of the process's standard output at a time (a second training meanwhile: heartbeat only)
_READING = threading.Lock()
#: how often C's stdout buffer is flushed into the pipe while faiss prints (it is block-buffered
#: when standard output is not a terminal)
FLUSH_EVERY = 0.5


def train_logged(kind, xt, spec: str, metric: str, *, seed: int, ngpu: int, what: str, **train):
    """`kind.train` (a Codec or an IvfModel) with its progress in the log: `what` names it;
    `train`: the rest of kind.train's arguments (Codec's `start`)."""
    with Heartbeat(f"{what}{spec} on {len(xt):,} vectors") as beat:
        return kind.train(xt, spec, metric, seed=seed, ngpu=ngpu, progress=beat, **train)


class Heartbeat:
    """`with Heartbeat("train: RQ16x8 on 100,000 vectors") as beat:` ... `beat.step(done, total)`
    (or `beat(done, total)`: what a kernel's `progress` calls)."""

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

    __call__ = step

    @contextlib.contextmanager
    def faiss_lines(self, step: re.Pattern, chatter: re.Pattern, total: int):
        """While the block runs, faiss's lines on standard output matching `step` count as steps
        of `total`, those matching `chatter` are dropped, and any other line goes on to
        standard output. Yields whether it reads them (not where another training already
        does, where the C library cannot be reached, or where there is no standard output to
        take): the caller turns faiss's verbose output on only then."""
        libc = _libc()
        if libc is None or not _READING.acquire(blocking=False):
            yield False
            return
        done = 0

        def on_line(line: bytes) -> bytes | None:
            nonlocal done
            text = line.decode(errors="replace")
            if step.search(text):
                done = min(done + 1, total)
                self.step(done, total)
                return None
            return None if chatter.search(text) else line

        try:
            with contextlib.ExitStack() as stack:
                try:
                    stack.enter_context(_stdout_lines(libc, on_line))
                except OSError:  # (file descriptor 1 closed: a daemon's)
                    reading = False
                else:
                    reading = True
                yield reading
        finally:
            _READING.release()

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


@functools.cache
def _libc():
    """The C library (its fflush), or None where ctypes cannot load it."""
    try:
        libc = ctypes.CDLL(None)
        libc.fflush.argtypes = [ctypes.c_void_p]
        return libc
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def _stdout_lines(libc, on_line):
    """Standard output (file descriptor 1, where C code prints) through a pipe while the block
    runs: each line to `on_line`, and what it returns (not None) on to the real standard output."""
    real = os.dup(1)  # (first: raises where there is none, before anything is changed)
    sys.stdout.flush()
    libc.fflush(None)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 1)
    os.close(write_end)
    stop = threading.Event()

    def read() -> None:
        rest = b""
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            while chunk := pipe.read(65536):
                *lines, rest = (rest + chunk).split(b"\n")
                for line in lines:
                    _write(real, on_line(line), b"\n")
        if rest:
            _write(real, on_line(rest), b"")

    def flush() -> None:
        while not stop.wait(FLUSH_EVERY):
            libc.fflush(None)

    reader, flusher = threading.Thread(target=read, daemon=True), threading.Thread(target=flush, daemon=True)
    reader.start()
    flusher.start()
    try:
        yield
    finally:
        stop.set()
        flusher.join()
        sys.stdout.flush()
        libc.fflush(None)
        os.dup2(real, 1)  # (the pipe's last writer closed: the reader sees its end)
        reader.join(timeout=5.0)  # (unless a process started meanwhile holds it: left to itself)
        os.close(real)


def _write(fd: int, line: bytes | None, end: bytes) -> None:
    if line is not None:
        with contextlib.suppress(OSError):  # (a reader left to itself after its pipe was given back)
            os.write(fd, line + end)
