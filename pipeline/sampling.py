"""Choosing and reading the training sample and the held-out queries: uniform over the whole
corpus, seeded, disjoint."""

from __future__ import annotations

import logging
import math
from typing import NamedTuple

import numpy as np

from vecpress.pipeline.errors import VecpressError
from vecpress.pipeline.executor import Executor
from vecpress.pipeline.layout import Shard, SourcePlan
from vecpress.pipeline.parquet import read_vectors
from vecpress.pipeline.scan import Columns

log = logging.getLogger("vecpress")



def sample_subset(num: int, rows: int, seed: int, stream: int = 0) -> np.ndarray:
    """Sorted positions of `rows` of a sample's `num` rows, seeded: the first `rows` of one
    seeded order of them all, so that a larger subset holds every smaller one (the advisor
    trains on a subset its first stage's rows are part of). The sample is in corpus order, so
    its first rows are the first files' (whatever those hold), never a subset by themselves.
    `stream`: another order from the same seed (the queries', against the training rows')."""
    order = np.random.default_rng([seed, stream]).permutation(num)
    return np.sort(order[:rows])


def sample_sizes(num_rows: int, num_train: int, num_queries: int) -> tuple[int, int]:
    """(num_train, num_queries) for a corpus: queries capped at 10% of rows, training at the rest."""
    if num_rows < 3:
        raise VecpressError(f"only {num_rows} rows in the input: nothing to compress")
    nq = min(num_queries, max(1, num_rows // 10))
    if nq < num_queries:
        log.warning("only %d rows: holding out %d queries instead of %d", num_rows, nq, num_queries)
    return min(num_train, num_rows - nq), nq


def choose_positions(num_rows: int, num_train: int, num_queries: int, seed: int, *,
                     row_group_rows=None, max_row_groups: int = 0, exclude=None):
    """Seeded, disjoint (train, query) global row positions, each sorted, and none of the
    sorted positions `exclude` (the rows an earlier run trained the codec on, which an
    incremental run keeps) unless too few other rows are left.

    Without a row-group budget (or when the corpus has no more row groups than it), the rows are
    uniform over the whole corpus. Parquet is read a row group at a time, so once the sample
    outnumbers the row groups, a uniform sample touches nearly all of them: a second full read
    of the corpus. With `max_row_groups` and the corpus's `row_group_rows` (in global order),
    sampling first picks that many row groups (seeded, uniformly, without replacement), or
    more where they would hold fewer than twice the sample, then draws rows uniformly from all
    their rows. Every row group is picked with the same probability and every picked row
    equally, so every row stays about equally likely (exactly, when row groups are of equal
    size), and at most that many row groups are read. The sample is clustered: rows of a row
    group are drawn together.
    """
    rng = np.random.default_rng(seed)
    n = num_train + num_queries
    exclude = np.asarray([] if exclude is None else exclude, np.int64)
    picked = None
    if row_group_rows is not None and max_row_groups > 0:
        sizes = np.asarray(row_group_rows, np.int64)
        budget = max(max_row_groups, math.ceil(2 * n * len(sizes) / max(int(sizes.sum()), 1)))
        if budget < len(sizes):
            chosen = np.sort(rng.choice(len(sizes), size=budget, replace=False))
            pool = np.concatenate([[0], np.cumsum(sizes[chosen])])
            if pool[-1] >= n:
                ends = np.cumsum(sizes)
                starts = (ends - sizes)[chosen]
                in_pool = int(np.isin(np.searchsorted(ends, exclude, side="right"), chosen).sum())
                idx = rng.choice(int(pool[-1]), size=min(n + in_pool, int(pool[-1])), replace=False)
                j = np.searchsorted(pool, idx, side="right") - 1
                picked = starts[j] + (idx - pool[j])
    if picked is None:
        picked = rng.choice(num_rows, size=min(n + len(exclude), num_rows), replace=False)
    if len(exclude):  # drawn in random order: the first n rows not excluded are uniform over them
        kept = np.isin(picked, exclude, assume_unique=True)
        if (~kept).sum() < n:
            log.warning("only %d rows are not excluded from the sample: %d excluded rows are taken too",
                        int((~kept).sum()), n - int((~kept).sum()))
        picked = picked[np.argsort(kept, kind="stable")]
    picked = picked[:n]
    return np.sort(picked[num_queries:]).astype(np.int64), np.sort(picked[:num_queries]).astype(np.int64)


def sample_rows(item: tuple[Shard, np.ndarray], *, columns: Columns) -> np.ndarray:
    """Vectors of the given sorted shard-local rows (validated like every other read)."""
    shard, local_rows = item
    return read_vectors(shard, np.asarray(local_rows, np.int64), columns.vector, columns.dim, nonzero=columns.nonzero)


class Sample(NamedTuple):
    train: np.ndarray  # training vectors
    queries: np.ndarray  # held-out query vectors
    query_positions: np.ndarray
    row_groups_read: int
    train_positions: np.ndarray


def read_sample(plan: SourcePlan, num_train: int, num_queries: int, seed: int, executor: Executor, *,
                max_row_groups: int = 0, exclude=None, metric: str | None = None) -> Sample:
    """The training and query vectors, read across the corpus (see choose_positions, and its
    `exclude`): only the row groups holding sampled rows are read (read for `metric`: cosine
    refuses all-zero vectors)."""
    sizes = plan.row_group_rows()
    train_pos, query_pos = choose_positions(plan.num_rows, num_train, num_queries, seed, row_group_rows=sizes,
                                            max_row_groups=max_row_groups, exclude=exclude)
    positions = np.union1d(train_pos, query_pos)
    touched = int(np.unique(np.searchsorted(np.cumsum(sizes), positions, side="right")).size)
    log.info("sample: %d rows from %d of %d row groups", len(positions), touched, len(sizes))
    items = [(shard, local) for shard, _, local in plan.locate(positions)]
    x = np.concatenate(executor.map(sample_rows, items, desc="sample", shared={"columns": Columns.of(plan, metric)}))
    is_query = np.isin(positions, query_pos)
    return Sample(x[~is_query], x[is_query], positions[is_query], touched, positions[~is_query])


def file_rows(plan: SourcePlan, positions: np.ndarray) -> dict[str, np.ndarray]:
    """Sorted global positions -> the rows' files and rows within them, as arrays (`uris`,
    `file_index` into them, `row`): where the rows are, whatever layout a later run has."""
    uris = sorted({f.uri for f in plan.files})
    index = {u: i for i, u in enumerate(uris)}
    file = np.empty(len(positions), np.int32)
    row = np.empty(len(positions), np.int64)
    for shard, sel, local in plan.locate(np.asarray(positions, np.int64)):
        for piece, in_piece, piece_rows in shard.locate(local):
            file[sel[in_piece]] = index[piece.file_uri]
            row[sel[in_piece]] = piece.file_row_start + piece_rows
    return {"uris": np.array(uris, dtype=str), "file_index": file, "row": row}


def positions_in(plan: SourcePlan, rows: dict[str, np.ndarray]) -> np.ndarray:
    """file_rows's rows -> their global positions in `plan`'s layout, in the same order (-1
    for rows of files it no longer has, or past a file's end)."""
    index = {str(u): i for i, u in enumerate(rows["uris"])}
    file, row = np.asarray(rows["file_index"]), np.asarray(rows["row"])
    order = np.lexsort((row, file))
    file, row = file[order], row[order]
    out = np.full(len(order), -1, np.int64)
    for shard in plan.shards:
        for piece, start in zip(shard.pieces, shard.piece_starts):
            f = index.get(piece.file_uri)
            if f is None:
                continue
            lo, hi = np.searchsorted(file, [f, f + 1])
            a, b = lo + np.searchsorted(row[lo:hi], [piece.file_row_start, piece.file_row_start + piece.num_rows])
            out[order[a:b]] = shard.row_offset + start + row[a:b] - piece.file_row_start
    return out


def layout_positions(plan: SourcePlan, rows: dict[str, np.ndarray]) -> np.ndarray:
    """file_rows's rows -> their sorted global positions in `plan`'s layout (rows of files
    it no longer has, or past a file's end, are left out)."""
    found = positions_in(plan, rows)
    return np.sort(found[found >= 0])
