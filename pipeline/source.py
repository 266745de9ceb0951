"""Source Parquet: listing, per-file schema validation, the shard plan, and the one function
that turns Arrow vectors into numpy.

Every file's schema is read from its own footer before any work starts; pyarrow datasets are
never used to read sources, because they take the first file's schema and silently cast the
rest. A vector column is `fixed_size_list<float32|float16>` or `list<float32|float16>` of one
dimension (fixed and variable lists, float32 and float16 may mix across files); the id column
is int64 or string; passthrough columns must have one type everywhere (nested fields'
nullability and names aside).
"""

from __future__ import annotations

import base64
import hashlib
import posixpath
from dataclasses import asdict, dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vecpress.pipeline import storage
from vecpress.pipeline.errors import SourceChangedError, SourceError
from vecpress.pipeline.schema import CODE_COLUMN, RERANK_COLUMN

VALUE_TYPES = {pa.float32(): "float32", pa.float16(): "float16"}
ID_TYPES = (pa.int64(), pa.string(), pa.large_string())
MAX_LISTED_PROBLEMS = 10


@dataclass(frozen=True)
class SourceSpec:
    """Which files and columns to compress."""

    uris: tuple[str, ...]
    #: vector column; None picks the only float-list column (an error if there are several)
    vector_column: str | None = None
    #: id column, int64 or string, copied to the output
    id_column: str = "id"
    #: passthrough columns copied unchanged to the output (e.g. text, url)
    keep: tuple[str, ...] = ()


@dataclass(frozen=True)
class SourceFile:
    uri: str
    size: int
    #: sha256 of the file size and its Parquet footer: changes when the file is rewritten with
    #: other data, except where a rewrite keeps every page's size and statistics (uncompressed
    #: pages, values changed within their min/max): mtime_ns covers that
    fingerprint: str
    num_rows: int
    row_group_rows: tuple[int, ...]
    #: the file's modification time (ns) as its filesystem or object store reports it, or None
    #: (unknown, or a layout written before vecpress recorded it)
    mtime_ns: int | None = None

    def changed_since(self, old: "SourceFile") -> bool:
        """Whether this file differs from `old` (the same URI in an earlier layout)."""
        if self.fingerprint != old.fingerprint:
            return True
        return self.mtime_ns is not None and old.mtime_ns is not None and self.mtime_ns != old.mtime_ns


@dataclass(frozen=True)
class Shard:
    """A run of row groups of one file: the unit of parallel work."""

    index: int
    file_uri: str
    fingerprint: str
    row_group_start: int
    row_group_stop: int
    num_rows: int
    #: global position of the shard's first row (rows are numbered across the sorted files)
    row_offset: int
    #: row index, inside its file, of the shard's first row
    file_row_start: int


@dataclass
class SourcePlan:
    """The deterministic plan of a run: sorted files with sizes and fingerprints, and shards."""

    vector_column: str
    id_column: str
    keep: list[str]
    dim: int
    vector_type: str  # e.g. "fixed_size_list<float32>[384]"
    value_type: str  # float32 | float16
    num_rows: int
    files: list[SourceFile]
    shards: list[Shard]
    #: id + passthrough fields as a serialized Arrow schema (base64)
    fields_b64: str = field(repr=False, default="")

    @property
    def source_bytes_per_vector(self) -> int:
        return self.dim * (4 if self.value_type == "float32" else 2)

    @property
    def output_fields(self) -> pa.Schema:
        return pa.ipc.read_schema(pa.py_buffer(base64.b64decode(self.fields_b64)))

    def to_dict(self) -> dict:
        d = asdict(self)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SourcePlan":
        d = dict(d)
        d["files"] = [SourceFile(**{**f, "row_group_rows": tuple(f["row_group_rows"])}) for f in d["files"]]
        d["shards"] = [Shard(**s) for s in d["shards"]]
        return cls(**d)

    def locate(self, positions: np.ndarray) -> list[tuple[Shard, np.ndarray, np.ndarray]]:
        """Group global row positions by shard: [(shard, indexes into positions, local rows)]."""
        offsets = np.array([s.row_offset for s in self.shards], np.int64)
        which = np.searchsorted(offsets, positions, side="right") - 1
        out = []
        for si in np.unique(which):
            sel = np.nonzero(which == si)[0]
            shard = self.shards[int(si)]
            out.append((shard, sel, positions[sel] - shard.row_offset))
        return out


# ---- listing ------------------------------------------------------------------------------

def list_parquet_files(uris) -> list[str]:
    """All Parquet files under the given files/directories, sorted, hidden files skipped."""
    return list(_parquet_files(uris))


def _parquet_files(uris) -> dict[str, int | None]:
    """list_parquet_files's files (sorted) -> their modification times (ns), from the listing."""
    found: dict[str, int | None] = {}
    for uri in uris:
        loc = storage.resolve(uri)
        try:
            info = loc.fs.get_file_info(loc.path)
        except OSError as exc:
            raise SourceError(f"{uri}: cannot access input: {exc}") from exc
        if info.type == pafs.FileType.NotFound:
            raise SourceError(f"{uri}: input does not exist")
        if info.type == pafs.FileType.File:
            found[loc.uri_for(loc.path)] = info.mtime_ns
            continue
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
        for fi in infos:
            rel = posixpath.relpath(fi.path, loc.path)
            if fi.type != pafs.FileType.File or any(p.startswith((".", "_")) for p in rel.split("/")):
                continue
            if fi.path.endswith((".parquet", ".parq", ".pq")):
                found[loc.uri_for(fi.path)] = fi.mtime_ns
    if not found:
        raise SourceError(f"no Parquet files found in {', '.join(map(str, uris))}")
    return dict(sorted(found.items()))


def open_parquet(uri: str) -> pq.ParquetFile:
    loc = storage.resolve(uri)
    # pyarrow's default pre_buffer=True reads every selected row group's column chunks at once,
    # so a worker's memory grew with its shard (388 vs 116 MiB for 200k x 384-d)
    return pq.ParquetFile(loc.fs.open_input_file(loc.path), pre_buffer=False)


def _fingerprint(f, uri: str) -> tuple[int, str, pq.FileMetaData]:
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


def _read_footer(uri: str) -> tuple[int, str, pq.FileMetaData, pa.Schema]:
    """(size, fingerprint, metadata, arrow schema) from the footer only."""
    loc = storage.resolve(uri)
    try:
        f = loc.fs.open_input_file(loc.path)
        size, fingerprint, metadata = _fingerprint(f, uri)
        pf = pq.ParquetFile(f, metadata=metadata)
        return size, fingerprint, pf.metadata, pf.schema_arrow
    except SourceError:
        raise
    except (OSError, pa.ArrowException) as exc:
        raise SourceError(f"{uri}: unreadable Parquet file: {exc}") from exc


def open_shard(shard: Shard) -> pq.ParquetFile:
    """The shard's file, opened for reading (as open_parquet), once its size and footer are
    checked against the plan's fingerprint: a file rewritten after planning would otherwise
    give rows that disagree with the plan's (or with other shards' already encoded).
    SourceChangedError where they differ."""
    loc = storage.resolve(shard.file_uri)
    try:
        f = loc.fs.open_input_file(loc.path)
        size, fingerprint, metadata = _fingerprint(f, shard.file_uri)
    except SourceError as exc:
        raise SourceChangedError(f"{exc} (changed since it was planned)") from None
    except (OSError, pa.ArrowException) as exc:
        raise SourceError(f"{shard.file_uri}: unreadable Parquet file: {exc}") from exc
    if fingerprint != shard.fingerprint:
        f.close()
        raise SourceChangedError(f"{shard.file_uri} changed since it was planned (now {size} bytes, another "
                                 f"footer): its row groups {shard.row_group_start}..{shard.row_group_stop - 1} "
                                 f"({shard.num_rows} rows) are not the ones planned; run again to plan anew")
    return pq.ParquetFile(f, metadata=metadata, pre_buffer=False)


def _vector_type(t: pa.DataType) -> tuple[str, str, int | None] | None:
    """(kind, value type, fixed dim or None) of a float vector column type, else None."""
    if pa.types.is_fixed_size_list(t) and t.value_type in VALUE_TYPES:
        return "fixed_size_list", VALUE_TYPES[t.value_type], t.list_size
    if (pa.types.is_list(t) or pa.types.is_large_list(t)) and t.value_type in VALUE_TYPES:
        return ("list" if pa.types.is_list(t) else "large_list"), VALUE_TYPES[t.value_type], None
    return None


def _loose(t: pa.DataType) -> pa.DataType:
    """`t` with every nested field nullable and list items named "item": Parquet writers
    differ there (Spark's containsNull=false, "element" against "item") for the same data."""
    if pa.types.is_fixed_size_list(t):
        return pa.list_(_loose(t.value_type), t.list_size)
    if pa.types.is_large_list(t):
        return pa.large_list(_loose(t.value_type))
    if pa.types.is_list(t):
        return pa.list_(_loose(t.value_type))
    if pa.types.is_map(t):
        return pa.map_(_loose(t.key_type), _loose(t.item_type))
    if pa.types.is_struct(t):
        return pa.struct([pa.field(f.name, _loose(f.type)) for f in t])
    return t


def _type_difference(ref: pa.DataType, t: pa.DataType, *, vector: bool) -> str | None:
    """How column type `t` differs from `ref` (another file's) in a way the run cannot take,
    or None. Vectors only need one dimension (each batch is converted to float32 on its
    own); other columns one type, nested fields' nullability and names aside."""
    if vector:
        dims = {_vector_type(ref)[2], _vector_type(t)[2]} - {None}
        return "dimensions differ" if len(dims) > 1 else None
    return None if _loose(ref) == _loose(t) else "types differ"


def _output_field(schemas: list[pa.Schema], col: str) -> pa.Field:
    """The output's field for an id or passthrough column: the first file's, nullable when any
    file's is, and with loose nested fields (_loose) when the files' nested fields differ."""
    fields = [s.field(col) for s in schemas]
    first = fields[0]
    loose = any(f.type != first.type for f in fields)
    return pa.field(col, _loose(first.type) if loose else first.type, nullable=any(f.nullable for f in fields),
                    metadata=first.metadata)


def _describe(t: pa.DataType) -> str:
    return str(t).replace("element: ", "").replace("item: ", "")


def _pick_vector_column(uri: str, schema: pa.Schema) -> str:
    candidates = [f.name for f in schema if _vector_type(f.type) is not None]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise SourceError(f"{uri}: no float vector column (fixed_size_list/list of float32 or float16); "
                          f"columns are {schema.names}")
    raise SourceError(f"{uri}: several vector columns {candidates}: choose one with --vector-column")


def _first_list_length(uri: str, column: str) -> int | None:
    pf = open_parquet(uri)
    for batch in pf.iter_batches(batch_size=1024, columns=[column]):
        arr = batch.column(0)
        for i in range(len(arr)):
            if arr[i].is_valid:
                return len(arr[i])
    return None


def plan_sources(spec: SourceSpec, *, shard_rows: int = 500_000) -> SourcePlan:
    """Read every file's footer, validate the schemas against each other and the spec, and
    cut the files into shards of about `shard_rows` rows (whole row groups)."""
    mtimes = _parquet_files(spec.uris)
    uris = list(mtimes)
    footers = {}
    unreadable = []
    for uri in uris:
        try:
            footers[uri] = _read_footer(uri)
        except SourceError as exc:
            unreadable.append(str(exc))
    if unreadable:
        raise SourceError(_summarize(f"{len(unreadable)} of {len(uris)} input files are unreadable", unreadable))

    vector_column = spec.vector_column or _pick_vector_column(uris[0], footers[uris[0]][3])
    if spec.id_column == vector_column or spec.id_column in spec.keep or vector_column in spec.keep \
            or len(set(spec.keep)) < len(spec.keep):
        raise SourceError(f"columns must be distinct: id={spec.id_column!r}, vector={vector_column!r}, keep={list(spec.keep)}")
    for reserved, what in ((CODE_COLUMN, "the codes"), (RERANK_COLUMN, "the warm re-rank codes")):
        if reserved in (spec.id_column, *spec.keep):
            raise SourceError(f"column name {reserved!r} is reserved for {what} in the output")

    problems: list[str] = []
    ref_types: dict[str, tuple[pa.DataType, str]] = {}
    for uri in uris:
        schema = footers[uri][3]
        num_rows = footers[uri][2].num_rows
        for col, role in [(vector_column, "vector"), (spec.id_column, "id"), *((k, "passthrough") for k in spec.keep)]:
            idx = schema.get_field_index(col)
            if idx < 0:
                problems.append(f"{uri}: missing {role} column {col!r} ({num_rows} rows; columns are {schema.names})")
                continue
            t = schema.field(idx).type
            if role == "vector" and _vector_type(t) is None:
                problems.append(f"{uri}: vector column {col!r} has type {_describe(t)} ({num_rows} rows); expected "
                                "fixed_size_list or list of float32/float16 (cast other types yourself)")
                continue
            if role == "id" and t not in ID_TYPES:
                problems.append(f"{uri}: id column {col!r} has type {t} ({num_rows} rows); expected int64 or string")
                continue
            if col not in ref_types:
                ref_types[col] = (t, uri)
                continue
            what = _type_difference(ref_types[col][0], t, vector=role == "vector")
            if what:
                ref_t, ref_uri = ref_types[col]
                problems.append(f"{uri}: column {col!r} is {_describe(t)} ({num_rows} rows) but {ref_uri} has "
                                f"{_describe(ref_t)}: {what} across files")
    if problems:
        raise SourceError(_summarize(f"input schema problems in {len({p.split(': ')[0] for p in problems})} file(s)", problems))

    vtype = ref_types[vector_column][0]
    kind, value_type, dim = _vector_type(vtype)
    if dim is None:
        for uri in uris:
            dim = _first_list_length(uri, vector_column)
            if dim is not None:
                break
    total = sum(footers[u][2].num_rows for u in uris)
    if total == 0 or dim is None:
        raise SourceError(f"no rows with vectors in {len(uris)} input file(s)")
    if dim == 0:
        raise SourceError(f"{uris[0]}: column {vector_column!r} holds empty vectors (dimension 0)")

    files, shards = [], []
    offset = 0
    for uri in uris:
        size, fp, md, _ = footers[uri]
        rg_rows = tuple(md.row_group(i).num_rows for i in range(md.num_row_groups))
        files.append(SourceFile(uri=uri, size=size, fingerprint=fp, num_rows=md.num_rows, row_group_rows=rg_rows,
                                mtime_ns=mtimes[uri]))
        start, file_row = 0, 0
        while start < len(rg_rows):
            stop, rows = start, 0
            while stop < len(rg_rows) and (rows == 0 or rows + rg_rows[stop] <= shard_rows):
                rows += rg_rows[stop]
                stop += 1
            if rows:
                shards.append(Shard(index=len(shards), file_uri=uri, fingerprint=fp, row_group_start=start,
                                    row_group_stop=stop, num_rows=rows, row_offset=offset, file_row_start=file_row))
            offset += rows
            file_row += rows
            start = stop

    out_fields = pa.schema([_output_field([footers[u][3] for u in uris], col) for col in (spec.id_column, *spec.keep)])
    return SourcePlan(
        vector_column=vector_column, id_column=spec.id_column, keep=list(spec.keep), dim=int(dim),
        vector_type=f"{kind}<{value_type}>[{dim}]", value_type=value_type, num_rows=int(total),
        files=files, shards=shards, fields_b64=base64.b64encode(out_fields.serialize().to_pybytes()).decode(),
    )


def _summarize(head: str, problems: list[str]) -> str:
    lines = problems[:MAX_LISTED_PROBLEMS]
    more = len(problems) - len(lines)
    tail = [f"... and {more} more"] if more > 0 else []
    return "\n  ".join([head + ":", *lines, *tail])


# ---- reading --------------------------------------------------------------------------------

def vectors_as_numpy(arr: pa.Array, dim: int, *, where: str, column: str, first_row: int = 0,
                     rows: np.ndarray | None = None) -> np.ndarray:
    """The one Arrow -> numpy conversion for vectors: exact, float32, shape (n, dim).

    `rows`, when given, holds the file row of each element (for arrays of sampled rows), else
    the rows are `first_row`, `first_row + 1`, ...
    Refuses (SourceError naming file, column, row count and first bad row) null vectors, null
    components, rows of another dimension, NaN/Inf and non-float types. Handles slices
    correctly (`FixedSizeListArray.values` ignores slice offsets; `flatten()` drops nulls).
    """
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    n = len(arr)

    def fail(mask: np.ndarray, reason: str):
        bad = np.nonzero(mask)[0]
        first = first_row + int(bad[0]) if rows is None else int(rows[bad[0]])  # rows: file row of each
        of = f"{n} rows" if rows is None else f"{n} sampled rows"
        raise SourceError(f"{where}: column {column!r}: {len(bad)} of {of} {reason} (first at row {first})")

    vt = _vector_type(arr.type)
    if vt is None:
        raise SourceError(f"{where}: column {column!r} has type {_describe(arr.type)} ({n} rows); "
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
    finite = np.isfinite(x)
    if not finite.all():
        fail(~finite.all(axis=1), "contain NaN or Inf")
    return x


def iter_shard_batches(shard: Shard, columns: list[str], batch_size: int):
    """Stream a shard's rows as RecordBatches of at most `batch_size` rows.

    Yields (first row index within the file, batch). Read errors name the file and row groups.
    """
    pf = open_shard(shard)
    try:
        row = shard.file_row_start
        for batch in pf.iter_batches(batch_size=batch_size, columns=columns,
                                     row_groups=range(shard.row_group_start, shard.row_group_stop),
                                     use_threads=False):
            yield row, batch
            row += batch.num_rows
    except (OSError, pa.ArrowException) as exc:
        raise SourceError(f"{shard.file_uri}: cannot read row groups {shard.row_group_start}.."
                          f"{shard.row_group_stop - 1} ({shard.num_rows} rows): {exc}") from exc


def read_rows(shard: Shard, local_rows: np.ndarray, columns: list[str]) -> pa.Table:
    """Rows at sorted shard-local indexes, reading only the row groups that hold them."""
    pf = open_shard(shard)
    bounds = np.cumsum([0] + [pf.metadata.row_group(i).num_rows
                              for i in range(shard.row_group_start, shard.row_group_stop)])
    pieces = []
    try:
        for j, rg in enumerate(range(shard.row_group_start, shard.row_group_stop)):
            lo, hi = bounds[j], bounds[j + 1]
            sel = local_rows[(local_rows >= lo) & (local_rows < hi)]
            if sel.size:
                t = pf.read_row_group(rg, columns=columns, use_threads=False)
                pieces.append(t.take(pa.array(sel - lo)))
    except (OSError, pa.ArrowException) as exc:
        raise SourceError(f"{shard.file_uri}: cannot read row groups {shard.row_group_start}.."
                          f"{shard.row_group_stop - 1}: {exc}") from exc
    return pa.concat_tables(pieces) if pieces else None
