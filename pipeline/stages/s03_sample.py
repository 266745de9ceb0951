"""Stage 3, sample: the training sample and the held-out queries, uniform over the whole
corpus, seeded and disjoint, written to the run's folder."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from vecpress.pipeline.context import RunContext, save_array, save_arrays
from vecpress.pipeline.executor import Executor
from vecpress.pipeline.options import CompressOptions
from vecpress.pipeline.sampling import file_rows, read_sample
from vecpress.pipeline.stages.s01_plan import Planned

log = logging.getLogger("vecpress")


@dataclass(frozen=True)
class Sampled:
    train_uri: str
    queries_uri: str
    query_positions_uri: str
    num_train: int
    num_queries: int
    seconds: float = 0.0
    row_groups_read: int | None = None
    #: where the training rows are (sampling.file_rows), for later incremental runs' queries
    train_rows_uri: str | None = None
    #: an incremental run on the previous version's queries: the units its run recorded
    #: (pipeline.reuse), and its inverted lists' spec (kept rows are listed from them)
    previous_units: list | None = None
    previous_lists: object | None = None


def sample(ctx: RunContext, planned: Planned, opts: CompressOptions, executor: Executor) -> Sampled:
    """Read the training sample and held-out queries, uniformly across the whole corpus."""
    start = time.perf_counter()
    s = read_sample(planned.plan, planned.num_train, planned.num_queries, opts.seed, executor,
                    max_row_groups=opts.sample_row_groups, metric=opts.metric)
    log.info("sample: %d training vectors, %d held-out queries (seed %d)", len(s.train), len(s.queries), opts.seed)
    return Sampled(
        train_uri=save_array(ctx.run_file("train.npy"), s.train),
        queries_uri=save_array(ctx.run_file("queries.npy"), s.queries),
        query_positions_uri=save_array(ctx.run_file("query_positions.npy"), s.query_positions),
        num_train=len(s.train), num_queries=len(s.queries), row_groups_read=s.row_groups_read,
        train_rows_uri=save_arrays(ctx.run_file("train_rows.npz"), file_rows(planned.plan, s.train_positions)),
        seconds=time.perf_counter() - start,
    )
