"""Signal handlers while the driver waits on Ray: what a handler raises comes out as itself."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from vecpress.pipeline.distributed.ray_executor import _RAY_WAIT


class Stopped(BaseException):
    """Like Prefect's TerminationSignal: a BaseException that is not a KeyboardInterrupt."""


def slow(i):
    time.sleep(3)
    return i


def test_a_handlers_exception_comes_out_of_a_ray_wait_as_itself(ray_executor):
    """Ray runs signal handlers inside ray.wait and lets only KeyboardInterrupt out: Prefect's
    TerminationSignal (on SIGTERM) came out as a SystemError, an ordinary failure that Prefect
    retried, so SIGTERM did not stop a Prefect run. Handlers kept across ray.init are `passing`."""
    def stop(signum, frame):
        raise Stopped(signum)

    previous = signal.signal(signal.SIGTERM, _RAY_WAIT.passing(stop))
    timer = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM))
    try:
        timer.start()
        start = time.monotonic()
        with pytest.raises(Stopped):
            ray_executor.map(slow, range(4), desc="slow")
        assert time.monotonic() - start < 30
    finally:
        timer.cancel()
        signal.signal(signal.SIGTERM, previous)
    with pytest.raises(Stopped):  # outside Ray's waits the handler is as it was
        _RAY_WAIT.passing(stop)(signal.SIGTERM, None)
    assert _RAY_WAIT.depth == 0 and _RAY_WAIT.raised is None
