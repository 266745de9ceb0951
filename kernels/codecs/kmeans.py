"""faiss's k-means one iteration at a time, so that a long clustering (an IVF's partitions:
thousands of centroids over up to 256 sampled rows each) reports each iteration done and the
caller can say how long is left.

faiss's Clustering.train runs every iteration in one call. Given starting centroids it uses
them as they are, draws the same subsample for the same seed, and splits empty clusters with a
generator seeded afresh in each iteration; so `niter` calls of one iteration, each starting
from the last one's centroids, give the centroids of one call of `niter` iterations, byte for
byte (tests/kernels/test_kmeans.py). That holds for one run (nredo 1) and no early stop, which
`iterates` checks; otherwise the caller clusters in one call.
"""

from __future__ import annotations

import numpy as np

from vecpress.kernels._faiss import faiss


def iterates(cp) -> bool:
    """Whether k-means with these ClusteringParameters can run one iteration at a time."""
    return int(cp.nredo) == 1 and float(getattr(cp, "early_stop_threshold", 0.0)) == 0.0 and int(cp.niter) >= 1


def kmeans_by_iteration(x: np.ndarray, k: int, cp, metric_type: int, progress=None, *, assign=None) -> np.ndarray:
    """The (k, d) centroids of faiss.Clustering(d, k, cp) trained on `x` with a flat index of
    `metric_type` assigning (`iterates(cp)` must hold), calling `progress(done, niter)` after
    each iteration. `assign`: the flat index to assign with, of `metric_type` (a GPU's, as
    faiss's IVF training takes one as its clustering_index; faiss resets it in each
    iteration); by default one on the CPU. `cp` is left as it was."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    d, niter = x.shape[1], int(cp.niter)
    centroids = None
    cp.niter = 1
    try:
        for done in range(1, niter + 1):
            clustering = faiss.Clustering(d, k, cp)
            if centroids is not None:
                faiss.copy_array_to_vector(centroids, clustering.centroids)
            clustering.train(x, faiss.IndexFlat(d, metric_type) if assign is None else assign)
            centroids = faiss.vector_to_array(clustering.centroids)
            if progress is not None:
                progress(done, niter)
    finally:
        cp.niter = niter
    return centroids.reshape(k, d)
