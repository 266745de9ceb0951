"""kernels.codecs.residual: residual quantizers trained stage by stage report each stage, and
train to the very bytes faiss's own ResidualQuantizer.train gives with the same per-stage
k-means; that k-means (faiss's progressive-dimension k-means with numpy's principal axes)
quantizes as faiss's does."""

from __future__ import annotations

import numpy as np
import pytest

import vecpress.kernels.codecs.residual as residual_module
import vecpress.kernels.codecs.train as train_module
from vecpress.kernels._faiss import faiss
from vecpress.kernels.codecs.build import _innermost, build_index
from vecpress.kernels.codecs.codec import Codec
from vecpress.kernels.codecs.residual import drop_cross_products, faiss_progressive_kmeans, progressive_kmeans, \
    residual_quantizers, trains_stagewise
from vecpress.kernels.codecs.search import _code_searcher
from vecpress.kernels.knn import prepare_vectors
from vecpress.kernels.synthetic import ClusteredEmbeddings

DIM = 64


@pytest.fixture(scope="module")
def xt():
    # 11,000 rows: over faiss's 39 per centroid for 8 bits, so the per-stage k-means is vecpress's
    return ClusteredEmbeddings(DIM, seed=5, num_clusters=60).batch(0, 11_000)


@pytest.fixture
def faiss_kmeans(monkeypatch):
    """Stage-by-stage training with faiss's per-stage k-means: then it is faiss's training."""
    monkeypatch.setattr(residual_module, "progressive_kmeans", faiss_progressive_kmeans)


@pytest.mark.parametrize(("spec", "metric", "stages"), [
    ("RQ4x8", "l2", 4),
    ("RQ3x8,beam=4", "cosine", 3),  # (greedy in training on the CPU; the beam encodes)
    ("PCA32,RQ3x8", "ip", 3),
    ("RQ3x8_Nqint8", "l2", 3),  # a stored norm: its range is trained too
    ("PRQ2x2x8", "cosine", 4),
    ("PRQ4x2x6_Nqint8", "l2", 8),
    ("MRL32,RQ2x8", "cosine", 2),
])
def test_stagewise_training_is_faiss_training_byte_for_byte(xt, monkeypatch, faiss_kmeans, spec, metric, stages):
    seen = []
    stagewise = Codec.train(xt, spec, metric, seed=7, ngpu=0, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(i, stages) for i in range(1, stages + 1)]
    monkeypatch.setattr(train_module, "trains_stagewise", lambda inner: False)  # faiss's own train
    whole = Codec.train(xt, spec, metric, seed=7, ngpu=0, progress=lambda done, total: seen.append("faiss"))
    assert seen[stages:] == []  # faiss's train tells of no stage
    assert stagewise.to_bytes() == whole.to_bytes()
    assert np.array_equal(stagewise.encode(xt[:300]), whole.encode(xt[:300]))


def test_small_samples_keep_faiss_default_k_means_and_train_alike(monkeypatch, faiss_kmeans):
    x = ClusteredEmbeddings(32, seed=2, num_clusters=20).batch(0, 2_500)  # under 39 x 64 rows per stage
    stagewise = Codec.train(x, "RQ3x6", "l2", seed=1, ngpu=0)
    monkeypatch.setattr(train_module, "trains_stagewise", lambda inner: False)
    assert stagewise.to_bytes() == Codec.train(x, "RQ3x6", "l2", seed=1, ngpu=0).to_bytes()


@pytest.mark.parametrize(("dim", "rows", "steps", "niter"),
                         [(64, 11_000, 4, 5), (200, 6_000, 10, 10), (48, 3_000, 2, 5), (640, 4_000, 4, 5)])
def test_progressive_kmeans_quantizes_as_faiss_does(dim, rows, steps, niter):
    """numpy's principal axes instead of faiss's PCAMatrix (above 512 dims, a randomized
    subspace iteration's; from AXES_ROWS of the rows where more): the k-means error over four
    seeds within 2% of faiss's ProgressiveDimClustering with the same parameters (one seed's
    varies by 6% either way here), and seeded: the same centroids twice."""
    x = ClusteredEmbeddings(dim, seed=3, num_clusters=80).batch(0, rows)

    def error(centroids):
        index = faiss.IndexFlatL2(dim)
        index.add(centroids)
        return float(index.search(x, 1)[0].mean())

    ours, theirs = [], []
    for seed in range(1, 5):
        cp = faiss.ProgressiveDimClusteringParameters()
        cp.progressive_dim_steps, cp.niter, cp.seed = steps, niter, seed
        ours.append(progressive_kmeans(x, 64, cp))
        theirs.append(faiss_progressive_kmeans(x, 64, cp))
    assert ours[0].shape == theirs[0].shape == (64, dim) and ours[0].dtype == np.float32
    assert np.mean([error(c) for c in ours]) / np.mean([error(c) for c in theirs]) < 1.02
    assert np.array_equal(progressive_kmeans(x, 64, cp), ours[-1])


@pytest.mark.parametrize(("dim", "count"), [(768, 145), (384, 19)])
def test_the_randomized_first_axes_capture_about_the_exact_ones_variance(dim, count, monkeypatch):
    """Above EXACT_AXES_DIM dims (768-d: RQ_PROGRESSIVE's 4 steps read 145 axes), and at any
    dims where at most 1/FEW_AXES of them are read (384-d: a judged RQ's 2 steps read 19),
    progressive_kmeans takes its first axes from a randomized subspace iteration: orthonormal,
    seeded (the same bytes twice), and on a power-law spectrum they capture over 98% of the
    variance the exact first axes do. A kept RQ's 4 steps at 384-d (86 axes) take eigh's."""
    from vecpress.kernels.synthetic import PowerLawEmbeddings

    top_axes = residual_module._top_axes
    assert dim > residual_module.EXACT_AXES_DIM and 3 * count <= dim or residual_module.FEW_AXES * count <= dim
    randomized = []
    monkeypatch.setattr(residual_module, "_top_axes", lambda *a: randomized.append(a) or top_axes(*a))
    x = PowerLawEmbeddings(dim, seed=4).batch(0, 6_000)
    mean = x.mean(axis=0)
    axes = residual_module._principal_axes(x, mean, count, seed=3)
    assert len(randomized) == 1
    assert axes.shape == (count, dim) and np.array_equal(axes, residual_module._principal_axes(x, mean, count, seed=3))
    np.testing.assert_allclose(axes @ axes.T, np.eye(count), atol=1e-4)
    cov = np.cov(x.T.astype(np.float64))
    exact = np.linalg.eigh(cov)[0][::-1][:count].sum()
    captured = np.trace(axes.astype(np.float64) @ cov @ axes.T.astype(np.float64))
    assert 0.98 < captured / exact <= 1 + 1e-6
    kept = residual_module.step_dims(384, train_module.RQ_PROGRESSIVE[0])[-2]  # (a kept RQ's axes at 384-d: eigh's)
    residual_module._principal_axes(x[:, :384], mean[:384], kept)
    assert len(randomized) == 2  # (the two calls above)


def test_what_trains_stagewise():
    kept = []  # (the indexes: an inner quantizer does not keep its index alive)

    def inner(spec, **set_rq):
        kept.append(build_index(spec, DIM, "l2"))
        q = _innermost(kept[-1])[1]
        for key, value in set_rq.items():
            setattr(q.rq, key, value)
        return q

    assert trains_stagewise(inner("RQ4x8", max_beam_size=1))
    assert not trains_stagewise(inner("RQ4x8"))  # faiss's default beam of 5
    assert not trains_stagewise(inner("RQ4x8", max_beam_size=1,
                                      train_type=faiss.ResidualQuantizer.Train_progressive_dim
                                      | faiss.ResidualQuantizer.Train_refine_codebook))
    assert not trains_stagewise(inner("LSQ4x8"))
    assert not trains_stagewise(inner("PQ8"))
    assert not trains_stagewise(inner("PRQ2x2x8"))  # its sub-quantizers' beam: faiss's 5


@pytest.mark.parametrize(("spec", "metric", "greedy"), [
    ("RQ6x8,beam=1", "cosine", True),
    ("PCA32,RQ4x8,beam=1", "l2", True),
    ("RQ4x8", "l2", False),  # faiss's default beam of 5 encodes: faiss's encoder
    ("RQ4x8_Nqint8,beam=1", "l2", False),  # a stored norm: faiss packs it
    ("RQ4x6,beam=1", "ip", False),  # 6 bits a stage: faiss packs them
])
def test_greedy_residual_codes_are_faiss_codes_near_ties_aside(xt, spec, metric, greedy):
    codec = Codec.train(xt, spec, metric, seed=4, ngpu=0)
    assert (codec._greedy_rq is not None) == greedy
    x = xt[:3000] + 0.01
    codes = codec.encode(x)
    faiss_codes = codec.index.sa_encode(prepare_vectors(x, metric))
    assert codes.shape == faiss_codes.shape and codes.dtype == np.uint8
    same = (codes == faiss_codes).mean()
    assert same == 1.0 if not greedy else same > 0.999
    if greedy:  # where a near-tie went the other way, the reconstruction is as close
        xp = prepare_vectors(x, metric)
        err = ((codec.decode(codes) - xp) ** 2).sum(1)
        err_faiss = ((codec.decode(faiss_codes) - xp) ** 2).sum(1)
        np.testing.assert_allclose(err, err_faiss, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("spec", ["RQ4x8,beam=1", "PRQ2x2x8", "RQ3x8_Nqint8", "PCA32,RQ3x8"])
def test_codecs_drop_the_cross_product_tables_no_search_reads_and_search_as_faiss(xt, spec):
    codec = Codec.train(xt, spec, "l2", seed=3, ngpu=0)
    data = codec.to_bytes()
    raw = faiss.deserialize_index(np.frombuffer(data, np.uint8))  # faiss's load computes the tables
    raw_inner = _innermost(raw)[1]
    assert all(q.codebook_cross_products.size() > 0 for q in residual_quantizers(raw_inner))
    loaded = Codec.from_bytes(data, spec=spec, metric="l2")
    assert all(q.codebook_cross_products.size() == 0 for q in residual_quantizers(_innermost(loaded.index)[1]))
    assert loaded.to_bytes() == data  # (the tables are not serialised)
    codes, xq = raw.sa_encode(xt[:2000]), xt[5000:5010]
    raw_inner.add_sa_codes(codes)  # (faiss's own search, its quantizer holding the tables)
    raw.ntotal = raw_inner.ntotal  # (behind a PCA)
    D, I = raw.search(xq, 10)
    got_D, got_I = loaded.search_codes(xq, codes, 10)
    assert np.array_equal(got_I, I)
    np.testing.assert_allclose(got_D, D, rtol=1e-5)
    inner = _innermost(loaded.index)[1]  # the search's index holds the codes over the codec's own quantizer
    assert int(_code_searcher(inner, codes).aq.this) == int(inner.aq.this)


def test_the_tables_a_search_reads_are_kept():
    index = build_index("RQ3x8", DIM, "l2")
    rq = _innermost(index)[1].rq
    rq.search_type = faiss.AdditiveQuantizer.ST_norm_from_LUT
    x = ClusteredEmbeddings(DIM, seed=1, num_clusters=20).batch(0, 3000)
    index.train(x)
    size = rq.codebook_cross_products.size()
    assert size > 0
    drop_cross_products(index)
    assert rq.codebook_cross_products.size() == size


def test_stagewise_training_computes_the_tables_only_where_they_are_read(xt, faiss_kmeans):
    """No cross-product tables where nothing reads them (RQ64x8's: 528 MB); where a search
    does (ST_norm_from_LUT), the tables faiss's own training computes."""
    plain = build_index("RQ3x8", DIM, "l2")
    residual_module.train_stagewise(_innermost(plain)[1], xt)
    assert _innermost(plain)[1].rq.codebook_cross_products.size() == 0
    tables = []
    for stagewise in (True, False):
        index = build_index("RQ3x8", DIM, "l2")
        rq = _innermost(index)[1].rq
        rq.search_type, rq.max_beam_size = faiss.AdditiveQuantizer.ST_norm_from_LUT, 1
        if stagewise:
            residual_module.train_stagewise(_innermost(index)[1], xt)
        else:
            index.train(xt)
        tables.append(faiss.vector_to_array(rq.codebook_cross_products))
    assert tables[0].size > 0 and np.array_equal(tables[0], tables[1])


@pytest.mark.gpu
@pytest.mark.parametrize(("spec", "metric", "rows", "stages"), [
    ("RQ4x8", "cosine", 11_000, 4),
    ("PRQ2x2x8", "l2", 11_000, 4),
    ("LSQ4x6", "l2", 3_000, None),
])
def test_gpu_training_of_additive_quantizers_codes_as_the_cpu_s(xt, spec, metric, rows, stages):
    """On a GPU a residual quantizer trains stage by stage (each stage heard of) with GPU flat
    indexes assigning, and an LSQ with faiss's GPU ICM encoder: the codec's reconstruction
    error within 2% of the CPU-trained one's, and it is a plain CPU codec after (no GPU helper
    left; its bytes load back)."""
    x = xt[:rows]
    seen = []
    gpu = Codec.train(x, spec, metric, seed=7, ngpu=1, progress=lambda done, total: seen.append((done, total)))
    cpu = Codec.train(x, spec, metric, seed=7, ngpu=0)
    if stages:
        assert seen == [(i, stages) for i in range(1, stages + 1)]

    def error(codec):
        v = prepare_vectors(x[:2000], metric)
        return float(np.mean(np.square(codec.decode(codec.encode(x[:2000])) - v)))

    assert error(gpu) <= 1.02 * error(cpu)
    inner = _innermost(gpu.index)[1]
    if isinstance(inner, faiss.IndexLocalSearchQuantizer):
        assert inner.lsq.icm_encoder_factory is None
    again = Codec.from_bytes(gpu.to_bytes(), spec=spec, metric=metric)
    assert np.array_equal(again.encode(x[:300]), gpu.encode(x[:300]))
