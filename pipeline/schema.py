"""Column names, output schema and the metadata key that carries a version's manifest."""

from __future__ import annotations

import numpy as np
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


def codes_array(codes: np.ndarray, *, binary: bool = False) -> pa.Array:
    """(n, code_size) uint8 -> the output's code column type (see schema.code_type)."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    n, size = codes.shape
    if binary:
        return pa.FixedSizeListArray.from_arrays(pa.array(codes.ravel(), pa.uint8()), size)
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(size), n, [None, pa.py_buffer(codes)])


def codes_as_numpy(arr) -> np.ndarray:
    """A code column (fixed_size_binary or fixed_size_list<uint8>) -> (n, code_size) uint8,
    honouring slice offsets."""
    if isinstance(arr, pa.ChunkedArray):
        arr = arr.combine_chunks()
    if pa.types.is_fixed_size_list(arr.type):
        size = arr.type.list_size
        return arr.values.slice(arr.offset * size, len(arr) * size).to_numpy().reshape(len(arr), size)
    size = arr.type.byte_width
    buf = arr.buffers()[1]
    return np.frombuffer(buf, np.uint8, count=len(arr) * size, offset=arr.offset * size).reshape(len(arr), size)


#: --serve lancedb: the stored vectors' Arrow value type (CompressOptions.vector_dtype)
VECTOR_TYPES = {"float16": pa.float16(), "float32": pa.float32()}


def served_schema(id_field: pa.Field, vector_column: str, dim: int, dtype: str, keep_fields: list[pa.Field],
                  metadata: dict[bytes, bytes] | None = None) -> pa.Schema:
    """A LanceDB-served table: the source id column, the vectors (the source column's name,
    fixed_size_list of `dtype`: what LanceDB indexes and searches), then the passthrough
    columns."""
    return pa.schema([pa.field(id_field.name, id_field.type, nullable=False),
                      pa.field(vector_column, pa.list_(VECTOR_TYPES[dtype], dim), nullable=False), *keep_fields],
                     metadata=metadata)
