"""The Python API that `import vecpress` exposes: run the job, open a table, search it.

Shaped after LanceDB's: `open` gives a table handle, `Table.search(q)` a query builder whose
`to_arrow()` / `to_pandas()` / `to_list()` run it. Results carry the selected columns and
`_distance` (smaller is nearer, as LanceDB's: squared L2; 1 - cosine similarity; 1 - inner
product for ip; Hamming distance for binary codes before re-ranking), and `query_index` when
the queries were a batch (a 2-D array). The same handle reads both outputs:

- a codes table (`--serve codes`): vecpress searches the codes (faiss's asymmetric distance
  over every row; re-ranking with exact distances from the warm column or the source);
- a LanceDB-served table (`--serve lancedb`): the search is LanceDB's own, over its index.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from vecpress.pipeline.codec_store import load_codec
from vecpress.pipeline.context import manifest_codec
from vecpress.pipeline.errors import VecpressError
from vecpress.pipeline.lance_io import default_ref, require_dataset, version_manifest, version_ref
from vecpress.pipeline.options import CompressOptions
from vecpress.pipeline.report import inspect_table

def compress(inputs: Sequence[str] | str, out: str, table: str, *, executor=None, **options: Any) -> dict:
    """Compress the Parquet files under `inputs` into a new version of `out/<table>.lance` and
    return the run's report (what `vecpress compress --json` prints). `options` are the
    CLI's options by their Python names (`codec="PQ32"`, `metric="cosine"`, `serve="lancedb"`,
    ...: `vecpress.CompressOptions`); runs on a local Ray, or on `ray_address=`. No Prefect."""
    from vecpress.pipeline.run import run_compress

    result = run_compress(inputs, out, table, CompressOptions.from_params(options), executor=executor)
    return result.report


def open_table(out: str, table: str, *, version: int | None = None, tag: str | None = None) -> "Table":
    """A handle on one version of `out/<table>.lance`: `version`, else `tag`, else the version
    tagged `production` where there is one, else the latest."""
    if version is not None and tag is not None:
        raise VecpressError("open a table by version or by tag, not both")
    return Table(out, table, version if version is not None else tag)


class Table:
    """One version of a vecpress table (see `open_table`)."""

    def __init__(self, out: str, table: str, version: int | str | None = None):
        self.out, self.name = out, table
        self._ds = require_dataset(out, table, version)  # (None: production, else the latest)
        #: how to open this version again: its number, or the tag of a failed version's branch
        self._ref = version_ref(self._ds, version if version is not None else default_ref(self._ds))
        self.manifest = version_manifest(self._ds)

    def __repr__(self) -> str:
        return (f"vecpress.Table({self.name!r}, version={self.version}, rows={self.count_rows()}, "
                f"codec={self.manifest['codec']['spec']!r}, serve={self.serve!r})")

    @property
    def version(self) -> int:
        return self._ds.version

    @property
    def serve(self) -> str:
        """"codes" (vecpress searches the codes) or "lancedb" (LanceDB searches its index)."""
        return self.manifest.get("serve", "codes")

    @property
    def schema(self) -> pa.Schema:
        return self._ds.schema

    @property
    def codec(self):
        """The version's trained codec (or, for a LanceDB-served table, its index model):
        `encode(x)` turns float32 vectors (n, dim) into codes as the rows were stored,
        `decode(codes)` back into vectors."""
        return load_codec(manifest_codec(self.out, self.manifest["codec"]))

    def count_rows(self) -> int:
        return self._ds.count_rows()

    def report(self) -> dict:
        """The version's report: size, codec, source and its evaluation (`vecpress inspect --json`)."""
        return inspect_table(self.out, self.name, self._ref)

    def versions(self) -> list[dict]:
        """Every version of the table: number, time and the tags on it."""
        tags = self.tags()
        return [{"version": v["version"], "timestamp": v["timestamp"],
                 "tags": sorted(t for t, tv in tags.items() if tv == v["version"])} for v in self._ds.versions()]

    def tags(self) -> dict[str, int]:
        """Tag name -> version."""
        return {name: t["version"] for name, t in self._ds.tags.list().items()}

    def to_arrow(self, columns: list[str] | None = None) -> pa.Table:
        """The version's rows (its `columns`, default all)."""
        return self._ds.to_table(columns=columns)

    def search(self, query) -> "Query":
        """A query for one vector (dim,) or a batch (n, dim); run it with `to_arrow()`."""
        return Query(self, query)


class Query:
    """A search of a vecpress table, built step by step as LanceDB's are."""

    def __init__(self, table: Table, query):
        q = np.asarray(query, dtype=np.float32)
        if q.ndim not in (1, 2):
            raise VecpressError(f"a query is one vector (dim,) or a batch (n, dim), got shape {q.shape}")
        self._table, self._batch, self._q = table, q.ndim == 2, np.atleast_2d(q)
        dim = table.manifest["dim"]
        if self._q.shape[1] != dim or self._q.shape[0] == 0:
            raise VecpressError(f"queries have shape {q.shape}, table {table.name!r} holds {dim}-d vectors")
        self._k, self._nprobes, self._rerank, self._rerank_from = 10, None, 0, "auto"
        self._where: str | None = None
        self._select: list[str] | None = None

    def limit(self, k: int) -> "Query":
        if int(k) < 1:
            raise VecpressError(f"limit must be at least 1, got {k}")
        self._k = int(k)
        return self

    def nprobes(self, n: int) -> "Query":
        """Partitions probed per query (default: the version's own, which its evaluation chose:
        the fewest within 0.01 of the recall of scoring every code). A codes table without
        partitions scores every code: asking for some is an error, not a silent no-op."""
        if self._table.serve != "lancedb" and not self._table.manifest.get("partitions"):
            raise VecpressError(f"table {self._table.name!r} version {self._table.version} is a codes table "
                                "without partitions: its search scores every code (no nprobes)")
        self._nprobes = int(n)
        return self

    def rerank(self, factor: int, *, source: bool = False, column: bool = False) -> "Query":
        """Re-rank factor x limit candidates by exact distance: from the warm column
        (`column=True`), the source Parquet (`source=True`), or the warm column where the table
        has one (neither). LanceDB-served tables re-rank with their stored vectors
        (LanceDB's refine_factor)."""
        if source and column:
            raise VecpressError("rerank from the source or from the column, not both")
        if self._table.serve == "lancedb" and (source or column):
            raise VecpressError("a LanceDB-served table re-ranks with its stored vectors: rerank(factor) alone")
        if int(factor) < 1:
            raise VecpressError(f"rerank factor must be at least 1, got {factor}")
        self._rerank, self._rerank_from = int(factor), "source" if source else "column" if column else "auto"
        return self

    def where(self, sql: str) -> "Query":
        """Search only the rows this Lance SQL filter selects (before scoring)."""
        self._where = sql
        return self

    def select(self, columns: list[str]) -> "Query":
        """The columns each result carries (the id column always)."""
        self._select = list(columns)
        return self

    def to_arrow(self) -> pa.Table:
        t = self._served() if self._table.serve == "lancedb" else self._codes()
        if not self._batch:
            t = t.drop_columns(["query_index"])
        return t

    def to_pandas(self):
        return self.to_arrow().to_pandas()

    def to_list(self) -> list[dict]:
        return self.to_arrow().to_pylist()

    def _codes(self) -> pa.Table:
        from vecpress.pipeline.search import search

        t, m = self._table, self._table.manifest
        found = search(t.out, t.name, self._q, self._k, rerank=self._rerank, rerank_from=self._rerank_from,
                       version=t._ref, where=self._where, columns=self._select, nprobes=self._nprobes)
        distance = found.column("distance").to_numpy()
        if m["metric"] in ("cosine", "ip") and not (m.get("codec_binary") and not self._rerank):
            distance = 1.0 + distance  # vecpress's -similarity -> LanceDB's 1 - similarity
        id_col = m["source"]["id_column"]
        cols = {"query_index": found.column("query"), id_col: found.column(id_col)}
        for c in found.column_names:
            if c not in ("query", "rank", "distance", "reranked", id_col):
                cols[c] = found.column(c)
        cols["_distance"] = pa.array(distance.astype(np.float32))
        return pa.table(cols)

    def _served(self) -> pa.Table:
        from vecpress.pipeline.served import lancedb_table

        t = self._table
        tbl = lancedb_table(t.out, t.name, t.version)
        id_col = t.manifest["source"]["id_column"]
        select = [id_col, *[c for c in (self._select if self._select is not None else t.manifest["source"]["keep"])
                            if c != id_col]]
        q = tbl.search(self._q if self._batch else self._q[0]).select(select).limit(self._k)
        if self._nprobes is not None:
            q = q.nprobes(self._nprobes)
        if self._rerank:
            q = q.refine_factor(self._rerank)
        if self._where is not None:
            q = q.where(self._where, prefilter=True)
        got = q.to_arrow()
        if "query_index" not in got.column_names:
            got = got.append_column("query_index", pa.array(np.zeros(got.num_rows, np.int64)))
        return got.select(["query_index", *select, "_distance"])
