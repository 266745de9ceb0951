"""The one scan over a shard's rows, and the observers it feeds.

`scan_shard` reads a shard batch by batch (`batch_rows` rows, never two files in one batch),
turns the vectors into numpy once, and hands every batch to its observers in order; each
observer computes something from the batch (codes, exact neighbours, the search over the
codes) or folds what the ones before it found (`Gather`: a running top-k). The encode pass,
an incremental run's read of its kept shards and the codec sweep are this one loop with other
observers, and the driver folds the shards' results as they arrive.

`ShardCompute` is the compute of one batch, the same in the worker that reads and in a GPU
actor that workers send batches to (pipeline.distributed).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import numpy as np
import pyarrow as pa

from vecpress.kernels.gpu_encode import gpu_count
from vecpress.kernels.knn import TopK, candidate_distances, exact_knn, gpu_knn, prepare_vectors
from vecpress.pipeline.codec_store import CodecRef, load_codec
from vecpress.pipeline.errors import ConfigError
from vecpress.pipeline.executor import report_progress
from vecpress.pipeline.layout import Piece, Shard, SourcePlan
from vecpress.pipeline.parquet import iter_shard_batches, vectors_as_numpy


@dataclass(frozen=True)
class Columns:
    """The source columns a stage reads, and the output fields it writes."""

    vector: str
    id: str
    keep: tuple[str, ...]
    dim: int
    out_fields: pa.Schema  # id + keep fields
    #: the metric the vectors are read for: cosine refuses all-zero vectors (it cannot normalise them)
    metric: str | None = None

    @classmethod
    def of(cls, plan: SourcePlan, metric: str | None = None) -> "Columns":
        return cls(plan.vector_column, plan.id_column, tuple(plan.keep), plan.dim, plan.output_fields, metric)

    @property
    def nonzero(self) -> bool:
        """Whether all-zero vectors are refused (cosine)."""
        return self.metric == "cosine"


#: vectors per batch (float32 bytes) when no batch size is given: below glibc's largest mmap
#: threshold (32 MiB), so a worker's per-batch arrays (the decoded vectors, their normalised
#: copy, the GEMM blocks) come back from its heap instead of fresh pages every batch. Measured
#: (benchmarks/batch_size.py, whole encode_shards runs, 2-core machine): 1.21x the worker's rate
#: with 65,536-row batches at 384-d, 1.24x at 768-d
AUTO_BATCH_BYTES = 24 << 20
#: rows per batch sent to a GPU encoder: large enough to overlap its host-to-GPU copies with
#: compute (kernels.gpu_encode's 64 MiB blocks); the size its benchmarks were measured with
GPU_BATCH_ROWS = 65_536


def batch_rows(batch_size: int, dim: int, *, gpu: bool) -> int:
    """Rows per record batch: `batch_size` when given (> 0); else GPU_BATCH_ROWS for batches
    computed on a GPU, AUTO_BATCH_BYTES of vectors for the CPU (16,384 rows at 384-d, 8,192
    at 768-d), within 1,024..65,536."""
    if batch_size > 0:
        return batch_size
    if gpu:
        return GPU_BATCH_ROWS
    return int(min(65_536, max(1_024, AUTO_BATCH_BYTES // (4 * dim))))


# ---- the scan ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Part:
    """The rows of a batch that come from one file."""

    piece: Piece
    #: its first row within its file, and within the batch
    first_row: int
    start: int
    #: the columns read, the vector column first
    record: pa.RecordBatch


@dataclass
class ScanBatch:
    """One batch of a shard scan, and what the observers before this one found in it (ids in
    `exact` and `found` are batch-local). A batch holds `batch_size` rows (the shard's last
    one fewer), from as many files as it takes: small files do not make small batches."""

    parts: list[Part]
    #: its first row within the shard, and that row's global position
    local: int
    position: int
    #: the raw vectors, float32
    x: np.ndarray
    codes: np.ndarray | None = None
    warm: np.ndarray | None = None
    #: exact top-(k + 1) of the held-out queries among the batch's rows: (D, I)
    exact: tuple | None = None
    #: the evaluation's search over the batch's codes: (D, I, E or None)
    found: tuple | None = None
    #: each row's coarse partition (Partitions), for a codes table's inverted lists, and the
    #: code of its residual to the partition's centroid (None: the lists hold `codes`)
    partitions: np.ndarray | None = None
    residual_codes: np.ndarray | None = None
    _prepared: dict = field(default_factory=dict, repr=False)

    def prepared(self, metric: str) -> np.ndarray:
        """The vectors prepared for `metric` (prepare_vectors), once per batch and metric."""
        if metric not in self._prepared:
            self._prepared[metric] = prepare_vectors(self.x, metric)
        return self._prepared[metric]


class Observer(Protocol):
    def observe(self, batch: ScanBatch) -> None:
        """See one batch (in scan order); may set the batch's fields for the observers after it."""


def scan_shard(shard: Shard, columns: Columns, observers: list[Observer], *, batch_size: int,
               extra: tuple[str, ...] = ()) -> Iterator[ScanBatch]:
    """Read the shard's vector column (and `extra` columns after it) in batches of
    `batch_size` rows, validate the vectors (vectors_as_numpy, per file), and let every
    observer see every batch; yields the batches once observed. Read and conversion errors
    name the file, column and rows; so do values outside their row group's footer statistics,
    and (cosine) all-zero vectors."""
    parts: list[Part] = []
    xs: list[np.ndarray] = []
    rows = first = 0

    def batch() -> ScanBatch:
        b = ScanBatch(parts, first, shard.row_offset + first, xs[0] if len(xs) == 1 else np.concatenate(xs))
        for observer in observers:
            observer.observe(b)
        report_progress(first + len(b.x), shard.num_rows)
        return b

    for piece, local, first_row, record, bounds in iter_shard_batches(shard, [columns.vector, *extra], batch_size):
        x = vectors_as_numpy(record.column(0), columns.dim, where=piece.file_uri, column=columns.vector,
                             first_row=first_row, bounds=bounds, nonzero=columns.nonzero)
        at = 0
        while at < len(x):
            take = min(len(x) - at, batch_size - rows)
            if not parts:
                first = local + at
            parts.append(Part(piece, first_row + at, rows, record.slice(at, take)))
            xs.append(x[at:at + take])
            rows, at = rows + take, at + take
            if rows == batch_size:
                yield batch()
                parts, xs, rows = [], [], 0
    if rows:
        yield batch()


def run_scan(shard: Shard, columns: Columns, observers: list[Observer], *, batch_size: int) -> int:
    """Scan the whole shard for its observers; returns the rows scanned."""
    return sum(len(b.x) for b in scan_shard(shard, columns, observers, batch_size=batch_size))


class Gather:
    """Folds a batch field, `exact` or `found`, into a running top-k of global positions."""

    def __init__(self, field: str, queries: int, k: int, exclude: np.ndarray | None, *, with_extra: bool = False):
        self.field = field
        self.top = TopK(queries, k, exclude=exclude, with_extra=with_extra)

    def observe(self, batch: ScanBatch) -> None:
        result = getattr(batch, self.field)
        if result is not None:
            self.top.add(*result, offset=batch.position)


def gathers(spec: ComputeSpec, queries: np.ndarray | None, query_positions: np.ndarray | None):
    """(exact, found) Gather observers of a shard's searches (None where not asked for)."""
    if queries is None or spec.k <= 0:
        return None, None
    exact = Gather("exact", len(queries), spec.k, query_positions)
    found = Gather("found", len(queries), spec.k, query_positions, with_extra=spec.rerank) if spec.search else None
    return exact, found


class Computed:
    """The batch's codes, warm codes and searches, from a ShardCompute (in this process) or a
    RemoteShardCompute (a GPU actor)."""

    def __init__(self, compute):
        self.compute = compute

    def observe(self, batch: ScanBatch) -> None:
        batch.codes, batch.warm, batch.exact, batch.found = self.compute(batch.x)


class StoredCodes:
    """A kept shard's stored codes (in row order) for each batch, then the searches over them."""

    def __init__(self, codes: np.ndarray, warm: np.ndarray | None, compute: "ShardCompute"):
        self.codes, self.warm, self.compute = codes, warm, compute

    def observe(self, batch: ScanBatch) -> None:
        rows = slice(batch.local, batch.local + len(batch.x))
        batch.codes = self.codes[rows]
        batch.warm = None if self.warm is None else self.warm[rows]
        batch.exact, batch.found = self.compute.searches(batch.x, batch.codes, batch.warm)


class Partitions:
    """Each batch's coarse partitions (pipeline.lists), from its raw vectors: on GPU `device`
    where faiss sees one (IvfModel.assign), else on the CPU; with a `residual` codec, the
    codes of the rows' residuals to their centroids too."""

    def __init__(self, coarse: CodecRef, residual: CodecRef | None = None, device: str = "cpu"):
        self.coarse, self.device = load_codec(coarse), device
        self.residual = load_codec(residual) if residual else None

    def observe(self, batch: ScanBatch) -> None:
        batch.partitions = self.coarse.assign(batch.x, device=self.device)[0]
        if self.residual is not None:
            batch.residual_codes = self.residual.encode(self.coarse.residuals(batch.x, batch.partitions),
                                                        device=self.device)


class Exact:
    """The exact top-(k + 1) of prepared queries among the batch's rows (no codec)."""

    def __init__(self, xq: np.ndarray, k: int, metric: str):
        self.xq, self.k, self.metric = xq, k, metric

    def observe(self, batch: ScanBatch) -> None:
        batch.exact = exact_knn(self.xq, batch.prepared(self.metric), self.k + 1, self.metric)


# ---- the compute of one batch -------------------------------------------------------------------

@dataclass(frozen=True)
class ComputeSpec:
    """What a batch's compute does: the codec (and warm codec) that encode it, and the
    evaluation's searches (exact top-k, and with `search` the top-k over the codes, with
    `rerank` the candidates' exact distances)."""

    codec: CodecRef
    rerank_codec: CodecRef | None = None
    #: neighbours per held-out query (0 = no searches)
    k: int = 100
    search: bool = True
    rerank: bool = True


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when CuPy sees a GPU here, else "cpu"; "cuda"/"cuda:N" as given when
    CuPy sees that GPU here (else ConfigError: asked for by name, it is not replaced); "cpu"."""
    if device == "cpu":
        return device
    gpus = gpu_count()
    if device == "auto":
        return "cuda" if gpus > 0 else "cpu"
    if gpus <= int(device.partition(":")[2] or 0):
        raise ConfigError(f"--device {device}: this worker ({socket.gethostname()}) sees no such GPU "
                          f"(CuPy sees {gpus}); use --device auto to fall back to the CPU")
    return device


#: ShardCompute.info's "exact_knn" / "code_search" where a GPU actor leaves that search to the
#: read tasks that send it batches (cpu_work=False)
LEFT_TO_READERS = "faiss-cpu in the read tasks"


def where_am_i() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid()}


class ShardCompute:
    """The compute of one batch of rows: codes, warm codes, the exact top-(k + 1) of the
    held-out queries among the batch's rows, and with `spec.search` the evaluation's search
    over the batch's codes (search_batch; batch-local ids throughout). Runs in the worker
    that reads (this class) or in a GPU actor that workers send batches to
    (pipeline.distributed), where both searches run on the GPU."""

    def __init__(self, spec: ComputeSpec, queries: np.ndarray | None, *, device: str = "auto",
                 cpu_work: bool = True, search_ngpu: int | None = None):
        """`device`: where the batch is encoded (and by default searched). `search_ngpu`: the
        GPUs faiss may search on instead (-1 = those it sees, 0 = none), for a compute that
        only searches (an incremental run's kept rows).

        `cpu_work=False` (a GPU actor): a search that would run on this process's CPU is
        left undone (None in the result) for the read task that sent the batch: the actor
        runs one batch at a time on one thread, while the read tasks have the cluster's CPUs.
        That is the exact top-k past faiss's GPU top-k (knn.GPU_MAX_K), and the search over
        codes that faiss searches only on the CPU (fast-scan PQ, RaBitQ, ...)."""
        self.codec = load_codec(spec.codec)
        self.warm = load_codec(spec.rerank_codec) if spec.rerank_codec else None
        self.k = spec.k
        self.device = resolve_device(device)
        with_knn = queries is not None and spec.k > 0
        self.queries = queries if with_knn and spec.search else None
        self.rerank = spec.rerank
        self.xq = prepare_vectors(queries, self.codec.metric) if with_knn else None
        on_gpu = self.device != "cpu"
        # both searches take k + 1 (the query's own row); past faiss's GPU top-k both stay on the CPU
        if search_ngpu is None:
            self.knn_ngpu = 1 if on_gpu and gpu_knn(self.k + 1, 1) else 0
        else:
            self.knn_ngpu = 1 if gpu_knn(self.k + 1, search_ngpu) else 0
        #: the GPU the searches run on: the encoder's (cuda:N), not the thread's current one
        self.gpu_number = int(self.device.partition(":")[2] or 0) if on_gpu else -1
        search_device = self.codec.search_device(self.knn_ngpu)
        self.knn_here = self.xq is not None and (cpu_work or self.knn_ngpu > 0)
        self.search_here = self.queries is not None and (cpu_work or search_device != "faiss-cpu")
        self.info = {**where_am_i(), "gpu_ids": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
                     "encode": self.codec.encode_device(self.device) if on_gpu else "cpu",
                     "rerank_encode": (self.warm.encode_device(self.device) if on_gpu else "cpu") if self.warm else None,
                     "exact_knn": "faiss-gpu" if self.knn_ngpu else ("faiss-cpu" if self.knn_here else LEFT_TO_READERS),
                     "code_search": None if self.queries is None else
                     (search_device if self.search_here else LEFT_TO_READERS)}
        encoder = self.codec.gpu_encoder(self.device) if on_gpu and self.info["encode"] != "cpu" else None
        if encoder is not None:
            self.info["gpu_name"] = encoder.device_name

    def __call__(self, x: np.ndarray):
        """-> (codes, warm codes or None, exact (D, I) or None, search_batch's (D, I, E) or None)."""
        codes = self.codec.encode(x, device=self.device)  # raw vectors: the codec prepares them itself
        warm = self.warm.encode(x, device=self.device) if self.warm else None
        return codes, warm, *self.searches(x, codes, warm)

    def searches(self, x: np.ndarray, codes: np.ndarray, warm: np.ndarray | None, *, knn: bool = True,
                 search: bool = True):
        """(exact (D, I) or None, search_batch's (D, I, E) or None) of a batch and its codes:
        those asked for that this compute does (`knn_here`, `search_here`)."""
        exact = found = None
        if knn and self.knn_here:
            exact = exact_knn(self.xq, prepare_vectors(x, self.codec.metric), self.k + 1, self.codec.metric,
                              ngpu=self.knn_ngpu, device=self.gpu_number)  # +1: the query's own row
        if search and self.search_here:
            found = search_batch(self.codec, self.queries, self.xq, codes, x, self.k, warm=self.warm,
                                 warm_codes=warm, rerank=self.rerank, ngpu=self.knn_ngpu, device=self.gpu_number)
        return exact, found


def search_batch(codec, queries: np.ndarray, xq: np.ndarray, codes: np.ndarray, x: np.ndarray, k: int, *,
                 warm=None, warm_codes: np.ndarray | None = None, rerank: bool = True, ngpu: int = 0,
                 device: int = -1):
    """The evaluation's search within one batch: top-(k + 1) of the raw `queries` over the
    batch's codes (the +1 leaves k once a query's own row is excluded; on `ngpu` GPUs where
    the codec allows, GPU number `device`: Codec.search_codes), batch-local ids, and with
    `rerank` the candidates' exact distances to the prepared queries `xq`: from the warm codes
    when the output has a warm column (as evaluate re-ranks then), else from the batch's
    source rows `x`.
    Returns (D, I, E or None)."""
    D, I = codec.search_codes(queries, codes, min(k + 1, len(codes)), ngpu=ngpu, device=device)
    if not rerank:
        return D, I, None
    rows = np.unique(I[I >= 0])  # only the candidates' rows are prepared or decoded
    base = warm.decode(warm_codes[rows]) if warm is not None else prepare_vectors(x[rows], codec.metric)
    return D, I, candidate_distances(xq, base, np.where(I >= 0, np.searchsorted(rows, I), -1), codec.metric)
