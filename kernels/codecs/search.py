"""The search over stored codes (`search_codes`, `search_device`): faiss's ADC for
quantizers, Hamming distance for binary codes, and where it pays (or on a GPU) a brute-force
search over the decoded codes; equal distances rank by row, on every route.

Under cosine, codes rank by the unit query's L2 distance to each code's reconstruction
(`searched_index`), reported as the negated similarity it estimates (1 - L2^2 / 2: the cosine
itself for an exact reconstruction). A reconstruction's norm is not 1, and ranking by the
inner product with it favours the codes decoded long: by L2, recall@10 on 384-d text
embeddings rises from 0.686 to 0.825 for RQ16x8, 0.632 to 0.816 for EDEN2, 0.907 to 0.954
for SQ4, 0.637 to 0.673 for PQ48 (BENCHMARKS.md, "Cosine codes ranked by L2")."""

from __future__ import annotations

import numpy as np

from vecpress.kernels._faiss import faiss, num_gpus
from vecpress.kernels.codecs.build import _innermost
from vecpress.kernels.codecs.residual import load_index
from vecpress.kernels.knn import (
    TopK, as_distances, candidate_distances, exact_knn, order_by_distance_then_id, prepare_vectors,
)


def searched_index(index, metric: str):
    """The index whose search ranks a codec's codes: its own, or under cosine a copy that ranks
    by L2 (the unit query's distance to each code's reconstruction). Additive codes without
    stored norms are then searched by decoding them (faiss's look-up tables for L2 need the
    norms); RaBitQ keeps its own estimator and binary codes their Hamming distance."""
    inner = _innermost(index)[1]
    if metric != "cosine" or isinstance(inner, (faiss.IndexLSH, faiss.IndexRaBitQ, faiss.IndexRaBitQFastScan)) \
            or inner.metric_type == faiss.METRIC_L2:
        return index
    view = load_index(faiss.serialize_index(index))  # (a copy: clone_index lacks some transforms)
    inner = _innermost(view)[1]
    inner.metric_type = faiss.METRIC_L2
    if isinstance(inner, faiss.IndexAdditiveQuantizer) and \
            int(inner.aq.search_type) == faiss.AdditiveQuantizer.ST_LUT_nonorm:
        inner.aq.search_type = faiss.AdditiveQuantizer.ST_decompress  # (same bytes: no norm stored)
    return view


def _space(inner) -> str:
    """The distance an index ranks by: "l2", or "ip" (inner product)."""
    return "l2" if inner.metric_type == faiss.METRIC_L2 else "ip"


def search_codes(index, metric: str, xq: np.ndarray, codes: np.ndarray, k: int, *, ngpu: int = 0,
                 device: int = -1):
    """Codec.search_codes of the codec whose trained faiss index is `index`, as
    `searched_index(index, metric)` gives it, serving `metric` (see there). Returns (D, I): D
    smaller-is-better, I row indexes into `codes` (-1 when fewer than k)."""
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    nq = np.asarray(xq).shape[0]
    if codes.shape[0] == 0 or k == 0:
        return np.full((nq, k), np.inf, np.float32), np.full((nq, k), -1, np.int64)
    if isinstance(_innermost(index)[1], faiss.IndexLSH):  # binary codes (Codec.is_binary)
        searcher = faiss.IndexBinaryFlat(8 * int(index.sa_code_size()))
        searcher.add(codes)
        D, I = searcher.search(_binary_query_codes(index, metric, xq), k)
        D = D.astype(np.float32)
    else:
        xq = prepare_vectors(xq, metric)
        chain, inner = _innermost(index)
        for vt in chain:
            xq = vt.apply(xq)
        on_gpu = _searches_on_gpu(inner, ngpu)
        if on_gpu or _decoded_search_pays(inner, nq):
            D, I = _search_decoded(inner, xq, codes, k, ngpu=ngpu if on_gpu else 0, device=device)
        else:
            D, I = _code_searcher(inner, codes).search(xq, k)
            D = as_distances(D, _space(inner)).astype(np.float32)
            if _reconstruction_search(inner) is not None:  # as _search_decoded's, to the bit
                D = _code_distances(inner, xq, codes, I, _space(inner))
        D = _as_metric(D, inner, metric)  # (then sorted again: d / 2 - 1 may round two apart into a tie)
    D[I < 0] = np.inf
    # faiss's heaps keep the first rows among equal distances, but list them last row
    # first for inner products and Hamming: ties rank by row here, as in TopK's merges
    D, I = _by_distance_then_row(D, I)
    return D, I.astype(np.int64)


def _as_metric(D: np.ndarray, inner, metric: str) -> np.ndarray:
    """Distances in the index's space as `metric` reports them: under cosine, an L2 distance d
    of a unit query as the negated similarity it estimates, d / 2 - 1 (the same order)."""
    return l2_as_cosine(D) if metric == "cosine" and _space(inner) == "l2" else D


def l2_as_cosine(D: np.ndarray) -> np.ndarray:
    """Squared L2 distances from unit queries -> negated cosine similarity estimates, d / 2 - 1
    (exact for unit vectors; the same order; inf stays inf)."""
    return (D * np.float32(0.5) - np.float32(1.0)).astype(np.float32)


def search_device(index, ngpu: int = 0) -> str:
    """Where search_codes(index, ..., ngpu=ngpu) searches: "faiss-gpu" (decoded codes, GPU
    brute force) or "faiss-cpu"."""
    return "faiss-gpu" if _searches_on_gpu(_innermost(index)[1], ngpu) else "faiss-cpu"


def _binary_query_codes(index, metric: str, xq: np.ndarray) -> np.ndarray:
    """The queries' binary codes, as Codec.encode(xq) gives them (on the CPU: faiss's
    sa_encode of the prepared queries; a binary codec has no PQ codebook)."""
    x = prepare_vectors(xq, metric)
    if x.shape[0] == 0:
        return np.zeros((0, int(index.sa_code_size())), np.uint8)
    return index.sa_encode(x)


# search_codes decodes codes and runs a GEMM from this many queries on: for scalar codes, which
# faiss decodes per (query, row) pair; look-up tables from TABLE_GEMM_MIN_QUERIES, additive
# codes decoded per pair from ADDITIVE_GEMM_MIN_QUERIES
GEMM_MIN_QUERIES = 32
TABLE_GEMM_MIN_QUERIES = 256
# additive codes faiss decodes once per (query, row) pair (RQ, LSQ, PRQ without stored norms:
# the default, and cosine's L2 view) from this many queries on: decoding a row costs M x d, as
# much as the GEMM's whole work for it, so decoding each row once wins from the second query
# (RQ16x8, 50,000 rows of 384-d: 33 ms against 132 ms at 2 queries, 38 against 437 at 8)
ADDITIVE_GEMM_MIN_QUERIES = 2
DECODE_BLOCK_BYTES = 32 << 20  # decoded float32 rows per GEMM block


def _reconstruction_search(inner) -> str | None:
    """How faiss's search over this index's codes works where it ranks by the exact distance
    to each code's reconstruction, so that a search over the decoded codes ranks the same:
    "decode" (faiss decodes each (query, code) pair: scalar codes, ST_decompress additive
    codes) or "tables" (look-up tables: PQ, additive codes with exact norms). None for the
    others: fast-scan PQ and RaBitQ rank by quantized tables or estimates, and additive codes
    with quantized norms (ST_norm_qint8, ...) by an approximate norm."""
    if isinstance(inner, faiss.IndexScalarQuantizer):
        return "decode"
    if isinstance(inner, faiss.IndexPQFastScan):
        return None
    if isinstance(inner, faiss.IndexPQ):
        return "tables"
    if isinstance(inner, faiss.IndexAdditiveQuantizer):
        st = int(inner.aq.search_type)
        if st == faiss.AdditiveQuantizer.ST_decompress:
            return "decode"
        exact_tables = {faiss.AdditiveQuantizer.ST_norm_float, faiss.AdditiveQuantizer.ST_norm_from_LUT}
        if inner.metric_type == faiss.METRIC_INNER_PRODUCT:
            exact_tables.add(faiss.AdditiveQuantizer.ST_LUT_nonorm)  # IP needs no norm
        return "tables" if st in exact_tables else None
    return None


def _searches_on_gpu(inner, ngpu: int) -> bool:
    """Whether search_codes(..., ngpu) searches these codes on a GPU: GPUs asked for and seen,
    and a codec whose decoded codes rank as faiss's search ranks them."""
    return ngpu != 0 and num_gpus(ngpu) > 0 and _reconstruction_search(inner) is not None


def _decoded_search_pays(inner, nq: int) -> bool:
    """Whether search_codes should decode the codes and run a GEMM over them for `nq` queries
    on the CPU: faiss's search must rank by the exact distance to each reconstruction
    (`_reconstruction_search`, so both compute the same thing), and the GEMM must be the faster.

    Measured on one core (benchmarks/search_codes.py, BENCHMARKS.md): faiss decodes scalar
    codes and ST_decompress additive codes once per (query, row) pair, which a GEMM beats by
    1.5-3x and 30-190x from 32 queries on, and additive codes' 4-11x from 2 queries on
    (ADDITIVE_GEMM_MIN_QUERIES). Look-up-table search costs about 0.5 ns per table per pair
    against the GEMM's 0.026 ns per dimension plus a decode per row, so tables win below one
    table per 16 dimensions (RQ4x8 at 384-d) or below a few hundred queries."""
    how = _reconstruction_search(inner)
    if how is None:
        return False
    if how == "decode":
        additive = isinstance(inner, faiss.IndexAdditiveQuantizer)
        return nq >= (ADDITIVE_GEMM_MIN_QUERIES if additive else GEMM_MIN_QUERIES)
    tables = int(inner.pq.M) if isinstance(inner, faiss.IndexPQ) else int(inner.aq.M)
    return nq >= TABLE_GEMM_MIN_QUERIES and 16 * tables >= int(inner.d)


def _search_decoded(inner, xq: np.ndarray, codes: np.ndarray, k: int, *, ngpu: int = 0, device: int = -1):
    """Top-k of transformed queries over the codes' reconstructions, decoded in blocks (on
    the CPU) and searched by brute force (on `ngpu` GPUs, else the CPU's BLAS).

    Each distinct code is decoded and searched once, the distances of the codes found are
    computed again a pair at a time, and each code's rows follow it in row order: equal codes
    get equal distances, in this batch or another, on the CPU or a GPU, and rank by row, as in
    faiss's own search over the codes. Searched row by row by GEMM, a distance's rounding
    depended on the row's place in its block, and a GPU's selection orders ties as it likes:
    the evaluation's search differed between devices and batchings wherever codes repeat
    (coarse codes, duplicate vectors)."""
    uniq, inverse = _distinct_rows(codes)
    block = max(1024, DECODE_BLOCK_BYTES // (4 * int(inner.d)))
    if ngpu:
        block *= 8  # fewer, larger copies to the GPU
    space = _space(inner)  # (cosine queries are already unit; searched_index ranks their codes by L2)
    top = TopK(xq.shape[0], min(k, uniq.shape[0]))
    for start in range(0, uniq.shape[0], block):
        decoded = inner.sa_decode(uniq[start:start + block])
        D, I = exact_knn(xq, decoded, top.k, space, ngpu=ngpu, device=device)
        top.add(D, np.where(I >= 0, I + start, -1))
    # the found codes' distances again, a pair at a time: a GEMM's (CPU or GPU) depend on the
    # code's place in its block, and would rank equal codes of two batches by that place
    if uniq.shape[0] > block:
        D = _code_distances(inner, xq, uniq, top.I, space)
    else:  # (one block: its decoded codes are still in hand)
        D = candidate_distances(xq, decoded, top.I, space)
    if inverse is None:  # no code repeats: rank by (distance, row)
        return _widen(*_by_distance_then_row(D, top.I), k)
    return _rows_of_codes(D, top.I, inverse, k)


#: rows hashed at a time by _distinct_rows (its temporaries stay this size, whatever the codes')
HASH_BLOCK_ROWS = 65_536


def _code_distances(inner, xq: np.ndarray, codes: np.ndarray, I: np.ndarray, space: str) -> np.ndarray:
    """Distances of transformed queries to the codes I (rows of `codes`, -1 = none), a pair at
    a time on the decoded codes: a (query, code) pair gets the same distance whichever search
    found it (GEMM on a CPU or a GPU, faiss's look-up tables), so equal codes tie exactly."""
    is_found = np.zeros(codes.shape[0], bool)
    is_found[I[I >= 0]] = True
    decoded = inner.sa_decode(codes[is_found])
    return candidate_distances(xq, decoded, np.where(I >= 0, np.cumsum(is_found)[np.maximum(I, 0)] - 1, -1), space)


def _distinct_rows(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(distinct codes in the order of their first rows, each row's index among them), or
    (codes, None) when no code repeats. Rows are told apart by a 64-bit hash, in blocks of
    HASH_BLOCK_ROWS (about 4 ms per block where np.unique over whole rows takes 13-50), and
    checked byte for byte; np.unique over whole rows decides if two codes collide."""
    n, size = codes.shape
    if n < 2:
        return codes, None
    width = -(-size // 8) * 8
    weights = np.random.default_rng(size).integers(1, 1 << 63, width // 8, dtype=np.uint64) | np.uint64(1)
    hashes = np.empty(n, np.uint64)
    for lo in range(0, n, HASH_BLOCK_ROWS):
        block = codes[lo:lo + HASH_BLOCK_ROWS]
        if width != size:
            block = np.pad(block, ((0, 0), (0, width - size)))
        hashes[lo:lo + len(block)] = (np.ascontiguousarray(block).view(np.uint64) * weights).sum(axis=1,
                                                                                                 dtype=np.uint64)
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    if len(first) == n:
        return codes, None
    inverse = inverse.ravel()
    if any(not np.array_equal(codes[first[inverse[lo:lo + HASH_BLOCK_ROWS]]], codes[lo:lo + HASH_BLOCK_ROWS])
           for lo in range(0, n, HASH_BLOCK_ROWS)):  # a collision: compare whole rows
        _, first, inverse = np.unique(codes.view(np.dtype((np.void, size))).ravel(), return_index=True,
                                      return_inverse=True)
        inverse = inverse.ravel()
    order = np.argsort(first, kind="stable")  # by first row: equal distances then rank as rows do
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return np.ascontiguousarray(codes[first[order]]), rank[inverse]


def _rows_of_codes(D: np.ndarray, I: np.ndarray, inverse: np.ndarray, k: int):
    """Top-k rows from the top distinct codes (D, I; I indexes the distinct codes, `inverse`
    maps rows to them): each code's rows in row order, ranked by (distance, row). Codes are
    expanded in distance order while fewer than k rows come before them (or while they tie
    with the code that makes k), each by at most k rows."""
    nq, kc = I.shape
    if nq == 0 or kc == 0:
        return np.full((nq, k), np.inf, np.float32), np.full((nq, k), -1, np.int64)
    D, I = _by_distance_then_row(D, I)  # (distinct codes are numbered by first row)
    counts = np.bincount(inverse)
    by_code = np.argsort(inverse, kind="stable")  # rows grouped by code, in row order
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    code = np.where(I >= 0, I, 0)
    take = np.where(I >= 0, np.minimum(counts[code], k), 0)
    before = np.cumsum(take, axis=1) - take
    # the distance of the code that brings the rows to k (inf where they never get there)
    reach = np.argmax(before + take >= k, axis=1)
    bound = np.where((before + take)[:, -1] >= k, D[np.arange(nq), reach], np.inf)
    take[(before >= k) & (D > bound[:, None])] = 0
    take = take.ravel()
    total = int(take.sum())
    within = np.arange(total) - np.repeat(np.cumsum(take) - take, take)
    rows = by_code[np.repeat(starts[code.ravel()], take) + within]
    dist = np.repeat(D.ravel(), take)
    query = np.repeat(np.repeat(np.arange(nq), kc), take)
    order = np.lexsort((rows, dist, query))
    rows, dist, query = rows[order], dist[order], query[order]
    rank = np.arange(total) - np.searchsorted(query, np.arange(nq))[query]
    keep = rank < k
    outD = np.full((nq, k), np.inf, np.float32)
    outI = np.full((nq, k), -1, np.int64)
    outD[query[keep], rank[keep]] = dist[keep]
    outI[query[keep], rank[keep]] = rows[keep]
    return outD, outI


def _by_distance_then_row(D: np.ndarray, I: np.ndarray):
    """Each query's (D, I) sorted by distance, equal distances by id."""
    order = order_by_distance_then_id(D, I)
    return np.take_along_axis(D, order, axis=1), np.take_along_axis(I, order, axis=1)


def _widen(D: np.ndarray, I: np.ndarray, k: int):
    """(D, I) padded to k columns with (inf, -1)."""
    pad = ((0, 0), (0, k - D.shape[1]))
    return np.pad(D, pad, constant_values=np.inf), np.pad(I, pad, constant_values=-1)


def _code_searcher(inner, codes: np.ndarray):
    """An index holding `codes` that searches them with faiss's ADC."""
    if isinstance(inner, faiss.IndexPQFastScan):
        # fast-scan stores codes in blocked SIMD layout: load plain PQ codes, then convert
        plain = faiss.IndexPQ(int(inner.d), int(inner.pq.M), int(inner.pq.nbits), inner.metric_type)
        plain.pq = inner.pq
        plain.is_trained = True
        plain.add_sa_codes(codes)
        return faiss.IndexPQFastScan(plain)
    if isinstance(inner, faiss.IndexAdditiveQuantizer):
        # an index over `inner`'s own quantizer (not a copy: a clone of RQ32x8 copied 130 MB of
        # tables, 45 ms, once per partition a query probed)
        searcher = faiss.IndexAdditiveQuantizer(int(inner.d), inner.aq, inner.metric_type)
        searcher.referenced_objects = [inner]  # (the quantizer stays inner's)
    else:
        searcher = faiss.clone_index(inner)
        searcher.reset()
    searcher.add_sa_codes(codes)
    return searcher
