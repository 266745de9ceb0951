"""Encoders as GPU actors, fed by CPU tasks that read and decode the input.

On a Ray cluster that declares GPUs, the encode stage starts one long-lived actor per GPU
(`num_gpus=1`, so Ray pins it to its own device through CUDA_VISIBLE_DEVICES). Each actor
loads the codec's GPU encoder and the held-out queries once. The encode tasks stay CPU tasks:
they read and decode their shard's Parquet batches, send each batch to their actor (through
the object store), get back its codes and exact top-k, and write the Lance fragments. Without
GPUs there are no actors and each task computes itself. A read task whose actor dies (its node
lost) sends its batches to the next live actor, and computes them itself, on its CPU, once
none is left. Every shard's result says which
process read it and which device computed it; the run's manifest aggregates that.

On a cluster that grows (an autoscaler, GPU nodes starting at zero), `ngpu=N` asks for N
actors whatever the cluster holds at the start: the actors wait for GPUs, the autoscaler sees
their demand and adds GPU nodes. The encode stage waits for them at most `wait_seconds`, then
goes on with the actors that are ready and ends the others; with none ready it fails with a
ClusterError before anything is written. `ngpu=-1` (all) takes the GPUs the cluster has when
the run starts; a local Ray, which cannot grow, never gets more actors than it has GPUs.

Ray counts GPUs as a resource: `ray.init(num_gpus=2)` declares two without any hardware,
which is how the scheduling is tested on a CPU machine. An actor on such a declared GPU
finds no CUDA device and says so (`encode: "cpu"`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402

from vecpress.pipeline.errors import ClusterError  # noqa: E402
from vecpress.pipeline.scan import LEFT_TO_READERS  # noqa: E402

log = logging.getLogger("vecpress")

#: seconds the encode stage waits for its GPU actors when VECPRESS_GPU_WAIT_S does not say
DEFAULT_GPU_WAIT_SECONDS = 600.0


def gpu_wait_seconds(value: float | None = None) -> float:
    """`value`, else $VECPRESS_GPU_WAIT_S, else DEFAULT_GPU_WAIT_SECONDS."""
    if value is not None:
        return float(value)
    env = os.environ.get("VECPRESS_GPU_WAIT_S")
    try:
        return float(env) if env else DEFAULT_GPU_WAIT_SECONDS
    except ValueError:
        raise ClusterError(f"VECPRESS_GPU_WAIT_S must be a number of seconds, got {env!r}") from None


@dataclasses.dataclass(frozen=True)
class EncodePlacement:
    """Where encoding runs: `"gpu"` (that many GPU actors) or `"cpu"` (CPU tasks).
    `cluster_gpus`: the whole GPUs the cluster had when the run asked."""

    mode: str
    num_encoders: int
    cluster_gpus: int = 0

    def describe(self) -> str:
        if self.mode == "gpu":
            waits = (f" ({self.num_encoders - self.cluster_gpus} waiting for GPUs the cluster did not have yet)"
                     if self.num_encoders > self.cluster_gpus else "")
            return f"{self.num_encoders} GPU encoder actor(s), one per GPU, fed by CPU read tasks{waits}"
        return "CPU tasks that read and encode (no GPU in the cluster)"


def plan_placement(resources: dict, *, ngpu: int = -1, may_grow: bool = False) -> EncodePlacement:
    """GPU actors when the cluster has GPUs (`ngpu=-1`: all of them, 0: never), else CPU tasks.
    `may_grow` (a cluster that may add nodes): `ngpu=N` asks for N actors even beyond the GPUs
    it has now. Fractional GPU totals count whole GPUs only."""
    gpus = int(resources.get("GPU", 0))
    use = gpus if ngpu < 0 else (ngpu if may_grow else min(ngpu, gpus))
    if use <= 0:
        return EncodePlacement("cpu", max(1, int(resources.get("CPU", 1))), gpus)
    return EncodePlacement("gpu", use, gpus)


@ray.remote
class _ComputeActor:
    """One per GPU (Ray pins it there through CUDA_VISIBLE_DEVICES): holds the codec's GPU
    encoder and the held-out queries, and computes the batches that CPU read tasks send."""

    def __init__(self):
        """The costly part of the start, done before the codec exists: imports, the CUDA
        context, faiss's GPU resources. `setup` then only loads the codec and the queries."""
        from vecpress.kernels._faiss import num_gpus
        from vecpress.kernels.gpu_encode import gpu_count
        from vecpress.pipeline.scan import ShardCompute  # noqa: F401 (imports the pipeline once)

        if gpu_count():
            import cupy

            cupy.zeros(1).sum()  # creates the CUDA context and the memory pool
        if num_gpus():
            from vecpress.kernels.knn import _gpu_resources

            _gpu_resources()
        self.compute = None
        self.rows = 0
        self.seconds = 0.0

    def setup(self, spec, queries) -> dict:
        from vecpress.pipeline.scan import ShardCompute

        self.compute = ShardCompute(spec, queries, device="auto", cpu_work=False)
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
    """A ShardCompute whose batches go to a GPU actor: what a CPU read task calls.

    The searches an actor leaves to the CPU (ShardCompute's `cpu_work`) run here, in the read
    task, on the codes the actor sends back. If its actor dies (its node is lost, its process
    killed), the batch goes to the pool's next live actor; with none left, the read task
    computes itself on its CPU (a GPU that lost its actors may be what failed), and its `info`
    says which actors it lost. Batches are pure compute, so sending one again is safe."""

    device = "cuda"  # (where its batches go: encode_shards sizes them for a GPU)

    def __init__(self, pool: "GpuComputePool", first: int):
        self.pool = pool
        self.current = first
        self.lost: list[int] = []
        self.local = None
        self.rest = None  # the read task's own ShardCompute for what the actor leaves undone

    @property
    def info(self) -> dict:
        if self.local is not None:
            lost = [self.pool.infos[i].get("pid") for i in self.lost]
            return {**self.local.info, "lost_actors": lost}
        return self.pool.infos[self.current]

    def __call__(self, x):
        while self.local is None:
            try:
                codes, warm, knn, found = ray.get(self.pool.actors[self.current].run.remote(x))
            except ray.exceptions.RayActorError as exc:
                self._lose(exc)
                continue
            info = self.pool.infos[self.current]  # (what it left undone came back as None)
            todo_knn, todo_search = (info.get(key) == LEFT_TO_READERS for key in ("exact_knn", "code_search"))
            if todo_knn or todo_search:
                self.rest = self.rest or self._cpu_compute()
                more_knn, more_found = self.rest.searches(x, codes, warm, knn=todo_knn, search=todo_search)
                knn, found = (more_knn if todo_knn else knn), (more_found if todo_search else found)
            return codes, warm, knn, found
        return self.local(x)

    def _cpu_compute(self):
        from vecpress.pipeline.scan import ShardCompute

        return ShardCompute(self.pool.spec, ray.get(self.pool.queries_ref), device="cpu")

    def _lose(self, exc) -> None:
        n = len(self.pool.actors)
        self.lost.append(self.current)
        live = [j % n for j in range(self.current + 1, self.current + n) if j % n not in self.lost]
        if live:
            self.current = live[0]
            log.warning("encode: GPU encoder actor %d is gone (%s); its batches go to actor %d",
                        self.lost[-1], type(exc).__name__, self.current)
            return
        log.warning("encode: every GPU encoder actor is gone (%s); this read task computes its batches itself",
                    type(exc).__name__)
        self.local = self.rest or self._cpu_compute()


class GpuComputePool:
    """One compute actor per GPU of the cluster; `for_shard(i)` spreads shards over them
    round-robin. Picklable (actor handles travel in task arguments); `close()` ends the actors."""

    def __init__(self, actors: list, infos: list[dict], placement: EncodePlacement):
        self.actors = actors
        self.infos = infos
        self.placement = placement
        #: what `setup` gave the actors (a ComputeSpec and the queries): a read task whose actors
        #: are all gone computes with them
        self.spec = None
        self.queries_ref = None
        #: seconds the encode stage waited for the actors to be ready (what is left of their
        #: process start, imports, CUDA context, kernel compile and faiss GPU resources)
        self.startup_seconds = 0.0

    @classmethod
    def prestart(cls, *, ngpu: int = -1, may_grow: bool = False) -> "GpuComputePool | None":
        """Ask for the actors (one per GPU) without waiting: they warm up while the run
        samples and trains. None when the cluster has no GPUs (the workers then compute
        themselves) and, with `may_grow`, no GPU was asked for by number either."""
        placement = plan_placement(ray.cluster_resources(), ngpu=ngpu, may_grow=may_grow)
        if placement.mode != "gpu":
            return None
        if placement.num_encoders > placement.cluster_gpus:
            log.info("encode: asking for %d GPU encoder(s), the cluster has %d GPU(s) now: waiting for more",
                     placement.num_encoders, placement.cluster_gpus)
        actors = [_ComputeActor.options(num_gpus=1, num_cpus=0).remote() for _ in range(placement.num_encoders)]
        return cls(actors, [], placement)

    def setup(self, spec, queries, *, wait_seconds: float | None = None) -> "GpuComputePool":
        """Give every actor the codec and the queries; waits until all are ready, at most
        `wait_seconds` (gpu_wait_seconds). Actors not ready by then are ended and the stage
        goes on with the others; with none ready, ClusterError. `startup_seconds` is the
        wait: what the encode stage pays for the actors."""
        start = time.perf_counter()
        try:
            wait = gpu_wait_seconds(wait_seconds)
            self.spec, self.queries_ref = spec, ray.put(queries)
            refs = [a.setup.remote(spec, self.queries_ref) for a in self.actors]
            ready = set(ray.wait(refs, num_returns=len(refs), timeout=wait)[0])
            late = [a for a, r in zip(self.actors, refs) if r not in ready]
            kept = [(a, r) for a, r in zip(self.actors, refs) if r in ready]
            self.infos = ray.get([r for _, r in kept])  # raises a setup's own error
        except BaseException:
            self.close()
            raise
        for actor in late:
            ray.kill(actor)
        self.actors = [a for a, _ in kept]
        self.startup_seconds = round(time.perf_counter() - start, 3)
        if late:
            gpus = int(ray.cluster_resources().get("GPU", 0))
            asked = len(kept) + len(late)
            if not kept:
                raise ClusterError(
                    f"no GPU encoder was ready after {wait:.0f} s: asked for {asked} (--ngpu), the cluster has "
                    f"{gpus} GPU(s) and none free for them. Add GPU nodes, lower --ngpu, or encode on CPUs "
                    f"with --ngpu 0; VECPRESS_GPU_WAIT_S sets the wait")
            log.warning("encode: %d of %d GPU encoders ready after %.0f s (the cluster has %d GPU(s)); "
                        "going on with %d", len(kept), asked, wait, gpus, len(kept))
            self.placement = dataclasses.replace(self.placement, num_encoders=len(kept))
        return self

    def for_shard(self, index: int) -> RemoteShardCompute:
        return RemoteShardCompute(self, index % len(self.actors))

    def totals(self) -> list[dict]:
        """Each actor's info, rows and busy seconds; `lost: True` (and no counts) for an actor
        that died during the stage."""
        out = []
        for actor, info in zip(self.actors, self.infos):
            try:
                out.append(ray.get(actor.totals.remote()))
            except ray.exceptions.RayActorError:
                out.append({**info, "lost": True, "rows": None, "busy_seconds": None})
        return out

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []
