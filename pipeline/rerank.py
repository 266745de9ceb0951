"""Exact distances for re-ranking candidates, from the two places full-precision vectors live:
the source Parquet (read back row group by row group, distributed over shards) or the
output's optional warm column (a second, higher-precision code, e.g. SQ8 or SQfp16)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from vecpress.kernels.knn import pair_distances, prepare_vectors
from vecpress.pipeline.codec_store import CodecRef, load_codec
from vecpress.pipeline.errors import SourceChangedError
from vecpress.pipeline.executor import Executor
from vecpress.pipeline.layout import Shard, SourcePlan
from vecpress.pipeline.parquet import read_vectors
from vecpress.pipeline.schema import RERANK_COLUMN, codes_as_numpy


@dataclass(frozen=True)
class PairsInShard:
    """(query, row) pairs whose rows lie in one shard."""

    shard: Shard
    local_rows: np.ndarray  # sorted, unique shard-local rows to read
    pair_query: np.ndarray  # query index of each pair
    pair_row: np.ndarray  # index into local_rows of each pair
    pair_slot: np.ndarray  # where each pair's distance goes in the flat result


def shard_pair_distances(item: PairsInShard, *, queries: np.ndarray, metric: str, column: str, dim: int) -> np.ndarray:
    """Exact distances of the item's pairs, reading only the row groups that hold its rows;
    refuses (SourceChangedError) if the file differs from the one that was compressed."""
    try:
        x = prepare_vectors(read_vectors(item.shard, item.local_rows, column, dim), metric)
    except SourceChangedError as exc:
        raise SourceChangedError(f"{exc}: cannot re-rank against a source that changed since it was compressed "
                                 "(recompress, re-rank from a warm column, or search without re-ranking)") from None
    return pair_distances(queries[item.pair_query], x[item.pair_row], metric)


def source_distances(plan: SourcePlan, xq: np.ndarray, I: np.ndarray, metric: str, executor: Executor) -> np.ndarray:
    """Exact distances (nq, c) of prepared queries xq to candidate source positions I (-1 = none;
    a table's rows are mapped to them by its RowMap)."""
    E = np.full(I.size, np.inf, np.float32)
    slots = np.nonzero(I.ravel() >= 0)[0]
    if slots.size == 0:
        return E.reshape(I.shape)
    positions = I.ravel()[slots]
    uniq, inverse = np.unique(positions, return_inverse=True)
    shard_of = np.searchsorted([s.row_offset for s in plan.shards], uniq, side="right") - 1
    items = []
    for si in np.unique(shard_of):
        shard = plan.shards[int(si)]
        in_shard = np.nonzero(shard_of == si)[0]  # indexes into uniq, sorted
        pairs = np.nonzero(np.isin(inverse, in_shard))[0]
        items.append(PairsInShard(shard=shard, local_rows=uniq[in_shard] - shard.row_offset,
                                  pair_query=slots[pairs] // I.shape[1],
                                  pair_row=np.searchsorted(in_shard, inverse[pairs]), pair_slot=slots[pairs]))
    results = executor.map(shard_pair_distances, items, desc="re-rank",
                           shared={"queries": xq, "metric": metric, "column": plan.vector_column, "dim": plan.dim})
    for item, d in zip(items, results):
        E[item.pair_slot] = d
    return E.reshape(I.shape)


def column_distances(ds, codec: CodecRef, xq: np.ndarray, I: np.ndarray, metric: str) -> np.ndarray:
    """Exact distances of prepared queries to the decoded warm-column vectors of candidates I."""
    E = np.full(I.size, np.inf, np.float32)
    slots = np.nonzero(I.ravel() >= 0)[0]
    if slots.size == 0:
        return E.reshape(I.shape)
    uniq, inverse = np.unique(I.ravel()[slots], return_inverse=True)
    codes = codes_as_numpy(ds.take(uniq.tolist(), columns=[RERANK_COLUMN]).column(0))
    x = load_codec(codec).decode(codes)
    E[slots] = pair_distances(xq[slots // I.shape[1]], x[inverse], metric)
    return E.reshape(I.shape)
