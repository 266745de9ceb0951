"""The blocked PQ encoder against faiss: same codes for >= 99.9% of sub-vectors (ties and float
rounding aside), for the numpy reference, the torch CPU path (when torch is installed) and the
CUDA path with its pinned double-buffered transfers (GPU machines only)."""

from __future__ import annotations

import numpy as np
import pytest

from vecpress.kernels._faiss import faiss
from vecpress.kernels.codecs.codec import Codec
from vecpress.kernels.knn import prepare_vectors
from vecpress.kernels.pq_encode import encode_pq, pack_codes, pq_codebook
from vecpress.kernels.synthetic import ClusteredEmbeddings

MIN_AGREEMENT = 0.999

# (factory, dim): 8-bit, 4-bit with even and odd M, and a width that straddles bytes (6 bits)
CASES = [("PQ16", 64), ("PQ8", 96), ("PQ32x4", 64), ("PQ7x4", 56), ("PQ12x6", 48)]


def unpack(codes: np.ndarray, M: int, nbits: int) -> np.ndarray:
    """faiss-layout packed codes -> (n, M) centroid ids (little-endian bit stream)."""
    bits = np.unpackbits(codes, axis=1, bitorder="little")[:, : M * nbits].reshape(len(codes), M, nbits)
    return (bits.astype(np.int64) << np.arange(nbits)).sum(axis=2)


def agreement(got: np.ndarray, want: np.ndarray, M: int, nbits: int) -> float:
    assert got.shape == want.shape and got.dtype == np.uint8
    return float((unpack(got, M, nbits) == unpack(want, M, nbits)).mean())


@pytest.fixture(scope="module")
def trained():
    """{factory: (trained IndexPQ, vectors to encode)} on clustered data, trained once."""
    out = {}
    for factory, d in CASES:
        gen = ClusteredEmbeddings(d, seed=3, num_clusters=64)
        index = faiss.index_factory(d, factory + "np")
        index.pq.cp.niter = 8
        index.pq.cp.seed = 1
        index.train(gen.batch(0, 4000))
        out[factory] = (index, gen.batch(10_000, 3000))
    return out


@pytest.mark.parametrize("factory", [c[0] for c in CASES])
def test_numpy_reference_matches_faiss(trained, factory):
    index, x = trained[factory]
    cb = pq_codebook(index)
    want = index.sa_encode(x)
    got = encode_pq(x, cb.centroids, cb.nbits, block_rows=257)  # many blocks, a ragged last one
    assert got.shape == (len(x), cb.code_size) == want.shape
    assert agreement(got, want, cb.M, cb.nbits) >= MIN_AGREEMENT


def test_block_size_does_not_change_codes(trained):
    index, x = trained["PQ16"]
    cb = pq_codebook(index)
    codes = [encode_pq(x, cb.centroids, cb.nbits, block_rows=r) for r in (1, 64, 1000, None)]
    for c in codes[1:]:
        assert np.array_equal(c, codes[0])
    assert encode_pq(x[:0], cb.centroids, cb.nbits).shape == (0, cb.code_size)


@pytest.mark.parametrize("M,nbits", [(8, 4), (7, 4), (5, 6), (4, 8), (3, 10), (6, 12), (3, 5), (2, 16)])
def test_packing_is_faiss_layout(M, nbits):
    """pack_codes of known ids equals faiss's own PQ bit packing (compute_codes of centroids)."""
    rs = np.random.default_rng(nbits)
    pq = faiss.ProductQuantizer(2 * M, M, nbits)
    cents = rs.normal(size=(M, 1 << nbits, 2)).astype(np.float32)
    faiss.copy_array_to_vector(cents.ravel(), pq.centroids)
    ids = rs.integers(0, 1 << nbits, size=(50, M))
    x = np.ascontiguousarray(cents[np.arange(M), ids].reshape(50, 2 * M))  # each sub-vector a centroid
    assert np.array_equal(pack_codes(ids, nbits), pq.compute_codes(x))


@pytest.mark.parametrize("spec,metric", [("OPQ8,PQ8", "l2"), ("PQ16x4fs", "cosine"), ("MRL32,PQ8", "cosine")])
def test_codec_pretransforms(spec, metric):
    """pq_codebook follows IndexPreTransform (OPQ rotation, MRL remap + normalisation) and
    fast-scan PQ: prepare + encode_pq gives the codec's own codes."""
    x = ClusteredEmbeddings(64, seed=5, num_clusters=32).batch(0, 3000)
    codec = Codec.train(x[:2000], spec, metric)
    cb = pq_codebook(codec.index)
    want = codec.encode(x[2000:])
    got = encode_pq(cb.prepare(prepare_vectors(x[2000:], metric)), cb.centroids, cb.nbits)
    assert agreement(got, want, cb.M, cb.nbits) >= MIN_AGREEMENT


def test_refuses_non_pq_and_bad_shapes(trained):
    sq = faiss.index_factory(16, "SQ8")
    with pytest.raises(ValueError, match="not a product-quantizer"):
        pq_codebook(sq)
    index, x = trained["PQ16"]
    cb = pq_codebook(index)
    with pytest.raises(ValueError, match="vectors must be"):
        encode_pq(x[:, :-1], cb.centroids, cb.nbits)
    with pytest.raises(ValueError, match="nbits"):
        encode_pq(x, cb.centroids, 4)


def test_codec_encode_on_cuda_falls_back_to_faiss_without_a_gpu():
    from vecpress.kernels.codecs.codec import Codec
    from vecpress.kernels.gpu_encode import gpu_count
    from vecpress.kernels.synthetic import ClusteredEmbeddings

    x = ClusteredEmbeddings(32, seed=8).batch(0, 3000)
    codec = Codec.train(x, "PQ8x4", "cosine", seed=1)
    assert codec.is_pq and not Codec.train(x, "SQ8", "l2").is_pq
    if gpu_count() == 0:  # what Codec.encode consults
        assert np.array_equal(codec.encode(x, device="cuda"), codec.encode(x))
    else:  # on a GPU: faiss's codes for >= 99.9% of sub-vectors
        assert (codec.encode(x, device="cuda") == codec.encode(x)).mean() >= 0.999


@pytest.mark.parametrize("spec,dim,numpy_engine", [("PQ8", 96, True), ("PQ16", 96, True), ("PQ12", 96, False),
                                                   ("PQ24", 96, False), ("PQ6x4fs", 72, True),
                                                   ("OPQ8,PQ8", 64, False), ("OPQ8,PQ8", 48, True)])
def test_codec_encode_picks_the_faster_cpu_engine(spec, dim, numpy_engine):
    """Sub-vectors 8 wide or at most 4: faiss's SIMD path; any other width (6, 12...): the
    blocked numpy encoder. Either way the codes are faiss's."""
    gen = ClusteredEmbeddings(dim, seed=11)
    codec = Codec.train(gen.batch(0, 4000), spec, "cosine", seed=0)
    assert (codec.numpy_pq_codebook() is not None) == numpy_engine
    x = gen.batch(20_000, 3000)
    cb = pq_codebook(codec.index)
    want = codec.index.sa_encode(prepare_vectors(x, "cosine"))
    assert agreement(codec.encode(x), want, cb.M, cb.nbits) >= MIN_AGREEMENT
