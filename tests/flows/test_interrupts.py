"""SIGINT and SIGTERM during a run, with and without Prefect: `vecpress compress` as a real
process, stopped once its log shows the encode stage started. It stops within seconds, says so
in one line, exits 130/143, commits nothing (the previous version stays the latest, readable),
releases the table, and the next run succeeds.

Before: SIGTERM without Prefect aborted the process (SIGABRT, from Ray's signal handler); Ctrl-C
under Prefect's temporary server hung for minutes (the server, in the command's process group,
shut down while the run still reported to it) and ended in a traceback and exit status 1."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from vecpress.flows.cli import main
from vecpress.pipeline.lance_io import open_dataset
from vecpress.pipeline.locking import lock_uri

ROOT = Path(__file__).resolve().parents[2]
#: small batches make the encode stage slow enough (tens of seconds) to be stopped in the middle
SLOW = ["--codec", "PQ8", "--shard-rows", "1000", "--batch-size", "100", "--num-train", "2000", "--num-queries", "100",
        "--eval-k", "10", "--force-retrain"]
FAST = ["--codec", "PQ8", "--num-train", "2000", "--num-queries", "100", "--eval-k", "10"]
#: a generous bound on how long a stopped run takes to exit (measured: 2-5 s)
EXIT_BOUND_S = 30


@pytest.fixture
def table_v1(make_corpus, tmp_path, ray_executor, capsys):
    """A source of 60 small row groups, and version 1 of table t made from it."""
    folder, _ = make_corpus(num_rows=30_000, dim=32, num_files=6, row_group_size=500)
    out = tmp_path / "out"
    assert main(["-q", "compress", str(folder), str(out), "--table", "t", *FAST, "--no-prefect"]) == 0
    capsys.readouterr()
    return folder, out


def stop_mid_encode(args: list[str], sig: int, *, to_group: bool, env: dict | None = None,
                    again_after: float | None = None) -> tuple[int, float, str]:
    """Run `vecpress compress ARGS` in a process (a session of its own, as a terminal's job), send
    `sig` to it (or to its process group, as a terminal's Ctrl-C does) once the encode stage has
    started (and once more `again_after` seconds later), and return (exit status, seconds from
    the signal to the exit, its output)."""
    env = {**os.environ, **(env or {})}
    env.pop("PREFECT_API_URL", None)  # (Prefect's temporary server when Prefect runs the flow)
    proc = subprocess.Popen([sys.executable, "-m", "vecpress.flows.cli", "compress", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    encoding = threading.Event()

    def read():
        for line in proc.stdout:
            lines.append(line)
            if "vecpress encode: " in line and " tasks" in line:
                encoding.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert encoding.wait(300), "the encode stage never started:\n" + "".join(lines)
        time.sleep(1)  # tasks under way
        assert proc.poll() is None, "the run ended before the signal:\n" + "".join(lines)
        sent = time.monotonic()
        for _ in range(1 if again_after is None else 2):
            if proc.poll() is None:
                os.killpg(proc.pid, sig) if to_group else proc.send_signal(sig)
                time.sleep(again_after or 0)
        rc = proc.wait(120)
        elapsed = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(10)
    return rc, elapsed, "".join(lines)


def assert_stopped(rc: int, elapsed: float, output: str, sig: int, out: Path, folder: Path, capsys) -> None:
    name = signal.Signals(sig).name
    assert rc == 128 + sig, output
    assert elapsed < EXIT_BOUND_S, output
    said = [line for line in output.splitlines() if line.startswith("vecpress: interrupted")]
    assert len(said) == 1 and said[0].startswith(f"vecpress: interrupted ({name})"), output
    assert "Traceback" not in output and "SIGTERM received" not in output, output
    ds = open_dataset(str(out), "t")
    assert ds.version == 1 and ds.count_rows() == 30_000  # nothing committed; version 1 as it was
    assert not Path(lock_uri(str(out), "t")).exists()  # the lease released
    assert main(["-q", "compress", str(folder), str(out), "--table", "t", *FAST, "--force-retrain", "--no-prefect",
                 "--json"]) == 0  # the next run goes ahead
    assert open_dataset(str(out), "t").version == 2
    capsys.readouterr()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_a_run_without_prefect(table_v1, sig, capsys):
    folder, out = table_v1
    rc, elapsed, output = stop_mid_encode([str(folder), str(out), "--table", "t", *SLOW, "--no-prefect"], sig,
                                          to_group=sig == signal.SIGINT)
    assert_stopped(rc, elapsed, output, sig, out, folder, capsys)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_stops_a_prefect_run_on_the_temporary_server(table_v1, sig, capsys):
    """Ctrl-C goes to the whole process group (the temporary server as well, unless it is in a
    session of its own); SIGTERM to the process, through Prefect's own handler (Ray's waits
    turned its TerminationSignal into a SystemError, which Prefect retried as a failure)."""
    folder, out = table_v1
    rc, elapsed, output = stop_mid_encode([str(folder), str(out), "--table", "t", *SLOW], sig,
                                          to_group=sig == signal.SIGINT)
    assert_stopped(rc, elapsed, output, sig, out, folder, capsys)
    assert "Crashed" in output  # Prefect recorded the run's end


def test_a_second_ctrl_c_exits_at_once_without_a_traceback(table_v1, capsys):
    """A second Ctrl-C while the first one's run stops ended in a traceback and exit status 1."""
    folder, out = table_v1
    rc, elapsed, output = stop_mid_encode([str(folder), str(out), "--table", "t", *SLOW], signal.SIGINT,
                                          to_group=True, again_after=0.5)
    assert rc == 130 and elapsed < EXIT_BOUND_S and "Traceback" not in output, output
    assert "vecpress: SIGINT again: exiting at once" in output or "vecpress: interrupted (SIGINT)" in output, output
    assert open_dataset(str(out), "t").version == 1
    assert main(["-q", "compress", str(folder), str(out), "--table", "t", *FAST, "--force-retrain",
                 "--no-prefect"]) == 0  # a lease left by the process is taken over (its pid is gone)
    assert open_dataset(str(out), "t").version == 2
