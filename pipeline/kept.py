"""An incremental run's kept rows: their fragments stay as they are, but the evaluation needs
their exact neighbours and their search over the stored codes, and the duplicate check their
ids. `search_kept_shard` reads a kept shard (or a group of small ones) once for all of it, as
the encode pass (stages/s06_encode.py) does for new shards."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vecpress.pipeline import storage
from vecpress.pipeline.context import save_arrays
from vecpress.pipeline.errors import VecpressError
from vecpress.pipeline.identity import write_id_buckets
from vecpress.pipeline.lance_io import open_lance
from vecpress.pipeline.layout import Shard
from vecpress.pipeline.lists import ListsSpec, write_task_lists
from vecpress.pipeline.scan import (
    Columns, ComputeSpec, Computed, Partitions, ShardCompute, StoredCodes, batch_rows, gathers, scan_shard,
)
from vecpress.pipeline.schema import CODE_COLUMN, RERANK_COLUMN, codes_as_numpy


@dataclass(frozen=True)
class KeptSearch:
    """The evaluation's search over kept rows: their stored codes are in the fragments of the
    previous version that each kept shard owns."""

    table_uri: str
    version: int
    compute: ComputeSpec
    columns: Columns
    batch_size: int = 0
    #: GPUs faiss may search on (-1 = those it sees, 0 = the CPU only)
    ngpu: int = -1
    #: --serve lancedb: the kept rows have no stored codes; their index parts (the kept
    #: model's partitions and codes) are computed from their vectors into a file in this folder
    index_buffers_uri: str | None = None
    #: EncodeJob's: the kept rows' ids (read from their fragments) go there too
    ids_uri: str | None = None
    id_buckets: int = 1
    #: EncodeJob's: the kept rows' partitions and stored codes go to the inverted lists too
    lists: ListsSpec | None = None


def search_kept_shard(item: tuple[Shard, list[int]], *, job: KeptSearch, queries: np.ndarray,
                      query_positions: np.ndarray):
    """A kept shard's (or merged group's) exact top-k for the queries and their search over its
    stored codes (read from the fragments it owns, `item[1]`), with the candidates' exact
    distances, in one read of its vectors, as the encode pass finds them for new shards.
    Returns (D, I, (D, I, E), ids file or None, inverted lists' file or None); for a
    LanceDB-served table (D, I, the index buffer's uri, ids file or None, None)."""
    shard, fragment_ids = item
    spec = job.compute
    ids_file = _kept_ids(job, shard, fragment_ids) if job.ids_uri else None
    if job.index_buffers_uri:
        return (*_index_kept_shard(shard, job, queries, query_positions), ids_file, None)
    compute = ShardCompute(spec, queries, device="cpu", search_ngpu=job.ngpu)  # (nothing to encode)
    codes, warm = _stored_codes(job, shard, fragment_ids, with_warm=spec.rerank_codec is not None and spec.rerank)
    exact, found = gathers(spec, queries, query_positions)
    observers = [StoredCodes(codes, warm, compute), exact, found]
    if job.lists is not None:
        observers.append(Partitions(job.lists.coarse, job.lists.residual))
    rows = batch_rows(job.batch_size, job.columns.dim, gpu=compute.knn_ngpu > 0)
    batches = [(b.partitions, b.residual_codes) for b in scan_shard(shard, job.columns, observers, batch_size=rows)]
    lists_file = None if job.lists is None else write_task_lists(
        job.lists, f"kept-{shard.index:06d}", [p for p, _ in batches], [shard.row_offset + np.arange(shard.num_rows)],
        [codes] if job.lists.residual is None else [r for _, r in batches])
    return exact.top.D, exact.top.I, (found.top.D, found.top.I, found.top.E), ids_file, lists_file


def _kept_ids(job: KeptSearch, shard: Shard, fragment_ids: list[int]) -> str:
    """The kept rows' ids, as committed (read from their fragments), into the ids folder."""
    ds = open_lance(job.table_uri, job.version)
    ids = [c for fid in fragment_ids for c in ds.get_fragment(fid).to_table(columns=[job.columns.id]).column(0).chunks]
    if sum(len(c) for c in ids) != shard.num_rows:
        raise VecpressError(f"{job.table_uri} version {job.version}: fragments {fragment_ids} hold "
                            f"{sum(len(c) for c in ids)} ids for the {shard.num_rows} rows of {shard.describe()}")
    return write_id_buckets(storage.join(job.ids_uri, f"kept-{shard.index:06d}.arrow"), ids,
                            [shard.row_offset + np.arange(shard.num_rows, dtype=np.int64)], job.id_buckets,
                            job.columns.out_fields.field(0).type)


def _index_kept_shard(shard: Shard, job: KeptSearch, queries: np.ndarray, query_positions: np.ndarray):
    """A served table's kept rows: their exact top-k, and their index parts for the index
    stage (the same model, so the same parts as when they were first encoded)."""
    compute = ShardCompute(job.compute, queries, device="cpu", search_ngpu=job.ngpu)
    exact, _ = gathers(job.compute, queries, query_positions)
    codes = []
    for b in scan_shard(shard, job.columns, [Computed(compute), exact],
                        batch_size=batch_rows(job.batch_size, job.columns.dim, gpu=compute.knn_ngpu > 0)):
        codes.append(b.codes)
    parts, pq_codes = compute.codec.split(np.concatenate(codes))
    uri = save_arrays(storage.join(job.index_buffers_uri, f"kept-{shard.index:06d}.npz"),
                      {"partitions": parts, "codes": pq_codes})
    return exact.top.D, exact.top.I, uri


def _stored_codes(job: KeptSearch, shard: Shard, fragment_ids: list[int], *, with_warm: bool):
    """The codes (and warm codes) a kept shard's rows were stored with, in row order."""
    ds = open_lance(job.table_uri, job.version)
    columns = [CODE_COLUMN, RERANK_COLUMN] if with_warm else [CODE_COLUMN]
    tables = [ds.get_fragment(fid).to_table(columns=columns) for fid in fragment_ids]
    codes = np.concatenate([codes_as_numpy(t.column(0)) for t in tables])
    if len(codes) != shard.num_rows:
        raise VecpressError(f"{job.table_uri} version {job.version}: fragments {fragment_ids} hold {len(codes)} "
                            f"codes for the {shard.num_rows} rows of {shard.describe()}")
    warm = np.concatenate([codes_as_numpy(t.column(1)) for t in tables]) if with_warm else None
    return codes, warm
