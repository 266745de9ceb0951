"""Nightly runs: the table lease, run reports as Prefect artifacts, the deployment in infra/."""

from __future__ import annotations

import inspect
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from vecpress.flows import schedule
from vecpress.pipeline.locking import TableBusyError, lock_uri, table_lock
from vecpress.flows.reporting import artifact_key, publish_run_report, render_run_report, report_rows
from vecpress.pipeline.errors import VecpressError
from vecpress.pipeline.options import CompressOptions

ROOT = Path(__file__).resolve().parents[2]
PREFECT_YAML = ROOT / "infra" / "prefect.yaml"


# ---- the table lease --------------------------------------------------------------------------

def _lease_path(out, table="corpus") -> Path:
    return Path(lock_uri(str(out), table))


def test_two_threads_exactly_one_gets_the_table(tmp_path):
    barrier = threading.Barrier(4)
    got, busy = [], []

    def contender(i):
        barrier.wait()
        try:
            with table_lock(str(tmp_path), "corpus", run_id=f"run-{i}"):
                got.append(i)
                time.sleep(0.5)
        except TableBusyError as exc:
            busy.append(exc)

    threads = [threading.Thread(target=contender, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 1 and len(busy) == 3
    for exc in busy:
        assert isinstance(exc, VecpressError)
        assert exc.table == "corpus" and exc.holder["run_id"] == f"run-{got[0]}"
        assert f"run-{got[0]}" in str(exc) and "'corpus'" in str(exc) and socket.gethostname() in str(exc)
        assert f"pid {os.getpid()}" in str(exc) and "since" in str(exc)
    assert not _lease_path(tmp_path).exists()  # released


_CONTENDER = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {root!r})
    from vecpress.pipeline.locking import TableBusyError, table_lock
    go = {go!r}
    open(go + ".ready-%d" % os.getpid(), "w").close()
    while not os.path.exists(go):
        time.sleep(0.005)
    try:
        with table_lock({out!r}, "corpus", run_id="proc-%d" % os.getpid()):
            print("GOT", os.getpid(), flush=True)
            time.sleep(2.0)
    except TableBusyError as exc:
        print("BUSY", exc.holder["pid"], exc, flush=True)
""")


def test_separate_processes_exactly_one_runs(tmp_path):
    go = tmp_path / "go"
    script = _CONTENDER.format(root=str(ROOT), go=str(go), out=str(tmp_path / "out"))
    procs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(3)]
    deadline = time.time() + 60
    while len(list(tmp_path.glob("go.ready-*"))) < len(procs) and time.time() < deadline:
        time.sleep(0.05)
    go.write_text("go")  # all imported and waiting: they race for the lease now
    outs = [p.communicate(timeout=60) for p in procs]
    lines = [o.strip() for o, _ in outs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    winners = [line for line in lines if line.startswith("GOT")]
    losers = [line for line in lines if line.startswith("BUSY")]
    assert len(winners) == 1 and len(losers) == 2, lines
    winner_pid = winners[0].split()[1]
    for line in losers:
        assert line.split()[1] == winner_pid and f"proc-{winner_pid}" in line


def _write_lease(tmp_path, **fields) -> Path:
    path = _lease_path(tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    now = time.time()
    lease = {"table": "corpus", "run_id": "old-run", "host": socket.gethostname(), "pid": os.getpid(),
             "pid_start": None, "acquired_at": now - 60, "renewed_at": now - 60, "expires_at": now + 3600,
             "token": "old-token", **fields}
    path.write_text(json.dumps(lease))
    return path


def test_expired_lease_is_taken_over(tmp_path):
    _write_lease(tmp_path, host="elsewhere", pid=1, expires_at=time.time() - 1)
    with table_lock(str(tmp_path), "corpus", run_id="new-run") as lease:
        assert json.loads(_lease_path(tmp_path).read_text())["run_id"] == "new-run" == lease["run_id"]


def test_dead_pid_on_this_host_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _write_lease(tmp_path, pid=dead.pid)  # not expired: only the dead pid frees it
    with table_lock(str(tmp_path), "corpus", run_id="new-run"):
        assert json.loads(_lease_path(tmp_path).read_text())["run_id"] == "new-run"


def test_reused_pid_is_taken_over(tmp_path):
    _write_lease(tmp_path, pid=os.getpid(), pid_start="1")  # our pid, but another process's start time
    with table_lock(str(tmp_path), "corpus", run_id="new-run"):
        pass


def test_live_lease_elsewhere_blocks(tmp_path):
    _write_lease(tmp_path, host="other-host", pid=4242, run_id="nightly-7")
    with pytest.raises(TableBusyError, match=r"nightly-7 on host other-host \(pid 4242\)"):
        with table_lock(str(tmp_path), "corpus"):
            pass
    assert json.loads(_lease_path(tmp_path).read_text())["run_id"] == "nightly-7"  # untouched


def test_released_on_exception(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with table_lock(str(tmp_path), "corpus"):
            assert _lease_path(tmp_path).exists()
            raise RuntimeError("boom")
    assert not _lease_path(tmp_path).exists()
    with table_lock(str(tmp_path), "corpus"):
        pass


def test_wait_seconds_waits_for_the_holder(tmp_path):
    """A run that may wait fails after its wait while the holder keeps the table, and gets the
    table once the holder lets go (the order of events is checked, not their times)."""
    held, go, releasing = threading.Event(), threading.Event(), threading.Event()

    def holder():
        with table_lock(str(tmp_path), "corpus", run_id="first"):
            held.set()
            go.wait()
            releasing.set()

    t = threading.Thread(target=holder)
    t.start()
    held.wait()
    with pytest.raises(TableBusyError, match="after waiting"):
        with table_lock(str(tmp_path), "corpus", wait_seconds=0.3, poll_seconds=0.05):
            pass
    threading.Timer(0.2, go.set).start()  # the holder lets go while the next run waits
    with table_lock(str(tmp_path), "corpus", run_id="second", wait_seconds=60, poll_seconds=0.05) as lease:
        assert lease["run_id"] == "second" and releasing.is_set()
    t.join()


def test_heartbeat_keeps_a_long_run_from_going_stale(tmp_path):
    with table_lock(str(tmp_path), "corpus", run_id="long", stale_after_seconds=0.6, heartbeat_seconds=0.1):
        time.sleep(1.2)  # twice the lease lifetime
        with pytest.raises(TableBusyError, match="long"):
            with table_lock(str(tmp_path), "corpus"):
                pass


# ---- run reports ------------------------------------------------------------------------------

FULL_REPORT = {
    "table": "Corpus_EN", "version": 7, "num_rows": 1_234_567, "dim": 384, "metric": "cosine", "codec": "OPQ32,PQ32",
    "code_bytes": 32, "source_bytes": 1536, "compression_ratio": 48.0,
    "eval": {"num_queries": 1000, "recall_at_1": 0.61, "recall_at_10": 0.7345, "recall_at_100": 0.82,
             "relative_error": 0.0412, "rerank": {"2": {"recall_at_10": 0.85}, "10": {"recall_at_10": 0.97},
                                                  "4": {"recall_at_10": 0.93}}},
    "run": {"run_id": "20261122T020000Z-abcd1234", "committed": True, "reason": "3 files changed", "mode": "incremental",
            "rows_added": 5000, "rows_removed": 1200, "files_added": 2, "files_removed": 1, "files_rewritten": 0,
            "files_unchanged": 40,
            "drift": {"measured": True, "relative_error": 0.0415, "baseline_relative_error": 0.0410,
                      "recall_at_10": 0.73, "baseline_recall_at_10": 0.735, "retrain": False, "reason": "within 2%"},
            "gate": {"passed": True, "recall_at_10": 0.7345, "floor": 0.7, "previous_recall_at_10": 0.735,
                     "max_drop": 0.01, "tag": "production", "tagged_version": 7, "reason": "recall@10 0.7345 >= 0.7"},
            "stage_seconds": {"plan": 0.5, "encode": 12.25}},
}


def test_render_full_report():
    md = render_run_report(FULL_REPORT)
    for needle in ("Corpus_EN", "committed version 7", "3 files changed", "incremental", "1,234,567", "OPQ32,PQ32",
                   "| rows added | 5,000 |", "| rows removed | 1,200 |", "| compression ratio | 48 |",
                   "| recall@10 | 0.7345 |", "| relative error | 0.0412 |", "re-ranked x2 | 0.85",
                   "## Drift", "| retrain | no |", "Gate passed", "| floor | 0.7 |", "production",
                   "| encode | 12.25 |"):
        assert needle in md, needle
    assert md.index("x2") < md.index("x4") < md.index("x10")  # numeric order
    figures = {r["figure"]: r["value"] for r in report_rows(FULL_REPORT)}
    assert figures["rows added"] == 5000 and figures["recall@10"] == 0.7345 and figures["gate passed"] is True
    assert figures["drift relative error"] == 0.0415 and figures["code bytes per vector"] == 32


def test_render_minimal_report():
    report = {"table": "corpus", "run": {"committed": False, "reason": "no change", "mode": "none"}}
    md = render_run_report(report)
    assert "no new version" in md and "no change" in md and "corpus" in md
    assert "## Quality" not in md and "## Drift" not in md
    assert {r["figure"]: r["value"] for r in report_rows(report)}["committed"] is False
    render_run_report({})  # nothing at all still renders
    render_run_report({"table": "t", "version": 2, "eval": None, "run": {"gate": {"passed": False, "reason": "x|y"}}})
    assert "FAILED**: x\\|y" in render_run_report({"run": {"gate": {"passed": False, "reason": "x|y"}}})


def test_artifact_keys_are_prefect_safe():
    assert artifact_key("corpus-en") == "vecpress-corpus-en"
    assert artifact_key("corpus-en", "figures") == "vecpress-corpus-en-figures"
    assert artifact_key(None) == "vecpress-table"
    # names Prefect would not take keep apart: one history per table
    keys = {artifact_key(t) for t in ("Corpus_EN", "corpus_en", "corpus-en", "corpus__en")}
    assert len(keys) == 4 and all(re.fullmatch(r"[a-z0-9-]+", k) for k in keys)
    assert re.fullmatch(r"vecpress-a-b-c-[0-9a-f]{6}-figures", artifact_key("a__b--c", "figures"))


def test_publish_outside_a_flow_is_a_no_op():
    publish_run_report(FULL_REPORT)


def test_publish_creates_markdown_and_table_artifacts(prefect_harness):
    import anyio
    from prefect import flow, get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    @flow(name="vecpress-report-test")
    def tiny():
        publish_run_report(FULL_REPORT)

    state = tiny(return_state=True)
    assert state.is_completed()

    async def read(key):
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))

    md = anyio.run(read, artifact_key(FULL_REPORT["table"]))
    tab = anyio.run(read, artifact_key(FULL_REPORT["table"], "figures"))
    assert len(md) == 1 and md[0].type == "markdown" and "committed version 7" in md[0].data
    assert md[0].flow_run_id == state.state_details.flow_run_id
    assert len(tab) == 1 and tab[0].type == "table"
    rows = json.loads(tab[0].data) if isinstance(tab[0].data, str) else tab[0].data
    assert {"figure": "rows added", "value": 5000} in rows


# ---- the deployment in infra/ -----------------------------------------------------------------

@pytest.fixture(scope="module")
def deployment() -> dict:
    from prefect.cli.deploy._models import PrefectYamlModel

    spec = yaml.safe_load(PREFECT_YAML.read_text())
    PrefectYamlModel.model_validate(spec)  # Prefect's own schema of prefect.yaml
    (d,) = spec["deployments"]
    return d


def test_prefect_yaml_entrypoint_is_the_compress_flow(deployment):
    from prefect import Flow
    from prefect.flows import load_flow_from_entrypoint

    assert deployment["name"] == schedule.DEPLOYMENT_NAME
    assert deployment["entrypoint"] == "flows/compress.py:compress_flow"
    path, func = deployment["entrypoint"].split(":")
    loaded = load_flow_from_entrypoint(f"{ROOT / path}:{func}")
    assert isinstance(loaded, Flow) and loaded.name == "vecpress-compress"
    assert deployment["work_pool"]["name"] == schedule.WORK_POOL


def test_prefect_yaml_schedule_and_concurrency(deployment):
    from cronsim import CronSim
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy

    (sched,) = deployment["schedules"]
    assert sched["cron"] == schedule.DEFAULT_CRON == "0 2 * * *"
    assert sched["timezone"] == schedule.DEFAULT_TIMEZONE
    schedule.cron_schedule(sched["cron"], sched["timezone"])  # Prefect's validation
    fire = next(CronSim(sched["cron"], datetime(2026, 11, 22, 12, 0)))
    assert (fire.day, fire.hour, fire.minute) == (23, 2, 0)
    limit = deployment["concurrency_limit"]
    assert limit["limit"] == 1
    assert limit["collision_strategy"] == schedule.COLLISION_STRATEGY == "CANCEL_NEW"
    ConcurrencyLimitStrategy(limit["collision_strategy"])


def test_prefect_yaml_parameters_are_flow_parameters(deployment):
    from vecpress.flows.compress import compress_flow

    params = deployment["parameters"]
    signature = inspect.signature(compress_flow.fn).parameters
    assert set(params) <= set(signature)
    assert {"inputs", "out", "table", "codec", "metric"} <= set(params)
    assert schedule.THRESHOLD_DEFAULTS == {"drift_threshold": 0.1, "force_retrain": False, "gate_min_recall": None,
                                           "gate_max_drop": 0.02}  # the pipeline's defaults, as documented
    for name, default in schedule.THRESHOLD_DEFAULTS.items():
        assert params[name] == default, name
    required = {n for n, p in signature.items() if p.default is inspect.Parameter.empty}
    assert required <= set(params)


def test_schedule_cli_gives_the_yaml_parameters(deployment, capsys):
    from vecpress.flows.cli import main

    p = deployment["parameters"]
    rc = main(["schedule", *p["inputs"], p["out"], "--table", p["table"], "--print-parameters"])
    assert rc == 0
    assert json.loads(capsys.readouterr().out) == p
    assert schedule.nightly_parameters(p["inputs"], p["out"], p["table"]) == p
    # a non-default option is carried; a default one is left to the code
    rc = main(["schedule", "in", "out", "--table", "t", "--codec", "PQ16", "--seed", "3", "--num-train", "100000",
               "--drift-threshold", "0.05", "--gate-min-recall", "0.8", "--print-parameters"])
    got = json.loads(capsys.readouterr().out)
    assert got["codec"] == "PQ16" and got["seed"] == 3 and got["drift_threshold"] == 0.05 and "num_train" not in got
    assert got["gate_min_recall"] == 0.8 and "min_recall" not in got  # the gate floor, not the advisor's target


def test_schedule_help_and_bad_options(capsys):
    out = subprocess.run([sys.executable, "-m", "vecpress.flows.cli", "schedule", "--help"], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    for flag in ("--cron", "--timezone", "--table", "--codec", "--drift-threshold", "--print-parameters"):
        assert flag in out
    with pytest.raises(VecpressError, match="unknown option"):
        CompressOptions.from_params({"not_a_param": 1})
    with pytest.raises(VecpressError, match="invalid schedule"):
        schedule.cron_schedule("0 25 * * *")


def test_served_deployment_matches_the_yaml(deployment):
    p = deployment["parameters"]
    d = schedule.nightly_deployment(inputs=p["inputs"], out=p["out"], table=p["table"])
    assert d.name == "vecpress-nightly-corpus" and d.entrypoint == deployment["entrypoint"]
    (s,) = d.schedules
    assert (s.schedule.cron, s.schedule.timezone) == (schedule.DEFAULT_CRON, schedule.DEFAULT_TIMEZONE)
    assert d.concurrency_limit == 1 and d.concurrency_options.collision_strategy.value == "CANCEL_NEW"
    assert d.parameters == p


def test_second_run_of_the_deployment_is_cancelled(deployment, prefect_harness):
    """Prefect's side: two runs of the nightly deployment at once leave exactly one running."""
    import anyio
    from prefect import get_client
    from prefect.states import Pending, Running

    p = deployment["parameters"]
    d = schedule.nightly_deployment(inputs=p["inputs"], out=p["out"], table=p["table"], name="overlap-test")
    d.schedules = []
    deployment_id = d.apply()

    async def start_two():
        async with get_client() as client:
            runs = [await client.create_flow_run_from_deployment(deployment_id) for _ in range(2)]
            results = []
            for run in runs:
                r = await client.set_flow_run_state(run.id, Pending())
                if r.state.is_pending():
                    r = await client.set_flow_run_state(run.id, Running())
                results.append(r.state)
            return results

    first, second = anyio.run(start_two)
    assert first.is_running()
    assert second.is_cancelled() and "concurrency limit" in (second.message or "")


@pytest.mark.slow
def test_a_schedule_served_without_a_server_gets_its_runs(deployment, tmp_path, monkeypatch):
    """Prefect's temporary server runs no scheduler: a deployment served there never got a run.
    Without PREFECT_API_URL, `vecpress schedule` serves on a local `prefect server start`, whose
    scheduler creates the cron's runs; the server stops with the block."""
    import anyio
    import urllib.request

    from prefect import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.setenv("PREFECT_HOME", str(tmp_path / "prefect-home"))  # the server's own database
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    p = deployment["parameters"]

    async def scheduled_runs(deployment_id):
        async with get_client() as client:
            runs = await client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])))
            return [r for r in runs if r.state is not None and r.state.is_scheduled()]

    with temporary_settings(restore_defaults={PREFECT_API_URL}):  # (no harness server either)
        with schedule.scheduling_api() as url:
            assert url.startswith("http://127.0.0.1:") and PREFECT_API_URL.value() == url
            d = schedule.nightly_deployment(cron="* * * * *", inputs=p["inputs"], out=p["out"], table=p["table"])
            deployment_id = d.apply()
            deadline, runs = time.monotonic() + 90, []
            while not runs and time.monotonic() < deadline:
                time.sleep(1)
                runs = anyio.run(scheduled_runs, deployment_id)
            assert runs, "the local server's scheduler created no run"
        with pytest.raises(OSError):
            urllib.request.urlopen(f"{url}/health", timeout=2)


def test_readme_documents_the_schedule():
    readme = (ROOT / "README.md").read_text()
    if "## Nightly runs" not in readme:
        pytest.skip("README has no 'Nightly runs' section yet")
    section = readme.split("## Nightly runs", 1)[1].split("\n## ", 1)[0]
    for needle in (schedule.DEFAULT_CRON, "CANCEL_NEW", "infra/prefect.yaml", "vecpress schedule",
                   *schedule.THRESHOLD_DEFAULTS):
        assert needle in section, needle
