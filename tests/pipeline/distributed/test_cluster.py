"""A real two-node Ray cluster on one machine: a head and a worker node started with
`ray start` as separate processes, a compress job run against them, work seen on both nodes;
then the worker node is killed while one of its encode tasks runs, and the job still ends
with exactly the input's rows.

Isolation from the session's own local Ray (tests/conftest.py `ray_executor`, started inside
the pytest process):
- the cluster runs under its own short `--temp-dir` (its `ray_current_cluster` file goes there,
  so a later `ray.init()` in this process cannot find it) and on free ports of its own;
- every `ray start` runs with `--block` in a new session (process group): teardown signals
  those groups only. `ray stop` is never called; it would stop every Ray on the machine;
- the driver (`vecpress`'s RayExecutor with an address, as `--ray-address` does) runs in a
  subprocess, so this process's `ray.init` is never touched;
- `RAY_AUTH_MODE=disabled`: no token is read from or written to `~/.ray` for this cluster.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[3]
RAY = str(Path(sys.executable).with_name("ray"))
SECRET = "vecpress-cluster-secret-4f1c9b"

# The driver: the `--no-prefect` path of `vecpress compress --ray-address` (RayExecutor with an
# address, run_compress), with an executor that records, from inside each encode task, the node
# it ran on, and can hold each encode task for a moment so that a node can be killed mid-task.
DRIVER = r'''
import json, os, sys, time
import ray
from vecpress.pipeline.distributed import RayExecutor
from vecpress.pipeline.options import CompressOptions
from vecpress.pipeline.run import run_compress

args = json.loads(sys.argv[1])
marks = args["marks"]


def recorded(fn, desc, marks, delay):
    def task(item, **shared):
        if desc == "encode":
            node = ray.get_runtime_context().get_node_id()
            name = f"{node}-{item[0].index:04d}-{os.getpid()}"  # (item: a group of shards)
            open(os.path.join(marks, "start-" + name), "w").close()
            time.sleep(delay)
            out = fn(item, **shared)
            open(os.path.join(marks, "done-" + name), "w").close()
            return out
        return fn(item, **shared)
    return task


class RecordingExecutor(RayExecutor):
    def imap(self, fn, items, *, desc, shared=None):
        return super().imap(recorded(fn, desc, marks, args["delay"]), items, desc=desc, shared=shared)


with RecordingExecutor(args["address"]) as ex:
    deadline = time.monotonic() + 60
    while True:
        nodes = [n for n in ray.nodes() if n["Alive"]]
        if len([n for n in nodes if "worker_node" in n["Resources"]]) >= args["min_nodes"] - 1:
            break
        if time.monotonic() > deadline:
            sys.exit(f"only {len(nodes)} of {args['min_nodes']} Ray nodes alive after 60 s")
        time.sleep(0.2)
    roles = {n["NodeID"]: ("worker" if "worker_node" in n["Resources"] else "head") for n in nodes}
    with open(os.path.join(marks, "nodes.json"), "w") as f:
        json.dump(roles, f)
    opts = CompressOptions(codec="PQ4", num_train=1000, num_queries=50, eval_k=10, shard_rows=500,
                           batch_size=250, ngpu=args.get("ngpu", -1))
    result = run_compress([args["src"]], args["out"], "t", opts, executor=ex, run_id=args.get("run_id"))
print("RESULT " + json.dumps({"run_id": result.run_id, "version": result.version,
                               "committed": result.committed, "roles": roles,
                               "devices": (result.manifest or {}).get("devices")}))
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_ports() -> list[str]:
    """Every port a node would otherwise take at a fixed default, picked free."""
    return [f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
            f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
            f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}"]


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time) of every process, from /proc."""
    table = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            table[int(entry)] = (int(fields[1]), fields[19])
    return table


class Node:
    """One `ray start --block` process and every process under it. Ray puts each task worker in
    a process group of its own, so the group alone would miss them: they are found through their
    parents and each is killed by pid (checked against its start time, so a reused pid is safe)."""

    def __init__(self, args: list[str], env: dict, log: Path):
        self.log = log
        with open(log, "wb") as f:
            self.proc = subprocess.Popen([RAY, "start", "--block", *args], env=env, stdout=f, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def processes(self) -> dict[int, str]:
        """pid -> start time of the `ray start` process and all its descendants."""
        table = _proc_table()
        found, todo = {}, [self.proc.pid]
        while todo:
            pid = todo.pop()
            if pid in table and pid not in found:
                found[pid] = table[pid][1]
                todo.extend(child for child, (parent, _) in table.items() if parent == pid)
        return found

    def kill(self, sig=signal.SIGKILL, procs: dict[int, str] | None = None) -> None:
        procs = self.processes() if procs is None else procs
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        table = _proc_table()
        for pid, started in procs.items():
            if pid in table and table[pid][1] == started:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass

    def stop(self) -> None:
        """SIGTERM (`ray start --block` then stops its processes), SIGKILL whatever is left."""
        procs = self.processes()
        self.kill(signal.SIGTERM, procs)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
        self.kill(signal.SIGKILL, {**procs, **self.processes()})
        self.proc.wait(timeout=15)


@pytest.fixture(scope="module")
def cluster():
    """A Ray head (1 CPU, no dashboard) in its own temp dir and process group."""
    temp_dir = Path(tempfile.mkdtemp(prefix="vpray-", dir="/tmp"))  # short: Ray's socket paths have a length limit
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled", AWS_SECRET_ACCESS_KEY=SECRET,
               AWS_ACCESS_KEY_ID="vecpress-cluster-key", AWS_DEFAULT_REGION="us-east-1",
               # a killed node is declared dead in ~2 s instead of ~30 s
               RAY_health_check_initial_delay_ms="1000", RAY_health_check_period_ms="500",
               RAY_health_check_timeout_ms="1000", RAY_health_check_failure_threshold="3")
    port = free_port()
    head = Node(["--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0",
                 "--include-dashboard=false", f"--dashboard-port={free_port()}",
                 f"--ray-client-server-port={free_port()}", f"--temp-dir={temp_dir}",
                 "--disable-usage-stats", *node_ports()], env, temp_dir.parent / f"{temp_dir.name}-head.log")
    nodes = [head]
    state = {"address": f"127.0.0.1:{port}", "env": env, "temp_dir": temp_dir, "nodes": nodes}
    try:
        wait_for(lambda: (temp_dir / "ray_current_cluster").exists() or head.proc.poll() is not None, 90)
        if head.proc.poll() is not None:
            pytest.fail(f"ray start --head exited: {head.log.read_text()[-3000:]}")
        yield state
    finally:
        for node in reversed(nodes):
            node.stop()
        for log in temp_dir.parent.glob(f"{temp_dir.name}-*.log"):
            log.unlink()
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture
def start_worker(cluster):
    """start_worker(name, cpus=1, gpus=0): another Ray node joining the head, with a
    `worker_node` marker resource (GPUs declared, none real); stopped at the end of the test."""
    started = []

    def start(name: str, **resources) -> Node:
        node = new_worker(cluster, name, **resources)
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()


def new_worker(cluster, name: str, *, cpus: int = 1, gpus: int = 0) -> Node:
    node = Node([f"--address={cluster['address']}", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}",
                 f"--num-gpus={gpus}", '--resources={"worker_node": 1}', "--disable-usage-stats", *node_ports()],
                cluster["env"], cluster["temp_dir"].parent / f"{cluster['temp_dir'].name}-{name}.log")
    cluster["nodes"].append(node)
    return node


def wait_for(cond, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout} s")
        time.sleep(0.1)


def start_driver(cluster, tmp_path, src, out, *, min_nodes, delay=0.0, run_id=None, ngpu=-1,
                 env=None) -> subprocess.Popen:
    marks = tmp_path / f"marks-{time.monotonic_ns()}"
    marks.mkdir()
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    args = {"address": cluster["address"], "src": str(src), "out": str(out), "marks": str(marks),
            "min_nodes": min_nodes, "delay": delay, "run_id": run_id, "ngpu": ngpu}
    proc = subprocess.Popen([sys.executable, str(script), json.dumps(args)], cwd=ROOT,
                            env={**cluster["env"], **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    proc.marks = marks
    return proc


def finish(proc, timeout=150) -> tuple[int, str, dict | None]:
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        pytest.fail(f"driver did not finish in {timeout} s:\n{output[-4000:]}")
    result = next((json.loads(line[len("RESULT "):]) for line in output.splitlines() if line.startswith("RESULT ")),
                  None)
    return proc.returncode, output, result


def encoded_on(marks: Path, roles: dict, kind: str) -> dict[str, set[int]]:
    """node role -> shard indexes whose encode task started/finished there."""
    seen: dict[str, set[int]] = {}
    for f in marks.glob(f"{kind}-*"):
        node, shard, _ = f.name[len(kind) + 1:].rsplit("-", 2)
        seen.setdefault(roles[node], set()).add(int(shard))
    return seen


def table_ids(out) -> np.ndarray:
    import lance

    return lance.dataset(str(Path(out) / "t.lance")).to_table(columns=["id"]).column("id").to_numpy()


def no_secret_under(*paths: Path) -> None:
    for root in paths:
        for f in root.rglob("*"):
            if f.is_file() and f.stat().st_size < 50_000_000:
                assert SECRET.encode() not in f.read_bytes(), f"credential found in {f}"


NUM_ROWS = 4000  # 8 shards of 500 rows


def test_two_node_cluster_runs_encode_on_both_nodes(cluster, start_worker, make_corpus, tmp_path):
    src, _ = make_corpus(NUM_ROWS, dim=16, num_files=2, row_group_size=500)
    start_worker("worker-a")
    out = tmp_path / "out"
    rc, output, result = finish(start_driver(cluster, tmp_path, src, out, min_nodes=2, delay=0.3))
    assert rc == 0 and result is not None, output[-4000:]
    assert sorted(result["roles"].values()) == ["head", "worker"]
    marks = next(tmp_path.glob("marks-*"))
    done = encoded_on(marks, result["roles"], "done")
    assert set(done) == {"head", "worker"}, f"encode tasks ran only on {set(done)}"
    assert done["head"] | done["worker"] == set(range(NUM_ROWS // 500))
    ids = table_ids(out)
    assert len(ids) == NUM_ROWS and np.array_equal(np.sort(ids), np.arange(NUM_ROWS))
    # credentials are in every process's environment, and in no output, log, manifest or report
    assert SECRET not in output
    no_secret_under(out, cluster["temp_dir"])


def test_worker_node_killed_mid_encode(cluster, start_worker, make_corpus, tmp_path):
    """The worker node's processes are SIGKILLed while one of its encode tasks runs. The run
    either completes (the lost task is retried on the head) or fails with an error naming the
    lost node/worker, having removed what it wrote (issue 17); a rerun on the head alone then
    completes. Either way the table ends with exactly the input's rows: none lost, none twice."""
    src, _ = make_corpus(NUM_ROWS, dim=16, num_files=2, row_group_size=500, name="src-kill")
    worker = start_worker("worker-b")
    out = tmp_path / "out"
    proc = start_driver(cluster, tmp_path, src, out, min_nodes=2, delay=1.5)
    nodes_file = proc.marks / "nodes.json"

    def worker_task_running():
        if proc.poll() is not None or not nodes_file.exists():
            return proc.poll() is not None
        try:
            roles = json.loads(nodes_file.read_text())
        except json.JSONDecodeError:
            return False
        return "worker" in encoded_on(proc.marks, roles, "start")

    wait_for(worker_task_running, 120)
    assert proc.poll() is None, f"driver ended before the worker node ran an encode task:\n{proc.communicate()[0]}"
    worker.kill()  # the raylet, its object store and its task workers, all at once
    rc, output, result = finish(proc)
    roles = json.loads(nodes_file.read_text())
    started = encoded_on(proc.marks, roles, "start")
    done = encoded_on(proc.marks, roles, "done")
    lost = started["worker"] - done.get("worker", set())
    assert lost, "no encode task was cut off on the worker node"
    print(f"worker node killed during shards {sorted(lost)}; first run exit code {rc}")
    if rc == 0:
        assert lost <= done.get("head", set()), "a task lost with the worker node was not redone on the head"
    else:
        assert any(w in output for w in ("WorkerCrashedError", "NodeDiedError", "died", "OwnerDiedError")), \
            output[-4000:]
        runs = out / "_vecpress" / "t" / "runs"
        assert not runs.exists() or not any(runs.iterdir()), "the failed run left its folder"  # (issue 17)
        rc, output, result = finish(start_driver(cluster, tmp_path, src, out, min_nodes=1))
        assert rc == 0, output[-4000:]
    # a second run on the head alone: nothing changed, nothing committed, same rows
    rc2, output2, again = finish(start_driver(cluster, tmp_path, src, out, min_nodes=1))
    assert rc2 == 0 and again is not None and not again["committed"], output2[-4000:]
    ids = table_ids(out)
    assert len(ids) == NUM_ROWS and len(np.unique(ids)) == NUM_ROWS
    assert np.array_equal(np.sort(ids), np.arange(NUM_ROWS))
    assert SECRET not in output + output2


def most_at_once(marks: Path) -> int:
    """The most encode tasks that ran at the same moment, from their start/done marks' times.
    An attempt with no done mark (its worker died and Ray ran the task again, as it may on a
    loaded machine) is left out: when it ended is unknown."""
    events = []
    for f in marks.glob("start-*"):
        done = marks / ("done-" + f.name[len("start-"):])
        if done.exists():
            events += [(f.stat().st_mtime_ns, 1), (done.stat().st_mtime_ns, -1)]
    most = now = 0
    for _, step in sorted(events):
        now += step
        most = max(most, now)
    return most


def test_tasks_in_flight_follow_a_growing_cluster(cluster, start_worker, make_corpus, tmp_path):
    """An autoscaler adds a node while the encode stage runs: the head has 1 CPU when the run
    starts (2 tasks in flight), a node with 3 more joins after the first encode task starts,
    and the stage then keeps more tasks in flight: more than 2 run at once."""
    rows = 2 * NUM_ROWS  # 16 shards: many still to run when the node has started, even on a slow machine
    src, _ = make_corpus(rows, dim=16, num_files=2, row_group_size=500, name="src-grow")
    out = tmp_path / "out"
    proc = start_driver(cluster, tmp_path, src, out, min_nodes=1, delay=5.0)
    wait_for(lambda: proc.poll() is not None or any(proc.marks.glob("start-*")), 120)
    assert proc.poll() is None, proc.communicate()[0][-4000:]
    start_worker("worker-grow", cpus=3)
    rc, output, result = finish(proc, timeout=240)
    assert rc == 0 and result is not None, output[-4000:]
    most = most_at_once(proc.marks)
    print(f"most encode tasks at once: {most}")
    assert most >= 3, f"at most {most} encode tasks ran at once on 4 CPUs"
    ids = table_ids(out)
    assert len(ids) == rows and np.array_equal(np.sort(ids), np.arange(rows))


def test_gpu_encoders_wait_for_a_gpu_node_to_join(cluster, start_worker, make_corpus, tmp_path):
    """`--ngpu 1` on a cluster with no GPU yet (an autoscaler's GPU group at zero): the run asks
    for the GPU actor at once, a node with a GPU joins while it samples and trains, and the
    encode stage runs on that actor, fed by the CPU read tasks."""
    src, _ = make_corpus(NUM_ROWS, dim=16, num_files=2, row_group_size=500, name="src-gpu")
    out = tmp_path / "out"
    proc = start_driver(cluster, tmp_path, src, out, min_nodes=1, ngpu=1, env={"VECPRESS_GPU_WAIT_S": "120"})
    wait_for(lambda: proc.poll() is not None or (proc.marks / "nodes.json").exists(), 120)
    start_worker("worker-gpu", cpus=1, gpus=1)
    rc, output, result = finish(proc)
    assert rc == 0 and result is not None, output[-4000:]
    devices = result["devices"]
    assert devices["placement"] == "gpu actors", devices
    assert len(devices["actors"]) == 1 and devices["actors"][0]["gpu_ids"] == "0"
    assert devices["actors"][0]["rows"] == NUM_ROWS
    ids = table_ids(out)
    assert len(ids) == NUM_ROWS and np.array_equal(np.sort(ids), np.arange(NUM_ROWS))


def test_gpu_encoders_go_on_with_the_gpus_they_got(cluster, start_worker, make_corpus, tmp_path):
    """`--ngpu 2` on a cluster that has one GPU and gets no more: after VECPRESS_GPU_WAIT_S the
    encode stage ends the actor still waiting and runs on the one it has."""
    src, _ = make_corpus(NUM_ROWS, dim=16, num_files=2, row_group_size=500, name="src-partial")
    start_worker("worker-one-gpu", cpus=1, gpus=1)
    out = tmp_path / "out"
    rc, output, result = finish(start_driver(cluster, tmp_path, src, out, min_nodes=2, ngpu=2,
                                             env={"VECPRESS_GPU_WAIT_S": "30"}))
    assert rc == 0 and result is not None, output[-4000:]
    devices = result["devices"]
    assert devices["placement"] == "gpu actors" and len(devices["actors"]) == 1, devices
    assert devices["actors"][0]["rows"] == NUM_ROWS
    assert "1 of 2 GPU encoders ready after 30 s" in output, output[-4000:]  # it waited, then went on
    assert len(table_ids(out)) == NUM_ROWS


def test_gpu_encoders_that_never_get_a_gpu_fail_before_writing(cluster, make_corpus, tmp_path):
    """`--ngpu 1` and no GPU ever joins: after VECPRESS_GPU_WAIT_S the run fails with an error
    that says what it waited for and what to do, and commits nothing."""
    src, _ = make_corpus(2000, dim=16, num_files=2, row_group_size=500, name="src-nogpu")
    out = tmp_path / "out"
    proc = start_driver(cluster, tmp_path, src, out, min_nodes=1, ngpu=1, env={"VECPRESS_GPU_WAIT_S": "3"})
    rc, output, result = finish(proc)
    assert rc != 0 and result is None, output[-4000:]
    assert "ClusterError: no GPU encoder was ready after 3 s: asked for 1 (--ngpu), the cluster has 0 GPU(s)" \
        in output, output[-4000:]
    assert not (out / "t.lance").exists() or len(table_ids(out)) == 0
    assert not list(proc.marks.glob("start-*")), "encode tasks ran without their GPU encoder"


def test_credentials_stay_out_of_logs_and_results(make_corpus, tmp_path, prefect_harness, ray_executor, caplog,
                                                  capsys, monkeypatch):
    """A flow run with AWS_* credentials in its environment: the secret is in none of the log
    records (any logger, DEBUG and up), stdout/stderr, the flow's result, the logs Prefect
    stored for the run, or the files written under OUT."""
    import logging

    import anyio
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from vecpress.flows.compress import compress_flow

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_SESSION_TOKEN", SECRET + "-token")
    caplog.set_level(logging.DEBUG)
    src, _ = make_corpus(2000, dim=16, num_files=2, row_group_size=500)
    out = tmp_path / "out"
    state = compress_flow(inputs=[str(src)], out=str(out), table="t", codec="PQ4", num_train=1000, num_queries=50,
                          eval_k=10, shard_rows=500, return_state=True)
    assert state.is_completed()
    result = state.result()
    assert result["num_rows"] == 2000

    async def stored_logs():
        async with get_client() as client:
            logs = await client.read_logs(log_filter=LogFilter(
                flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
            return [entry.message for entry in logs]

    from prefect.logging.handlers import APILogHandler

    messages = []
    for _ in range(30):  # logs reach the API asynchronously, in batches
        for name in ("prefect", "prefect.flow_runs", "prefect.task_runs", "vecpress", ""):
            for handler in logging.getLogger(name).handlers:
                if isinstance(handler, APILogHandler):
                    handler.flush()
        messages = anyio.run(stored_logs)
        if messages:
            break
        time.sleep(0.5)
    assert messages, "Prefect stored no logs for the run"
    captured = capsys.readouterr()
    seen = "\n".join([caplog.text, captured.out, captured.err, json.dumps(result, default=str), *messages])
    assert SECRET not in seen
    no_secret_under(out)


def test_job_submitted_through_the_jobs_api(make_corpus, tmp_path, monkeypatch):
    """`vecpress compress` as a Ray job (the README's `ray job submit` route, through the same
    Jobs API via its Python client), on a head with the dashboard that serves that API."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    src, _ = make_corpus(2000, dim=16, num_files=2, row_group_size=500)
    out = tmp_path / "out"
    temp_dir = Path(tempfile.mkdtemp(prefix="vpjob-", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_MODE="disabled")
    dash = free_port()
    head = Node(["--head", f"--port={free_port()}", "--node-ip-address=127.0.0.1", "--num-cpus=2", "--num-gpus=0",
                 "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
                 f"--ray-client-server-port={free_port()}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
                 *node_ports()], env, temp_dir.parent / f"{temp_dir.name}-head.log")
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    try:
        client = None
        deadline = time.monotonic() + 120
        while client is None:
            if head.proc.poll() is not None:
                pytest.fail(f"ray start --head exited: {head.log.read_text()[-3000:]}")
            try:
                client = JobSubmissionClient(f"http://127.0.0.1:{dash}")
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        entrypoint = (f"{sys.executable} -m flows.cli -q compress {src} {out} --table t --codec PQ4 "
                      "--num-train 1000 --num-queries 50 --eval-k 10 --shard-rows 500 --no-prefect")
        job = client.submit_job(entrypoint=entrypoint, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
        deadline = time.monotonic() + 180
        while (status := client.get_job_status(job)) not in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
            assert time.monotonic() < deadline, f"job still {status}: {client.get_job_logs(job)[-3000:]}"
            time.sleep(1)
        assert status == JobStatus.SUCCEEDED, client.get_job_logs(job)[-4000:]
        ids = table_ids(out)
        assert len(ids) == 2000 and np.array_equal(np.sort(ids), np.arange(2000))
    finally:
        head.stop()
        for log in temp_dir.parent.glob(f"{temp_dir.name}-*.log"):
            log.unlink()
        shutil.rmtree(temp_dir, ignore_errors=True)
