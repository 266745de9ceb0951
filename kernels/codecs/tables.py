"""Distances from queries to additive codes (RQ, LSQ) by look-up tables, for codes stored
relative to a centroid, or as they are (the inverted lists' codes: pipeline.lists).

A code's reconstruction is the sum of one entry of each of its M codebooks, r = sum_m B_m[j_m],
so a query's inner product with it is a sum of M table entries, <q, r> = sum_m T_q[m, j_m]
with T_q[m, j] = <q, B_m[j]> (`query_tables`: M x 256 products, once per query). Under L2, a
row stored as centroid c plus residual code r is at

    |q - c - r|^2 = |q - c|^2 + (|r|^2 + 2 <c, r>) - 2 <q, r>

from query q: the bracket is the row's own (`code_terms`, computed once when the lists are
built), |q - c|^2 one number per query and partition, so a code costs M look-ups instead of
decoding it (M x d) for every query that probes it, which is what faiss's search over such
codes does (RQ64x8 at 768-d: 0.93 s a query at 64 of 512 partitions). Under inner product,
<q, c + r> = <q, c> + <q, r> needs no term.

Every quantity is computed one query (or row) at a time in the same order, so a query's
distances are the same bytes searched alone or in a batch of any size.
"""

from __future__ import annotations

import numpy as np

from vecpress.kernels._faiss import faiss
from vecpress.kernels.codecs.build import _innermost

#: rows decoded at a time for code_terms
_BLOCK = 16_384


def table_codebooks(index) -> np.ndarray | None:
    """The (M, 256, d) codebooks of trained faiss index `index` where its codes are M bytes,
    each the number of one codebook's entry, summed to decode (an RQ or LSQ of 8-bit
    codebooks, no pre-transform, no norm in the code); None for any other codec."""
    chain, inner = _innermost(index)
    if chain or not isinstance(inner, (faiss.IndexResidualQuantizer, faiss.IndexLocalSearchQuantizer)) \
            or not inner.is_trained:
        return None
    aq = faiss.downcast_AdditiveQuantizer(inner.aq)
    plain = (faiss.AdditiveQuantizer.ST_decompress, faiss.AdditiveQuantizer.ST_LUT_nonorm)
    if int(aq.search_type) not in plain or (faiss.vector_to_array(aq.nbits) != 8).any() \
            or int(inner.sa_code_size()) != int(aq.M):
        return None
    return faiss.vector_to_array(aq.codebooks).reshape(int(aq.M), 256, int(aq.d))


def query_tables(books: np.ndarray, xq: np.ndarray) -> np.ndarray:
    """(nq, M, 256) float32 tables T[q, m, j] = <xq[q], books[m, j]>, one product per query
    (the same bytes in a batch of any size)."""
    flat = np.ascontiguousarray(books.reshape(-1, books.shape[2]), dtype=np.float32)
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    out = np.empty((len(xq), flat.shape[0]), np.float32)
    for q in range(len(xq)):
        out[q] = flat @ xq[q]
    return out.reshape(len(xq), books.shape[0], books.shape[1])


def table_sums(tables: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """(nq, n) float32 inner products <q, r> of the queries whose `tables` these are with the
    reconstructions of `codes` (n, M): their M entries summed in codebook order."""
    codes = np.ascontiguousarray(np.asarray(codes, np.uint8).T)
    out = np.zeros((tables.shape[0], codes.shape[1]), np.float32)
    for m in range(codes.shape[0]):
        out += tables[:, m, :][:, codes[m]]
    return out


def code_terms(codec_decode, codes: np.ndarray, centroids: np.ndarray | None) -> np.ndarray:
    """(n,) float32 |r|^2 + 2 <c, r> of each row: r its code decoded (`codec_decode(codes)`:
    the reconstructions), c its centroid (`centroids`: one row per code; None: codes stored
    as they are, |r|^2)."""
    out = np.empty(len(codes), np.float32)
    for i in range(0, len(codes), _BLOCK):
        r = codec_decode(codes[i:i + _BLOCK])
        out[i:i + _BLOCK] = np.einsum("ij,ij->i", r, r if centroids is None else r + 2 * centroids[i:i + _BLOCK])
    return out


def l2_by_tables(tables: np.ndarray, codes: np.ndarray, terms: np.ndarray, xq: np.ndarray,
                 centroid: np.ndarray) -> np.ndarray:
    """(nq, n) float32 squared L2 distances from queries `xq` (whose `tables` these are) to
    rows stored as `centroid` plus the residual `codes` whose code_terms are `terms`; negative
    rounding clipped to 0."""
    diff = np.asarray(xq, np.float32) - centroid
    base = np.square(diff).sum(axis=1, dtype=np.float32)
    d = (base[:, None] + terms[None, :]) - 2 * table_sums(tables, codes)
    return np.maximum(d, 0, out=d)
