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

from pipeline.distributed.gpu_pool import plan_placement

ROOT = Path(__file__).resolve().parents[1]


def test_plan_placement():
    assert plan_placement({"CPU": 16, "GPU": 8}).num_encoders == 8
    assert plan_placement({"CPU": 16, "GPU": 8}).mode == "gpu"
    assert plan_placement({"CPU": 16, "GPU": 8}, ngpu=2).num_encoders == 2
    assert plan_placement({"CPU": 16, "GPU": 8}, ngpu=0).mode == "cpu"
    assert plan_placement({"CPU": 4}).mode == "cpu"
    assert plan_placement({"CPU": 4, "GPU": 0.5}).mode == "cpu"  # no whole GPU


SCRIPT = r"""
import json, sys
import numpy as np
import ray
from kernels.pq_encode import encode_pq
from pipeline.distributed.gpu_pool import GpuEncodePool

CENTROIDS = np.random.default_rng(0).normal(size=(4, 16, 4)).astype(np.float32)

def read(item):
    return np.random.default_rng(item).normal(size=(100 + item, 16)).astype(np.float32)

def make_encoder(device):
    return lambda x: encode_pq(x, CENTROIDS, 4, device=device)

gpus = int(sys.argv[1])
ray.init(num_cpus=2, num_gpus=gpus, include_dashboard=False, logging_level="ERROR")
try:
    with GpuEncodePool(make_encoder) as pool:
        codes, report = pool.map(read, range(12))
    ok = all(np.array_equal(c, encode_pq(read(i), CENTROIDS, 4)) for i, c in enumerate(codes))
    print("RESULT " + json.dumps({"ok": ok, "items": report.items, "summary": report.summary()}))
finally:
    ray.shutdown()
"""


@pytest.mark.parametrize("gpus", [2, 0])
def test_encoders_run_as_one_actor_per_gpu(gpus):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "RAY_USAGE_STATS_ENABLED": "0"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(gpus)], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=180)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = json.loads(lines[-1][len("RESULT "):])
    assert out["ok"]
    summary = out["summary"]
    encoders = summary["encoders"]
    if gpus:
        assert summary["placement"] == {"mode": "gpu", "num_encoders": 2}
        # one actor per declared GPU, each pinned to its own GPU, both used
        assert sorted(tuple(e["gpu_ids"]) for e in encoders) == [("0",), ("1",)]
        assert all(e["items"] > 0 for e in encoders)
        # no CUDA here: the actors say they encoded on the CPU
        assert {e["device"] for e in encoders} <= {"cpu", "cuda"}
        # readers are CPU tasks in other processes, holding no GPU
        actor_pids = {e["pid"] for e in encoders}
        assert all(it["reader"]["gpu_ids"] == [] and it["reader"]["pid"] not in actor_pids for it in out["items"])
    else:
        assert summary["placement"]["mode"] == "cpu"
        assert all(e["device"] == "cpu" and e["gpu_ids"] == [] for e in encoders)
    assert sum(e["items"] for e in encoders) == 12
    assert sum(e["rows"] for e in encoders) == sum(100 + i for i in range(12))
