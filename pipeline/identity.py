"""Duplicate ids, found without an extra pass over the vectors and without one process
holding every id.

Each encode task (and, in an incremental run, each read of kept rows) writes the ids it
read with their global positions to one small Arrow IPC file in the run's folder, sorted into
`num_buckets` record batches by a hash of the id (`write_id_buckets`). Then one task per
bucket (`check_bucket`, through the executor, in parallel) reads that bucket's batch from
every file and finds the ids that occur more than once: its memory is the bucket's ids, about
ID_BUCKET_ROWS rows, whatever the corpus' size. The driver folds the buckets' counts and a
few examples (`find_duplicate_ids`).

With --duplicate-ids keep-first / keep-last a bucket's check also writes the positions it
drops (each duplicated id's rows but its first, or its last, by position) to a small file
of its own; `collect_dropped` joins them into the one sorted array pipeline.rowmap reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from vecpress.pipeline import storage
from vecpress.pipeline.context import load_array, save_array
from vecpress.pipeline.buckets import read_bucket_of_all, write_buckets
from vecpress.pipeline.errors import DuplicateIdError
from vecpress.pipeline.layout import SourcePlan

#: about this many ids per bucket: a bucket check holds them (int64 ids and positions: 16
#: bytes a row, so ~32 MiB here, and a sort of them)
ID_BUCKET_ROWS = 2_000_000
#: duplicated ids an error names
MAX_EXAMPLES = 3
#: positions of one duplicated id an example names
MAX_EXAMPLE_ROWS = 4

_SCHEMA_POSITION = pa.field("position", pa.int64())

#: what a run does with an id that occurs more than once (CompressOptions.duplicate_ids)
DUPLICATE_IDS = ("refuse", "keep-first", "keep-last")


def num_id_buckets(num_rows: int) -> int:
    return max(1, -(-int(num_rows) // ID_BUCKET_ROWS))


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: every input bit moves every output bit (uint64, wrapping)."""
    h = h.astype(np.uint64, copy=True)
    h ^= h >> np.uint64(30)
    h *= np.uint64(0xBF58476D1CE4E5B9)
    h ^= h >> np.uint64(27)
    h *= np.uint64(0x94D049BB133111EB)
    h ^= h >> np.uint64(31)
    return h


def hash_ids(ids: pa.Array) -> np.ndarray:
    """A 64-bit hash of each id (int64 or string; no nulls), vectorised: equal ids hash equal."""
    if pa.types.is_integer(ids.type):
        return _mix(ids.to_numpy(zero_copy_only=False).view(np.uint64))
    ids = ids.cast(pa.large_string()) if not pa.types.is_large_string(ids.type) else ids
    n = len(ids)
    offsets = np.frombuffer(ids.buffers()[1], np.int64)[ids.offset:ids.offset + n + 1]
    data = ids.buffers()[2]
    raw = np.frombuffer(data, np.uint8) if data is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    h = np.zeros(n, np.uint64)
    body = raw[offsets[0]:offsets[-1]].astype(np.uint64)
    if len(body):
        # sum of byte * P^(its place in the string), wrapping: a polynomial hash per string
        place = np.arange(len(body)) - np.repeat(offsets[:-1] - offsets[0], lengths)
        powers = np.cumprod(np.full(int(lengths.max()), 0x100000001B3, np.uint64))
        terms = (body + np.uint64(1)) * powers[place]
        nonempty = lengths > 0
        h[nonempty] = np.add.reduceat(terms, (offsets[:-1] - offsets[0])[nonempty])
    return _mix(h ^ lengths.astype(np.uint64))


def write_id_buckets(uri: str, ids: list[pa.Array], positions: list[np.ndarray], num_buckets: int,
                     id_type: pa.DataType) -> str:
    """The ids and global positions one task read, as one Arrow IPC file of `num_buckets`
    record batches (batch b: the ids whose hash is b modulo num_buckets)."""
    arr = pa.concat_arrays([a.cast(id_type) for a in ids]) if ids else pa.array([], id_type)
    pos = np.concatenate(positions).astype(np.int64) if positions else np.zeros(0, np.int64)
    schema = pa.schema([pa.field("id", id_type), _SCHEMA_POSITION])
    return write_buckets(uri, pa.record_batch([arr, pa.array(pos)], schema=schema),
                         (hash_ids(arr) % np.uint64(num_buckets)).astype(np.int64), num_buckets)


@dataclass
class Duplicates:
    """Ids that occur more than once: how many, the rows beyond each one's first, a few
    examples (id, its first positions), the earliest first."""

    num_ids: int = 0
    num_surplus_rows: int = 0
    examples: list[tuple[object, list[int]]] = field(default_factory=list)
    #: keep-first / keep-last: the buckets' files of the positions they drop
    surplus_files: list[str] = field(default_factory=list)

    def fold(self, other: "Duplicates") -> "Duplicates":
        self.num_ids += other.num_ids
        self.num_surplus_rows += other.num_surplus_rows
        self.examples = sorted(self.examples + other.examples, key=lambda e: e[1])[:MAX_EXAMPLES]
        self.surplus_files += other.surplus_files
        return self


def check_bucket(bucket: int, *, files: tuple[str, ...], keep: str = "refuse",
                 surplus_uri: str | None = None) -> Duplicates:
    """The duplicated ids of one bucket, read from every task's file. With `keep` keep-first
    or keep-last, the positions of the rows it drops go to a file in `surplus_uri` (only
    when there are some): a bucket's, so the result stays small whatever the duplicates."""
    table = read_bucket_of_all(files, bucket)
    if table is None:
        return Duplicates()
    ids = table.column("id").combine_chunks()
    pos = table.column("position").to_numpy()
    key = ids.to_numpy(zero_copy_only=False) if pa.types.is_integer(ids.type) else \
        pc.dictionary_encode(ids).indices.to_numpy(zero_copy_only=False)
    order = np.lexsort((pos, key))
    k = key[order]
    first = np.concatenate([[True], k[1:] != k[:-1]])
    group = np.cumsum(first) - 1
    sizes = np.bincount(group)
    dup_groups = np.nonzero(sizes > 1)[0]
    if not len(dup_groups):
        return Duplicates()
    starts = np.nonzero(first)[0]
    shown = dup_groups[np.argsort(pos[order[starts[dup_groups]]], kind="stable")[:MAX_EXAMPLES]]
    examples = [(ids[int(order[starts[g]])].as_py(),
                 pos[order[starts[g]:starts[g] + min(int(sizes[g]), MAX_EXAMPLE_ROWS)]].tolist()) for g in shown]
    found = Duplicates(int(len(dup_groups)), int(sizes[dup_groups].sum() - len(dup_groups)), examples)
    if keep != "refuse":
        # within a group rows are in position order: keep its first, or its last
        kept = first if keep == "keep-first" else np.concatenate([k[1:] != k[:-1], [True]])
        surplus = np.sort(pos[order[~kept]])
        found.surplus_files = [save_array(storage.join(surplus_uri, f"bucket-{bucket:06d}.npy"), surplus)]
    return found


def find_duplicate_ids(executor, files: list[str], num_buckets: int, *, keep: str = "refuse",
                       surplus_uri: str | None = None) -> Duplicates:
    """Every bucket checked, one task each, through `executor`; their results folded."""
    found = Duplicates()
    for _, d in executor.imap(check_bucket, range(num_buckets), desc="duplicate ids",
                              shared={"files": tuple(files), "keep": keep, "surplus_uri": surplus_uri}):
        found.fold(d)
    return found


def collect_dropped(found: Duplicates, uri: str) -> np.ndarray:
    """The buckets' dropped positions as one sorted int64 array, saved at `uri` (pipeline.rowmap
    reads it): 8 bytes per dropped row in the driver, none per kept row."""
    parts = [load_array(f) for f in sorted(found.surplus_files)]
    dropped = np.sort(np.concatenate(parts)).astype(np.int64) if parts else np.zeros(0, np.int64)
    save_array(uri, dropped)
    return dropped


def _where(plan: SourcePlan, position: int, num_kept_rows: int) -> str:
    """A global position as its file and row there (and whether the run keeps it)."""
    (shard, _, local), = plan.locate(np.array([position]))
    (piece, _, row), = shard.locate(local)
    kept = "kept row: " if position < num_kept_rows else ""
    return f"{position} ({kept}{piece.file_uri} row {piece.file_row_start + int(row[0])})"


def refuse_duplicates(found: Duplicates, plan: SourcePlan, *, num_kept_rows: int = 0,
                      previous_version: int | None = None) -> None:
    """DuplicateIdError naming the count and a few examples (their rows, files and rows
    there) when `found` holds any duplicated id."""
    if not found.num_ids:
        return
    examples = "; ".join(f"id {i!r} at rows " + ", ".join(_where(plan, p, num_kept_rows) for p in rows)
                         for i, rows in found.examples)
    against = f" and the rows kept from version {previous_version}" if num_kept_rows else ""
    raise DuplicateIdError(
        f"column {plan.id_column!r}: {found.num_ids} id(s) occur more than once in the {len(plan.files)} input "
        f"file(s){against} ({found.num_surplus_rows} surplus rows of {plan.num_rows}), e.g. {examples}; "
        "nothing committed: make the ids unique")
