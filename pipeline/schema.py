"""Column names, output schema and the metadata key that carries a version's manifest."""

from __future__ import annotations

import pyarrow as pa

CODE_COLUMN = "code"
#: optional warm column: a second, higher-precision code of each vector, for exact-ish re-ranking
RERANK_COLUMN = "rerank_code"
MANIFEST_METADATA_KEY = b"vecpress.manifest"
RUN_ID_PROPERTY = "vecpress.run_id"
SIDECAR_DIR = "_vecpress"
EVAL_TABLE_SUFFIX = "_eval"


def code_type(code_size: int, *, binary: bool = False) -> pa.DataType:
    """Codes are opaque fixed_size_binary, except bit-packed binary codes, which are
    fixed_size_list<uint8> so that LanceDB can search them with the hamming distance."""
    return pa.list_(pa.uint8(), code_size) if binary else pa.binary(code_size)


def codes_schema(id_field: pa.Field, code_size: int, keep_fields: list[pa.Field],
                 metadata: dict[bytes, bytes] | None = None, *, binary: bool = False,
                 rerank_size: int | None = None) -> pa.Schema:
    """Output table: the source id column (same name and type), the codes, the optional warm
    re-rank codes, then the passthrough columns."""
    fields = [pa.field(id_field.name, id_field.type, nullable=False),
              pa.field(CODE_COLUMN, code_type(code_size, binary=binary), nullable=False)]
    if rerank_size:
        fields.append(pa.field(RERANK_COLUMN, code_type(rerank_size), nullable=False))
    fields += keep_fields
    return pa.schema(fields, metadata=metadata)


def same_columns(a: pa.Schema, b: pa.Schema) -> bool:
    """Schemas equal in names and types (nullability and metadata ignored)."""
    return [(f.name, f.type) for f in a] == [(f.name, f.type) for f in b]
