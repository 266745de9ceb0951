"""Encoders as GPU actors, fed by CPU tasks that read and decode the input.

On a Ray cluster that declares GPUs, the encode stage starts one long-lived actor per GPU
(`num_gpus=1`, so Ray pins it to its own device through CUDA_VISIBLE_DEVICES). Each actor
loads the codec's GPU encoder and the held-out queries once. The encode tasks stay CPU tasks:
they read and decode their shard's Parquet batches, send each batch to their actor (through
the object store), get back its codes and exact top-k, and write the Lance fragments. Without
GPUs there are no actors and each task computes itself. Every shard's result says which
process read it and which device computed it; the run's manifest aggregates that.

Ray counts GPUs as a resource: `ray.init(num_gpus=2)` declares two without any hardware,
which is how the scheduling is tested on a CPU machine. An actor on such a declared GPU
finds no CUDA device and says so (`encode: "cpu"`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402


@dataclass(frozen=True)
class EncodePlacement:
    """Where encoding runs: `"gpu"` (that many GPU actors) or `"cpu"` (CPU tasks)."""

    mode: str
    num_encoders: int

    def describe(self) -> str:
        if self.mode == "gpu":
            return f"{self.num_encoders} GPU encoder actor(s), one per GPU, fed by CPU read tasks"
        return "CPU tasks that read and encode (no GPU in the cluster)"


def plan_placement(resources: dict, *, ngpu: int = -1) -> EncodePlacement:
    """GPU actors when the cluster has GPUs (`ngpu=-1`: all of them, 0: never), else CPU tasks.
    Fractional GPU totals count whole GPUs only."""
    gpus = int(resources.get("GPU", 0))
    use = gpus if ngpu < 0 else min(ngpu, gpus)
    if use <= 0:
        return EncodePlacement("cpu", max(1, int(resources.get("CPU", 1))))
    return EncodePlacement("gpu", use)


@ray.remote
class _ComputeActor:
    """One per GPU (Ray pins it there through CUDA_VISIBLE_DEVICES): holds the codec's GPU
    encoder and the held-out queries, and computes the batches that CPU read tasks send."""

    def __init__(self):
        """The costly part of the start, done before the codec exists: imports, the CUDA
        context, faiss's GPU resources. `setup` then only loads the codec and the queries."""
        from kernels._faiss import num_gpus
        from kernels.gpu_encode import gpu_count
        from pipeline.stages import ShardCompute  # noqa: F401 (imports the pipeline once)

        if gpu_count():
            import cupy

            cupy.zeros(1).sum()  # creates the CUDA context and the memory pool
        if num_gpus():
            from kernels.knn import _gpu_resources

            _gpu_resources()
        self.compute = None
        self.rows = 0
        self.seconds = 0.0

    def setup(self, job, queries) -> dict:
        from pipeline.stages import ShardCompute

        self.compute = ShardCompute(job, queries, device="auto")
        self.compute.info["gpu_ids"] = ",".join(str(g) for g in ray.get_gpu_ids())
        return self.compute.info

    def run(self, x):
        start = time.perf_counter()
        out = self.compute(x)
        self.rows += len(x)
        self.seconds += time.perf_counter() - start
        return out

    def totals(self) -> dict:
        return {**self.compute.info, "rows": self.rows, "busy_seconds": round(self.seconds, 3)}


class RemoteShardCompute:
    """A ShardCompute whose batches go to one GPU actor: what a CPU read task calls."""

    def __init__(self, actor, info: dict):
        self.actor = actor
        self.info = info

    def __call__(self, x):
        return ray.get(self.actor.run.remote(x))


class GpuComputePool:
    """One compute actor per GPU of the cluster; `for_shard(i)` spreads shards over them
    round-robin. Picklable (actor handles travel in task arguments); `close()` ends the actors."""

    def __init__(self, actors: list, infos: list[dict], placement: EncodePlacement):
        self.actors = actors
        self.infos = infos
        self.placement = placement
        #: seconds the encode stage waited for the actors to be ready (what is left of their
        #: process start, imports, CUDA context, kernel compile and faiss GPU resources)
        self.startup_seconds = 0.0

    @classmethod
    def prestart(cls, *, ngpu: int = -1) -> "GpuComputePool | None":
        """Ask for the actors (one per GPU) without waiting: they warm up while the run
        samples and trains. None when the cluster has no GPUs (the workers then compute
        themselves)."""
        placement = plan_placement(ray.cluster_resources(), ngpu=ngpu)
        if placement.mode != "gpu":
            return None
        actors = [_ComputeActor.options(num_gpus=1, num_cpus=0).remote() for _ in range(placement.num_encoders)]
        return cls(actors, [], placement)

    def setup(self, job, queries) -> "GpuComputePool":
        """Give every actor the codec and the queries; waits until all are ready.
        `startup_seconds` is that wait: what the encode stage pays for the actors."""
        start = time.perf_counter()
        queries_ref = ray.put(queries)
        self.infos = ray.get([a.setup.remote(job, queries_ref) for a in self.actors])
        self.startup_seconds = round(time.perf_counter() - start, 3)
        return self

    @classmethod
    def start(cls, job, queries, *, ngpu: int = -1) -> "GpuComputePool | None":
        """Actors on the cluster's GPUs, ready for `job`; None when it has no GPUs."""
        pool = cls.prestart(ngpu=ngpu)
        return None if pool is None else pool.setup(job, queries)

    def for_shard(self, index: int) -> RemoteShardCompute:
        i = index % len(self.actors)
        return RemoteShardCompute(self.actors[i], self.infos[i])

    def totals(self) -> list[dict]:
        return ray.get([a.totals.remote() for a in self.actors]) if self.actors else []

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
