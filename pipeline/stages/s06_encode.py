"""Stage 6, encode: every new shard into uncommitted Lance fragments, in parallel. The same
pass over the source finds the held-out queries' exact neighbours and their search over the
new codes (the evaluation); an incremental run keeps its kept shards' fragments as they are
and takes their results from the previous run's record (pipeline.reuse), or reads their
vectors and stored codes once for the same two searches where it has none.

A worker runs `encode_shards` (or pipeline.kept's `search_kept_shard`): one scan of a shard,
or of a group of shards smaller than a batch (layout.group_shards), whose observers
(pipeline.scan) compute each batch and fold its results, the codes streamed into Lance's
fragment writer, the ids (with their positions) written by hash bucket to one file for the
duplicate check (pipeline.identity). The driver folds each shard's result as it arrives (a
running top-k, the fragments' metadata), so its memory does not grow with the number of
shards; once all are in, one task per bucket of ids looks for repeats, and any refuses the
run before its commit, or (--duplicate-ids keep-first / keep-last) decides which rows go:
pipeline.dedup takes them out of the fragments and of the evaluation's top-k.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import time
from dataclasses import dataclass

import lance
import lance.fragment
import numpy as np
import pyarrow as pa

from vecpress.kernels.knn import TopK
from vecpress.pipeline import storage
from vecpress.pipeline.codec_store import load_codec
from vecpress.pipeline.context import RunContext, load_array, save_array, save_arrays
from vecpress.pipeline.errors import SourceError
from vecpress.pipeline.executor import Executor
from vecpress.pipeline.dedup import Unit, drop_from_units, dropped_record, exact_over_kept, kept_top, pass_k
from vecpress.pipeline.identity import (
    collect_dropped, find_duplicate_ids, num_id_buckets, refuse_duplicates, write_id_buckets,
)
from vecpress.pipeline.kept import KeptSearch, fold_kept
from vecpress.pipeline.reuse import UnitRecorder
from vecpress.pipeline.lists import ListsSpec, build_and_measure, write_task_lists
from vecpress.pipeline.layout import Shard, group_shards, merge_shards
from vecpress.pipeline.options import CompressOptions
from vecpress.pipeline.rowmap import RowMap
from vecpress.pipeline.scan import (
    Columns, ComputeSpec, Computed, Partitions, ScanBatch, ShardCompute, batch_rows, gathers, scan_shard, where_am_i,
)
from vecpress.pipeline.schema import (
    codes_array, codes_schema, served_schema,
)
from vecpress.pipeline.stages.s01_plan import Planned
from vecpress.pipeline.stages.s03_sample import Sampled
from vecpress.pipeline.stages.s05_train import Trained

log = logging.getLogger("vecpress")


@dataclass(frozen=True)
class EncodeJob:
    table_uri: str
    compute: ComputeSpec
    columns: Columns
    #: rows per record batch; 0 = batch_rows's choice for the device that computes the batch
    batch_size: int = 0
    max_rows_per_file: int = 1 << 20
    #: folder for per-shard results; a shard with a result there is not encoded again, so a
    #: retried encode stage only redoes unfinished shards (None = no checkpoints)
    checkpoint_uri: str | None = None
    #: where a worker encodes and computes exact neighbours itself: "auto" (its GPU when CuPy
    #: sees one, else the CPU), "cuda" or "cpu"
    device: str = "auto"
    #: encoders hosted elsewhere (pipeline.distributed's GPU actors): `remote.for_shard(i)` is
    #: the ShardCompute that shard i sends its batches to. None = compute in the worker
    remote: object | None = None
    #: --serve lancedb: the stored vectors' type; the rows' index parts (partition, residual
    #: code: IvfModel.encode) go to a file per task under `index_buffers_uri` (None: a codes table)
    vector_dtype: str | None = None
    index_buffers_uri: str | None = None
    #: folder of the tasks' ids (pipeline.identity: one file per task, `id_buckets` batches by
    #: hash), checked for duplicates once every task is done (None: not checked)
    ids_uri: str | None = None
    id_buckets: int = 1
    #: a codes table's inverted lists (pipeline.lists): each task's rows by partition go to a
    #: file under `lists.parts_uri` (None: no partitions)
    lists: ListsSpec | None = None


@dataclass
class ShardResult:
    """What one encode task did: its shards (one, or a group of small ones), the fragments of
    each, and their top-k for the held-out queries."""

    shards: list[int]
    #: each shard's fragments (metadata JSON), parallel to `shards`
    fragments: list[list[dict]]
    num_rows: int
    seconds: float
    #: this shard's exact top-k for the held-out queries (global positions), or None
    knn_D: np.ndarray | None = None
    knn_I: np.ndarray | None = None
    #: with ComputeSpec.search: the shard's top-k over the codes (distance, global position,
    #: exact distance or None without re-ranking), or None
    search_D: np.ndarray | None = None
    search_I: np.ndarray | None = None
    search_E: np.ndarray | None = None
    #: which process read the shard, and where its codes and neighbours were computed
    reader: dict | None = None
    compute: dict | None = None
    #: seconds spent waiting for / in the compute (encode, exact neighbours, search over the codes)
    compute_seconds: float = 0.0
    #: --serve lancedb: the file of the rows' index parts (partitions, residual codes), in row order
    index_buffer_uri: str | None = None
    #: the file of the task's ids by bucket (pipeline.identity), or None
    ids_file_uri: str | None = None
    #: the file of the task's rows by partition (pipeline.lists), or None
    lists_file_uri: str | None = None

    #: the array fields, stored beside the JSON fields in a checkpoint
    ARRAYS = ("knn_D", "knn_I", "search_D", "search_I", "search_E")

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        arrays = {name: a for name in self.ARRAYS if (a := getattr(self, name)) is not None}
        meta = json.dumps({"shards": self.shards, "fragments": self.fragments,
                           "num_rows": self.num_rows, "seconds": self.seconds, "reader": self.reader,
                           "compute": self.compute, "compute_seconds": self.compute_seconds,
                           "index_buffer_uri": self.index_buffer_uri, "ids_file_uri": self.ids_file_uri,
                           "lists_file_uri": self.lists_file_uri})
        np.savez(buf, meta=np.frombuffer(meta.encode(), np.uint8), **arrays)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "ShardResult":
        z = np.load(io.BytesIO(data), allow_pickle=False)
        meta = json.loads(z["meta"].tobytes())
        return cls(**meta, **{name: z[name] if name in z else None for name in cls.ARRAYS})


class _Timed(Computed):
    """Computed, timing the compute (ShardResult.compute_seconds)."""

    seconds = 0.0

    def observe(self, batch: ScanBatch) -> None:
        start = time.perf_counter()
        super().observe(batch)
        self.seconds += time.perf_counter() - start


def encode_shards(group: tuple[Shard, ...], *, job: EncodeJob, queries: np.ndarray | None = None,
                  query_positions: np.ndarray | None = None) -> ShardResult:
    """Encode consecutive shards (layout.group_shards: one, or small ones together) into
    uncommitted Lance fragments, each shard its own, streaming `batch_size` rows at a time.

    With `queries`, also computes their exact top-k in the same read (ground truth for
    evaluation), excluding each query's own row, and searches them over the codes.
    """
    checkpoint = None
    if job.checkpoint_uri:
        checkpoint = storage.join(job.checkpoint_uri, f"shards-{group[0].index:06d}-{group[-1].index:06d}.npz")
        if storage.exists(checkpoint):
            done = ShardResult.from_bytes(storage.read_bytes(checkpoint))
            if all(not wanted or (uri and storage.exists(uri)) for wanted, uri in
                   ((job.ids_uri, done.ids_file_uri), (job.lists, done.lists_file_uri))):
                return done
    start = time.perf_counter()
    spec, cols = job.compute, job.columns
    codec = load_codec(spec.codec)
    warm_size = load_codec(spec.rerank_codec).code_size if spec.rerank_codec else None
    if job.vector_dtype:
        schema = served_schema(cols.out_fields.field(0), cols.vector, cols.dim, job.vector_dtype,
                               list(cols.out_fields)[1:])
    else:
        schema = codes_schema(cols.out_fields.field(0), codec.code_size, list(cols.out_fields)[1:],
                              binary=codec.is_binary, rerank_size=warm_size)
    exact, found = gathers(spec, queries, query_positions)
    compute = job.remote.for_shard(group[0].index) if job.remote is not None else \
        ShardCompute(spec, queries if exact is not None else None, device=job.device)
    computed = _Timed(compute)
    observers = [computed, *(g for g in (exact, found) if g is not None)]
    if job.lists is not None:
        observers.append(Partitions(job.lists.coarse, job.lists.residual, compute.device))
    rows = batch_rows(job.batch_size, cols.dim, gpu=compute.device != "cpu")  # (a GPU actor's: "cuda")
    keep_fields = list(cols.out_fields)[1:]  # a file's own passthrough types are cast to these
    ends = np.cumsum([s.num_rows for s in group])  # each shard's end, in rows of the group
    num_rows = 0
    failure: list[BaseException] = []

    served: list[np.ndarray] = []  # --serve lancedb: the batches' index parts
    ids_read: list[pa.Array] = []  # the ids and their global positions, for the duplicate check
    positions: list[np.ndarray] = []
    listed: tuple[list, list, list] = ([], [], [])  # partitions, positions, codes for the inverted lists

    def output(b: ScanBatch):
        """(shard of the group, record batch) of a batch's output rows, one per file it read."""
        if job.vector_dtype:  # the vectors for LanceDB; their index parts kept for the index stage
            served.append(b.codes)
            stored = pa.FixedSizeListArray.from_arrays(pa.array(b.x.ravel().astype(job.vector_dtype, copy=False)),
                                                       cols.dim)
        else:
            stored = codes_array(b.codes, binary=codec.is_binary)
        if job.lists is not None:
            for into, part in zip(listed, (b.partitions, b.position + np.arange(len(b.x), dtype=np.int64),
                                           b.codes if b.residual_codes is None else b.residual_codes)):
                into.append(part)
        warm = codes_array(b.warm) if warm_size else None
        for part in b.parts:
            ids, n = part.record.column(1), part.record.num_rows
            if ids.null_count:
                raise SourceError(f"{part.piece.file_uri}: column {cols.id!r}: {ids.null_count} of {n} rows have a "
                                  f"null id (in rows {part.first_row}..{part.first_row + n - 1})")
            if job.ids_uri:
                ids_read.append(ids)
                positions.append(b.position + part.start + np.arange(n, dtype=np.int64))
            kept = [a if a.type == f.type else a.cast(f.type) for a, f in zip(part.record.columns[2:], keep_fields)]
            warm_part = [] if warm is None else [warm.slice(part.start, n)]
            shard = int(np.searchsorted(ends, b.local + part.start, side="right"))
            yield shard, pa.record_batch([ids, stored.slice(part.start, n), *warm_part, *kept], schema=schema)

    def outputs():
        nonlocal num_rows
        try:
            for b in scan_shard(merge_shards(group), cols, observers, batch_size=rows, extra=(cols.id, *cols.keep)):
                num_rows += len(b.x)
                yield from output(b)
        except GeneratorExit:  # closed by the writer after its own error: that one is the failure
            raise
        except BaseException as exc:  # lance re-raises it as OSError(LanceError(Arrow)); keep it
            failure.append(exc)
            raise

    if len(group) == 1:  # streamed into the writer: a worker holds one batch, not its shard
        fragments = [_write_fragments(job, schema, (rb for _, rb in outputs()), failure)]
    else:  # shards smaller than a batch: each one's rows in hand, then written as its own fragments
        by_shard: list[list[pa.RecordBatch]] = [[] for _ in group]
        for i, rb in outputs():
            by_shard[i].append(rb)
        fragments = [_write_fragments(job, schema, iter(rbs), failure) for rbs in by_shard]
    buffer_uri = None
    if job.vector_dtype:
        parts, codes = codec.split(np.concatenate(served) if served else np.zeros((0, codec.code_size), np.uint8))
        buffer_uri = save_arrays(storage.join(job.index_buffers_uri, f"shards-{group[0].index:06d}-"
                                              f"{group[-1].index:06d}.npz"), {"partitions": parts, "codes": codes})
    ids_file = None
    if job.ids_uri:
        ids_file = write_id_buckets(storage.join(job.ids_uri, f"shards-{group[0].index:06d}-{group[-1].index:06d}"
                                                 ".arrow"), ids_read, positions, job.id_buckets, cols.out_fields.field(0).type)
    lists_file = None
    if job.lists is not None:
        lists_file = write_task_lists(job.lists, f"shards-{group[0].index:06d}-{group[-1].index:06d}", *listed)
    result = ShardResult(shards=[s.index for s in group], fragments=fragments, num_rows=num_rows,
                         seconds=time.perf_counter() - start, reader=where_am_i(), compute=compute.info,
                         compute_seconds=computed.seconds, index_buffer_uri=buffer_uri, ids_file_uri=ids_file,
                         lists_file_uri=lists_file)
    if exact is not None:
        result.knn_D, result.knn_I = exact.top.D, exact.top.I
    if found is not None:
        result.search_D, result.search_I, result.search_E = found.top.D, found.top.I, found.top.E
    if checkpoint:  # written only after the fragments are durable
        storage.write_bytes(checkpoint, result.to_bytes())
    return result


def _write_fragments(job: EncodeJob, schema: pa.Schema, batches, failure: list[BaseException]) -> list[dict]:
    """Lance fragments (uncommitted) of the record batches, as metadata JSON. An error raised
    by the batches' own generator (`failure`) is raised as it is, not as Lance wraps it."""
    reader = pa.RecordBatchReader.from_batches(schema, batches)
    try:
        # mode="overwrite": field ids from this schema, not from the table's current version
        # (the commit is an Overwrite; "append" rejects or mis-numbers a changed schema)
        target, options = storage.lance_location(job.table_uri)
        with storage.writing(job.table_uri, "the new version's data files"):
            frags = lance.fragment.write_fragments(reader, target, schema=schema, mode="overwrite",
                                                   storage_options=options, max_rows_per_file=job.max_rows_per_file)
    except Exception:
        if failure:
            raise failure[0] from None
        raise
    return [f.to_json() for f in frags]


# ---- the driver ------------------------------------------------------------------------------------

class DeviceReport:
    """Which processes read shards, and where codes, exact neighbours and the evaluation's
    search over the codes were computed: folded shard by shard."""

    def __init__(self):
        self.computes: dict = {}
        self.readers: dict = {}

    def add(self, r: ShardResult) -> None:
        c = r.compute or {}
        row = self.computes.setdefault((c.get("host"), c.get("pid")), {**c, "shards": 0, "rows": 0, "seconds": 0.0})
        row["shards"] += len(r.shards)
        row["rows"] += r.num_rows
        row["seconds"] = round(row["seconds"] + r.compute_seconds, 3)
        rd = r.reader or {}
        reader = self.readers.setdefault((rd.get("host"), rd.get("pid")), {**rd, "shards": 0, "rows": 0})
        reader["shards"] += len(r.shards)
        reader["rows"] += r.num_rows

    def report(self, actors: list[dict] | None = None, startup_seconds: float | None = None) -> dict:
        gpu = any(str(c.get("encode", "cpu")).startswith("cuda") for c in self.computes.values())
        return {"placement": "gpu actors" if actors else ("workers on their GPU" if gpu else "cpu workers"),
                "readers": sorted(self.readers.values(), key=lambda r: (str(r["host"]), r["pid"] or 0)),
                "compute": sorted(self.computes.values(), key=lambda r: (str(r.get("host")), r.get("pid") or 0)),
                "actors": actors or [], "actor_startup_seconds": startup_seconds}


@dataclass(frozen=True)
class Encoded:
    fragments: tuple[dict, ...]
    num_rows: int
    ground_truth_uri: str
    seconds: float = 0.0
    #: which processes read the shards and which devices computed them (DeviceReport)
    devices: dict | None = None
    #: the held-out queries' top-k over the codes found in the encode pass (ids), and their
    #: candidates' exact distances (None without re-ranking); None when not searched in the pass
    search_ids_uri: str | None = None
    search_exact_uri: str | None = None
    #: the folder of the shards' checkpoints (removed once the commit that used them lands)
    checkpoints_uri: str | None = None
    #: the folder of the tasks' ids (pipeline.identity; removed with the checkpoints)
    ids_uri: str | None = None
    #: the duplicate-id check's record (rows, buckets, seconds, and with a keep option the rows
    #: dropped: how many, examples, `dropped_uri`, the sorted positions pipeline.rowmap reads)
    id_check: dict | None = None
    #: data files of fragments written again without dropped rows: removed once the commit lands
    replaced_files: tuple[str, ...] = ()
    #: --serve lancedb: per encode task, (its first fragment, its fragments, its index buffer's
    #: uri), fragments counted in `fragments`' order
    index_buffers: tuple[tuple[int, int, str], ...] = ()
    #: a codes table's inverted lists (pipeline.lists: their spec, the partitions' sizes, the
    #: held-out queries' recall along the nprobes grid), or None without partitions
    lists: ListsSpec | None = None
    partitions: dict | None = None
    #: every unit's results, for the next incremental run (pipeline.reuse), or None (served)
    units_uri: str | None = None
    #: an incremental run's kept rows read, and not read (their results reused)
    kept_rows: dict | None = None


def encode(ctx: RunContext, planned: Planned, sampled: Sampled, trained: Trained, opts: CompressOptions,
           executor: Executor) -> Encoded:
    """Encode the new shards into uncommitted Lance fragments, with the held-out queries' exact
    neighbours and search over the codes from the same pass; an incremental run keeps the
    other fragments as they are and reads its kept shards once for the same searches. Every
    shard's result is folded as it arrives: ties rank by position whatever the order."""
    start = time.perf_counter()
    plan, diff = planned.plan, planned.diff
    served = opts.serve == "lancedb"  # (LanceDB's search is evaluated on the index, not in this pass)
    k = pass_k(opts.eval_k, opts.duplicate_ids)  # (deeper where rows may be dropped after the pass)
    spec = ComputeSpec(trained.codec, trained.rerank_codec, k, search=not served, rerank=opts.eval_rerank)
    job = EncodeJob(table_uri=ctx.table_uri, compute=spec, columns=Columns.of(plan, opts.metric),
                    batch_size=opts.batch_size,
                    checkpoint_uri=ctx.run_file("shards"), device=opts.device,
                    vector_dtype=opts.vector_dtype if served else None,
                    index_buffers_uri=ctx.run_file("index-buffers") if served else None,
                    ids_uri=ctx.run_file("ids"), id_buckets=num_id_buckets(plan.num_rows),
                    lists=None if served or trained.coarse is None else
                    ListsSpec.for_rows(ctx.run_file("lists"), trained.coarse, plan.num_rows, trained.codec,
                                       trained.residual))
    xq, qpos = load_array(sampled.queries_uri), load_array(sampled.query_positions_uri)
    num_kept = len(diff.kept_shards) if diff else 0
    min_rows = batch_rows(opts.batch_size, plan.dim, gpu=False)  # shards smaller than a batch go together
    pool = None
    gpu_compute = getattr(executor, "gpu_compute", None)  # optional in the Executor protocol
    if gpu_compute is not None and opts.device != "cpu" and len(plan.shards) > num_kept:
        pool = gpu_compute(spec, xq, ngpu=opts.ngpu)
    exact = TopK(len(qpos), k, exclude=qpos)
    recorder = None if served else UnitRecorder(ctx)  # (what the next incremental run need not read)
    found = TopK(len(qpos), k, exclude=qpos, with_extra=opts.eval_rerank)
    searched = not served  # (a served table is searched by LanceDB; checkpoints of older runs lack the search)
    fragments: dict[int, list[dict]] = {}
    tasks: dict[int, tuple[list[int], str | None]] = {}  # first shard of a task -> its shards, index buffer
    kept_units: list[Unit] = []  # an incremental run's kept groups, in order
    devices = DeviceReport()
    id_files: list[str] = []  # every task's ids, by bucket
    list_files: list[str] = []  # every task's rows, by partition
    num_rows, actors = 0, None
    try:
        if pool is not None:
            log.info("encode: %s, ready in %.1fs", pool.placement.describe(), pool.startup_seconds)
            job = dataclasses.replace(job, remote=pool)
        groups = group_shards(plan.shards[num_kept:], min_rows)
        log.info("encode: %d shards in %d tasks", len(plan.shards) - num_kept, len(groups))
        for _, r in executor.imap(encode_shards, groups, desc="encode",
                                  shared={"job": job, "queries": xq, "query_positions": qpos}):
            exact.add(r.knn_D, r.knn_I)
            if r.search_I is None:
                searched = False
            else:
                found.add(r.search_D, r.search_I, r.search_E)
            fragments.update(zip(r.shards, r.fragments))
            if recorder is not None:
                recorder.add([plan.shards[i] for i in r.shards], (r.knn_D, r.knn_I),
                             (r.search_D, r.search_I, r.search_E))
            tasks[r.shards[0]] = (r.shards, r.index_buffer_uri)
            devices.add(r)
            id_files.append(r.ids_file_uri)
            list_files.append(r.lists_file_uri)
            num_rows += r.num_rows
        if pool is not None:
            actors = pool.totals()
            if any(a.get("lost") for a in actors):
                log.warning("encode: %d of %d GPU encoder actors were lost during the stage; their batches went to "
                            "the others, or to the read tasks", sum(bool(a.get("lost")) for a in actors), len(actors))
    finally:
        if pool is not None:
            pool.close()
    report = devices.report(actors, pool.startup_seconds if pool is not None else None)
    for c in report["compute"]:
        log.info("encode: %s pid %s encoded %d rows of %d shards on %s%s, exact neighbours on %s, "
                 "search over the codes on %s", c.get("host"), c.get("pid"), c["rows"], c["shards"], c.get("encode"),
                 f" ({c['gpu_name']})" if c.get("gpu_name") else "", c.get("exact_knn"), c.get("code_search"))
    kept = None
    if num_kept:  # the kept rows' results: recorded by the previous run, else one read of them
        kept = fold_kept(executor, plan, diff, KeptSearch(
            ctx.table_uri, diff.previous_version, spec, Columns.of(plan, opts.metric), opts.batch_size, opts.ngpu,
            index_buffers_uri=job.index_buffers_uri, ids_uri=job.ids_uri, id_buckets=job.id_buckets,
            lists=job.lists), xq=xq, qpos=qpos, exact=exact, found=found, min_rows=min_rows, served=served,
            out=ctx.out, recorded=sampled.previous_units, previous_lists=sampled.previous_lists, recorder=recorder)
        kept_units = kept.units
        id_files += kept.id_files
        list_files += kept.list_files
        log.info("encode: %d kept rows read, %d not read (their results recorded by the previous run)",
                 kept.rows_read, kept.rows_reused)
    check_start = time.perf_counter()
    # one task per bucket of ids, in parallel: no process holds every id. A refusal leaves
    # nothing behind: run_compress removes a failed run's uncommitted files and run folder
    keep = opts.duplicate_ids
    dup = find_duplicate_ids(executor, sorted(id_files), job.id_buckets, keep=keep,
                             surplus_uri=storage.join(job.ids_uri, "surplus") if keep != "refuse" else None)
    num_kept_rows = sum(s.num_rows for s in plan.shards[:num_kept])
    if keep == "refuse":
        refuse_duplicates(dup, plan, num_kept_rows=num_kept_rows,
                          previous_version=diff.previous_version if diff else None)
    rows = RowMap(collect_dropped(dup, ctx.run_file("dropped.npy"))) if dup.num_ids else RowMap.identity()
    id_check = {"unique": not dup.num_ids, "rows": plan.num_rows, "buckets": job.id_buckets,
                "task_files": len(id_files), "duplicate_ids": keep}
    units = kept_units + [Unit(plan.shards[i].row_offset, sum(plan.shards[j].num_rows for j in shards),
                               tuple(f for j in shards for f in fragments[j]), buffer)
                          for i, (shards, buffer) in sorted(tasks.items())]
    replaced: tuple[str, ...] = ()
    if rows:
        id_check.update(dropped_record(dup, rows, ctx.run_file("dropped.npy"), plan, keep))
        units, replaced = drop_from_units(units, rows, executor, table_uri=ctx.table_uri,
                                           max_rows_per_file=job.max_rows_per_file)
    id_check["seconds"] = round(time.perf_counter() - check_start, 3)
    truth, _, complete = kept_top(exact.I, rows, opts.eval_k)
    if not complete.all():
        truth = rows.rows_of(exact_over_kept(plan, rows, xq, qpos, opts, executor, complete))
    gt_uri = save_array(ctx.run_file("ground_truth.npy"), truth)
    search_ids_uri = search_exact_uri = None
    if searched:
        found_I, extra, complete = kept_top(found.I, rows, opts.eval_k, *([found.E] if opts.eval_rerank else []))
        if not complete.all():  # (the evaluation searches the committed codes instead)
            log.info("encode: %d of %d queries' search over the codes held too many dropped rows: the evaluation "
                     "searches the committed codes", int((~complete).sum()), len(complete))
        else:
            search_ids_uri = save_array(ctx.run_file("search_ids.npy"), found_I)
            if opts.eval_rerank:
                search_exact_uri = save_array(ctx.run_file("search_exact.npy"), extra[0])
    partitions = None
    if job.lists is not None:  # (the search in the pass, where complete, is the exhaustive one to match)
        partitions = build_and_measure(ctx.relative, job.lists, list_files, executor, xq=xq, qpos=rows.rows_of(qpos), truth=truth,
                                    found=found_I if search_ids_uri else None, codec=trained.codec, rows=rows)
        if trained.residual_judged:
            partitions["residual_judged"] = trained.residual_judged
    new_fragments = [f for u in units[len(kept_units):] for f in u.fragments]
    kept_fragments = [f for u in units[:len(kept_units)] for f in u.fragments]
    index_buffers, at = [], 0
    for u in units:  # each unit's fragments, in the order they are committed
        if u.buffer_uri and u.fragments:
            index_buffers.append((at, len(u.fragments), u.buffer_uri))
        at += len(u.fragments)
    seconds = time.perf_counter() - start
    log.info("encode: %d rows in %d new fragments (%d kept), %.1fs (%.0f rows/s)", num_rows, len(new_fragments),
             len(kept_fragments), seconds, num_rows / max(seconds, 1e-9))
    return Encoded(tuple(kept_fragments + new_fragments), plan.num_rows - len(rows.dropped), gt_uri, seconds, report,
                   search_ids_uri, search_exact_uri, checkpoints_uri=job.checkpoint_uri, ids_uri=job.ids_uri,
                   id_check=id_check, replaced_files=replaced, index_buffers=tuple(index_buffers),
                   lists=job.lists, partitions=partitions, units_uri=recorder.save() if recorder else None,
                   kept_rows=kept and {"read": kept.rows_read, "not_read": kept.rows_reused})
