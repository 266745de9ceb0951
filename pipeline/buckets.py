"""Rows sorted into buckets across many files, each bucket then read back from every file by
one task: how a distributed pass regroups its output (ids by hash for the duplicate check,
codes by partition for the inverted lists) without one process holding all of it.

A writer (one encode task) puts its rows into one Arrow IPC file of `num_buckets` record
batches, batch b holding its rows of bucket b. Arrow IPC files are random-access per record
batch (the footer names each one's offset), so a reader of bucket b reads only that batch of
each file: locally, or by range reads from an object store.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa

from vecpress.pipeline import storage


def write_buckets(uri: str, rows: pa.RecordBatch, bucket: np.ndarray, num_buckets: int) -> str:
    """Write `rows` to `uri` as `num_buckets` record batches, batch b the rows whose `bucket`
    is b (in their order); returns `uri`."""
    bucket = np.asarray(bucket, np.int64)
    order = np.argsort(bucket, kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(bucket, minlength=num_buckets))])
    rows = rows.take(pa.array(order))
    sink = io.BytesIO()
    with pa.ipc.new_file(sink, rows.schema) as writer:
        for b in range(num_buckets):
            writer.write_batch(rows.slice(int(starts[b]), int(starts[b + 1] - starts[b])))
    storage.write_bytes(uri, sink.getvalue())
    return uri


def open_batches(uri: str) -> pa.ipc.RecordBatchFileReader:
    """An Arrow IPC file, open for reading its record batches one by one (get_batch)."""
    loc = storage.resolve(uri)
    return pa.ipc.open_file(loc.fs.open_input_file(loc.path))


def read_bucket(uri: str, bucket: int) -> pa.RecordBatch:
    """Bucket `bucket` of a file write_buckets wrote (only that batch is read)."""
    loc = storage.resolve(uri)
    with loc.fs.open_input_file(loc.path) as f:
        return pa.ipc.open_file(f).get_batch(bucket)


def read_bucket_of_all(files: list[str] | tuple[str, ...], bucket: int) -> pa.Table | None:
    """Bucket `bucket` of every file, as one table; None when no file has rows there."""
    batches = [b for b in (read_bucket(uri, bucket) for uri in files) if b.num_rows]
    return pa.Table.from_batches(batches) if batches else None
