"""--duplicate-ids keep-first / keep-last: the rows a run drops leave its fragments, and its
evaluation, before the commit.

The duplicate check (pipeline.identity) decides which positions go once every encode task is
done, so the fragments were already written with them. `drop_rows` rewrites the fragments of
one *unit* (an encode task's, or an incremental run's kept group's: consecutive positions)
without them, one data file at a time, and only units that hold a dropped row; the files it
replaces are removed once the commit lands. Lance deletion files would spare the rewrite, but
a version with deletions no longer has the fragment layout an incremental run extends
(fragments owned by row count) and its row offsets skip nothing, so every reader would map
rows twice; a rewrite keeps table row == kept position rank, the only mapping (pipeline.rowmap).

The encode pass's top-k for the held-out queries is over every row; with a keep option it is
fetched twice as deep (`pass_k`) and the dropped rows are taken out of it (`kept_top`). A
query whose top-2k holds more than k dropped rows gets its exact neighbours from one more
read of the source, over the kept rows only (`exact_kept_shard`).
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, replace

import lance
import lance.fragment
import numpy as np
import pyarrow as pa
from lance.file import LanceFileReader

from vecpress.kernels.knn import TopK, exact_knn, prepare_vectors
from vecpress.pipeline import storage
from vecpress.pipeline.context import load_arrays, save_arrays
from vecpress.pipeline.layout import Shard
from vecpress.pipeline.rowmap import RowMap
from vecpress.pipeline.executor import Executor
from vecpress.pipeline.identity import Duplicates
from vecpress.pipeline.layout import group_shards, merge_shards
from vecpress.pipeline.options import CompressOptions
from vecpress.pipeline.scan import Columns, batch_rows, scan_shard

log = logging.getLogger("vecpress")

#: rows per batch a rewrite reads and writes
REWRITE_BATCH_ROWS = 65_536


def pass_k(eval_k: int, duplicate_ids: str) -> int:
    """The depth of the encode pass's top-k: twice `eval_k` when rows may be dropped after it."""
    return eval_k if duplicate_ids == "refuse" else 2 * eval_k


@dataclass(frozen=True)
class Unit:
    """Consecutive fragments holding positions start .. start + num_rows - 1, in order, and
    (--serve lancedb) the index buffer of the same rows."""

    start: int
    num_rows: int
    fragments: tuple[dict, ...]
    buffer_uri: str | None = None


@dataclass(frozen=True)
class Rewritten:
    unit: Unit
    #: the data files (URIs) the rewrite replaced: removed once the commit lands
    replaced: tuple[str, ...]


def _kept_batches(unit: Unit, local: np.ndarray, table_uri: str, options, replaced: list[str]):
    """The unit's rows in order, a batch at a time, less those at `local`; each data file read
    is noted in `replaced`."""
    at = 0
    for frag in unit.fragments:
        (data,) = frag["files"]  # (vecpress writes every column of a fragment to one file)
        uri = storage.join(table_uri, "data", data["path"])
        replaced.append(uri)
        reader = LanceFileReader(storage.lance_location(uri)[0], storage_options=options)
        for rb in reader.read_all(batch_size=REWRITE_BATCH_ROWS).to_batches():
            mask = np.ones(rb.num_rows, bool)
            mask[local[(local >= at) & (local < at + rb.num_rows)] - at] = False
            at += rb.num_rows
            yield rb.filter(pa.array(mask))


def drop_rows(item: tuple[Unit, np.ndarray], *, table_uri: str, max_rows_per_file: int) -> Rewritten:
    """The unit's fragments written again without the rows at `local` (sorted offsets from
    the unit's first position), a data file at a time; its index buffer likewise."""
    unit, local = item
    target, options = storage.lance_location(table_uri)
    replaced: list[str] = []
    stream = _kept_batches(unit, local, table_uri, options, replaced)
    first = next(stream)
    with storage.writing(table_uri, "the new version's data files"):
        frags = lance.fragment.write_fragments(
            pa.RecordBatchReader.from_batches(first.schema, itertools.chain([first], stream)), target,
            schema=first.schema, mode="overwrite", storage_options=options, max_rows_per_file=max_rows_per_file)
    buffer = unit.buffer_uri
    if buffer:
        keep = np.ones(unit.num_rows, bool)
        keep[local] = False
        buffer = save_arrays(buffer.removesuffix(".npz") + "-kept.npz",
                             {name: a[keep] for name, a in load_arrays(buffer).items()})
    return Rewritten(replace(unit, num_rows=unit.num_rows - len(local), fragments=tuple(f.to_json() for f in frags),
                             buffer_uri=buffer), tuple(replaced))


def kept_top(I: np.ndarray, rows: RowMap, k: int, *extra: np.ndarray):
    """A top-(2k) of source positions less the dropped ones, as the first k table rows (and
    the `extra` arrays aligned with it), and per query whether it is complete: k kept rows
    found, or every row of the corpus was in it (a -1 in it)."""
    mapped = rows.rows_of(I)
    gone = (I >= 0) & (mapped < 0)
    order = np.argsort(gone, axis=1, kind="stable")[:, :k]  # kept (and -1) entries first, in rank order
    complete = ((~gone).sum(axis=1) >= k) | (I < 0).any(axis=1)
    taken = np.take_along_axis(mapped, order, axis=1)
    valid = ~np.take_along_axis(gone, order, axis=1)
    taken[~valid] = -1
    return taken, [np.where(valid, np.take_along_axis(e, order, axis=1), np.inf) for e in extra], complete


class KeptExact:
    """The exact top-k of the queries over a batch's rows that are not dropped (global
    positions), folded over a shard."""

    def __init__(self, queries: np.ndarray, k: int, exclude: np.ndarray, dropped: np.ndarray, metric: str):
        self.xq, self.k, self.metric, self.dropped = prepare_vectors(queries, metric), k, metric, dropped
        self.top = TopK(len(queries), k, exclude=exclude)

    def observe(self, batch) -> None:
        pos = batch.position + np.arange(len(batch.x), dtype=np.int64)
        held = np.nonzero(~np.isin(pos, self.dropped))[0]
        if not len(held):
            return
        D, I = exact_knn(self.xq, prepare_vectors(batch.x[held], self.metric), self.k + 1, self.metric)
        self.top.add(D, np.where(I >= 0, pos[held][np.maximum(I, 0)], -1))


def exact_kept_shard(shard: Shard, *, columns: Columns, metric: str, queries: np.ndarray,
                     query_positions: np.ndarray, k: int, dropped: np.ndarray, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """A shard's exact top-k (global positions) over its kept rows: the evaluation's
    ground truth when the encode pass's deeper top-k was not deep enough."""
    lo, hi = np.searchsorted(dropped, [shard.row_offset, shard.row_offset + shard.num_rows])
    observer = KeptExact(queries, k, query_positions, dropped[lo:hi], metric)
    for _ in scan_shard(shard, columns, [observer], batch_size=batch_size):
        pass
    return observer.top.D, observer.top.I


def dropped_record(dup: Duplicates, rows: RowMap, uri: str, plan, keep: str) -> dict:
    """The id check's record of the rows a keep option dropped, and its log line."""
    examples = [[i, p] for i, p in dup.examples]
    log.warning("duplicate ids: %d id(s) of column %r occur more than once; --duplicate-ids %s: %d of %d rows "
                "dropped, e.g. %s", dup.num_ids, plan.id_column, keep, len(rows.dropped), plan.num_rows,
                "; ".join(f"id {i!r} at positions {p}" for i, p in examples))
    return {"num_ids_duplicated": dup.num_ids, "rows_dropped": len(rows.dropped), "examples": examples,
            "dropped_uri": uri}


def drop_from_units(units: list[Unit], rows: RowMap, executor: Executor, **shared) -> tuple[list[Unit], tuple]:
    """The units that hold a dropped row, written again without it (one task each); the
    others as they are. Returns the units and the data files the rewrites replaced."""
    items = [(i, u, rows.dropped_in(u.start, u.start + u.num_rows)) for i, u in enumerate(units)]
    items = [it for it in items if len(it[2])]
    units, replaced = list(units), []
    done = executor.map(drop_rows, [(u, local) for _, u, local in items], desc="drop duplicated rows", shared=shared)
    for (i, _, _), r in zip(items, done):
        units[i] = r.unit
        replaced += r.replaced
    return units, tuple(replaced)


def exact_over_kept(plan, rows: RowMap, xq: np.ndarray, qpos: np.ndarray, opts: CompressOptions, executor: Executor,
                     complete: np.ndarray) -> np.ndarray:
    """The queries' exact top-k over the kept rows (global positions), from one more read of
    the source: when the encode pass's deeper top-k held too many dropped rows for some."""
    log.info("encode: %d of %d queries had more than %d dropped rows among their %d nearest: their exact neighbours "
             "are read again over the kept rows", int((~complete).sum()), len(complete), opts.eval_k,
             2 * opts.eval_k)
    rows_per_batch = batch_rows(opts.batch_size, plan.dim, gpu=False)
    top = TopK(len(qpos), opts.eval_k, exclude=qpos)
    for _, (D, I) in executor.imap(exact_kept_shard, [merge_shards(g) for g in group_shards(plan.shards, rows_per_batch)],
                                   desc="exact neighbours (kept rows)",
                                   shared={"columns": Columns.of(plan, opts.metric), "metric": opts.metric,
                                           "queries": xq, "query_positions": qpos, "k": opts.eval_k,
                                           "dropped": rows.dropped, "batch_size": rows_per_batch}):
        top.add(D, I)
    return top.I
