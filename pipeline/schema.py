"""Column names, output schema and the metadata key that carries a version's manifest."""

from __future__ import annotations

import pyarrow as pa

CODE_COLUMN = "code"
MANIFEST_METADATA_KEY = b"vecpress.manifest"
RUN_ID_PROPERTY = "vecpress.run_id"
SIDECAR_DIR = "_vecpress"
EVAL_TABLE_SUFFIX = "_eval"


def codes_schema(id_field: pa.Field, code_size: int, keep_fields: list[pa.Field],
                 metadata: dict[bytes, bytes] | None = None) -> pa.Schema:
    """Output table: the source id column (same name and type), the codes as
    fixed_size_binary(code_size), then the passthrough columns."""
    fields = [pa.field(id_field.name, id_field.type, nullable=False),
              pa.field(CODE_COLUMN, pa.binary(code_size), nullable=False)]
    fields += keep_fields
    return pa.schema(fields, metadata=metadata)


def same_columns(a: pa.Schema, b: pa.Schema) -> bool:
    """Schemas equal in names and types (nullability and metadata ignored)."""
    return [(f.name, f.type) for f in a] == [(f.name, f.type) for f in b]
