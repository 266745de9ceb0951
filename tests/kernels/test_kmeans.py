"""kernels.codecs.kmeans: faiss's k-means one iteration at a time is its k-means in one call,
byte for byte, and an IVF model trained so reports each iteration and is the same model."""

from __future__ import annotations

import numpy as np
import pytest

import vecpress.kernels.codecs.ivf as ivf_module
from vecpress.kernels._faiss import faiss
from vecpress.kernels.codecs.ivf import IvfModel
from vecpress.kernels.codecs.kmeans import iterates, kmeans_by_iteration
from vecpress.kernels.synthetic import ClusteredEmbeddings


@pytest.fixture(scope="module")
def x():
    return ClusteredEmbeddings(48, seed=4, num_clusters=30).batch(0, 12_000)


@pytest.mark.parametrize(("k", "metric_type", "spherical"), [
    (40, faiss.METRIC_L2, False),
    (30, faiss.METRIC_INNER_PRODUCT, True),
    (20, faiss.METRIC_L2, False),  # 20 x 256 < 12,000 rows: each call draws the same subsample
])
def test_one_iteration_at_a_time_is_one_call(x, k, metric_type, spherical):
    cp = faiss.ClusteringParameters()
    cp.seed, cp.niter, cp.spherical = 9, 7, spherical
    whole = faiss.Clustering(x.shape[1], k, cp)
    whole.train(x, faiss.IndexFlat(x.shape[1], metric_type))
    seen = []
    stepped = kmeans_by_iteration(x, k, cp, metric_type, lambda done, total: seen.append((done, total)))
    assert seen == [(i, 7) for i in range(1, 8)]
    assert cp.niter == 7  # (left as it was)
    assert np.array_equal(stepped, faiss.vector_to_array(whole.centroids).reshape(k, -1))


def test_what_iterates():
    cp = faiss.ClusteringParameters()
    assert iterates(cp)
    cp.nredo = 2  # the best of two runs: only in one call
    assert not iterates(cp)


@pytest.mark.parametrize(("spec", "metric", "steps"), [
    ("IVF64,FLAT", "l2", 10),
    ("IVF32,PQ8", "cosine", 11),  # faiss's 10 iterations, then the PQ
    ("IVF16,SQ", "ip", 10),
])
def test_ivf_training_reports_each_iteration_and_is_the_same_model(x, monkeypatch, spec, metric, steps):
    seen = []
    stepped = IvfModel.train(x, spec, metric, seed=2, ngpu=0, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(i, steps) for i in range(1, steps + 1)]
    monkeypatch.setattr(ivf_module, "iterates", lambda cp: False)  # faiss's train in one call
    whole = IvfModel.train(x, spec, metric, seed=2, ngpu=0)
    assert faiss.serialize_index(stepped.index).tobytes() == faiss.serialize_index(whole.index).tobytes()
    assert np.array_equal(stepped.encode(x[:500]), whole.encode(x[:500]))
