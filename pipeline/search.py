"""Query a compressed table: ADC top-k over the stored codes, optionally re-ranked exactly
(`rerank` x k candidates, vectors from the warm column or read back from the source Parquet)."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vecpress.kernels.knn import TopK, prepare_vectors
from vecpress.pipeline import storage
from vecpress.pipeline.errors import SourceError, VecpressError
from vecpress.pipeline.executor import Executor, LocalExecutor, ThreadExecutor
from vecpress.pipeline.codec_store import load_codec
from vecpress.pipeline.context import manifest_codec
from vecpress.pipeline.lance_io import (
    fragment_offsets, read_run_file, require_dataset, table_uri, version_manifest, version_ref,
)
from vecpress.pipeline.rerank import column_distances, source_distances
from vecpress.pipeline.rowmap import RowMap
from vecpress.pipeline.layout import SourcePlan
from vecpress.pipeline.lists import search_lists, version_lists
from vecpress.pipeline.parquet import read_fingerprint, vectors_as_numpy
from vecpress.pipeline.source import list_parquet_files
from vecpress.pipeline.evaluate import CodeSearch, search_fragment


def read_query_vectors(uri: str, column: str, dim: int, *, metric: str | None = None) -> np.ndarray:
    """Query vectors from a Parquet file or folder, or a .npy file of an (n, dim) float array,
    validated like the corpus (cosine: no all-zero vectors). SourceError naming the file for
    anything else."""
    if str(uri).endswith(".npy"):
        return _npy_queries(uri, dim, metric=metric)
    parts = []
    for f in list_parquet_files([uri]):
        loc = storage.resolve(f)
        try:
            handle = loc.fs.open_input_file(loc.path)
            _, _, metadata = read_fingerprint(handle, f)
            pf = pq.ParquetFile(handle, metadata=metadata)
        except (SourceError, OSError, pa.ArrowException) as exc:
            raise SourceError(f"--queries {f}: not a readable Parquet file nor a .npy array of query vectors: "
                              f"{storage.one_line(exc).removeprefix(f + ': ')}") from None
        if column not in pf.schema_arrow.names:
            raise VecpressError(f"{f}: no column {column!r} for query vectors ({pf.metadata.num_rows} rows; "
                                f"columns are {pf.schema_arrow.names}); pass --query-column")
        parts.append(vectors_as_numpy(pf.read(columns=[column]).column(0), dim, where=f, column=column,
                                      nonzero=metric == "cosine"))
    return np.concatenate(parts)


def _npy_queries(uri: str, dim: int, *, metric: str | None) -> np.ndarray:
    """Query vectors from a .npy file: an (n, dim) array of floats, finite (and, for cosine, not all zero)."""
    try:
        x = np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise SourceError(f"--queries {uri}: not a readable .npy array of query vectors: {storage.one_line(exc)}") from None
    if x.ndim != 2 or x.shape[1] != dim or x.dtype.kind != "f" or not len(x):
        raise SourceError(f"--queries {uri}: holds a {x.dtype} array of shape {x.shape}; expected (n, {dim}) floats, "
                          "n at least 1")
    arr = pa.FixedSizeListArray.from_arrays(pa.array(x.astype(np.float32).ravel()), dim)
    return vectors_as_numpy(arr, dim, where=uri, column="(the .npy array)", nonzero=metric == "cosine")


def query_codes(out: str, table: str, queries: np.ndarray, *, version: int | str | None = None) -> np.ndarray:
    """Query vectors in the table's stored form: (n, code_size) uint8, encoded by the version's
    codec as its rows were. For a binary codec (BIN, BINt) that is what LanceDB searches by
    Hamming distance: `tbl.search(code, vector_column_name="code").distance_type("hamming")`."""
    m = version_manifest(require_dataset(out, table, version))
    queries = np.atleast_2d(np.asarray(queries, np.float32))
    if queries.shape[1] != m["dim"]:
        raise VecpressError(f"queries have shape {queries.shape}, the table holds {m['dim']}-d vectors")
    if m.get("serve") == "lancedb":
        raise VecpressError(f"table {table!r} serves its vectors to LanceDB: search it with the query vectors as they are")
    return load_codec(manifest_codec(out, m["codec"])).encode(queries)


def search(out: str, table: str, queries: np.ndarray, k: int = 10, *, rerank: int = 0, rerank_from: str = "auto",
           version: int | str | None = None, executor: Executor | None = None, where: str | None = None,
           columns: list[str] | None = None, nprobes: int | None = None) -> pa.Table:
    """Top-k per query: columns query, rank, <id>, distance (smaller is better: squared L2, or
    negated similarity for ip/cosine, or Hamming distance for binary codes before re-ranking),
    reranked, and the table's passthrough columns (or `columns`, any of the table's).

    A table with partitions (pipeline.lists) scores only the codes of each query's `nprobes`
    nearest partitions (default: the version's, chosen by its evaluation); `nprobes` equal to
    the partitions scores them all. Without partitions every code is scored.

    `where` (a Lance SQL filter over the table's columns) restricts the search to the rows it
    selects, before scoring: k results whenever k rows match (among the probed partitions'
    rows, with partitions).

    With `rerank` = r, r x k candidates are re-ranked by exact distance to vectors read from
    the warm column (`rerank_from="column"`), the source Parquet ("source"), or the warm
    column when the table has one ("auto")."""
    if k < 1:
        raise VecpressError(f"k must be at least 1, got {k}")
    if rerank < 0:
        raise VecpressError(f"rerank must be 0 (off) or a factor of at least 1, got {rerank}")
    if rerank_from not in ("auto", "source", "column"):
        raise VecpressError(f"rerank_from must be auto, source or column, not {rerank_from!r}")
    reads = executor or ThreadExecutor()  # (one search's re-rank reads: threads, not Ray tasks)
    executor = executor or LocalExecutor()
    ds = require_dataset(out, table, version)
    m = version_manifest(ds)
    if queries.ndim != 2 or queries.shape[1] != m["dim"]:
        raise VecpressError(f"queries have shape {queries.shape}, the table holds {m['dim']}-d vectors")
    if m["metric"] == "cosine" and not np.asarray(queries).any(axis=1).all():
        zero = np.flatnonzero(~np.asarray(queries).any(axis=1))
        raise VecpressError(f"{len(zero)} of {len(queries)} queries are all-zero vectors (first: query {zero[0]}), "
                            f"which cosine cannot normalise (table {table!r} is searched by cosine)")
    codec = manifest_codec(out, m["codec"])
    num_candidates = k * max(1, rerank)
    offsets = fragment_offsets(ds) if where is not None or m.get("partitions") is None else None
    allowed = None if where is None else filtered_positions(ds, where, offsets)
    lists = version_lists(out, m)
    if lists is None and nprobes is not None:
        raise VecpressError(f"table {table!r} version {ds.version} has no partitions: its search scores every "
                            "code (no nprobes; compress with --partitions N for partitions)")
    if lists is not None:
        nprobes = m["partitions"]["default_nprobes"] if nprobes is None else nprobes
        if not 1 <= nprobes <= lists.spec.nlist:
            raise VecpressError(f"nprobes must be from 1 to {lists.spec.nlist} (the partitions of table {table!r} "
                                f"version {ds.version}), got {nprobes}")
        D, I = search_lists(lists, load_codec(codec), queries, num_candidates, nprobes, allowed=allowed)
    else:
        job = CodeSearch(table_uri=table_uri(out, table), version=version_ref(ds, version), codec=codec,
                         k=num_candidates)
        found = TopK(queries.shape[0], num_candidates)
        for _, (D, I) in executor.imap(search_fragment, [(fid, off) for fid, off, _ in offsets], desc="search",
                                       shared={"job": job, "queries": queries, "allowed": allowed}):
            found.add(D, I)
        D, I = found.result()
    if rerank:
        xq = prepare_vectors(queries, m["metric"])
        warm = manifest_codec(out, m.get("rerank_codec"))
        if rerank_from == "column" and warm is None:
            raise VecpressError(f"table {table!r} version {ds.version} has no warm re-rank column "
                                "(compress with --rerank-codec SQ8, or re-rank from the source)")
        if warm is not None and rerank_from != "source":
            E = column_distances(ds, warm, xq, I, m["metric"])
        else:
            plan = SourcePlan.from_dict(json.loads(read_run_file(out, m["source"]["plan_uri"],
                                                                 needed_for="re-ranking from the source")))
            E = source_distances(plan, xq, RowMap.of_manifest(out, m).positions_of(I), m["metric"], reads)
        order = np.argsort(E, axis=1, kind="stable")[:, :k]
        D, I = np.take_along_axis(E, order, axis=1), np.take_along_axis(I, order, axis=1)
        I[~np.isfinite(D)] = -1
    D, I = D[:, :k], I[:, :k]
    q, rank = np.nonzero(I >= 0)
    positions = I[q, rank]
    id_col = m["source"]["id_column"]
    keep = [c for c in (m["source"]["keep"] if columns is None else columns) if c != id_col]
    missing = [c for c in keep if c not in ds.schema.names]
    if missing:
        raise VecpressError(f"table {table!r} version {ds.version} has no column(s) {missing}; it has {ds.schema.names}")
    rows = ds.take(positions.tolist(), columns=[id_col, *keep])
    cols = {"query": pa.array(q, pa.int64()), "rank": pa.array(rank, pa.int64()), id_col: rows.column(id_col),
            "distance": pa.array(D[q, rank], pa.float32()), "reranked": pa.array(np.full(len(q), bool(rerank)))}
    for c in keep:
        cols[c] = rows.column(c)
    return pa.table(cols)


def filtered_positions(ds, where: str, offsets: list[tuple[int, int, int]]) -> np.ndarray:
    """The sorted global positions of the rows a Lance SQL filter selects (one scan of the
    filter's columns); VecpressError naming the filter when Lance refuses it."""
    start = {fid: off for fid, off, _ in offsets}
    try:
        addr = ds.to_table(columns=[], filter=where, with_row_address=True).column("_rowaddr").to_numpy()
    except (ValueError, OSError, RuntimeError) as exc:
        reason = str(exc).strip().splitlines()[0][:200]
        raise VecpressError(f"where {where!r} on {ds.uri} version {ds.version}: {reason}") from None
    frag, local = (addr >> np.uint64(32)).astype(np.int64), (addr & np.uint64(0xFFFFFFFF)).astype(np.int64)
    base = np.array([start[int(f)] for f in frag], np.int64) if len(frag) else np.zeros(0, np.int64)
    return np.sort(base + local)


def named_scores(result: pa.Table, metric: str, id_column: str, *, hamming: bool = False) -> pa.Table:
    """A search result of the Python API (query_index, <id>, ..., `_distance` as LanceDB's)
    as the command line prints it: columns query, rank, <id>, the score, and the rest. The
    score is named for what it is: `distance` (squared L2, smaller is nearer),
    `cosine_distance` (1 - cosine similarity, 0..2, smaller is nearer; estimates from the codes
    clipped at 0), `inner_product` (larger is nearer), or `hamming_distance` (bits that differ
    between the codes: binary codes before re-ranking)."""
    D = result.column("_distance").to_numpy(zero_copy_only=False)
    if hamming:
        name, score = "hamming_distance", D
    elif metric == "cosine":
        name, score = "cosine_distance", np.maximum(D, 0.0)
    elif metric == "ip":
        name, score = "inner_product", 1.0 - D  # (LanceDB's dot distance is 1 - inner product)
    else:
        name, score = "distance", D
    query = result.column("query_index").to_numpy()
    rank = np.zeros(len(query), np.int64)
    if len(query):
        starts = np.r_[0, np.nonzero(np.diff(query))[0] + 1]
        rank = np.arange(len(query)) - np.repeat(starts, np.diff(np.r_[starts, len(query)]))
    cols = {"query": pa.array(query, pa.int64()), "rank": pa.array(rank), id_column: result.column(id_column),
            name: pa.array(score, pa.float32())}
    for c in result.column_names:
        if c not in ("query_index", "_distance", id_column):
            cols[c] = result.column(c)
    return pa.table(cols)