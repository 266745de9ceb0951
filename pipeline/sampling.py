"""Choosing and reading the training sample and the held-out queries: uniform over the whole
corpus, seeded, disjoint."""

from __future__ import annotations

import logging

import numpy as np

from pipeline.errors import VecpressError
from pipeline.executor import Executor
from pipeline.source import SourcePlan
from pipeline.stages import Columns, sample_rows

log = logging.getLogger("vecpress")


def sample_sizes(num_rows: int, num_train: int, num_queries: int) -> tuple[int, int]:
    """(num_train, num_queries) for a corpus: queries capped at 10% of rows, training at the rest."""
    if num_rows < 3:
        raise VecpressError(f"only {num_rows} rows in the input: nothing to compress")
    nq = min(num_queries, max(1, num_rows // 10))
    if nq < num_queries:
        log.warning("only %d rows: holding out %d queries instead of %d", num_rows, nq, num_queries)
    return min(num_train, num_rows - nq), nq


def choose_positions(num_rows: int, num_train: int, num_queries: int, seed: int):
    """Uniform, seeded, disjoint (train, query) global row positions, each sorted."""
    rng = np.random.default_rng(seed)
    picked = rng.choice(num_rows, size=num_train + num_queries, replace=False)
    return np.sort(picked[num_queries:]).astype(np.int64), np.sort(picked[:num_queries]).astype(np.int64)


def read_sample(plan: SourcePlan, num_train: int, num_queries: int, seed: int, executor: Executor):
    """(training vectors, held-out query vectors, query positions), read uniformly across the
    corpus: only the row groups holding sampled rows are read."""
    train_pos, query_pos = choose_positions(plan.num_rows, num_train, num_queries, seed)
    positions = np.union1d(train_pos, query_pos)
    items = [(shard, local) for shard, _, local in plan.locate(positions)]
    x = np.concatenate(executor.map(sample_rows, items, desc="sample", shared={"columns": Columns.of(plan)}))
    is_query = np.isin(positions, query_pos)
    return x[~is_query], x[is_query], positions[is_query]
