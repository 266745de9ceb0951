"""Reading source Parquet: the one Arrow -> numpy conversion for vectors, and the readers of
a shard's rows (streamed in batches, or picked by row), each file checked against the plan's
fingerprint before it is read."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vecpress.pipeline import pages, storage
from vecpress.pipeline.errors import SourceChangedError, SourceError
from vecpress.pipeline.executor import report_progress
from vecpress.pipeline.layout import Piece, Shard

VALUE_TYPES = {pa.float32(): "float32", pa.float16(): "float16"}


def open_parquet(uri: str) -> pq.ParquetFile:
    loc = storage.resolve(uri)
    # pyarrow's default pre_buffer=True reads every selected row group's column chunks at once,
    # so a worker's memory grew with its shard (388 vs 116 MiB for 200k x 384-d)
    return pq.ParquetFile(loc.fs.open_input_file(loc.path), pre_buffer=False)


def read_fingerprint(f, uri: str) -> tuple[int, str, pq.FileMetaData]:
    """(size, fingerprint, metadata) of an open Parquet file: the fingerprint hashes its size
    and raw footer bytes, and the metadata is parsed from the same bytes (no second read)."""
    size = f.size()
    if size < 12:
        raise SourceError(f"{uri}: not a Parquet file ({size} bytes, truncated or empty)")
    f.seek(size - 8)
    tail = f.read(8)
    if tail[4:] != b"PAR1":
        raise SourceError(f"{uri}: not a Parquet file or truncated (no PAR1 footer magic)")
    footer_len = int.from_bytes(tail[:4], "little")
    if footer_len + 12 > size:
        raise SourceError(f"{uri}: truncated Parquet file (footer of {footer_len} bytes in a {size}-byte file)")
    f.seek(size - 8 - footer_len)
    footer = f.read(footer_len)
    f.seek(0)
    metadata = pq.read_metadata(pa.BufferReader(footer + tail))  # the reader needs only the tail
    return size, hashlib.sha256(size.to_bytes(8, "little") + footer).hexdigest(), metadata


def _open_checked(piece: Piece) -> tuple[pa.NativeFile, pq.FileMetaData]:
    """The piece's file, opened, and its metadata, once its size and footer are checked
    against the plan's fingerprint: a file rewritten after planning would otherwise give rows
    that disagree with the plan's (or with other shards' already encoded). SourceChangedError
    where they differ."""
    loc = storage.resolve(piece.file_uri)
    try:
        f = loc.fs.open_input_file(loc.path)
        size, fingerprint, metadata = read_fingerprint(f, piece.file_uri)
    except SourceError as exc:
        raise SourceChangedError(f"{exc} (changed since it was planned)") from None
    except (OSError, pa.ArrowException) as exc:
        raise SourceError(f"{piece.file_uri}: unreadable Parquet file: {exc}") from exc
    if fingerprint != piece.fingerprint:
        f.close()
        raise SourceChangedError(f"{piece.file_uri} changed since it was planned (now {size} bytes, another "
                                 f"footer): its row groups {piece.row_group_start}..{piece.row_group_stop - 1} "
                                 f"({piece.num_rows} rows) are not the ones planned; run again to plan anew")
    return f, metadata


def open_piece(piece: Piece) -> pq.ParquetFile:
    """The piece's file, opened for reading (as open_parquet) once checked (_open_checked)."""
    f, metadata = _open_checked(piece)
    return pq.ParquetFile(f, metadata=metadata, pre_buffer=False)


def vector_type(t: pa.DataType) -> tuple[str, str, int | None] | None:
    """(kind, value type, fixed dim or None) of a float vector column type, else None."""
    if pa.types.is_fixed_size_list(t) and t.value_type in VALUE_TYPES:
        return "fixed_size_list", VALUE_TYPES[t.value_type], t.list_size
    if (pa.types.is_list(t) or pa.types.is_large_list(t)) and t.value_type in VALUE_TYPES:
        return ("list" if pa.types.is_list(t) else "large_list"), VALUE_TYPES[t.value_type], None
    return None


def describe_type(t: pa.DataType) -> str:
    return str(t).replace("element: ", "").replace("item: ", "")


@dataclass(frozen=True)
class ValueBounds:
    """The min/max statistics a Parquet footer holds for a vector column's values, per row
    group of a run of row groups: the values decoded from a row group must lie within them.
    A page damaged into other, still readable values is caught here at no extra read (the
    footer is read anyway, the values are decoded anyway)."""

    #: the first row group's number in its file
    first_group: int
    #: the file row where each row group starts, then where the last one ends
    starts: np.ndarray
    #: each row group's min and max (float64; NaN where the footer has none)
    low: np.ndarray
    high: np.ndarray


def _statistic(value) -> float:
    """A footer statistic as a float: float32 columns give floats, float16 ones their 2 bytes."""
    if isinstance(value, (bytes, bytearray)) and len(value) == 2:
        return float(np.frombuffer(value, "<f2")[0])
    return float(value) if isinstance(value, (int, float)) else math.nan


def value_bounds(metadata: pq.FileMetaData, column: str, row_groups: range) -> ValueBounds | None:
    """The footer's statistics of `column`'s values (its one leaf, `<column>.list.element` or
    `.item`) for `row_groups`, or None where the footer has none."""
    leaves = [i for i in range(metadata.num_columns) if metadata.schema.column(i).path.startswith(column + ".")]
    if len(leaves) != 1 or not len(row_groups):
        return None
    starts = [sum(metadata.row_group(g).num_rows for g in range(row_groups.start))]
    low, high = [], []
    for g in row_groups:
        rg = metadata.row_group(g)
        stats = rg.column(leaves[0]).statistics
        has = stats is not None and stats.has_min_max
        low.append(_statistic(stats.min) if has else math.nan)
        high.append(_statistic(stats.max) if has else math.nan)
        starts.append(starts[-1] + rg.num_rows)
    if all(math.isnan(v) for v in low + high):
        return None
    return ValueBounds(row_groups.start, np.array(starts, np.int64), np.array(low), np.array(high))


def _extremes(x: np.ndarray, groups: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row group, min, max) of each run of rows of one row group (`groups`: each row's, or
    None: one run): contiguous reductions, cheaper than np.isfinite's mask."""
    cuts = [0, len(x)] if groups is None else [0, *(np.flatnonzero(np.diff(groups)) + 1), len(x)]
    runs = [(a, b) for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
    return (np.array([-1 if groups is None else groups[a] for a, _ in runs], np.int64),
            np.array([x[a:b].min() for a, b in runs]), np.array([x[a:b].max() for a, b in runs]))


def _check_value_bounds(x: np.ndarray, bounds: ValueBounds, g: np.ndarray, file_rows: np.ndarray, *, where: str,
                        column: str) -> None:
    """SourceError naming the first row whose values leave its row group's footer statistics
    (`g`: each row's row group in `bounds`, `file_rows`: its row in the file)."""
    low, high = bounds.low[g], bounds.high[g]
    row_min, row_max = x.min(axis=1), x.max(axis=1)
    with np.errstate(invalid="ignore"):  # (NaN: no statistics for that row group)
        below, above = row_min < low, row_max > high
    bad = below | above
    if not bad.any():
        return
    i = int(np.argmax(bad))
    value = row_min[i] if below[i] else row_max[i]
    same = g == g[i]
    raise SourceError(f"{where}: column {column!r}: row group {bounds.first_group + int(g[i])}: value {float(value):g} "
                      f"(row {int(file_rows[i])}) is outside the footer's statistics [min {low[i]:g}, max {high[i]:g}] "
                      f"({int(bad[same].sum())} of {int(same.sum())} rows read from it): the file is damaged")


def vectors_as_numpy(arr: pa.Array, dim: int, *, where: str, column: str, first_row: int = 0,
                     rows: np.ndarray | None = None, bounds: ValueBounds | None = None,
                     nonzero: bool = False) -> np.ndarray:
    """The one Arrow -> numpy conversion for vectors: exact, float32, shape (n, dim).

    `rows`, when given, holds the file row of each element (for arrays of sampled rows), else
    the rows are `first_row`, `first_row + 1`, ...
    Refuses (SourceError naming file, column, row count and first bad row) null vectors, null
    components, rows of another dimension, NaN/Inf and non-float types; values outside their
    row group's footer statistics (`bounds`: the file is damaged); with `nonzero` (cosine,
    which divides by the norm) all-zero vectors. Handles slices correctly
    (`FixedSizeListArray.values` ignores slice offsets; `flatten()` drops nulls).
    """
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    n = len(arr)

    def fail(mask: np.ndarray, reason: str):
        bad = np.nonzero(mask)[0]
        first = first_row + int(bad[0]) if rows is None else int(rows[bad[0]])  # rows: file row of each
        of = f"{n} rows" if rows is None else f"{n} sampled rows"
        raise SourceError(f"{where}: column {column!r}: {len(bad)} of {of} {reason} (first at row {first})")

    vt = vector_type(arr.type)
    if vt is None:
        raise SourceError(f"{where}: column {column!r} has type {describe_type(arr.type)} ({n} rows); "
                          "expected fixed_size_list or list of float32/float16")
    if arr.null_count:
        fail(arr.is_null().to_numpy(zero_copy_only=False), "are null vectors")
    kind = vt[0]
    if kind == "fixed_size_list":
        if arr.type.list_size != dim:
            raise SourceError(f"{where}: column {column!r} has dimension {arr.type.list_size}, expected {dim} "
                              f"({n} rows): dimensions differ")
        values = arr.values.slice(arr.offset * dim, n * dim)
    else:
        lengths = np.diff(arr.offsets.to_numpy())
        if (lengths != dim).any():
            bad = lengths != dim
            first = int(np.nonzero(bad)[0][0])
            fail(bad, f"have a dimension other than {dim} (first has {int(lengths[first])})")
        values = arr.flatten()
    if values.null_count:
        row_has_null = values.is_null().to_numpy(zero_copy_only=False).reshape(n, dim).any(axis=1)
        fail(row_has_null, "contain null components")
    x = values.to_numpy(zero_copy_only=False).reshape(n, dim)
    if x.dtype != np.float32:
        x = x.astype(np.float32)
    # the extremes of each row group's rows: NaN and Inf show in them (NaN propagates), and the
    # footer's statistics bound them
    file_rows = groups = None
    if bounds is not None:
        file_rows = first_row + np.arange(n) if rows is None else np.asarray(rows)
        groups = np.clip(np.searchsorted(bounds.starts, file_rows, side="right") - 1, 0, len(bounds.low) - 1)
    run_group, run_min, run_max = _extremes(x, groups)
    if not (np.isfinite(run_min).all() and np.isfinite(run_max).all()):
        fail(~np.isfinite(x).all(axis=1), "contain NaN or Inf")
    if bounds is not None:
        with np.errstate(invalid="ignore"):  # (NaN: no statistics for that row group)
            outside = (run_min < bounds.low[run_group]) | (run_max > bounds.high[run_group])
        if outside.any():
            _check_value_bounds(x, bounds, groups, file_rows, where=where, column=column)
    if nonzero:
        zero = ~x.any(axis=1)
        if zero.any():
            fail(zero, "are all-zero vectors, which cosine cannot normalise (drop them, or use --metric l2 or ip)")
    return x


def iter_shard_batches(shard: Shard, columns: list[str], batch_size: int):
    """Stream a shard's rows, piece after piece, as RecordBatches of at most `batch_size` rows
    (a batch never spans two files).

    Yields (piece, its first row within the shard, first row index within the file, batch,
    the footer's statistics of the first column's values in the piece (value_bounds) or None).
    Read errors name the file and row groups."""
    for piece, start in zip(shard.pieces, shard.piece_starts):
        pf = open_piece(piece)
        row_groups = range(piece.row_group_start, piece.row_group_stop)
        bounds = value_bounds(pf.metadata, columns[0], row_groups)
        try:
            row = piece.file_row_start
            for batch in pf.iter_batches(batch_size=batch_size, columns=columns, row_groups=row_groups,
                                         use_threads=False):
                yield piece, int(start) + row - piece.file_row_start, row, batch, bounds
                row += batch.num_rows
        except (OSError, pa.ArrowException) as exc:
            raise SourceError(f"{piece.file_uri}: cannot read row groups {piece.row_group_start}.."
                              f"{piece.row_group_stop - 1} ({piece.num_rows} rows): {exc}") from exc
        if row - piece.file_row_start != piece.num_rows:
            raise SourceChangedError(f"{piece.describe()}: read {row - piece.file_row_start} rows (file changed?)")


#: rows decoded at a time when reading a few rows of a row group (re-ranking candidates)
TAKE_BATCH_ROWS = 1024


def _rows_of_row_group(pf, rg: int, column: str, rows: np.ndarray) -> pa.Table:
    """The sorted rows `rows` of row group `rg`: decoded batch by batch up to the last of them
    only, keeping just those rows (a candidate early in a group costs a fraction of it; measured
    2-9x less decoding than the whole group for one to a few candidates)."""
    chunks, start = [], 0
    for batch in pf.iter_batches(batch_size=TAKE_BATCH_ROWS, row_groups=[rg], columns=[column], use_threads=False):
        end = start + batch.num_rows
        wanted = rows[(rows >= start) & (rows < end)] - start
        if wanted.size:
            chunks.append(batch.take(pa.array(wanted)))
        start = end
        if start > rows[-1]:
            break
    if start <= rows[-1]:
        raise SourceError(f"{pf.metadata.num_rows} rows in the file, row group {rg} ends before row {int(rows[-1])}")
    return pa.Table.from_batches(chunks)


#: read candidates' rows from their pages where pages.py handles the column (False: by Arrow
#: only; benchmarks/query_latency.py compares the two)
USE_PAGES = True


def _vector_leaf(metadata, column: str) -> int | None:
    """The vector column's one leaf for the page reader, or None where it does not apply."""
    if not USE_PAGES:
        return None
    try:
        return pages.leaf_index(metadata, column)
    except pages.Unsupported:
        return None


def _rows_by_pages(f, metadata, piece: Piece, rg: int, leaf: int | None, rows: np.ndarray, dim: int) -> pa.Array | None:
    """Rows `rows` of row group `rg` read from their pages alone (pages.py), or None where the
    page reader does not handle the column chunk (`leaf` None: the column)."""
    if leaf is None:
        return None
    try:
        chunk = pages.chunk_pages(f, metadata, rg, leaf, (piece.file_uri, piece.fingerprint))
        x = pages.read_rows(f, chunk, rows, dim)
    except pages.Unsupported:
        return None
    return pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), dim)


def read_vectors(shard: Shard, local_rows: np.ndarray, column: str, dim: int, *, nonzero: bool = False) -> np.ndarray:
    """The vectors at sorted shard-local rows, reading only the pages that hold them where the
    page reader handles the column (pages.py), else only the row groups that hold them, each
    decoded only up to its last wanted row; validated as every read is (vectors_as_numpy,
    against the footer's statistics too)."""
    parts, done = [], 0
    for piece, _, rows in shard.locate(local_rows):
        f, metadata = _open_checked(piece)
        pf, leaf = None, _vector_leaf(metadata, column)
        row_groups = range(piece.row_group_start, piece.row_group_stop)
        starts = np.cumsum([0] + [metadata.row_group(i).num_rows for i in row_groups])
        bounds = value_bounds(metadata, column, row_groups)
        for j, rg in enumerate(row_groups):
            sel = rows[(rows >= starts[j]) & (rows < starts[j + 1])]
            if not sel.size:
                continue
            try:
                arr = _rows_by_pages(f, metadata, piece, rg, leaf, sel - starts[j], dim)
                if arr is None:
                    pf = pf or pq.ParquetFile(f, metadata=metadata, pre_buffer=False)
                    arr = _rows_of_row_group(pf, rg, column, sel - starts[j]).column(0)
            except (OSError, pa.ArrowException) as exc:
                raise SourceError(f"{piece.file_uri}: cannot read row group {rg} ({len(sel)} rows wanted): "
                                  f"{exc}") from exc
            parts.append(vectors_as_numpy(arr, dim, where=piece.file_uri, column=column,
                                          rows=piece.file_row_start + sel, bounds=bounds, nonzero=nonzero))
            done += len(sel)
            report_progress(done, len(local_rows))
    return np.concatenate(parts) if parts else np.zeros((0, dim), np.float32)
