"""Encoders as GPU actors, fed by CPU tasks that read and decode the input.

On a Ray cluster that declares GPUs, one long-lived actor per GPU (`num_gpus=1`, so Ray pins
it to its own device through CUDA_VISIBLE_DEVICES) loads the encoder once and encodes every
array handed to it; CPU tasks (`num_cpus` each, no GPU) read and decode the items and put
the arrays in the object store, where the actor takes them. Without GPUs every item is read
and encoded by one CPU task. Either way `map` returns the results in item order plus a
report of which devices did what (`EncodeReport`).

Ray counts GPUs as a resource: `ray.init(num_gpus=2)` declares two without any hardware,
which is how the scheduling is tested on a CPU machine. An actor on such a declared GPU
finds no CUDA device and says so in the report (`device: "cpu"`).
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

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


@dataclass
class EncodeReport:
    """Which process read each item and which device encoded it."""

    placement: EncodePlacement
    items: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        encoders: dict = {}
        for it in self.items:
            e = it["encoder"]
            key = (e["host"], e["pid"])
            row = encoders.setdefault(key, {"host": e["host"], "pid": e["pid"], "gpu_ids": e["gpu_ids"],
                                            "device": e["device"], "items": 0, "rows": 0, "seconds": 0.0})
            row["items"] += 1
            row["rows"] += it["rows"]
            row["seconds"] += e["seconds"]
        readers = sorted({(it["reader"]["host"], it["reader"]["pid"]) for it in self.items})
        return {"placement": asdict(self.placement), "description": self.placement.describe(),
                "readers": [{"host": h, "pid": p} for h, p in readers],
                "encoders": sorted(encoders.values(), key=lambda r: (r["host"], r["gpu_ids"], r["pid"]))}


def _where() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()] if ray.is_initialized() else []}


def _device_of(gpu_ids: list) -> str:
    """"cuda" when this process was given a GPU and CUDA can be used here, else "cpu"."""
    if not gpu_ids:
        return "cpu"
    from kernels.pq_encode import cuda_device_count

    return "cuda" if cuda_device_count() > 0 else "cpu"


@ray.remote
def _read(read: Callable, item) -> tuple:
    start = time.perf_counter()
    x = read(item)
    return x, {**_where(), "seconds": time.perf_counter() - start}


@ray.remote
def _read_and_encode(read: Callable, make_encoder: Callable, item) -> tuple:
    start = time.perf_counter()
    x = read(item)
    reader = {**_where(), "seconds": time.perf_counter() - start}
    start = time.perf_counter()
    codes = make_encoder("cpu")(x)
    return codes, reader, {**_where(), "device": "cpu", "seconds": time.perf_counter() - start}


@ray.remote
class _EncodeActor:
    """One per GPU: builds the encoder once for its device, then encodes arrays."""

    def __init__(self, make_encoder: Callable):
        self.where = _where()
        self.device = _device_of(self.where["gpu_ids"])
        self.encode_fn = make_encoder(self.device)

    def encode(self, read_result: tuple) -> tuple:
        x, reader = read_result
        start = time.perf_counter()
        codes = self.encode_fn(x)
        return codes, reader, {**self.where, "device": self.device, "seconds": time.perf_counter() - start}


class GpuEncodePool:
    """`map(read, items)`: `read(item)` -> array on a CPU task, `make_encoder(device)(array)` ->
    codes on a GPU actor (or on the same CPU task without GPUs).

    `make_encoder` is called once per actor with "cuda" or "cpu" and must be picklable (a
    module-level function or a functools.partial over small arguments such as codec bytes).
    `max_queued` bounds the arrays waiting per actor, and so the object-store memory in flight.
    """

    def __init__(self, make_encoder: Callable[[str], Callable], *, ngpu: int = -1,
                 num_cpus_per_reader: float = 1, max_queued: int = 2):
        self.make_encoder = make_encoder
        self.ngpu = ngpu
        self.num_cpus_per_reader = num_cpus_per_reader
        self.max_queued = max_queued
        self.placement: EncodePlacement | None = None
        self._actors: list = []

    def start(self) -> "GpuEncodePool":
        self.placement = plan_placement(ray.cluster_resources(), ngpu=self.ngpu)
        if self.placement.mode == "gpu" and not self._actors:
            self._actors = [_EncodeActor.options(num_gpus=1, num_cpus=0).remote(self.make_encoder)
                            for _ in range(self.placement.num_encoders)]
        return self

    def shutdown(self) -> None:
        for actor in self._actors:
            ray.kill(actor)
        self._actors = []

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.shutdown()

    def map(self, read: Callable, items) -> tuple[list, EncodeReport]:
        if self.placement is None:
            self.start()
        items = list(items)
        report = EncodeReport(self.placement)
        results: list[Any] = [None] * len(items)
        meta: list = [None] * len(items)
        if self.placement.mode == "cpu":
            task = _read_and_encode.options(num_cpus=self.num_cpus_per_reader)
            refs = [task.remote(read, self.make_encoder, item) for item in items]
            for i, ref in enumerate(refs):
                results[i], reader, encoder = ray.get(ref)
                meta[i] = (reader, encoder)
        else:
            reader_task = _read.options(num_cpus=self.num_cpus_per_reader, num_gpus=0)
            pending: dict = {}  # ref -> (item index, actor index)
            queued = [0] * len(self._actors)
            next_item = 0
            while next_item < len(items) or pending:
                while next_item < len(items) and min(queued) < self.max_queued:
                    a = queued.index(min(queued))  # the least busy actor
                    ref = self._actors[a].encode.remote(reader_task.remote(read, items[next_item]))
                    pending[ref] = (next_item, a)
                    queued[a] += 1
                    next_item += 1
                ready, _ = ray.wait(list(pending), num_returns=1)
                for ref in ready:
                    i, a = pending.pop(ref)
                    queued[a] -= 1
                    codes, reader, encoder = ray.get(ref)
                    results[i] = codes
                    meta[i] = (reader, encoder)
        for i, (reader, encoder) in enumerate(meta):
            report.items.append({"item": i, "rows": int(len(results[i])), "reader": reader, "encoder": encoder})
        return results, report
