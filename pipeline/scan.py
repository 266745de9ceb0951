"""Stage functions over one shard or fragment: plain functions, callable in a REPL, run by any
Executor. Arguments are small descriptors; big shared inputs (queries) arrive as numpy."""

from __future__ import annotations

import io
import json
import os
import re
import socket
import time
from dataclasses import dataclass

import lance
import lance.fragment
import numpy as np
import pyarrow as pa

from vecpress.kernels.gpu_encode import gpu_count
from vecpress.kernels.knn import TopK, candidate_distances, exact_knn, gpu_knn, prepare_vectors
from vecpress.pipeline import storage
from vecpress.pipeline.codec_store import CodecRef, load_codec
from vecpress.pipeline.errors import ConfigError, SourceError
from vecpress.pipeline.lance_io import open_lance
from vecpress.pipeline.schema import CODE_COLUMN, codes_schema
from vecpress.pipeline.source import Shard, SourcePlan, iter_shard_batches, read_rows, vectors_as_numpy


@dataclass(frozen=True)
class Columns:
    """The source columns a stage reads, and the output fields it writes."""

    vector: str
    id: str
    keep: tuple[str, ...]
    dim: int
    out_fields: pa.Schema  # id + keep fields

    @classmethod
    def of(cls, plan: SourcePlan) -> "Columns":
        return cls(plan.vector_column, plan.id_column, tuple(plan.keep), plan.dim, plan.output_fields)


# ---- sample ---------------------------------------------------------------------------------

def sample_rows(item: tuple[Shard, np.ndarray], *, columns: Columns) -> np.ndarray:
    """Vectors of the given sorted shard-local rows (validated like every other read)."""
    shard, local_rows = item
    t = read_rows(shard, np.asarray(local_rows, np.int64), [columns.vector])
    return vectors_as_numpy(t.column(0), columns.dim, where=shard.file_uri, column=columns.vector,
                            rows=shard.file_row_start + np.asarray(local_rows, np.int64))


# ---- encode ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class EncodeJob:
    table_uri: str
    codec: CodecRef
    columns: Columns
    #: rows per record batch; 0 = batch_rows's choice for the device that computes the batch
    batch_size: int = 0
    max_rows_per_file: int = 1 << 20
    #: exact neighbours computed in the same pass over the source (0 = off)
    eval_k: int = 100
    #: optional warm column codec (written as RERANK_COLUMN)
    rerank_codec: CodecRef | None = None
    #: also search the held-out queries over each batch's codes (the evaluation's top-k over
    #: the codes, as `search_codes` finds it) and, with `eval_rerank`, keep the candidates'
    #: exact distances (from the source rows in hand, or the warm column): evaluate then needs
    #: no second read of the codes or of the source
    eval_search: bool = False
    eval_rerank: bool = True
    #: folder for per-shard results; a shard with a result there is not encoded again, so a
    #: retried encode stage only redoes unfinished shards (None = no checkpoints)
    checkpoint_uri: str | None = None
    #: where a worker encodes and computes exact neighbours itself: "auto" (its GPU when CuPy
    #: sees one, else the CPU), "cuda" or "cpu"
    device: str = "auto"
    #: encoders hosted elsewhere (pipeline.distributed's GPU actors): `remote.for_shard(i)` is
    #: the ShardCompute that shard i sends its batches to. None = compute in the worker
    remote: object | None = None


#: vectors per batch (float32 bytes) when no batch size is given: below glibc's largest mmap
#: threshold (32 MiB), so a worker's per-batch arrays (the decoded vectors, their normalised
#: copy, the GEMM blocks) come back from its heap instead of fresh pages every batch. Measured
#: (benchmarks/batch_size.py, whole encode_shard runs, 2-core machine): 1.21x the worker's rate
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


def check_device(device: str) -> str:
    """`device` if it is "auto", "cpu", "cuda" or "cuda:N", else ValueError."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ValueError(f"device must be auto, cpu or cuda[:N], got {device!r}")
    return device


def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when CuPy sees a GPU here, else "cpu"; "cuda"/"cuda:N" as given when
    CuPy sees that GPU here (else ConfigError: asked for by name, it is not replaced); "cpu"."""
    if check_device(device) == "cpu":
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
    held-out queries among the batch's rows, and with EncodeJob.eval_search the evaluation's
    search over the batch's codes (search_batch; batch-local ids throughout). Runs in the
    worker that reads (this class) or in a GPU actor that workers send batches to
    (pipeline.distributed), where both searches run on the GPU."""

    def __init__(self, job: "EncodeJob", queries: np.ndarray | None, *, device: str = "auto",
                 cpu_work: bool = True):
        """`cpu_work=False` (a GPU actor): a search that would run on this process's CPU is
        left undone (None in the result) for the read task that sent the batch: the actor
        runs one batch at a time on one thread, while the read tasks have the cluster's CPUs.
        That is the exact top-k past faiss's GPU top-k (knn.GPU_MAX_K), and the search over
        codes that faiss searches only on the CPU (fast-scan PQ, RaBitQ, ...)."""
        self.codec = load_codec(job.codec)
        self.warm = load_codec(job.rerank_codec) if job.rerank_codec else None
        self.k = job.eval_k
        self.device = resolve_device(device)
        with_knn = queries is not None and job.eval_k > 0
        self.queries = queries if with_knn and job.eval_search else None
        self.rerank = job.eval_rerank
        self.xq = prepare_vectors(queries, self.codec.metric) if with_knn else None
        on_gpu = self.device != "cpu"
        # both searches take k + 1 (the query's own row); past faiss's GPU top-k both stay on the CPU
        self.knn_ngpu = 1 if on_gpu and gpu_knn(self.k + 1, 1) else 0
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
        if on_gpu and self.info["encode"] != "cpu":
            self.info["gpu_name"] = self.codec.gpu_encoder(self.device).device_name

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


@dataclass
class ShardResult:
    shard_index: int
    fragments: list[dict]
    num_rows: int
    seconds: float
    #: this shard's exact top-k for the held-out queries (global positions), or None
    knn_D: np.ndarray | None = None
    knn_I: np.ndarray | None = None
    #: with EncodeJob.eval_search: the shard's top-k over the codes (distance, global position,
    #: exact distance or None without re-ranking), or None
    search_D: np.ndarray | None = None
    search_I: np.ndarray | None = None
    search_E: np.ndarray | None = None
    #: which process read the shard, and where its codes and neighbours were computed
    reader: dict | None = None
    compute: dict | None = None
    #: seconds spent waiting for / in the compute (encode, exact neighbours, search over the codes)
    compute_seconds: float = 0.0

    #: the array fields, stored beside the JSON fields in a checkpoint
    ARRAYS = ("knn_D", "knn_I", "search_D", "search_I", "search_E")

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        arrays = {name: a for name in self.ARRAYS if (a := getattr(self, name)) is not None}
        meta = json.dumps({"shard_index": self.shard_index, "fragments": self.fragments,
                           "num_rows": self.num_rows, "seconds": self.seconds, "reader": self.reader,
                           "compute": self.compute, "compute_seconds": self.compute_seconds})
        np.savez(buf, meta=np.frombuffer(meta.encode(), np.uint8), **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "ShardResult":
        z = np.load(io.BytesIO(data), allow_pickle=False)
        meta = json.loads(z["meta"].tobytes())
        return cls(**meta, **{name: z[name] if name in z else None for name in cls.ARRAYS})


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


def codes_array(codes: np.ndarray, *, binary: bool = False) -> pa.Array:
    """(n, code_size) uint8 -> the output's code column type (see schema.code_type)."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    n, size = codes.shape
    if binary:
        return pa.FixedSizeListArray.from_arrays(pa.array(codes.ravel(), pa.uint8()), size)
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(size), n, [None, pa.py_buffer(codes)])


def codes_as_numpy(arr) -> np.ndarray:
    """A code column (fixed_size_binary or fixed_size_list<uint8>) -> (n, code_size) uint8,
    honouring slice offsets."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_fixed_size_list(arr.type):
        size = arr.type.list_size
        return arr.values.slice(arr.offset * size, len(arr) * size).to_numpy().reshape(len(arr), size)
    size = arr.type.byte_width
    buf = arr.buffers()[1]
    return np.frombuffer(buf, np.uint8, count=len(arr) * size, offset=arr.offset * size).reshape(len(arr), size)


def encode_shard(shard: Shard, *, job: EncodeJob, queries: np.ndarray | None = None,
                 query_positions: np.ndarray | None = None) -> ShardResult:
    """Encode one shard into Lance fragments (uncommitted), streaming `batch_size` rows at a time.

    With `queries`, also computes the shard's exact top-k for them in the same read (ground
    truth for evaluation), excluding each query's own row.
    """
    checkpoint = None
    if job.checkpoint_uri:
        checkpoint = storage.join(job.checkpoint_uri, f"shard-{shard.index:06d}.npz")
        if storage.exists(checkpoint):
            return ShardResult.from_bytes(storage.read_bytes(checkpoint))
    start = time.perf_counter()
    codec = load_codec(job.codec)
    cols = job.columns
    warm = load_codec(job.rerank_codec) if job.rerank_codec else None
    schema = codes_schema(cols.out_fields.field(0), codec.code_size, list(cols.out_fields)[1:],
                          binary=codec.is_binary, rerank_size=warm.code_size if warm else None)
    with_knn = queries is not None and job.eval_k > 0
    compute = job.remote.for_shard(shard.index) if job.remote is not None else \
        ShardCompute(job, queries if with_knn else None, device=job.device)
    topk = TopK(queries.shape[0], job.eval_k, exclude=query_positions) if with_knn else None
    search = None
    if with_knn and job.eval_search:
        search = TopK(queries.shape[0], job.eval_k, exclude=query_positions, with_extra=job.eval_rerank)
    read_cols = [cols.vector, cols.id, *cols.keep]
    keep_fields = list(cols.out_fields)[1:]  # a file's own passthrough types are cast to these
    num_rows = 0
    compute_seconds = 0.0
    failure: list[BaseException] = []

    def batches():
        try:
            yield from read_and_encode()
        except GeneratorExit:  # closed by the writer after its own error: that one is the failure
            raise
        except BaseException as exc:  # lance re-raises it as OSError(LanceError(Arrow)); keep it
            failure.append(exc)
            raise

    def read_and_encode():
        nonlocal num_rows, compute_seconds
        rows = batch_rows(job.batch_size, cols.dim, gpu=compute.device != "cpu")  # (a GPU actor's: "cuda")
        for first_row, batch in iter_shard_batches(shard, read_cols, rows):
            ids = batch.column(1)
            if ids.null_count:
                raise SourceError(f"{shard.file_uri}: column {cols.id!r}: {ids.null_count} of {batch.num_rows} "
                                  f"rows have a null id (in rows {first_row}..{first_row + batch.num_rows - 1})")
            x = vectors_as_numpy(batch.column(0), cols.dim, where=shard.file_uri, column=cols.vector,
                                 first_row=first_row)
            t0 = time.perf_counter()
            codes, warm_codes, knn, found = compute(x)
            compute_seconds += time.perf_counter() - t0
            position = shard.row_offset + (first_row - shard.file_row_start)
            if topk is not None:
                D, I = knn
                topk.add(D, np.where(I >= 0, I + position, -1))
            if search is not None:
                Ds, Is, E = found
                search.add(Ds, np.where(Is >= 0, Is + position, -1), E)
            num_rows += batch.num_rows
            warm_cols = [codes_array(warm_codes)] if warm else []
            kept = [a if a.type == f.type else a.cast(f.type) for a, f in zip(batch.columns[2:], keep_fields)]
            yield pa.record_batch([ids, codes_array(codes, binary=codec.is_binary), *warm_cols, *kept], schema=schema)

    reader = pa.RecordBatchReader.from_batches(schema, batches())
    try:
        # mode="overwrite": field ids from this schema, not from the table's current version
        # (the commit is an Overwrite; "append" rejects or mis-numbers a changed schema)
        target, options = storage.lance_location(job.table_uri)
        frags = lance.fragment.write_fragments(reader, target, schema=schema, mode="overwrite", storage_options=options,
                                               max_rows_per_file=job.max_rows_per_file)
    except Exception:
        if failure:
            raise failure[0] from None
        raise
    if num_rows != shard.num_rows:
        raise SourceError(f"{shard.file_uri}: expected {shard.num_rows} rows in row groups "
                          f"{shard.row_group_start}..{shard.row_group_stop - 1}, read {num_rows} (file changed?)")
    result = ShardResult(shard_index=shard.index, fragments=[f.to_json() for f in frags], num_rows=num_rows,
                         seconds=time.perf_counter() - start,
                         knn_D=None if topk is None else topk.D, knn_I=None if topk is None else topk.I,
                         search_D=None if search is None else search.D, search_I=None if search is None else search.I,
                         search_E=None if search is None else search.E,
                         reader=where_am_i(), compute=compute.info, compute_seconds=compute_seconds)
    if checkpoint:  # written only after the fragments are durable
        storage.write_bytes(checkpoint, result.to_bytes())
    return result


# ---- search over stored codes ----------------------------------------------------------------

@dataclass(frozen=True)
class CodeSearch:
    table_uri: str
    version: int
    codec: CodecRef
    k: int


def search_fragment(item: tuple[int, int], *, job: CodeSearch, queries: np.ndarray,
                    query_positions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """ADC top-k of the queries over one committed fragment's codes, as global positions."""
    fragment_id, row_offset = item
    codec = load_codec(job.codec)
    ds = open_lance(job.table_uri, job.version)
    codes = codes_as_numpy(ds.get_fragment(fragment_id).to_table(columns=[CODE_COLUMN]).column(0))
    topk = TopK(queries.shape[0], job.k, exclude=query_positions)
    # one extra result per query so that excluding the query's own row still leaves k
    D, I = codec.search_codes(queries, codes, min(job.k + 1, codes.shape[0]))
    topk.add(D, np.where(I >= 0, I + row_offset, -1))
    return topk.D, topk.I
