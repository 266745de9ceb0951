"""Scheduling of encoders on GPU actors, with GPUs declared to Ray but no hardware.

The Ray test runs in a subprocess with its own `ray.init(num_cpus=2, num_gpus=2)`, so the
session's shared Ray (conftest's `ray_executor`, 2 CPUs, no GPUs) is left alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vecpress.kernels.gpu_encode import gpu_count
from vecpress.pipeline.distributed.gpu_pool import plan_placement
from vecpress.pipeline.scan import LEFT_TO_READERS

ROOT = Path(__file__).resolve().parents[3]


def test_plan_placement():
    assert plan_placement({"CPU": 16, "GPU": 8}).num_encoders == 8
    assert plan_placement({"CPU": 16, "GPU": 8}).mode == "gpu"
    assert plan_placement({"CPU": 16, "GPU": 8}, ngpu=2).num_encoders == 2
    assert plan_placement({"CPU": 16, "GPU": 8}, ngpu=0).mode == "cpu"
    assert plan_placement({"CPU": 4}).mode == "cpu"
    assert plan_placement({"CPU": 4, "GPU": 0.5}).mode == "cpu"  # no whole GPU


SCRIPT = r"""
import json, sys, tempfile
import numpy as np
import ray
from vecpress.pipeline.demo import write_corpus
from vecpress.pipeline.distributed import RayExecutor
from vecpress.pipeline.options import CompressOptions
from vecpress.pipeline.run import run_compress
from vecpress.pipeline.lance_io import open_lance

gpus, kill = int(sys.argv[1]), int(sys.argv[2])
work = tempfile.mkdtemp()


# kills the first `kill` GPU actors once they are set up, before any batch reaches them
# (as a lost node or an OOM kill would)
class KillingExecutor(RayExecutor):

    def gpu_compute(self, spec, queries, *, ngpu=-1):
        pool = super().gpu_compute(spec, queries, ngpu=ngpu)
        for actor in (pool.actors if pool is not None else [])[:kill]:
            ray.kill(actor, no_restart=True)
        return pool


write_corpus(work + "/src", num_rows=6000, dim=32, num_files=3, row_group_size=500)
ray.init(num_cpus=2, num_gpus=gpus, include_dashboard=False, logging_level="ERROR")
try:
    opts = CompressOptions(codec="PQ8", num_train=2000, num_queries=50, eval_k=10, shard_rows=1000,
                           batch_size=400, eval_rerank=False)
    with KillingExecutor() as ex:
        result = run_compress([work + "/src"], work + "/out", "t", opts, executor=ex)
    ds = open_lance(work + "/out/t.lance")
    codes = ds.to_table(columns=["id", "code"]).sort_by("id").column("code").to_pylist()
    print("RESULT " + json.dumps({"devices": result.manifest["devices"], "num_rows": ds.count_rows(),
                                  "codes": [c.hex() for c in codes], "recall": [result.eval["recall_at_1"], result.eval["recall_at_10"]]}))
finally:
    ray.shutdown()
"""


def _run(gpus: int, kill: int = 0) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(gpus), str(kill)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def runs():
    return {gpus: _run(gpus) for gpus in (2, 0)}


@pytest.mark.slow
@pytest.mark.parametrize("kill", [1, 2])
def test_lost_gpu_actors_hand_their_batches_on(runs, kill):
    """GPU actors die after set-up (a lost node): with one of two gone, its read tasks send
    their batches to the other; with both gone, the read tasks compute themselves. Either way
    the run ends with the same codes and recall as without actors."""
    out = _run(2, kill)
    dev = out["devices"]
    assert dev["placement"] == "gpu actors"
    lost = [a for a in dev["actors"] if a.get("lost")]
    assert len(lost) == kill and len(dev["actors"]) == 2
    readers = {r["pid"] for r in dev["readers"]}
    if kill == 1:
        alive = next(a for a in dev["actors"] if not a.get("lost"))
        assert alive["rows"] == 6000
        assert {c["pid"] for c in dev["compute"]} == {alive["pid"]}
    else:
        assert {c["pid"] for c in dev["compute"]} <= readers
        assert all(sorted(c["lost_actors"]) == sorted(a["pid"] for a in lost) for c in dev["compute"])
        assert all((c["encode"], c["exact_knn"]) == ("cpu", "faiss-cpu") for c in dev["compute"])  # not the GPU
    assert sum(c["rows"] for c in dev["compute"]) == 6000
    assert out["num_rows"] == 6000
    assert out["codes"] == runs[0]["codes"] and out["recall"] == runs[0]["recall"]


def test_encoders_run_as_one_actor_per_gpu_fed_by_cpu_read_tasks(runs):
    dev = runs[2]["devices"]
    assert dev["placement"] == "gpu actors" and dev["actor_startup_seconds"] > 0
    actors = dev["actors"]
    # one actor per declared GPU, each pinned to its own GPU, both used
    assert sorted(a["gpu_ids"] for a in actors) == ["0", "1"]
    assert all(a["rows"] > 0 for a in actors) and sum(a["rows"] for a in actors) == 6000
    # every shard was computed by an actor, and read by a CPU task in another process
    actor_pids = {a["pid"] for a in actors}
    assert {c["pid"] for c in dev["compute"]} == actor_pids
    assert sum(c["rows"] for c in dev["compute"]) == 6000 and sum(c["shards"] for c in dev["compute"]) == 6
    assert all(r["pid"] not in actor_pids for r in dev["readers"])
    assert sum(r["rows"] for r in dev["readers"]) == 6000
    # each actor says where it encoded: its GPU where that GPU is real (a 1-GPU machine has no
    # GPU "1"), else the CPU with faiss
    # (and the evaluation's search over the codes: PQ8 searches its decoded codes on the GPU);
    # the searches that would run on an actor's one CPU thread run in the read tasks instead
    for c in dev["compute"]:
        assert (c["encode"], c["exact_knn"], c["code_search"]) in {
            ("cpu", LEFT_TO_READERS, LEFT_TO_READERS), ("cuda:0", "faiss-gpu", "faiss-gpu")}, c
        if gpu_count() == 0:
            assert c["encode"] == "cpu"


def test_without_gpus_the_read_tasks_compute_themselves(runs):
    dev = runs[0]["devices"]
    assert dev["actors"] == []
    assert {c["pid"] for c in dev["compute"]} == {r["pid"] for r in dev["readers"]}
    # device="auto": a worker that sees a GPU uses it (Ray leaves GPUs visible to CPU tasks)
    want = ("workers on their GPU", "cuda:0") if gpu_count() else ("cpu workers", "cpu")
    assert dev["placement"] == want[0] and all(c["encode"] == want[1] for c in dev["compute"])


def test_actor_placement_changes_nothing_in_the_output(runs):
    assert runs[2]["num_rows"] == runs[0]["num_rows"] == 6000
    assert runs[2]["codes"] == runs[0]["codes"]  # same seed, same codec, same codes
    assert runs[2]["recall"] == runs[0]["recall"]  # same exact neighbours too


def test_placement_on_a_cluster_that_may_grow():
    # a number asked for is asked for in full where the cluster may add GPU nodes
    grow = plan_placement({"CPU": 0}, ngpu=2, may_grow=True)
    assert (grow.mode, grow.num_encoders, grow.cluster_gpus) == ("gpu", 2, 0)
    assert "2 waiting for GPUs" in grow.describe()
    assert plan_placement({"CPU": 8, "GPU": 1}, ngpu=4, may_grow=True).num_encoders == 4
    # ... not where it cannot (a local Ray), and "all" means the GPUs there are now
    assert plan_placement({"CPU": 0}, ngpu=2).mode == "cpu"
    assert plan_placement({"CPU": 8, "GPU": 1}, ngpu=4).num_encoders == 1
    assert plan_placement({"CPU": 0}, ngpu=-1, may_grow=True).mode == "cpu"
    assert plan_placement({"CPU": 8, "GPU": 3}, ngpu=-1, may_grow=True).num_encoders == 3
    assert plan_placement({"CPU": 8, "GPU": 3}, ngpu=0, may_grow=True).mode == "cpu"


def test_in_flight_cap():
    from vecpress.pipeline.distributed.ray_executor import MIN_IN_FLIGHT, in_flight_cap

    assert in_flight_cap(0, 1) == MIN_IN_FLIGHT  # a head with no CPUs still shows an autoscaler demand
    assert in_flight_cap(16, 1) == 32 and in_flight_cap(16, 2) == 16 and in_flight_cap(3, 1) == 6


def test_gpu_wait_seconds(monkeypatch):
    from vecpress.pipeline.distributed.gpu_pool import DEFAULT_GPU_WAIT_SECONDS, gpu_wait_seconds
    from vecpress.pipeline.errors import ClusterError

    monkeypatch.delenv("VECPRESS_GPU_WAIT_S", raising=False)
    assert gpu_wait_seconds() == DEFAULT_GPU_WAIT_SECONDS == 600
    monkeypatch.setenv("VECPRESS_GPU_WAIT_S", "45")
    assert gpu_wait_seconds() == 45 and gpu_wait_seconds(5) == 5  # an executor's own value wins
    monkeypatch.setenv("VECPRESS_GPU_WAIT_S", "ten minutes")
    with pytest.raises(ClusterError, match="VECPRESS_GPU_WAIT_S must be a number of seconds, got 'ten minutes'"):
        gpu_wait_seconds()


@pytest.mark.gpu
def test_compress_on_the_gpu_reports_it(make_corpus, tmp_path):
    """A compress run with device="cuda" encodes on the GPU and says so in its manifest, at the
    recall of the same run on the CPU."""
    if gpu_count() == 0:
        pytest.skip("CuPy sees no GPU")
    from vecpress.pipeline.options import CompressOptions
    from vecpress.pipeline.run import run_compress

    src, _ = make_corpus(num_rows=8000, dim=64)
    runs = {}
    for device in ("cpu", "cuda"):
        opts = CompressOptions(codec="PQ16", num_train=3000, num_queries=100, eval_k=10, shard_rows=2000,
                               batch_size=700, device=device, eval_rerank=False)
        runs[device] = run_compress([str(src)], str(tmp_path / device), "t", opts)
    compute = runs["cuda"].manifest["devices"]["compute"]
    assert compute and all(c["encode"] == "cuda:0" and c["exact_knn"] == "faiss-gpu" for c in compute)
    assert all(c["encode"] == "cpu" for c in runs["cpu"].manifest["devices"]["compute"])
    for k in ("recall_at_1", "recall_at_10"):
        assert abs(runs["cuda"].eval[k] - runs["cpu"].eval[k]) <= 0.01
