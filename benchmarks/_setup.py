"""Shared set-up for the encode benchmarks: a generated corpus, its plan, a trained codec and
the EncodeJob that `vecpress.pipeline.stages.s06_encode.encode_shards` runs (nothing here is timed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vecpress.kernels.codecs.codec import Codec
from vecpress.pipeline.codec_store import save_codec
from vecpress.pipeline.demo import write_corpus
from vecpress.pipeline.source import SourceSpec, plan_sources
from vecpress.pipeline.sampling import sample_rows
from vecpress.pipeline.scan import Columns, ComputeSpec
from vecpress.pipeline.stages.s06_encode import EncodeJob


def encode_setup(work: Path, *, rows: int, dim: int, files: int, codec: str, shard_rows: int,
                 batch_size: int, num_train: int = 20_000, metric: str = "cosine", row_group_size: int = 16_384):
    """(plan, job): corpus under work/src (reused when present), codec trained on its first rows."""
    src = work / "src"
    if not src.exists():
        write_corpus(str(src), num_rows=rows, dim=dim, num_files=files, row_group_size=row_group_size)
    plan = plan_sources(SourceSpec((str(src),)), shard_rows=shard_rows)
    columns = Columns.of(plan)
    shard = plan.shards[0]
    xt = sample_rows((shard, np.arange(min(num_train, shard.num_rows))), columns=columns)
    ref = save_codec(Codec.train(xt, codec, metric), str(work / "sidecar"))
    job = EncodeJob(table_uri=str(work / "out" / "bench.lance"), compute=ComputeSpec(ref, k=100), columns=columns,
                    batch_size=batch_size)  # as the encode stage sets it
    return plan, job
