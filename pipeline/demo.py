"""A generated sample corpus: clustered embeddings in Parquet, written chunk by chunk."""

from __future__ import annotations

import contextlib
import json
import logging
import re

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vecpress.kernels.synthetic import ClusteredEmbeddings
from vecpress.pipeline import storage
from vecpress.pipeline.errors import ConfigError

log = logging.getLogger("vecpress")

TOPICS = ["sports", "science", "finance", "travel", "music", "health", "politics", "food"]


def write_corpus(uri: str, *, num_rows: int = 100_000, dim: int = 384, num_files: int = 4, seed: int = 0,
                 row_group_size: int = 16_384, chunk: int = 16_384) -> list[str]:
    """Write `num_files` Parquet files (id int64, embedding fixed_size_list<float32>[dim],
    text string) under `uri`, and `_corpus.json` with these parameters; returns their URIs.
    Deterministic in (num_rows, dim, num_files, seed). Files `part-NNNNN.parquet` that an
    earlier call left there beyond `num_files` are removed (they would join the corpus)."""
    for name, value, least in (("rows", num_rows, 1), ("dim", dim, 1), ("files", num_files, 1), ("seed", seed, 0)):
        if value < least:
            raise ConfigError(f"--{name} must be at least {least}, got {value}")  # (a seed too: numpy's)
    if num_files > num_rows:
        raise ConfigError(f"--files {num_files} is more than --rows {num_rows}: a file would be empty")
    with storage.writing(uri, "the sample corpus"):  # (a full disk: one line naming the folder)
        return _write_corpus(uri, num_rows, dim, num_files, seed, row_group_size, chunk)


def _write_corpus(uri: str, num_rows: int, dim: int, num_files: int, seed: int, row_group_size: int,
                  chunk: int) -> list[str]:
    gen = ClusteredEmbeddings(dim, seed=seed)
    loc = storage.resolve(uri)
    loc.fs.create_dir(loc.path, recursive=True)
    _remove_parts(loc, keep=num_files)
    schema = pa.schema([("id", pa.int64()), ("embedding", pa.list_(pa.float32(), dim)), ("text", pa.string())])
    bounds = np.linspace(0, num_rows, num_files + 1).astype(int)
    files = []
    for i in range(num_files):
        path = f"{loc.path}/part-{i:05d}.parquet"
        try:
            with loc.fs.open_output_stream(path) as sink, pq.ParquetWriter(sink, schema) as w:
                for start in range(bounds[i], bounds[i + 1], chunk):
                    n = min(chunk, bounds[i + 1] - start)
                    x = gen.batch(start, n)
                    ids = np.arange(start, start + n, dtype=np.int64)
                    text = [f"doc {j} about {TOPICS[j % len(TOPICS)]}" for j in ids]
                    w.write_table(pa.table([pa.array(ids), pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim),
                                            pa.array(text)], schema=schema), row_group_size=row_group_size)
        except BaseException:  # (a full disk: no half-written file that would join the corpus)
            with contextlib.suppress(OSError):
                loc.fs.delete_file(path)
            raise
        files.append(loc.uri_for(path))
    with loc.fs.open_output_stream(f"{loc.path}/{CORPUS_FILE}") as f:
        f.write(json.dumps(corpus_parameters(num_rows, dim, num_files, seed)).encode())
    log.info("wrote %d rows x %d-d in %d files under %s", num_rows, dim, num_files, uri)
    return files


#: what write_corpus was called with, beside its files (the leading "_" keeps it out of the corpus)
CORPUS_FILE = "_corpus.json"


def corpus_parameters(num_rows: int, dim: int, num_files: int, seed: int) -> dict:
    return {"rows": num_rows, "dim": dim, "files": num_files, "seed": seed}


def written_corpus(uri: str) -> dict | None:
    """The parameters write_corpus recorded under `uri`, or None (none there, or no record)."""
    path = storage.join(uri, CORPUS_FILE)
    return json.loads(storage.read_bytes(path)) if storage.exists(path) else None


def _remove_parts(loc, *, keep: int) -> None:
    """Remove the part-NNNNN.parquet files numbered `keep` or more (an earlier, larger call's)."""
    for info in loc.fs.get_file_info(pafs.FileSelector(loc.path, allow_not_found=True)):
        m = re.search(r"/part-(\d{5})\.parquet$", info.path)
        if m and int(m.group(1)) >= keep:
            loc.fs.delete_file(info.path)


def demo_codec(dim: int) -> str:
    """The demo's codec: PQ with 8-wide sub-vectors (PQ48 at 384-d, 32x smaller), else the
    pipeline's default for `dim`."""
    from vecpress.pipeline.stages.s01_plan import default_codec

    return f"PQ{dim // 8}" if dim % 8 == 0 and dim // 8 <= 256 else default_codec(dim)
