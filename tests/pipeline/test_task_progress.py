"""Progress inside a stage's tasks: a task reports the share of its rows done
(report_progress, as scan_shard and read_vectors do), and the executor's log shows the
running tasks' shares with the time left, on this process and on Ray."""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest

from vecpress.pipeline import executor
from vecpress.pipeline.executor import LocalExecutor, Progress, ThreadExecutor, report_progress


def reporting_task(steps: int) -> int:
    for done in range(1, steps + 1):
        time.sleep(0.1)
        report_progress(done, steps)
    return steps


def _running_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "running (" in r.getMessage()]


def test_progress_line_shows_running_shares_and_time_left(caplog):
    caplog.set_level(logging.INFO, logger="vecpress")
    p = Progress("encode", 4, every_running=0.0)
    p.step(index=0)
    p.update(1, 50, 100)
    p.update(2, 25, 100)
    line = _running_lines(caplog)[-1]
    assert line.startswith("encode: 1/4 done, 2 running (50%, 25%)") and "left" in line, line
    p.step(index=1)  # a finished task's share is not counted as running any more
    p.tick()
    assert "1 running (25%)" in _running_lines(caplog)[-1]


def test_report_progress_outside_an_executor_does_nothing():
    report_progress(1, 2)


@pytest.mark.parametrize("ex", [LocalExecutor(), ThreadExecutor(2)], ids=["local", "threads"])
def test_local_executors_log_their_tasks_progress(ex, caplog, monkeypatch):
    monkeypatch.setattr(executor, "RUNNING_SECONDS", 0.0)
    caplog.set_level(logging.INFO, logger="vecpress")
    assert ex.map(reporting_task, [4, 4], desc="scan") == [4, 4]
    lines = _running_lines(caplog)
    assert any(line.startswith("scan: 0/2 done, ") and "75%" in line for line in lines), lines


def test_ray_tasks_report_progress_to_the_driver(ray_executor, caplog, monkeypatch):
    from vecpress.pipeline.distributed import ray_executor as rx

    monkeypatch.setattr(rx, "REPORT_SECONDS", 0.2)
    monkeypatch.setattr(executor, "RUNNING_SECONDS", 0.0)
    caplog.set_level(logging.INFO, logger="vecpress")
    assert ray_executor.map(reporting_task, [30], desc="encode") == [30]
    lines = _running_lines(caplog)
    shares = [int(line.split("running (")[1].split("%")[0]) for line in lines]
    assert shares and all(0 < s <= 100 for s in shares), lines
    assert np.all(np.diff(shares) >= 0), shares  # a task's share only grows
    assert "left" in lines[-1]
