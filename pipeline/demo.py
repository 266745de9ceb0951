"""A generated sample corpus: clustered embeddings in Parquet, written chunk by chunk."""

from __future__ import annotations

import logging

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kernels.synthetic import ClusteredEmbeddings
from pipeline import storage

log = logging.getLogger("vecpress")

TOPICS = ["sports", "science", "finance", "travel", "music", "health", "politics", "food"]


def write_corpus(uri: str, *, num_rows: int = 100_000, dim: int = 384, num_files: int = 4, seed: int = 0,
                 row_group_size: int = 16_384, chunk: int = 16_384) -> list[str]:
    """Write `num_files` Parquet files (id int64, embedding fixed_size_list<float32>[dim],
    text string) under `uri`; returns their URIs. Deterministic in (num_rows, dim, num_files, seed)."""
    gen = ClusteredEmbeddings(dim, seed=seed)
    loc = storage.resolve(uri)
    loc.fs.create_dir(loc.path, recursive=True)
    schema = pa.schema([("id", pa.int64()), ("embedding", pa.list_(pa.float32(), dim)), ("text", pa.string())])
    bounds = np.linspace(0, num_rows, num_files + 1).astype(int)
    files = []
    for i in range(num_files):
        path = f"{loc.path}/part-{i:05d}.parquet"
        with pq.ParquetWriter(loc.fs.open_output_stream(path), schema) as w:
            for start in range(bounds[i], bounds[i + 1], chunk):
                n = min(chunk, bounds[i + 1] - start)
                x = gen.batch(start, n)
                ids = np.arange(start, start + n, dtype=np.int64)
                text = [f"doc {j} about {TOPICS[j % len(TOPICS)]}" for j in ids]
                w.write_table(pa.table([pa.array(ids), pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim),
                                        pa.array(text)], schema=schema), row_group_size=row_group_size)
        files.append(loc.uri_for(path))
    log.info("wrote %d rows x %d-d in %d files under %s", num_rows, dim, num_files, uri)
    return files
