"""An incremental run's kept rows: their fragments stay as they are, but the evaluation needs
their exact neighbours and their search over the stored codes, and the duplicate check their
ids. Where the previous run recorded them (pipeline/reuse.py), those results are taken as
they are and the kept shard is not read at all; else `search_kept_shard` reads a kept shard
(or a group of small ones) once for all of it, as the encode pass (stages/s06_encode.py)
does for new shards. `fold_kept` does both for the encode stage."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from vecpress.kernels.knn import TopK
from vecpress.pipeline import storage
from vecpress.pipeline.context import save_arrays
from vecpress.pipeline.dedup import Unit
from vecpress.pipeline.errors import VecpressError
from vecpress.pipeline.executor import Executor
from vecpress.pipeline.identity import write_id_buckets
from vecpress.pipeline.lance_io import open_lance
from vecpress.pipeline.layout import Shard, SourcePlan, group_shards, merge_shards
from vecpress.pipeline.lists import ListsSpec, write_task_lists
from vecpress.pipeline.reuse import Recorded, UnitRecorder, relist_group, reusable
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


def kept_ids(item: tuple[Shard, list[int]], *, job: KeptSearch) -> str:
    """A task: the ids of a kept shard whose results are reused (_kept_ids)."""
    return _kept_ids(job, *item)


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


@dataclass
class KeptFold:
    """What an incremental run's kept rows add to its encode stage."""

    units: list[Unit]  # their fragments, by group, in layout order
    id_files: list[str]
    list_files: list[str]
    rows_reused: int  # kept rows not read: their results recorded by an earlier run
    rows_read: int


def fold_kept(executor: Executor, plan: SourcePlan, diff, job: KeptSearch, *, xq: np.ndarray, qpos: np.ndarray,
              exact: TopK, found: TopK, min_rows: int, served: bool, out: str, recorded: list[Recorded] | None,
              previous_lists: ListsSpec | None, recorder: UnitRecorder | None) -> KeptFold:
    """Fold the kept shards' exact top-k and search over their codes into `exact` and `found`,
    from the recorded units where they cover them (reusable), else from one read of each
    group; their ids and list rows go to the files returned."""
    shards = list(plan.shards[:len(diff.kept_shards)])
    ids = dict(zip((s.index for s in shards), diff.kept_fragment_ids))
    metadata = dict(zip((f for fids in diff.kept_fragment_ids for f in fids), diff.kept_fragments))
    usable = recorded is not None and not served and (job.lists is None or previous_lists is not None)
    reused = reusable(recorded, shards, k=exact.k, extra=job.compute.rerank) if usable else []
    covered = {r.first + j for r in reused for j in range(len(r.unit.keys))}
    runs: list[list[Shard]] = [[]]
    for i, s in enumerate(shards):  # the uncovered shards, in runs of consecutive ones
        if i in covered:
            runs.append([])
        else:
            runs[-1].append(s)
    scanned = [g for run in runs if run for g in group_shards(run, min_rows)]
    taken = [tuple(shards[r.first:r.first + len(r.unit.keys)]) for r in reused]

    def item(g):
        return merge_shards(g), [f for s in g for f in ids[s.index]]

    units = {g[0].row_offset: Unit(g[0].row_offset, sum(s.num_rows for s in g),
                                   tuple(metadata[f] for s in g for f in ids[s.index])) for g in [*scanned, *taken]}
    id_files, list_files = [], []
    for r, g in zip(reused, taken):
        a = r.unit.arrays(out, r.shift)
        search = (a["search_D"], a["search_I"], a.get("search_E"))
        exact.add(a["knn_D"], a["knn_I"])
        found.add(*search[:2], *([search[2]] if job.compute.rerank else []))
        if recorder is not None:
            recorder.add(list(g), (a["knn_D"], a["knn_I"]), search)
    if taken and job.ids_uri:
        id_files += executor.map(kept_ids, [item(g) for g in taken], desc="ids (kept rows, not read)",
                                 shared={"job": job})
    if taken and job.lists is not None:
        spans = np.array(sorted((r.unit.row_offset, r.unit.row_offset + r.unit.num_rows, r.shift) for r in reused),
                         np.int64)
        list_files += executor.map(relist_group, range(previous_lists.num_groups), desc="inverted lists (kept rows)",
                                   shared={"previous": previous_lists, "spans": spans, "spec": job.lists})
    items = [item(g) for g in scanned]
    for i, (D, I, f, ids_file, lists_file) in executor.imap(search_kept_shard, items,
                                                           desc="exact neighbours and search (kept rows)",
                                                           shared={"job": job, "queries": xq,
                                                                   "query_positions": qpos}):
        exact.add(D, I)
        id_files.append(ids_file)
        list_files.append(lists_file)
        at = scanned[i][0].row_offset
        if served:  # f: the group's index buffer
            units[at] = dataclasses.replace(units[at], buffer_uri=f)
        else:
            found.add(*f)
            if recorder is not None:
                recorder.add(list(scanned[i]), (D, I), f)
    return KeptFold([units[at] for at in sorted(units)], [f for f in id_files if f], [f for f in list_files if f],
                    rows_reused=sum(r.unit.num_rows for r in reused), rows_read=sum(s.num_rows for s, _ in items))
