"""Inverted lists: a codes table's rows by coarse partition, so that a query scores only the
codes of the `nprobes` partitions nearest it instead of every row.

The coarse quantizer (IVF centroids: kernels.codecs.ivf.IvfModel of form `IVF<n>,FLAT`) is
trained with the codec, on the same sample. The encode pass assigns every row its partition
from its raw vector (scan.Partitions) and each encode task writes the (partition, position,
code) of its rows to one file, by group of partitions (`write_task_lists`, pipeline.buckets).
Then one task per group (`build_group`) reads that group from every task's file and writes
the group's lists: one Arrow IPC file with one record batch per partition (positions and
codes, in position order; for an RQ's or LSQ's codes ranked by L2, also each row's code
term, |r|^2 + 2 <c, r> of a residual code or |r|^2 of a table code, so that a query scores a
code by M look-ups in its tables: kernels.codecs.tables). A query reads only the record
batches of the partitions it probes (`InvertedLists.read`). No process holds more than one
group (about LIST_GROUP_ROWS rows).

The lists live in the run's folder beside its codec and are named by the version's manifest
(`partitions`). The table's rows keep their order (row i is the source's position i): LanceDB
readers, re-ranking from the source and incremental runs see the table as before.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from vecpress.kernels.codecs.ivf import POINTS_PER_CENTROID
from vecpress.kernels.codecs.search import l2_as_cosine
from vecpress.kernels.codecs.spec import is_binary_spec
from vecpress.kernels.codecs.tables import code_terms, l2_by_tables, query_tables, table_codebooks, table_sums
from vecpress.kernels.knn import TopK, exact_knn, order_by_distance_then_id, prepare_vectors
from vecpress.kernels.metrics import difference_standard_error, knn_recall, query_recalls, recall_table
from vecpress.pipeline import storage
from vecpress.pipeline.buckets import open_batches, read_bucket_of_all, write_buckets
from vecpress.pipeline.codec_store import CodecRef, load_codec
from vecpress.pipeline.context import manifest_codec
from vecpress.pipeline.rowmap import RowMap
from vecpress.pipeline.schema import codes_array, codes_as_numpy

log = logging.getLogger("vecpress")

#: rows of one group of partitions: what a build task holds (positions, codes, a sort of them)
LIST_GROUP_ROWS = 1_000_000
#: --partitions auto: tables of fewer rows get none (their exhaustive search takes milliseconds)
AUTO_MIN_ROWS = 100_000
#: the default nprobes is the fewest whose recall@10 is within this of the best measured
NPROBES_TOLERANCE = 0.01
#: the nprobes grid stops where doubling nprobes gains less recall@10 than this
PLATEAU = 0.002
#: a batch search keeps the partitions it read, up to about this many bytes, for its next queries
READ_CACHE_BYTES = 256 << 20
#: a residual search holds its queries' look-up tables (kernels.codecs.tables) for about this
#: many bytes of queries at a time (RQ64x8: 64 KB a query)
TABLES_BYTES = 256 << 20
#: ... and scores a partition's codes for about this many (query, row) pairs at a time
SCORED_PAIRS = 4 << 20


def auto_partitions(num_rows: int, num_train: int) -> int:
    """--partitions auto: a power of two near sqrt(rows), with at least POINTS_PER_CENTROID
    training vectors each (faiss's k-means rule); 0 below AUTO_MIN_ROWS rows."""
    if num_rows < AUTO_MIN_ROWS:
        return 0
    nlist = 1 << int(round(np.log2(np.sqrt(num_rows))))
    while nlist > 1 and num_train < nlist * POINTS_PER_CENTROID:
        nlist //= 2
    return min(nlist, 65_536)


def residual_fits(spec: str, dim: int) -> bool:
    """Whether a codec of this spec can code residuals (vectors minus their centroid): not
    binary sign codes, nor an MRL prefix (it would renormalise the residual)."""
    return not is_binary_spec(spec, dim) and not spec.upper().startswith("MRL")


def judge_residual(codec, residual, coarse, base: np.ndarray, partitions: np.ndarray, residuals: np.ndarray,
                   xq: np.ndarray, metric: str) -> dict:
    """recall@10 of held-out queries `xq` among sample rows `base` (their exact neighbours
    there), searched over the table's codes and as residual lists rank them (centroid plus
    decoded residual code; every partition probed; `partitions` and `residuals`: the base rows'
    as the coarse quantizer gives them): the train stage lists residual codes only
    where they rank better. Where residuals are much smaller than the rows they gain a lot
    (PQ8 under L2, 256 partitions: lists' recall@10 0.52 against 0.19), elsewhere little, and
    a 1-bit EDEN code of a residual loses its scale against the centroid's (0.61 against 0.68,
    128-d cosine): BENCHMARKS.md, "Residual codes or the table's codes"."""
    qp, bp = prepare_vectors(xq, metric), prepare_vectors(base, metric)
    _, exact = exact_knn(qp, bp, 10, metric)
    _, own = codec.search_codes(xq, codec.encode(base), 10)
    recon = coarse.centroids[partitions] + residual.decode(residual.encode(residuals))
    _, listed = exact_knn(qp, np.ascontiguousarray(recon, dtype=np.float32), 10, residual_metric(metric))
    se = difference_standard_error(query_recalls(exact, listed, 10), query_recalls(exact, own, 10))
    return {"base_rows": len(base), "queries": len(xq),
            "table_codes_recall_at_10": round(knn_recall(exact, own, 10), 4),
            "residual_codes_recall_at_10": round(knn_recall(exact, listed, 10), 4),
            "gain_standard_error": round(se, 4) if np.isfinite(se) else None}


def residual_leads(judged: dict) -> bool:
    """Whether residual codes ranked the sample's neighbours better than the table's (judge_residual)."""
    return judged["residual_codes_recall_at_10"] > judged["table_codes_recall_at_10"]


def residual_metric(metric: str) -> str:
    """The metric a residual codec is trained and searched with: inner product for ip (the
    query's product with a row is its product with the centroid plus that with the residual);
    L2 for L2 and cosine (|q - c - r|^2; cosine's vectors are normalised before the residual is
    taken, and its codes rank by L2 to their reconstruction as the table's do: codecs.search)."""
    return "ip" if metric == "ip" else "l2"


def coarse_spec(nlist: int) -> str:
    """The coarse quantizer's form: IVF centroids, nothing per row but the partition."""
    return f"IVF{nlist},FLAT"


@dataclass(frozen=True)
class ListsSpec:
    """Where a run's inverted lists go and how they are cut: `num_groups` groups of
    consecutive partitions, one build task and one file each."""

    uri: str
    coarse: CodecRef
    nlist: int
    num_groups: int
    code_size: int
    #: the codec of the rows' residuals to their centroids, which the lists hold; None: the
    #: lists hold the table's own codes
    residual: CodecRef | None = None
    #: the table's codec (None: not known, as for lists read before it was recorded here)
    table: CodecRef | None = None

    @classmethod
    def for_rows(cls, uri: str, coarse: CodecRef, num_rows: int, table: CodecRef,
                 residual: CodecRef | None = None) -> "ListsSpec":
        nlist = load_codec(coarse).num_partitions
        return cls(uri, coarse, nlist, max(1, min(nlist, -(-num_rows // LIST_GROUP_ROWS))),
                   (residual or table).code_size, residual, table)

    @property
    def listed(self) -> CodecRef | None:
        """The codec of the codes the lists hold: the residual codec, else the table's."""
        return self.residual or self.table

    @property
    def partitions_per_group(self) -> int:
        return -(-self.nlist // self.num_groups)

    def partitions_of(self, group: int) -> range:
        per = self.partitions_per_group
        return range(group * per, min(self.nlist, (group + 1) * per))

    def group_uri(self, group: int) -> str:
        return storage.join(self.uri, f"lists-{group:05d}.arrow")

    @property
    def parts_uri(self) -> str:
        """The encode tasks' files (working files, removed once the lists are built)."""
        return storage.join(self.uri, "parts")

    def schema(self) -> pa.Schema:
        return pa.schema([pa.field("partition", pa.int32()), pa.field("position", pa.int64()),
                          pa.field("code", pa.binary(self.code_size))])

    @property
    def books(self) -> np.ndarray | None:
        """The listed codec's codebooks where its codes are scored by look-up tables
        (kernels.codecs.tables: an RQ or LSQ of 8-bit codebooks), else None."""
        return None if self.listed is None else _table_codebooks(self.listed)

    @property
    def has_terms(self) -> bool:
        """Whether the lists store each row's code term (kernels.codecs.tables): codes scored
        by look-up tables by L2 (cosine's too), |r|^2 + 2 <c, r> of a residual code r and
        its centroid c, |r|^2 of a table's code."""
        return self.books is not None and self.listed.metric != "ip"


@functools.lru_cache(maxsize=16)
def _table_codebooks(listed: CodecRef) -> np.ndarray | None:
    return table_codebooks(load_codec(listed).index)


def write_task_lists(spec: ListsSpec, name: str, partitions: list[np.ndarray], positions: list[np.ndarray],
                     codes: list[np.ndarray]) -> str:
    """One encode task's rows (their partitions, global positions and codes), by group of
    partitions, to `<parts>/<name>.arrow`."""
    part = np.concatenate(partitions).astype(np.int32) if partitions else np.zeros(0, np.int32)
    pos = np.concatenate(positions).astype(np.int64) if positions else np.zeros(0, np.int64)
    code = np.concatenate(codes) if codes else np.zeros((0, spec.code_size), np.uint8)
    rows = pa.record_batch([pa.array(part), pa.array(pos), codes_array(code)], schema=spec.schema())
    return write_buckets(storage.join(spec.parts_uri, f"{name}.arrow"), rows, part // spec.partitions_per_group,
                         spec.num_groups)


def build_group(group: int, *, spec: ListsSpec, files: tuple[str, ...], dropped: np.ndarray) -> np.ndarray:
    """A group's lists from every task's file: one record batch per partition, rows in
    position order, each listed by its table row (RowMap: the positions in `dropped`, rows a
    run dropped as duplicated ids, left out). Returns the sizes of the group's partitions."""
    parts = spec.partitions_of(group)
    table = read_bucket_of_all(files, group) or spec.schema().empty_table()
    rows_of = RowMap(dropped).rows_of(table.column("position").to_numpy())
    if len(dropped):
        table = table.filter(pa.array(rows_of >= 0)).set_column(1, "position", pa.array(rows_of[rows_of >= 0]))
        rows_of = rows_of[rows_of >= 0]
    part = table.column("partition").to_numpy() - parts.start
    order = np.lexsort((rows_of, part))
    rows = table.select(["position", "code"]).take(pa.array(order))
    batch = pa.RecordBatch.from_arrays([c.combine_chunks() for c in rows.columns], schema=rows.schema)
    if spec.has_terms:  # (each row's code term, for the search by look-up tables)
        centroids = load_codec(spec.coarse).centroids[part[order] + parts.start] if spec.residual else None
        terms = code_terms(load_codec(spec.listed).decode, codes_as_numpy(batch.column(1)), centroids)
        batch = batch.append_column("term", pa.array(terms))
    write_buckets(spec.group_uri(group), batch, part[order], len(parts))
    return np.bincount(part, minlength=len(parts)).astype(np.int64)


def build_lists(executor, spec: ListsSpec, files: list[str], *, dropped: np.ndarray | None = None) -> np.ndarray:
    """Every group's lists, one task each (through `executor`); the partitions' sizes."""
    sizes = np.zeros(spec.nlist, np.int64)
    shared = {"spec": spec, "files": tuple(sorted(files)),
              "dropped": np.zeros(0, np.int64) if dropped is None else dropped}
    for g, s in executor.imap(build_group, range(spec.num_groups), desc="inverted lists", shared=shared):
        parts = spec.partitions_of(g)
        sizes[parts.start:parts.stop] = s
    return sizes


class InvertedLists:
    """A version's lists, read partition by partition (each group's file opened once)."""

    def __init__(self, spec: ListsSpec):
        self.spec = spec
        self._files: dict[int, pa.ipc.RecordBatchFileReader] = {}

    def read(self, partition: int) -> tuple[np.ndarray, np.ndarray]:
        """(global positions, codes (n, code_size) uint8) of one partition's rows."""
        return self.read_listed(partition)[:2]

    def read_listed(self, partition: int) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """read's (positions, codes) and the rows' code terms (ListsSpec.has_terms), or None
        where the lists hold none (lists built before they were stored)."""
        group = int(partition) // self.spec.partitions_per_group
        if group not in self._files:
            self._files[group] = open_batches(self.spec.group_uri(group))
        batch = self._files[group].get_batch(int(partition) - group * self.spec.partitions_per_group)
        terms = batch.column(2).to_numpy() if batch.num_columns > 2 else None
        return batch.column(0).to_numpy(), codes_as_numpy(batch.column(1)), terms


def search_lists(lists: InvertedLists, codec, queries: np.ndarray, k: int, nprobes: int, *,
                 exclude: np.ndarray | None = None, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of raw queries over the codes of their `nprobes` nearest partitions: (D, I), I
    global positions (-1 where fewer than k rows were probed). `exclude[q]`: a position never
    returned for query q (its own row); `allowed`: sorted positions, the only ones returned.
    Table codes: each query scores its partitions' codes in one search (ADC's cost is per
    query and code either way; one call per query beats one per partition of a batch, which
    pays faiss's per-call overhead for every partition); a batch reads a partition once
    (`READ_CACHE_BYTES` of them kept at a time). Residual codes (relative to each partition's
    centroid) are searched a partition at a time, for all the batch's queries that probe it
    together (`_search_by_partition`), and so are an RQ's or LSQ's table codes; those two by
    look-up tables (`_list_scorer`)."""
    coarse = load_codec(lists.spec.coarse)
    probes = coarse.probe(queries, nprobes)
    kk = k + (exclude is not None)  # (one more, so that excluding a query's own row leaves k)
    books = lists.spec.books
    if lists.spec.residual or books is not None:
        step = max(1, len(queries) if books is None else TABLES_BYTES // (books.shape[0] * books.shape[1] * 4))
        found = [_search_by_partition(lists, _list_scorer(lists.spec, coarse, codec, queries[i:i + step], kk),
                                      probes[i:i + step], k, allowed=allowed,
                                      exclude=None if exclude is None else exclude[i:i + step])
                 for i in range(0, len(queries), step)] or [(np.zeros((0, k), np.float32), np.zeros((0, k), np.int64))]
        return np.concatenate([f[0] for f in found]), np.concatenate([f[1] for f in found])
    D = np.full((len(queries), k), np.inf, np.float32)
    I = np.full((len(queries), k), -1, np.int64)
    cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    held = 0
    for q, partitions in enumerate(probes):
        for p in partitions[partitions >= 0]:
            if p not in cache:
                if held > READ_CACHE_BYTES:
                    cache, held = {}, 0
                cache[p] = lists.read(p)
                held += cache[p][0].nbytes + cache[p][1].nbytes
        top = TopK(1, k, exclude=None if exclude is None else exclude[q:q + 1])
        pos, codes, _ = _rows([cache[p] for p in partitions[partitions >= 0]], lists.spec.code_size, allowed)
        d, i = codec.search_codes(queries[q:q + 1], codes, min(kk, len(pos)))
        top.add(d, _positions(i, pos))
        D[q], I[q] = top.D[0], top.I[0]
    return D, I


def _search_by_partition(lists: InvertedLists, score, probes: np.ndarray, k: int, *,
                         exclude: np.ndarray | None, allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """search_lists over residual codes, or codes scored by look-up tables: each probed
    partition read once and its codes scored for every query of the batch that probes it
    together (`score`: _list_scorer's).

    A query's codes relative to a partition's centroid are its own there, so a query-major
    search would score a partition's codes once per (query, partition) pair, and faiss decodes
    a residual quantizer's codes for each (RQ64x8 at 768-d: 0.93 s a query at nprobes 64)."""
    probed: dict[int, list[int]] = {}
    for q, partitions in enumerate(probes):
        for p in partitions[partitions >= 0]:
            probed.setdefault(int(p), []).append(q)
    top = TopK(len(probes), k, exclude=exclude)
    for p in sorted(probed):
        qs = np.asarray(probed[p], np.int64)
        d, i = score(qs, p, *_rows([lists.read_listed(p)], lists.spec.code_size, allowed))
        D = np.full((len(probes), d.shape[1]), np.inf, np.float32)
        I = np.full((len(probes), d.shape[1]), -1, np.int64)
        D[qs], I[qs] = d, i
        top.add(D, I)
    return top.D, top.I


def _list_scorer(spec: ListsSpec, coarse, codec, queries: np.ndarray, k: int):
    """score(query numbers, partition, positions, codes, code terms) -> (D, I) of those of the
    raw `queries` in a partition: their top-k among its codes, I positions, as the table's codes
    report distances (`codec`: the table's). Residual codes r relative to the centroid c: L2
    |q - c - r|^2, inner product -<q, c + r> = -<q, c> - <q, r>; under cosine the L2 distance
    reported as d / 2 - 1.

    An RQ's or LSQ's codes (ListsSpec.books), residual or the table's, score by look-up tables
    (kernels.codecs.tables: each query's once, then M look-ups a code; by L2 with the code
    terms the lists store). Other residual codes, or lists built without terms, by faiss's
    ADC of the codes (a query relative to the centroid by L2), two or more queries over the
    codes decoded once (kernels.codecs.search) with each found code's distance computed again
    a pair at a time, as in a one-query search: either way a query's distances are the same
    searched alone or in a batch, and the merge ranks the same."""
    residual = None if spec.residual is None else load_codec(spec.residual)
    space = "ip" if (residual or codec).metric == "ip" else "l2"
    books, xq = spec.books, prepare_vectors(queries, coarse.metric)
    tables = None if books is None else query_tables(books, xq)
    origin = np.zeros(xq.shape[1], np.float32)

    def top(d: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        ids = np.broadcast_to(pos, d.shape)
        order = order_by_distance_then_id(d, ids, k)
        return np.take_along_axis(d, order, axis=1), np.take_along_axis(ids, order, axis=1)

    def by_blocks(qs: np.ndarray, pos: np.ndarray, distances) -> tuple[np.ndarray, np.ndarray]:
        """The top-k of `distances(lo, hi)` (the queries' to rows lo:hi) over the partition's
        rows, SCORED_PAIRS (query, row) pairs at a time: the same result, bounded memory."""
        step = max(1, SCORED_PAIRS // max(len(qs), 1))
        found = [top(distances(lo, lo + step), pos[lo:lo + step]) for lo in range(0, len(pos), step)]
        if len(found) <= 1:
            return found[0] if found else top(np.zeros((len(qs), 0), np.float32), pos)
        return top(np.hstack([f[0] for f in found]), np.hstack([f[1] for f in found]))

    def score(qs: np.ndarray, p: int, pos: np.ndarray, codes: np.ndarray, terms: np.ndarray | None):
        centroid = origin if residual is None else coarse.centroids[p]
        if residual is None and (tables is None or (space == "l2" and terms is None)):
            d, i = codec.search_codes(queries[qs], codes, min(k, len(pos)))  # (the table's codes, as they report)
            return d, _positions(i, pos)
        if space == "l2":
            if tables is not None and terms is not None:
                t, x = tables[qs], xq[qs]
                d, i = by_blocks(qs, pos, lambda lo, hi: l2_by_tables(t, codes[lo:hi], terms[lo:hi], x, centroid))
            else:
                d, i = residual.search_codes(xq[qs] - centroid, codes, min(k, len(pos)))
                i = _positions(i, pos)
            return (l2_as_cosine(d) if coarse.metric == "cosine" else d), i
        # (a dot product per query, as a one-query search takes it: the same rounding)
        dots = np.array([[float(x @ centroid)] for x in xq[qs]], np.float32)
        if tables is not None:
            t = tables[qs]
            return by_blocks(qs, pos, lambda lo, hi: -table_sums(t, codes[lo:hi]) - dots)
        d, i = residual.search_codes(xq[qs], codes, min(k, len(pos)))
        return d - dots, _positions(i, pos)

    return score


def _positions(i: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """The positions of found row numbers `i` (into `pos`), -1 where none was found."""
    return np.where(i >= 0, pos[np.maximum(i, 0)], -1)


def _rows(read: list[tuple], code_size: int,
          allowed: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """The (positions, codes) read of some partitions (read's or read_listed's), together, and
    their code terms (None unless every partition's were read); only those `allowed` lists."""
    pos = np.concatenate([r[0] for r in read]) if read else np.zeros(0, np.int64)
    codes = np.concatenate([r[1] for r in read]) if read else np.zeros((0, code_size), np.uint8)
    terms = [r[2] if len(r) > 2 else None for r in read]
    terms = np.concatenate(terms) if terms and all(t is not None for t in terms) else None
    if allowed is not None:
        at = np.minimum(np.searchsorted(allowed, pos), max(len(allowed) - 1, 0))
        keep = allowed[at] == pos if len(allowed) else np.zeros(len(pos), bool)
        pos, codes, terms = pos[keep], codes[keep], None if terms is None else terms[keep]
    return pos, codes, terms


def nprobes_grid(nlist: int) -> list[int]:
    """The nprobes an evaluation measures: powers of two below the partitions, then all."""
    return [1 << i for i in range(int(np.log2(max(nlist, 1))) + 1) if 1 << i < nlist] + [nlist]


def measure_nprobes(lists: InvertedLists, codec, xq: np.ndarray, qpos: np.ndarray, truth: np.ndarray,
                    num_rows: int, exhaustive: dict) -> dict:
    """Recall of the search over the lists against the exact neighbours along the nprobes
    grid, with single-query latency, and the default nprobes. The grid stops once recall@10
    has reached the exhaustive search's over the table's codes (`exhaustive`: its recall
    record; less NPROBES_TOLERANCE) and stopped rising (by less than PLATEAU from the point
    before), once it has stopped rising twice running, or at every partition. The default
    nprobes is the fewest within NPROBES_TOLERANCE of the best recall@10 on the grid."""
    target = exhaustive.get("recall_at_10")
    grid = []
    for n in nprobes_grid(lists.spec.nlist):
        start = time.perf_counter()
        _, I = search_lists(lists, codec, xq, truth.shape[1], n, exclude=qpos)
        seconds = time.perf_counter() - start
        grid.append({"nprobes": n, **recall_table(truth, I, num_rows), "batch_seconds": round(seconds, 4),
                     "p50_ms": _single_query_ms(lists, codec, xq[:20], n)})
        if _grid_done(grid, target):
            break
    best = max((g["recall_at_10"] or 0.0) for g in grid)
    default = next(g["nprobes"] for g in grid if (g["recall_at_10"] or 0.0) >= best - NPROBES_TOLERANCE)
    return {"nlist": lists.spec.nlist, "default_nprobes": default, "exhaustive": exhaustive,
            "tolerance": NPROBES_TOLERANCE, "grid": grid}


def _grid_done(grid: list[dict], target: float | None) -> bool:
    """Whether the nprobes grid has measured enough: recall@10 stopped rising (by less than
    PLATEAU a doubling) having reached `target` less NPROBES_TOLERANCE, or stopped rising two
    doublings running below it (lists whose codes cannot reach it, which would otherwise be
    searched at every nprobes up to all partitions: 90 s of a 200,000-row run's 130 s)."""
    recalls = [g["recall_at_10"] for g in grid]
    if recalls[-1] is None:
        return True
    flat = [len(recalls) > i and recalls[-i] - recalls[-i - 1] < PLATEAU for i in (1, 2)]
    return flat[0] and (target is None or recalls[-1] >= target - NPROBES_TOLERANCE or flat[1])


def _single_query_ms(lists: InvertedLists, codec, xq: np.ndarray, nprobes: int) -> float:
    times = []
    for q in xq:
        start = time.perf_counter()
        search_lists(lists, codec, q[None], 10, nprobes)
        times.append(time.perf_counter() - start)
    return round(float(np.median(times)) * 1000, 3)


@functools.lru_cache(maxsize=16)
def open_lists(spec: ListsSpec) -> InvertedLists:
    """A version's lists, kept open per process (a table handle's searches reuse them)."""
    return InvertedLists(spec)


def build_and_measure(relative, spec: ListsSpec, files: list[str], executor, *, xq: np.ndarray,
                   qpos: np.ndarray, truth: np.ndarray, found: np.ndarray | None, codec, rows: RowMap) -> dict:
    """Build the inverted lists from the tasks' files (removed after; the rows `rows` drops
    left out, the others listed by their table row), and measure their search of the
    held-out queries along the nprobes grid against the encode pass's exhaustive search over
    the table's codes (`found`; `truth`, `qpos` and `found` in table rows): the manifest's
    `partitions` record."""
    start = time.perf_counter()
    sizes = build_lists(executor, spec, files, dropped=rows.dropped)
    storage.remove_tree(spec.parts_uri)
    built = time.perf_counter() - start
    exhaustive = recall_table(truth, found, int(sizes.sum())) if found is not None else \
        {"recall_at_10": None}
    measured = measure_nprobes(InvertedLists(spec), load_codec(codec), xq, qpos, truth, int(sizes.sum()), exhaustive)
    log.info("inverted lists: %d partitions (%d to %d rows), built in %.1fs; default nprobes %d: recall@10 %s "
             "(the table's codes, every one scored: %s)", spec.nlist, sizes.min(), sizes.max(), built,
             measured["default_nprobes"], _recall_at(measured, measured["default_nprobes"]), exhaustive["recall_at_10"])
    return {**measured, "uri": relative(spec.uri), "num_groups": spec.num_groups,
            "coarse": {**spec.coarse.to_dict(), "uri": relative(spec.coarse.uri)},
            "residual": spec.residual and {**spec.residual.to_dict(), "uri": relative(spec.residual.uri)},
            "sizes": {"min": int(sizes.min()), "max": int(sizes.max()), "empty": int((sizes == 0).sum())},
            "build_seconds": round(built, 3), "seconds": round(time.perf_counter() - start, 3)}


def _recall_at(measured: dict, nprobes: int):
    return next((r["recall_at_10"] for r in measured["grid"] if r["nprobes"] == nprobes), None)


def version_lists(out: str, manifest: dict) -> InvertedLists | None:
    """A version's inverted lists (open, kept per process), or None without partitions."""
    entry = manifest.get("partitions")
    if not entry:
        return None
    coarse, table = manifest_codec(out, entry["coarse"]), manifest_codec(out, manifest["codec"])
    residual = manifest_codec(out, entry.get("residual"))
    return open_lists(ListsSpec(storage.join(storage.normalize(out), entry["uri"]), coarse, entry["nlist"],
                                entry["num_groups"], (residual or table).code_size, residual, table))
