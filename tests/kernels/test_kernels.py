"""kernels: codecs, exact k-NN, top-k merging and metrics, against brute-force references."""

from __future__ import annotations

import numpy as np
import pytest

from vecpress.kernels.codecs.build import check_codec_spec
from vecpress.kernels.codecs.codec import Codec
from vecpress.kernels.codecs.spec import CodecSpecError
from vecpress.kernels.knn import TopK, candidate_distances, exact_knn, prepare_vectors
from vecpress.kernels.metrics import difference_standard_error, knn_hits, knn_recall, query_recalls, relative_error, \
    reranked
from vecpress.kernels.synthetic import ClusteredEmbeddings, PowerLawEmbeddings

SPECS = ["PQ8", "PQ8x4", "OPQ8,PQ8", "RQ4x8", "SQ8", "SQfp16"]


@pytest.fixture(scope="module")
def data():
    gen = ClusteredEmbeddings(32, seed=3, num_clusters=32)
    return gen.batch(0, 4000), gen.batch(10_000, 50)


def brute_force(xq, xb, k, metric):
    xq, xb = prepare_vectors(xq, metric), prepare_vectors(xb, metric)
    if metric == "l2":
        D = ((xq[:, None, :] - xb[None, :, :]) ** 2).sum(-1)
    else:
        D = -(xq @ xb.T)
    return np.argsort(D, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_codec_round_trip_and_adc_search(data, spec, metric):
    xb, xq = data
    codec = Codec.train(xb[:3000], spec, metric, seed=1)
    again = Codec.from_bytes(codec.to_bytes(), spec=spec, metric=metric)
    codes = again.encode(xb)
    assert codes.shape == (len(xb), codec.code_size) and codes.dtype == np.uint8
    assert np.array_equal(codes, codec.encode(xb))
    err = relative_error(prepare_vectors(xb, metric), again.decode(codes))
    assert err < {"SQfp16": 1e-6, "SQ8": 1e-3}.get(spec, 0.25)
    D, I = again.search_codes(xq, codes, 10)
    assert (np.diff(D, axis=1) >= -1e-5).all(), "results sorted by distance"
    # ADC search ranks like exact search over the decoded vectors (by L2 under cosine)
    decoded_truth = brute_force(prepare_vectors(xq, metric), again.decode(codes), 10, "ip" if metric == "ip" else "l2")
    assert knn_recall(decoded_truth, I, 10) > 0.9
    assert knn_recall(brute_force(xq, xb, 10, metric), I, 10) > (0.9 if spec.startswith("SQ") else 0.2)


def test_training_is_deterministic_and_seeded(data):
    xb, _ = data
    a = Codec.train(xb[:3000], "PQ8", "l2", seed=5).encode(xb)
    b = Codec.train(xb[:3000], "PQ8", "l2", seed=5).encode(xb)
    c = Codec.train(xb[:3000], "PQ8", "l2", seed=6).encode(xb)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_checksum_is_verified(data):
    codec = Codec.train(data[0][:1000], "SQ8", "l2")
    blob = codec.to_bytes()
    with pytest.raises(ValueError, match="checksum"):
        Codec.from_bytes(blob, spec="SQ8", metric="l2", sha256="0" * 64)


@pytest.mark.parametrize("spec,dim,num_train,needle", [
    ("PQ7", 32, 5000, "m must divide dim=32"),
    ("IVF16,PQ8", 32, 5000, "not a standalone codec"),
    ("NOPE", 32, 5000, "could not parse"),
    ("PQ8x10", 32, 500, "at least 1024 training vectors"),
])
def test_impossible_specs_are_rejected(spec, dim, num_train, needle):
    with pytest.raises(CodecSpecError, match=needle):
        check_codec_spec(spec, dim, "l2", num_train)


@pytest.mark.parametrize("spec,size", [("PQ8", 8), ("PQ8x4", 4), ("OPQ8,PQ8", 8), ("RQ4x8", 4), ("SQ8", 32), ("SQfp16", 64)])
def test_code_sizes(spec, size):
    assert check_codec_spec(spec, 32, "l2", 5000) == size


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
def test_sharded_exact_knn_equals_brute_force(data, metric):
    xb, xq = data
    truth = brute_force(xq, xb, 20, metric)
    top = TopK(len(xq), 20)
    for lo in range(0, len(xb), 700):
        D, I = exact_knn(prepare_vectors(xq, metric), prepare_vectors(xb[lo:lo + 700], metric), 20, metric)
        top.add(D, np.where(I >= 0, I + lo, -1))
    assert knn_recall(truth, top.I, 20) > 0.999


def test_topk_excludes_own_row():
    top = TopK(2, 2, exclude=np.array([0, 5]))
    top.add(np.array([[0.0, 1.0, 2.0], [0.0, 0.5, 3.0]]), np.array([[0, 1, 2], [5, 6, 7]]))
    assert top.I.tolist() == [[1, 2], [6, 7]]


def test_knn_recall_counts_overlap():
    truth = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
    found = np.array([[4, 3, 9, 9], [5, -1, -1, -1]])
    assert knn_recall(truth, found, 4) == pytest.approx((2 + 1) / 8)
    assert knn_recall(truth, found, 1) == pytest.approx(0.5)
    # per query (the first stage's standard errors); a truth padded with -1 counts its real ones
    truth[1, 2:] = -1
    hits, true = knn_hits(truth, found, 4)
    assert hits.tolist() == [2, 1] and true.tolist() == [4, 2]
    assert knn_recall(truth, found, 4) == pytest.approx(3 / 6)
    assert query_recalls(truth, found, 4).tolist() == [0.5, 0.5]
    a, b = np.array([1.0, 0.5, 0.5, 1.0]), np.array([0.5, 0.5, 0.0, 0.5])  # differences 0.5, 0, 0.5, 0.5
    assert difference_standard_error(a, b) == pytest.approx(np.std([0.5, 0, 0.5, 0.5], ddof=1) / 2)
    assert difference_standard_error(a[:1], b[:1]) == float("inf")


def test_rerank_orders_candidates_by_exact_distance(data):
    xb, xq = data
    cand = np.tile(np.arange(40), (len(xq), 1))
    E = candidate_distances(xq, xb, cand, "l2")
    assert np.array_equal(reranked(cand, E, 5, 8), brute_force(xq, xb[:40], 5, "l2"))
    # only the first r x k candidates count
    assert np.array_equal(reranked(cand, E, 5, 2), brute_force(xq, xb[:10], 5, "l2"))
    cand[:, 3] = -1
    assert (reranked(cand, candidate_distances(xq, xb, cand, "l2"), 5, 8) != 3).all()


def test_synthetic_data_is_reproducible_and_structured():
    g = ClusteredEmbeddings(64, seed=1)
    a, b = g.batch(100, 500), ClusteredEmbeddings(64, seed=1).batch(100, 500)
    assert np.array_equal(a, b)
    # structure: nearest neighbours are much closer than random pairs
    d_nn = np.sort(((a[:50, None] - a[None]) ** 2).sum(-1), axis=1)[:, 1].mean()
    d_rand = ((a[:50] - a[50:100]) ** 2).sum(-1).mean()
    assert d_nn < 0.5 * d_rand


def test_power_law_embeddings_are_reproducible_and_their_spectrum_falls_off_as_asked():
    a = PowerLawEmbeddings(96, seed=2, decay=0.9).batch(10, 4000)
    assert a.dtype == np.float32 and a.shape == (4000, 96)
    assert np.array_equal(a, PowerLawEmbeddings(96, seed=2, decay=0.9).batch(10, 4000))
    assert not np.array_equal(a, PowerLawEmbeddings(96, seed=2, decay=0.9).batch(11, 4000))
    variances = np.sort(np.linalg.eigvalsh(np.cov(a.T.astype(np.float64))))[::-1]
    # the slope of log variance against log rank, over the axes well inside the spectrum
    ranks = np.arange(4, 64)

    def slope(v):
        return np.polyfit(np.log(ranks + 1), np.log(v[ranks]), 1)[0]

    assert -1.1 < slope(variances) < -0.7
    flat = np.sort(np.linalg.eigvalsh(np.cov(PowerLawEmbeddings(96, seed=2, decay=0.0).batch(0, 4000).T)))[::-1]
    assert -0.3 < slope(flat) <= 0


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["PQ8", "RQ4x8"])
def test_gpu_training_matches_cpu_quality(data, spec):
    xb, _ = data
    cpu = Codec.train(xb[:3000], spec, "l2", seed=1, ngpu=0)
    gpu = Codec.train(xb[:3000], spec, "l2", seed=1, ngpu=-1)
    e_cpu = relative_error(xb, cpu.decode(cpu.encode(xb)))
    e_gpu = relative_error(xb, gpu.decode(gpu.encode(xb)))
    assert e_gpu <= e_cpu * 1.05 + 1e-4  # same quality within 5%, not bit-identical
    # a GPU-trained codec serialises as a plain CPU codec
    assert Codec.from_bytes(gpu.to_bytes(), spec=spec, metric="l2").code_size == gpu.code_size


@pytest.mark.gpu
def test_gpu_exact_knn_equals_cpu_within_and_past_the_gpu_top_k(data):
    from vecpress.kernels.knn import GPU_MAX_K, gpu_knn

    xb, xq = data
    xq, xb = prepare_vectors(xq, "l2"), prepare_vectors(xb, "l2")
    for k in (100, GPU_MAX_K + 1):  # the second is past faiss's GPU selection: searched on the CPU
        assert gpu_knn(k, -1) == (k <= GPU_MAX_K)
        D_gpu, I_gpu = exact_knn(xq, xb, k, "l2", ngpu=-1)
        D_cpu, I_cpu = exact_knn(xq, xb, k, "l2", ngpu=0)
        np.testing.assert_allclose(D_gpu, D_cpu, rtol=1e-4, atol=1e-3)
        assert (I_gpu == I_cpu).mean() > 0.99  # ties aside
