"""Query a compressed table: ADC top-k over the stored codes, optionally re-ranked exactly
against the source vectors (`rerank` x k candidates read back from the source Parquet)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from kernels.knn import TopK, prepare_vectors, rerank as rerank_candidates
from pipeline import storage
from pipeline.codec_store import CodecRef
from pipeline.errors import SourceChangedError, VecpressError
from pipeline.executor import Executor, LocalExecutor
from pipeline.lance_io import fragment_offsets, require_dataset, version_manifest
from pipeline.source import SourcePlan, _read_footer, list_parquet_files, open_parquet, read_rows, vectors_as_numpy
from pipeline.stages import CodeSearch, search_fragment


def read_query_vectors(uri: str, column: str, dim: int) -> np.ndarray:
    """Query vectors from a Parquet file or folder, validated like the corpus."""
    parts = []
    for f in list_parquet_files([uri]):
        pf = open_parquet(f)
        if column not in pf.schema_arrow.names:
            raise VecpressError(f"{f}: no column {column!r} for query vectors ({pf.metadata.num_rows} rows; "
                                f"columns are {pf.schema_arrow.names}); pass --query-column")
        parts.append(vectors_as_numpy(pf.read(columns=[column]).column(0), dim, where=f, column=column))
    return np.concatenate(parts)


def source_vectors(plan: SourcePlan, positions: np.ndarray) -> np.ndarray:
    """Source vectors at global positions (any order), after checking the files are unchanged."""
    out = np.zeros((len(positions), plan.dim), np.float32)
    checked: set[str] = set()
    for shard, sel, local in plan.locate(positions):
        if shard.file_uri not in checked:
            _, fp, _, _ = _read_footer(shard.file_uri)
            if fp != shard.fingerprint:
                raise SourceChangedError(f"{shard.file_uri} changed since it was compressed: cannot re-rank "
                                         "against it (recompress, or search without --rerank)")
            checked.add(shard.file_uri)
        order = np.argsort(local, kind="stable")
        t = read_rows(shard, local[order], [plan.vector_column])
        x = vectors_as_numpy(t.column(0), plan.dim, where=shard.file_uri, column=plan.vector_column)
        out[sel[order]] = x
    return out


def search(out: str, table: str, queries: np.ndarray, k: int = 10, *, rerank: int = 0,
           version: int | None = None, executor: Executor | None = None) -> pa.Table:
    """Top-k per query: columns query, rank, <id>, distance (smaller is better; negated
    similarity for ip/cosine), reranked, and the table's passthrough columns."""
    if k < 1:
        raise VecpressError(f"k must be at least 1, got {k}")
    ds = require_dataset(out, table, version)
    m = version_manifest(ds)
    base = storage.normalize(out)
    if queries.ndim != 2 or queries.shape[1] != m["dim"]:
        raise VecpressError(f"queries have shape {queries.shape}, the table holds {m['dim']}-d vectors")
    codec = CodecRef(**{**m["codec"], "uri": storage.join(base, m["codec"]["uri"])})
    num_candidates = k * max(1, rerank)
    job = CodeSearch(table_uri=ds.uri, version=ds.version, codec=codec, k=num_candidates)
    found = TopK(queries.shape[0], num_candidates)
    items = [(fid, off) for fid, off, _ in fragment_offsets(ds)]
    for D, I in (executor or LocalExecutor()).map(search_fragment, items, desc="search", shared={"job": job, "queries": queries}):
        found.add(D, I)
    D, I = found.result()
    if rerank:
        plan = SourcePlan.from_dict(json.loads(storage.read_bytes(storage.join(base, m["source"]["plan_uri"]))))
        flat = I.ravel()
        valid = flat >= 0
        vecs = np.zeros((flat.size, plan.dim), np.float32)
        vecs[valid] = prepare_vectors(source_vectors(plan, flat[valid]), m["metric"])
        D, I = rerank_candidates(prepare_vectors(queries, m["metric"]), vecs.reshape(*I.shape, plan.dim), I, k, m["metric"])
    D, I = D[:, :k], I[:, :k]
    q, rank = np.nonzero(I >= 0)
    positions = I[q, rank]
    id_col, keep = m["source"]["id_column"], m["source"]["keep"]
    rows = ds.take(positions.tolist(), columns=[id_col, *keep]) if len(positions) else None
    cols = {"query": pa.array(q, pa.int64()), "rank": pa.array(rank, pa.int64())}
    cols[id_col] = rows.column(id_col) if rows is not None else pa.array([], pa.int64())
    cols["distance"] = pa.array(D[q, rank], pa.float32())
    cols["reranked"] = pa.array(np.full(len(q), bool(rerank)))
    for c in keep:
        cols[c] = rows.column(c) if rows is not None else pa.array([], pa.string())
    return pa.table(cols)
