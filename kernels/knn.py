"""Exact k nearest neighbours and the top-k merge used to combine per-shard results.

Distances are always "smaller is better": inner-product scores are negated, so results from
any metric merge the same way. Ids are int64 positions chosen by the caller (global row
positions in vecpress), -1 for "no result".
"""

from __future__ import annotations

import functools

import numpy as np

from vecpress.kernels._faiss import faiss, num_gpus

METRICS = ("l2", "ip", "cosine")
#: the largest k faiss's GPU brute force selects (GPU_MAX_SELECTION_K); a larger k (e.g.
#: --eval-k 5000) is searched on the CPU instead of failing mid-run
GPU_MAX_K = 2048


def faiss_metric(metric: str) -> int:
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {', '.join(METRICS)}")
    return faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT


def prepare_vectors(x: np.ndarray, metric: str) -> np.ndarray:
    """float32, C-contiguous, and unit-normalised for cosine (cosine = normalise, then IP; a
    row of zeros stays zeros). The caller's array is never changed. The norms come from one
    pass (einsum), and the rows are divided into one new array: np.linalg.norm squares the
    whole array into a temporary first, and a copy to divide in place is another, which made
    this 2-3x slower (the advisor's first stage prepares its rows once per candidate)."""
    given = x
    x = np.ascontiguousarray(x, dtype=np.float32)
    if metric == "cosine":
        norms = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
        norms[norms == 0] = 1.0
        x = np.divide(x, norms, out=None if np.may_share_memory(x, given) else x)
    return x


def as_distances(D: np.ndarray, metric: str) -> np.ndarray:
    """faiss scores -> smaller-is-better distances."""
    return D if metric == "l2" else -D


@functools.lru_cache(maxsize=1)
def _gpu_resources():
    """One faiss StandardGpuResources per process: creating one per call costs a temp-memory
    allocation and a cuBLAS handle each time."""
    return faiss.StandardGpuResources()


def gpu_knn(k: int, ngpu: int) -> bool:
    """Whether exact_knn(..., k, ngpu=ngpu) searches on a GPU: GPUs asked for and seen, k within
    faiss's GPU selection."""
    return k <= GPU_MAX_K and num_gpus(ngpu) > 0


def exact_knn(xq: np.ndarray, xb: np.ndarray, k: int, metric: str, *, ngpu: int = 0, device: int = -1):
    """Brute-force k-NN of prepared queries over prepared base vectors; on a GPU (`gpu_knn`),
    GPU number `device` (-1: the thread's current CUDA device).

    Returns (D, I) with D smaller-is-better and I indexes into xb (-1 where xb has < k rows).
    """
    k_eff = min(k, xb.shape[0])
    mt = faiss_metric(metric)
    if k_eff == 0:
        return np.full((xq.shape[0], k), np.inf, np.float32), np.full((xq.shape[0], k), -1, np.int64)
    if gpu_knn(k_eff, ngpu):
        D, I = faiss.knn_gpu(_gpu_resources(), xq, xb, k_eff, metric=mt, device=device)
    else:
        D, I = faiss.knn(xq, xb, k_eff, metric=mt)
    D = as_distances(D, metric).astype(np.float32)
    if k_eff < k:
        pad = k - k_eff
        D = np.hstack([D, np.full((D.shape[0], pad), np.inf, np.float32)])
        I = np.hstack([I, np.full((I.shape[0], pad), -1, np.int64)])
    return D, I


def order_by_distance_then_id(D: np.ndarray, I: np.ndarray, k: int | None = None) -> np.ndarray:
    """Each row's column order by (distance, id), its first `k` (all by default).

    A quicksort of the distances, then the rows where two finite distances tie within the
    first k + 1 are sorted again by (distance, id): 5-10x faster than sorting every row on
    both keys, for results where ties are rare (nq x 200 results: 1.2 ms against 12)."""
    n = D.shape[1]
    k = n if k is None else min(k, n)
    order = np.argsort(D, axis=1)
    head = np.take_along_axis(D, order[:, :min(k + 1, n)], axis=1)
    ties = ((head[:, 1:] == head[:, :-1]) & np.isfinite(head[:, 1:])).any(axis=1)
    if ties.any():
        order[ties] = np.lexsort((I[ties], D[ties]), axis=1)
    return order[:, :k]


class TopK:
    """Running k smallest distances per query, merged from any number of partial results.

    Results rank by (distance, id): among equal distances the smaller id (the earlier row)
    wins, so partial results merge to the same top-k in any order (shards that finish in any
    order, batches of any size). `add` takes ids local to a block and its `offset`.

    `exclude[q]` is an id never kept for query q (the query's own row, when queries are held
    out from the corpus itself), so a query does not count itself as its own neighbour.
    With `with_extra`, each result carries one more float (e.g. its exact distance, when D is
    an approximate one) that follows it through the merge: `E`.

    Blocks are merged a few at a time (once they hold MERGE_COLUMNS columns, or when a result
    is read), so many small blocks cost about what a few large ones do.
    """

    #: columns of pending blocks that trigger a merge
    MERGE_COLUMNS = 1024

    def __init__(self, num_queries: int, k: int, exclude: np.ndarray | None = None, *, with_extra: bool = False):
        self.k = k
        self._D = np.full((num_queries, k), np.inf, np.float32)
        self._I = np.full((num_queries, k), -1, np.int64)
        self._E = np.full((num_queries, k), np.inf, np.float32) if with_extra else None
        self.exclude = None if exclude is None else np.asarray(exclude, np.int64).reshape(-1, 1)
        self._pending: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]] = []
        self._pending_columns = 0

    def add(self, D: np.ndarray, I: np.ndarray, E: np.ndarray | None = None, *, offset: int = 0) -> None:
        """Merge a block of results: D (smaller is better), ids I (-1 = none) counted from
        `offset`, and with `with_extra` the extra value E of each."""
        I = np.asarray(I, np.int64)
        if offset:
            I = np.where(I >= 0, I + offset, -1)
        if self._E is not None and E is None:
            raise ValueError("this TopK carries an extra value per result: pass E")
        self._pending.append((np.asarray(D, np.float32), I, None if self._E is None else np.asarray(E, np.float32)))
        self._pending_columns += I.shape[1]
        if self._pending_columns >= max(self.MERGE_COLUMNS, 2 * self.k):
            self._merge()

    def _merge(self) -> None:
        if not self._pending:
            return
        allD = np.hstack([self._D, *(p[0] for p in self._pending)])
        allI = np.hstack([self._I, *(p[1] for p in self._pending)])
        if self.exclude is not None:
            allD = np.where(allI == self.exclude, np.inf, allD)
        allD = np.where(allI < 0, np.inf, allD)
        order = order_by_distance_then_id(allD, allI, self.k)
        self._D = np.take_along_axis(allD, order, axis=1)
        self._I = np.take_along_axis(allI, order, axis=1)
        self._I[~np.isfinite(self._D)] = -1
        if self._E is not None:
            self._E = np.take_along_axis(np.hstack([self._E, *(p[2] for p in self._pending)]), order, axis=1)
        self._pending, self._pending_columns = [], 0

    @property
    def D(self) -> np.ndarray:
        self._merge()
        return self._D

    @property
    def I(self) -> np.ndarray:  # noqa: E743 (faiss's name)
        self._merge()
        return self._I

    @property
    def E(self) -> np.ndarray | None:
        self._merge()
        return self._E

    def result(self):
        return self.D, self.I


def pair_distances(xq: np.ndarray, x: np.ndarray, metric: str) -> np.ndarray:
    """Exact smaller-is-better distance between row i of xq and row i of x (prepared vectors)."""
    if metric == "l2":
        return ((xq - x) ** 2).sum(axis=1).astype(np.float32)
    return -(xq * x).sum(axis=1).astype(np.float32)


def candidate_distances(xq: np.ndarray, x: np.ndarray, I: np.ndarray, metric: str) -> np.ndarray:
    """Exact distances of each query to its candidates I (rows of x, -1 = none -> inf).

    faiss's by-index SIMD kernels read each candidate row in place: no (nq x c x d) gather,
    80x numpy's gather-and-sum at 1000 x 101 candidates of 384-d (one core)."""
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    x = np.ascontiguousarray(x, dtype=np.float32)
    nq, c = I.shape
    if nq == 0 or c == 0 or x.shape[0] == 0:
        return np.full((nq, c), np.inf, np.float32)
    safe = np.ascontiguousarray(np.where(I >= 0, I, 0), dtype=np.int64)
    out = np.empty((nq, c), np.float32)
    by_idx = faiss.fvec_L2sqr_by_idx if metric == "l2" else faiss.fvec_inner_products_by_idx
    by_idx(faiss.swig_ptr(out), faiss.swig_ptr(xq), faiss.swig_ptr(x), faiss.swig_ptr(safe), xq.shape[1], nq, c)
    return np.where(I >= 0, out if metric == "l2" else -out, np.inf).astype(np.float32)
