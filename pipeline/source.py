"""Source Parquet: listing, per-file schema validation and the shard plan (reading the planned
rows is `vecpress.pipeline.parquet`'s).

Every file's schema is read from its own footer before any work starts; pyarrow datasets are
never used to read sources, because they take the first file's schema and silently cast the
rest. A vector column is `fixed_size_list<float32|float16>` or `list<float32|float16>` of one
dimension (fixed and variable lists, float32 and float16 may mix across files); the id column
is int64 or string; passthrough columns must have one type everywhere (nested fields'
nullability and names aside).
"""

from __future__ import annotations

import base64
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from vecpress.pipeline import storage
from vecpress.pipeline.errors import SourceError
from vecpress.pipeline.listing import list_inputs
from vecpress.pipeline.layout import SourceFile, SourcePlan, pack_shards
from vecpress.pipeline.parquet import describe_type, open_parquet, read_fingerprint, vector_type
from vecpress.pipeline.schema import CODE_COLUMN, RERANK_COLUMN
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
    #: read what symbolic links inside the input folders point to (each real file once)
    #: instead of refusing them
    follow_links: bool = False


# ---- listing ------------------------------------------------------------------------------

def list_parquet_files(uris, *, follow_links: bool = False) -> list[str]:
    """All Parquet files under the given files/directories, sorted, hidden files skipped, each
    real file once; links inside a folder refused unless `follow_links` (pipeline.listing)."""
    return list(list_inputs(uris, follow_links=follow_links).files)


def _read_footer(uri: str) -> tuple[int, str, pq.FileMetaData, pa.Schema]:
    """(size, fingerprint, metadata, arrow schema) from the footer only."""
    loc = storage.resolve(uri)
    try:
        f = loc.fs.open_input_file(loc.path)
        size, fingerprint, metadata = read_fingerprint(f, uri)
        pf = pq.ParquetFile(f, metadata=metadata)
        return size, fingerprint, pf.metadata, pf.schema_arrow
    except SourceError:
        raise
    except (OSError, pa.ArrowException) as exc:
        raise SourceError(f"{uri}: unreadable Parquet file: {exc}") from exc


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
        dims = {vector_type(ref)[2], vector_type(t)[2]} - {None}
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


def _pick_vector_column(uri: str, schema: pa.Schema, num_rows: int) -> str:
    candidates = [f.name for f in schema if vector_type(f.type) is not None]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        lists = [f"column {f.name!r} has type {describe_type(f.type)}" for f in schema
                 if pa.types.is_fixed_size_list(f.type) or pa.types.is_list(f.type) or pa.types.is_large_list(f.type)]
        raise SourceError(f"{uri}: no float vector column ({num_rows} rows): "
                          + ("; ".join(lists) + "; expected fixed_size_list or list of float32/float16 (cast other "
                             "types yourself, or choose another column with --vector-column)" if lists else
                             f"expected fixed_size_list or list of float32/float16; columns are {schema.names}"))
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
    cut the sorted files' row groups into shards of about `shard_rows` rows (layout.pack_shards:
    whole row groups, small files sharing shards)."""
    listing = list_inputs(spec.uris, follow_links=spec.follow_links)
    mtimes = listing.files
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

    vector_column = spec.vector_column or _pick_vector_column(uris[0], footers[uris[0]][3], footers[uris[0]][2].num_rows)
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
            if role == "vector" and vector_type(t) is None:
                problems.append(f"{uri}: vector column {col!r} has type {describe_type(t)} ({num_rows} rows); expected "
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
                problems.append(f"{uri}: column {col!r} is {describe_type(t)} ({num_rows} rows) but {ref_uri} has "
                                f"{describe_type(ref_t)}: {what} across files")
    if problems:
        raise SourceError(_summarize(f"input schema problems in {len({p.split(': ')[0] for p in problems})} file(s)", problems))

    vtype = ref_types[vector_column][0]
    kind, value_type, dim = vector_type(vtype)
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

    files = []
    for uri in uris:
        size, fp, md, _ = footers[uri]
        rg_rows = tuple(md.row_group(i).num_rows for i in range(md.num_row_groups))
        files.append(SourceFile(uri=uri, size=size, fingerprint=fp, num_rows=md.num_rows, row_group_rows=rg_rows,
                                mtime_ns=mtimes[uri]))
    shards = pack_shards(((f, 0, len(f.row_group_rows)) for f in files), shard_rows)

    out_fields = pa.schema([_output_field([footers[u][3] for u in uris], col) for col in (spec.id_column, *spec.keep)])
    return SourcePlan(
        vector_column=vector_column, id_column=spec.id_column, keep=tuple(spec.keep), dim=int(dim),
        vector_type=f"{kind}<{value_type}>[{dim}]", value_type=value_type, num_rows=int(total),
        files=tuple(files), shards=tuple(shards),
        fields_b64=base64.b64encode(out_fields.serialize().to_pybytes()).decode(), shard_rows=shard_rows,
        links=tuple(listing.links), aliases=tuple(listing.aliases),
    )


def _summarize(head: str, problems: list[str]) -> str:
    lines = problems[:MAX_LISTED_PROBLEMS]
    more = len(problems) - len(lines)
    tail = [f"... and {more} more"] if more > 0 else []
    return "\n  ".join([head + ":", *lines, *tail])


