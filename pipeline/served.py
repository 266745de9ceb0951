"""A LanceDB-served table (`--serve lancedb`): its vector index (IVF_PQ, IVF_HNSW_PQ, IVF_SQ,
IVF_HNSW_SQ, IVF_FLAT, IVF_HNSW_FLAT or IVF_RQ: kernels.codecs.ivf), built from vecpress's model,
partitions and codes, and the recall of LanceDB's own search over it.

The encode pass leaves, per task, every row's partition and, for the PQ forms, its residual PQ
code (IvfModel.encode) in the run folder. Once the rows are committed, each task's file becomes
an index segment of its fragments, in a worker: the file is rewritten with the rows' Lance row
ids, and Lance's `create_index_uncommitted` takes it with vecpress's centroids (and codebook):
as precomputed shuffle buffers for the PQ forms (Lance then trains and computes nothing but an
HNSW graph where asked), as a precomputed partition dataset for the others (Lance then encodes
each partition's vectors, read from the table, with the bounds or rotation it fits). The driver
commits the segments together: one new version whose index covers every row, detached
(the run's candidate until it passes the gate: pipeline.gated).

Traps Lance leaves open (../shared/PITFALLS.md), and how this module closes them: without the
centroids or the codebook Lance silently trains its own (both always passed); a row missing
from a buffer is never returned (every buffer is checked against its fragments' rows); a
float16 column needs a float16 model (the model is cast to the column's type); buffers are
not filtered by fragment (one buffer per segment); segments sharing an index uuid overwrite
each other (each segment gets its own).
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass

import lance
import lancedb
import numpy as np
import pyarrow as pa

from vecpress.pipeline import storage
from vecpress.pipeline.codec_store import CodecRef, load_codec
from vecpress.pipeline.context import load_arrays
from vecpress.pipeline.errors import VecpressError
from vecpress.pipeline.lance_io import open_lance

log = logging.getLogger("vecpress")

#: the grid of LanceDB search settings every served version is measured at (refine_factor
#: None: no re-ranking; else r x k candidates re-ranked with the stored vectors)
GRID_NPROBES = (10, 20, 50)
GRID_REFINE = (None, 2, 5)
#: the recall targets `inspect` names the cheapest setting for
RECALL_TARGETS = (0.9, 0.95)
#: queries timed one by one for the latency of each setting
LATENCY_QUERIES = 50


def index_name(column: str) -> str:
    return f"{column}_idx"


@dataclass(frozen=True)
class IndexJob:
    """What every segment task needs: the committed version, the column, the model."""

    table_uri: str
    version: int
    column: str
    model: CodecRef
    vector_dtype: str


def build_index_segment(item: tuple[int, int, str], *, job: IndexJob):
    """An uncommitted index segment over `item`'s fragments (the version's fragments number
    first .. first + count - 1, in order) from the encode task's file of partitions and codes
    (`item[2]`). Returns Lance's segment (picklable), for `commit_index`."""
    first, count, uri = item
    ds = open_lance(job.table_uri, job.version)
    frags = ds.get_fragments()[first:first + count]
    rows = [f.count_rows() for f in frags]
    parts = load_arrays(uri)
    if len(parts["partitions"]) != sum(rows):
        raise VecpressError(f"{uri} holds {len(parts['partitions'])} rows' index parts for the {sum(rows)} rows of "
                            f"fragments {[f.fragment_id for f in frags]} of {job.table_uri} version {job.version}")
    row_ids = np.concatenate([(np.uint64(f.fragment_id) << np.uint64(32)) + np.arange(n, dtype=np.uint64)
                              for f, n in zip(frags, rows)])
    model = load_codec(job.model)
    dtype = np.float16 if job.vector_dtype == "float16" else np.float32  # (a float32 model on float16 panics)
    _, options = storage.lance_location(job.table_uri)
    kw = dict(name=index_name(job.column), metric=model.lance_metric, num_partitions=len(model.centroids),
              ivf_centroids=model.centroids.astype(dtype), fragment_ids=[f.fragment_id for f in frags],
              storage_options=options)
    # the buffer is read once, by this call, in this process: a local file whatever the output
    # (Lance takes no object-store URI for it)
    with storage.writing(job.table_uri, "the vector index"), \
            tempfile.TemporaryDirectory(prefix="vecpress-index-") as local:
        if model.num_sub_vectors:  # partitions and codes: Lance computes nothing per row
            codes = np.ascontiguousarray(parts["codes"], np.uint8)
            buffer = pa.table({"row_id": pa.array(row_ids, pa.uint64()),
                               "__ivf_part_id": pa.array(parts["partitions"].astype(np.uint32), pa.uint32()),
                               "__pq_code": pa.FixedSizeListArray.from_arrays(pa.array(codes.ravel(), pa.uint8()),
                                                                              codes.shape[1])})
            lance.write_dataset(buffer, local + "/buffer", mode="overwrite")
            return ds.create_index_uncommitted(
                job.column, model.index_type, num_sub_vectors=model.num_sub_vectors,
                pq_codebook=model.codebook.astype(dtype), precomputed_shuffle_buffers=["buffer"],
                precomputed_shuffle_buffers_path=local + "/buffer/data", **kw)
        # partitions only (one fragment, one file: Lance's rule): Lance encodes the vectors
        buffer = pa.table({"row_id": pa.array(row_ids, pa.uint64()),
                           "partition": pa.array(parts["partitions"].astype(np.uint32), pa.uint32())})
        lance.write_dataset(buffer, local + "/partitions", mode="overwrite")
        return ds.create_index_uncommitted(job.column, model.index_type,
                                           precomputed_partition_dataset=local + "/partitions", **kw)


def index_info(ds: lance.LanceDataset, column: str) -> dict | None:
    """The version's index over `column` (type, name, segments, whether it covers every row),
    or None when it has none."""
    name = index_name(column)
    segments = [i for i in ds.list_indices() if i["name"] == name]
    if not segments:
        return None
    covered = set().union(*(set(i["fragment_ids"]) for i in segments))
    return {"type": segments[0]["type"], "name": name, "column": column, "segments": len(segments),
            "covers_all_rows": covered >= {f.fragment_id for f in ds.get_fragments()}}


def commit_index(table_uri: str, version: int, segments: list) -> int:
    """Commit the segments as the index of `version` (a served run's candidate: pipeline.gated):
    a new detached version, whose rows it all covers, which no reader of latest sees."""
    target, options = storage.lance_location(table_uri)
    op = lance.LanceOperation.CreateIndex(list(segments), [])
    with storage.writing(table_uri, "the vector index"):
        done = lance.LanceDataset.commit(target, op, read_version=version, storage_options=options, detached=True)
    return done.version


# ---- the recall of LanceDB's search ---------------------------------------------------------

def lancedb_table(out: str, table: str, version: int):
    """The table as a LanceDB user opens it (lancedb.connect(out).open_table), at `version`."""
    target, options = storage.lance_location(storage.normalize(out))
    tbl = lancedb.connect(target, storage_options=options).open_table(table)
    tbl.checkout(version)
    return tbl


def evaluate_served(out: str, table: str, version: int, manifest: dict, xq: np.ndarray, qpos: np.ndarray,
                    truth: np.ndarray, *, grid: bool = True) -> dict:
    """recall@1/10/100 of LanceDB's own search at its defaults, and recall@10 and the p50
    latency of one query over the grid of nprobes x refine_factor, for the held-out queries
    (raw vectors `xq`, their own positions `qpos` excluded from their results) against their
    exact neighbours (positions `truth`). Searches the table as a user does: lancedb, the
    version checked out, the id column compared. `grid` False: the defaults only (what the
    quality gate needs, a tenth of the searches)."""
    ds = open_lance(storage.join(storage.normalize(out), f"{table}.lance"), version)
    id_col = manifest["source"]["id_column"]
    positions = np.unique(np.concatenate([truth[truth >= 0], qpos[qpos >= 0]])).tolist()
    by_position = dict(zip(positions, ds.take(positions, columns=[id_col]).column(0).to_pylist()))
    own = [by_position.get(int(p)) for p in qpos]  # (None: the query's own row was dropped as a duplicate)
    want = [[by_position[int(p)] for p in row if p >= 0] for row in truth]
    tbl = lancedb_table(out, table, version)
    k = truth.shape[1]

    def search(query, nprobes, refine, limit):
        q = tbl.search(query).select([id_col, "_distance"]).limit(limit)
        if nprobes is not None:
            q = q.nprobes(nprobes)
        if refine is not None:
            q = q.refine_factor(refine)
        return q

    def found(nprobes, refine, limit) -> list[list]:
        t = search(xq, nprobes, refine, limit + 1).to_arrow()  # +1: the query's own row
        out_ids = [[] for _ in range(len(xq))]
        for qi, i in zip(t.column("query_index").to_pylist(), t.column(id_col).to_pylist()):
            if i != own[qi] and len(out_ids[qi]) < limit:
                out_ids[qi].append(i)
        return out_ids

    def recall(got, kk) -> float | None:
        if kk > k:
            return None
        hits = sum(len(set(g[:kk]) & set(w[:kk])) for g, w in zip(got, want))
        return hits / max(1, sum(len(w[:kk]) for w in want))

    def p50_ms(nprobes, refine) -> float:
        queries = xq[:LATENCY_QUERIES]
        search(queries[0], nprobes, refine, 10).to_arrow()  # warm: index and files opened
        times = []
        for q in queries:
            start = time.perf_counter()
            search(q, nprobes, refine, 10).to_arrow()
            times.append((time.perf_counter() - start) * 1000)
        return round(float(np.median(times)), 3)

    default = found(None, None, min(k, 100))
    settings = [(n, r) for n in GRID_NPROBES for r in GRID_REFINE] if grid else []
    grid = []
    for nprobes, refine in settings:
        grid.append({"nprobes": nprobes, "refine_factor": refine, "recall_at_10": recall(found(nprobes, refine, 10), 10),
                     "p50_ms": p50_ms(nprobes, refine)})
    info = index_info(ds, manifest["source"]["vector_column"]) or {}
    return {"index": info.get("type"), "defaults": {"nprobes": None, "refine_factor": None,
                                              **{f"recall_at_{kk}": recall(default, kk) for kk in (1, 10, 100)},
                                              "p50_ms": p50_ms(None, None)},
            "grid": grid, "cheapest": cheapest_settings(grid)}


def cheapest_settings(grid: list[dict]) -> dict[str, dict | None]:
    """Per recall target, the setting that reaches it with the least work: the fewest
    partitions probed, then the least re-ranking (latencies of small tables are too close to
    rank by)."""
    cheapest = {}
    for target_recall in RECALL_TARGETS:
        ok = [g for g in grid if (g["recall_at_10"] or 0) >= target_recall]
        cheapest[str(target_recall)] = min(ok, key=lambda g: (g["nprobes"], g["refine_factor"] or 1)) if ok else None
    return cheapest

