"""Quality measures for compressed vectors."""

from __future__ import annotations

import numpy as np

#: the k of the recall@k every evaluation reports (each one its neighbours allow)
RECALL_KS = (1, 10, 100)
#: the re-rank factors r of recall@k after exact re-ranking of r x k candidates
RERANK_FACTORS = (1, 2, 4, 10)


def knn_recall(I_true: np.ndarray, I_found: np.ndarray, k: int) -> float:
    """k-recall@k: the share of the true k nearest neighbours found among the k returned,
    averaged over queries. Ids < 0 (missing results) never match."""
    hits, denom = knn_hits(I_true, I_found, k)
    return float(hits.sum() / denom.sum()) if denom.sum() else 0.0


def query_recalls(I_true: np.ndarray, I_found: np.ndarray, k: int) -> np.ndarray:
    """Per query, the share of its true k nearest neighbours among the k returned."""
    hits, denom = knn_hits(I_true, I_found, k)
    return hits / np.maximum(denom, 1)


def difference_standard_error(a: np.ndarray, b: np.ndarray) -> float:
    """The standard error of the mean per-query difference of two recalls (query_recalls of
    the same queries); inf for fewer than two queries."""
    return float(np.std(a - b, ddof=1) / np.sqrt(len(a))) if len(a) > 1 else float("inf")


def knn_hits(I_true: np.ndarray, I_found: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per query: (how many of its true k nearest neighbours are among the k returned, how
    many true neighbours it has: k unless ids < 0 pad them). knn_recall is their ratio of sums."""
    if I_true.shape[0] == 0:
        raise ValueError("knn_recall needs at least one query")
    t = I_true[:, :k]
    f = I_found[:, :k]
    hits = np.zeros(len(t), np.int64)
    denom = np.zeros(len(t), np.int64)
    for i, (row_t, row_f) in enumerate(zip(t, f)):
        row_t = row_t[row_t >= 0]
        denom[i] = len(row_t)
        hits[i] = np.intersect1d(row_t, row_f[row_f >= 0], assume_unique=False).size
    return hits, denom


def relative_error(x: np.ndarray, x_rec: np.ndarray) -> float:
    """sum ||x - decode(encode(x))||^2 / sum ||x||^2 over the sample (faiss's convention)."""
    x = np.asarray(x, np.float64)
    num = float(((x - np.asarray(x_rec, np.float64)) ** 2).sum())
    den = float((x**2).sum())
    return num / den if den > 0 else 0.0


def reranked(I: np.ndarray, E: np.ndarray, k: int, r: int) -> np.ndarray:
    """The k best of the first r*k candidates (in approximate order) by exact distance E:
    what a search that re-ranks r x k candidates returns."""
    c = min(r * k, I.shape[1])
    order = np.argsort(E[:, :c], axis=1, kind="stable")[:, :k]
    out = np.take_along_axis(I[:, :c], order, axis=1)
    out[~np.isfinite(np.take_along_axis(E[:, :c], order, axis=1))] = -1
    return out


def recall_table(truth: np.ndarray, I: np.ndarray, num_rows: int, E: np.ndarray | None = None) -> dict:
    """recall@1/10/100 of ADC results I, and with exact re-ranking of r x k candidates (E: the
    exact distances of I's candidates) for every r x k that I holds."""
    k = I.shape[1]
    ev = {f"recall_at_{kk}": knn_recall(truth, I, kk) if kk <= k and kk <= num_rows - 1 else None
          for kk in RECALL_KS}
    if E is not None:
        ev["rerank"] = {str(r): {f"recall_at_{kk}": knn_recall(truth, reranked(I, E, kk, r), kk)
                                 for kk in RECALL_KS if r * kk <= k and kk <= num_rows - 1}
                        for r in RERANK_FACTORS}
    return ev
