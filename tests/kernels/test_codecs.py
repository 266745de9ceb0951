"""kernels.codecs: every codec family of the spec grammar, against brute-force references.

Per family: train, encode, decode, serialise, search the stored codes, check determinism and
code sizes; then the binary (Hamming), Matryoshka, fast-scan and calibration specifics, the
rejections of impossible specs, and the advisor's default grid.
"""

from __future__ import annotations

import numpy as np
import pytest

from vecpress.kernels._faiss import faiss
from vecpress.kernels.codecs.build import (_innermost, build_index, centroids_per_codebook, check_codec_spec,
                                           codebook_parameters,
                                          code_size_of, rows_to_train)
from vecpress.kernels.codecs.codec import Codec
from vecpress.kernels.codecs.grid import default_grid, held_by_finer
from vecpress.kernels.codecs.spec import CodecSpecError
from vecpress.kernels.knn import TopK, prepare_vectors
from vecpress.kernels.metrics import knn_recall, relative_error
from vecpress.kernels.synthetic import ClusteredEmbeddings

DIM = 64


@pytest.fixture(scope="module")
def data():
    gen = ClusteredEmbeddings(DIM, seed=7, num_clusters=32)
    return gen.batch(0, 3000), gen.batch(50_000, 40)


def brute_force(xq, xb, k, metric):
    """Exact top-k of already prepared vectors ("l2" or "ip")."""
    D = ((xq[:, None, :] - xb[None, :, :]) ** 2).sum(-1) if metric == "l2" else -(xq @ xb.T)
    return np.argsort(D, axis=1, kind="stable")[:, :k]


def popcount_xor(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Hamming distance as LanceDB computes it: popcount(xor) over the bytes, all pairs."""
    return np.unpackbits(a[:, None, :] ^ b[None, :, :], axis=2).sum(axis=2)


# (spec, metric, size at DIM=64, training rows): one or two per family
FAMILIES = [
    ("PQ8", "l2", 8, 2000),
    ("PQ16x6", "cosine", 12, 2000),
    ("OPQ8,PQ8", "cosine", 8, 2000),
    ("OPQ8_32,PQ8", "l2", 8, 2000),
    ("PQ16x4fs", "cosine", 8, 2000),
    ("PQ16x4fs", "ip", 8, 2000),
    ("RQ4x8,beam=2", "l2", 4, 2000),
    ("LSQ4x6,ils=4", "cosine", 3, 1000),
    ("PRQ2x2x8", "cosine", 4, 1000),
    ("PLSQ2x2x6,ils=2", "l2", 3, 1000),
    ("SQ4", "cosine", 32, 2000),
    ("SQ6", "l2", 48, 2000),
    ("SQbf16", "cosine", 128, 2000),
    ("SQ8,calibrate=0.001", "l2", 64, 2000),
    ("RaBitQ", "l2", 16, 2000),
    ("RaBitQ,qb=0", "cosine", 16, 2000),
    ("RaBitQ4", "cosine", 52, 2000),
    ("PCA32,PQ8", "l2", 8, 2000),
    ("RR64,PQ8", "cosine", 8, 2000),
    ("MRL32,PQ8", "cosine", 8, 2000),
    ("MRL32,SQ8", "ip", 32, 2000),
    ("MRL48,PQ16x4fs", "l2", 8, 2000),
    ("SQeden4", "l2", 32, 2000),
    ("RR64,SQeden2", "cosine", 16, 2000),
    ("SQtq4", "l2", 40, 2000),
    ("SQtqmse4", "cosine", 32, 2000),
]


@pytest.mark.parametrize("spec,metric,size,num_train", FAMILIES)
def test_family_round_trip_and_search(data, spec, metric, size, num_train):
    xb, xq = data
    assert check_codec_spec(spec, DIM, metric, num_train) == size == code_size_of(spec, DIM, metric)
    codec = Codec.train(xb[:num_train], spec, metric, seed=1)
    assert codec.code_size == size and codec.dim == DIM and not codec.is_binary
    codes = codec.encode(xb)
    assert codes.shape == (len(xb), size) and codes.dtype == np.uint8
    again = Codec.from_bytes(codec.to_bytes(), spec=spec, metric=metric)
    assert np.array_equal(again.encode(xb), codes), "serialisation round trip changes codes"
    decoded = again.decode(codes)
    assert decoded.shape == (len(xb), DIM) and decoded.dtype == np.float32
    assert np.array_equal(decoded, codec.decode(codes))
    err = relative_error(prepare_vectors(xb, metric), decoded)
    assert err < (0.75 if spec.startswith("MRL") else 0.35), err  # MRL: dropped dims count

    D, I = again.search_codes(xq, codes, 10)
    assert D.dtype == np.float32 and I.dtype == np.int64 and I.shape == (len(xq), 10)
    assert (I >= 0).all() and (np.diff(D, axis=1) >= -1e-4).all(), "results sorted by distance"
    exact = brute_force(prepare_vectors(xq, metric), prepare_vectors(xb, metric), 10,
                        "l2" if metric == "l2" else "ip")
    if spec.startswith("RaBitQ4"):
        # faiss 1.15 decodes multi-bit RaBitQ codes to their 1-bit part only; search uses
        # every bit, so compare with the exact neighbours instead
        assert knn_recall(exact, I, 10) > 0.7
        return
    # search over codes ranks like exact search over the decoded vectors (cosine: by L2, but RaBitQ)
    space = "ip" if metric == "ip" or (metric == "cosine" and spec.startswith("RaBitQ")) else "l2"
    queries = prepare_vectors(xq, metric)
    if spec.startswith("MRL"):  # the queries as the codec sees them (a renormalised prefix), padded as decode pads
        for vt in _innermost(again.index)[0]:
            queries = vt.apply(queries)
        queries = np.pad(queries, ((0, 0), (0, DIM - queries.shape[1])))
    decoded_truth = brute_force(queries, decoded, 10, space)
    assert knn_recall(decoded_truth, I, 10) > (0.8 if spec.startswith("RaBitQ") else 0.9)
    assert knn_recall(exact, I, 10) > 0.2


# (spec, metric): every family whose search ranks by the distance to the reconstruction, in
# each metric it may take (the IP additive quantizers search with ST_LUT_nonorm, L2 with
# ST_decompress), and then four that keep faiss's own search
DECODED_SEARCH = [
    ("PQ8", "l2"), ("PQ16x6", "ip"), ("OPQ8,PQ8", "cosine"), ("PCA32,PQ8", "ip"), ("MRL32,PQ8", "l2"),
    ("SQ8", "ip"), ("SQ4", "l2"), ("SQfp16", "cosine"), ("RQ4x8", "l2"), ("RQ4x8", "ip"),
    ("LSQ4x6", "cosine"), ("PRQ2x2x6", "l2"),
]


@pytest.mark.parametrize("spec,metric", DECODED_SEARCH + [("PQ16x4fs", "l2"), ("RaBitQ", "ip"), ("PQ2", "l2"), ("LSQ2x6", "cosine")])
def test_decoded_gemm_search_equals_faiss_search(data, monkeypatch, spec, metric):
    """Where it pays, search_codes decodes blocks of codes and runs a BLAS brute force over
    them; it must return what faiss's own search over the codes returns."""
    import vecpress.kernels.codecs.search as ks

    xb, xq = data
    codec = Codec.train(xb[:1000], spec, metric, seed=1)
    codes = codec.encode(xb)
    inner = _innermost(codec.index)[1]
    monkeypatch.setattr(ks, "DECODE_BLOCK_BYTES", 4 * DIM * 700)  # 5 blocks, the last partial
    monkeypatch.setattr(ks, "TABLE_GEMM_MIN_QUERIES", len(xq))  # table codecs too, at 40 queries
    assert ks._decoded_search_pays(inner, len(xq)) == ((spec, metric) in DECODED_SEARCH)
    assert (ks._reconstruction_search(inner) is None) == ((spec, metric) in ESTIMATED_SEARCH)
    assert codec.search_device(0) == "faiss-cpu"
    D, I = codec.search_codes(xq, codes, 10)
    for threshold in ("GEMM_MIN_QUERIES", "ADDITIVE_GEMM_MIN_QUERIES", "TABLE_GEMM_MIN_QUERIES"):
        monkeypatch.setattr(ks, threshold, len(xq) + 1)
    assert not ks._decoded_search_pays(inner, len(xq))
    D_ref, I_ref = codec.search_codes(xq, codes, 10)
    assert_same_search(D, I, D_ref, I_ref, spec)


def assert_same_search(D, I, D_ref, I_ref, spec):
    """The same k smallest distances; ids may differ only among (near-)ties, which small
    codebooks make common (LSQ4x6: 4096 distinct reconstructions for 3000 rows)."""
    tol = 1e-4 * np.abs(D_ref).max()
    assert np.allclose(D, D_ref, rtol=1e-4, atol=tol)
    for q in range(len(D_ref)):  # every result clearly inside the k-th distance is in both
        inside = D_ref[q] < D_ref[q, -1] - tol
        assert set(I_ref[q][inside]) == set(I[q][D[q] < D_ref[q, -1] - tol]), q
    assert (I == I_ref).mean() > (0.2 if spec.startswith("LSQ") else 0.8)


@pytest.mark.parametrize("spec,metric", [("PQ1", "l2"), ("PQ2", "cosine"), ("SQ4", "l2")])
def test_decoded_search_ranks_equal_codes_by_row_whatever_the_batching(data, monkeypatch, spec, metric):
    """Coarse codes repeat (PQ1: 256 codes for 3000 rows), and rows with equal codes tie. The
    decoded search gives them one distance and ranks them by row, as faiss's own search does:
    a search of the whole block equals the merge of two halves' searches (the encode pass's
    batches against evaluate's fragments), and equals faiss's ADC where its codes are distinct.
    Row by row, a GEMM's rounding and a GPU's selection ordered such ties by position."""
    import vecpress.kernels.codecs.search as ks

    xb, xq = data
    codec = Codec.train(xb[:1000], spec, metric, seed=1)
    codes = np.concatenate([codec.encode(xb)] * 2)  # every code at least twice
    monkeypatch.setattr(ks, "_decoded_search_pays", lambda inner, nq: True)
    uniq, inverse = ks._distinct_rows(codes)
    assert np.array_equal(uniq[inverse], codes) and len(uniq) <= len(codes) // 2
    D, I = codec.search_codes(xq, codes, 50)
    assert np.isfinite(D).all() and (I >= 0).all()
    # equal codes: equal distances, rows in order
    same = (codes[I[:, :-1]] == codes[I[:, 1:]]).all(axis=2)
    assert same.any() and (D[:, :-1][same] == D[:, 1:][same]).all() and (I[:, :-1][same] < I[:, 1:][same]).all()
    half = len(codes) // 3  # not on a code boundary
    top = TopK(len(xq), 50)
    for lo, hi in ((0, half), (half, len(codes))):
        Dp, Ip = codec.search_codes(xq, codes[lo:hi], 50)
        top.add(Dp, np.where(Ip >= 0, Ip + lo, -1))
    assert np.array_equal(top.I, I) and np.array_equal(top.D, D)
    monkeypatch.setattr(ks, "_decoded_search_pays", lambda inner, nq: False)  # faiss's own search
    D_ref, I_ref = codec.search_codes(xq, codes, 50)
    assert_same_search(D, I, D_ref, I_ref, "LSQ")
    assert (I == I_ref).mean() > 0.85  # (PQ2: 0.90; the rest near-ties of distinct codes. Ties by row first: 0.002)


@pytest.mark.parametrize("spec", ["PQ2", "SQ8"])
def test_distinct_codes_at_equal_distances_rank_by_row(data, monkeypatch, spec):
    """A zero query (inner product) is equally far from every code: the first k rows, on both
    search paths and whatever the batching. Ties between distinct codes at the k-th distance
    are kept, not cut by the order they were expanded in."""
    import vecpress.kernels.codecs.search as ks

    xb, xq = data
    codec = Codec.train(xb[:1000], spec, "ip", seed=1)
    codes = codec.encode(xb[:400])
    codes = np.concatenate([codes[:3], codes[:3], codes[3:]])  # some repeat
    zero = np.zeros((40, xb.shape[1]), np.float32)
    for pays in (True, False):
        monkeypatch.setattr(ks, "_decoded_search_pays", lambda inner, nq, pays=pays: pays)
        D, I = codec.search_codes(zero, codes, 10)
        assert (D == 0).all() and (I == np.arange(10)).all(), (pays, I[0])
        top = TopK(len(zero), 10)
        for lo, hi in ((0, 150), (150, len(codes))):
            Dp, Ip = codec.search_codes(zero, codes[lo:hi], 10)
            top.add(Dp, np.where(Ip >= 0, Ip + lo, -1))
        assert np.array_equal(top.I, I)
    # code 0 has rows [2, 12, 13], code 1 row [10], both at distance 0: k = 2 gives rows 2, 10
    inverse = np.array([2, 2, 0, 2, 2, 2, 2, 2, 2, 2, 1, 2, 0, 0])
    D, I = ks._rows_of_codes(np.zeros((1, 2), np.float32), np.array([[0, 1]]), inverse, 2)
    assert I.tolist() == [[2, 10]]


# codecs whose search ranks by quantized tables or estimates, not by the distance to the
# reconstruction: they keep faiss's own search everywhere, GPU runs included
ESTIMATED_SEARCH = [("PQ16x4fs", "l2"), ("RaBitQ", "ip")]


@pytest.mark.gpu
@pytest.mark.parametrize("spec,metric", DECODED_SEARCH + ESTIMATED_SEARCH + [("PQ2", "l2"), ("LSQ2x6", "cosine")])
def test_gpu_search_over_codes_equals_faiss_search(data, monkeypatch, spec, metric):
    """With ngpu=1 (a GPU actor's search in the encode pass), codecs that rank by the distance
    to the reconstruction search their decoded codes with faiss's GPU brute force, at any
    number of queries; the others keep faiss's CPU search. Both return faiss's results."""
    import vecpress.kernels.codecs.search as ks

    xb, xq = data
    codec = Codec.train(xb[:1000], spec, metric, seed=1)
    codes = codec.encode(xb)
    gpu = (spec, metric) not in ESTIMATED_SEARCH
    assert codec.search_device(1) == ("faiss-gpu" if gpu else "faiss-cpu")
    D, I = codec.search_codes(xq[:8], codes, 10, ngpu=1)  # 8 queries: below every CPU GEMM threshold
    for threshold in ("GEMM_MIN_QUERIES", "ADDITIVE_GEMM_MIN_QUERIES", "TABLE_GEMM_MIN_QUERIES"):
        monkeypatch.setattr(ks, threshold, 10**9)
    D_ref, I_ref = codec.search_codes(xq[:8], codes, 10)
    assert_same_search(D, I, D_ref, I_ref, spec)


@pytest.mark.parametrize("spec,metric", [("PQ8", "l2"), ("PQ16x6", "ip"), ("PQ16x4fs", "cosine"),
                                         ("OPQ8,PQ8", "cosine"), ("PCA32,PQ8", "ip"), ("MRL32,PQ8", "l2")])
def test_parallel_pq_training_gives_faiss_bytes(data, monkeypatch, spec, metric):
    """Codec.train runs a PQ's sub-quantizer k-means side by side; the trained codec is the
    one faiss's own (sequential) training gives, byte for byte, pre-transforms included."""
    import vecpress.kernels.codecs.train as kt

    xb, _ = data
    parallel = Codec.train(xb[:2000], spec, metric, seed=3, ngpu=0)
    fresh = build_index(spec, DIM, metric)  # (held: the chain's objects live as long as it does)
    assert kt._trains_pq_in_parallel(_innermost(fresh)[1])
    monkeypatch.setattr(kt, "_trains_pq_in_parallel", lambda inner: False)  # read by train_index
    sequential = Codec.train(xb[:2000], spec, metric, seed=3, ngpu=0)
    assert parallel.to_bytes() == sequential.to_bytes()
    assert np.array_equal(parallel.encode(xb[:500]), sequential.encode(xb[:500]))
    other_seed = Codec.train(xb[:2000], spec, metric, seed=4, ngpu=0)
    assert other_seed.to_bytes() != parallel.to_bytes()  # the seed reaches the parallel k-means


def test_opq_training_reports_each_rotation_iteration_and_trains_faiss_bytes(data, monkeypatch):
    """An OPQ rotation trains one iteration per call of faiss's train (each heard of, before the
    PQ's sub-quantizers, in one count), to the rotation faiss's one call gives."""
    import vecpress.kernels.codecs.train as kt

    xb, _ = data
    seen = []
    stepwise = Codec.train(xb[:2000], "OPQ8,PQ8", "l2", seed=3, ngpu=0, progress=lambda *step: seen.append(step))
    assert seen == [(i, 50 + 8) for i in range(1, 59)]  # (faiss's 50 iterations, then 8 sub-quantizers)
    monkeypatch.setattr(kt, "_trains_opq_stepwise", lambda vt: False)
    assert stepwise.to_bytes() == Codec.train(xb[:2000], "OPQ8,PQ8", "l2", seed=3, ngpu=0).to_bytes()


def test_decoded_search_only_where_it_pays():
    """Per-pair decoding codecs switch at GEMM_MIN_QUERIES (additive ones at
    ADDITIVE_GEMM_MIN_QUERIES), look-up tables only from TABLE_GEMM_MIN_QUERIES and with at
    least one table per 16 dimensions."""
    import vecpress.kernels.codecs.search as ks

    gen = ClusteredEmbeddings(384, seed=2)
    xt = gen.batch(0, 2000)
    specs = ("SQ8", "PQ48", "PQ16x4", "PQ32x4fs", "RQ2x8", "LSQ2x4")
    codecs = {spec: Codec.train(xt, spec, "l2") for spec in specs}
    pays = {spec: [ks._decoded_search_pays(_innermost(codec.index)[1], nq)
                   for nq in (1, ks.ADDITIVE_GEMM_MIN_QUERIES, ks.GEMM_MIN_QUERIES - 1, ks.GEMM_MIN_QUERIES,
                              ks.TABLE_GEMM_MIN_QUERIES)]
            for spec, codec in codecs.items()}
    assert pays == {"SQ8": [False, False, False, True, True], "PQ48": [False, False, False, False, True],
                    "PQ16x4": [False] * 5, "PQ32x4fs": [False] * 5,
                    "RQ2x8": [False, True, True, True, True], "LSQ2x4": [False, True, True, True, True]}


@pytest.mark.parametrize("spec,num_train", [
    ("PQ8", 2000), ("PQ16x4fs", 2000), ("OPQ8,PQ8", 1000), ("RQ4x8", 1000), ("LSQ4x6,ils=2", 600),
    ("PRQ2x2x6", 600), ("RaBitQ", 1000), ("BINt", 1000), ("MRL32,PQ8", 1000),
])
def test_training_is_deterministic(data, spec, num_train):
    xb, _ = data
    a = Codec.train(xb[:num_train], spec, "l2", seed=3).encode(xb[:500])
    b = Codec.train(xb[:num_train], spec, "l2", seed=3).encode(xb[:500])
    assert np.array_equal(a, b)


@pytest.mark.parametrize("spec", ["SQ8", "PQ16", "PQ24", "RQ4x8,beam=1", "RQ4x8", "BINt", "MRL256,PQ16"])
def test_encoding_in_blocks_gives_the_codes_of_all_rows_at_once(monkeypatch, spec):
    """Codec.encode prepares and encodes encode_block_rows at a time on the CPU: the codes are
    those of faiss's encoder over every prepared row at once, blocks' edges included (3 blocks
    and a part of 1,024 rows at 768-d), and a greedy RQ's codes go on from first stages' codes
    block by block."""
    from vecpress.kernels.codecs import codec as codec_module

    x = np.random.default_rng(5).standard_normal((3 * 1024 + 300, 768)).astype(np.float32)
    monkeypatch.setattr(codec_module, "ENCODE_BLOCK_BYTES", 1024 * 768 * 4)
    assert codec_module.encode_block_rows(768) == 1024
    codec = Codec.train(x[:2500], spec, "cosine", seed=1)
    codes = codec.encode(x)
    assert codes.shape == (len(x), codec.code_size)
    want = np.concatenate([codec.encode(x[i:i + 700]) for i in range(0, len(x), 700)])
    assert np.array_equal(codes, want)
    if codec.numpy_pq_codebook() is None and codec._greedy_rq is None:
        assert np.array_equal(codes, codec.index.sa_encode(prepare_vectors(x, "cosine")))
    if spec == "RQ4x8,beam=1":  # (its own first two stages' codes: the rest searched, block by block)
        assert np.array_equal(codec.encode(x, first=codes[:, :2]), codes)
        with pytest.raises(ValueError, match="do not fit"):
            codec.encode(x, first=codes[:100, :2])


@pytest.mark.parametrize("spec", ["PQ8", "PQ16x4fs", "RQ4x8"])
def test_seed_changes_kmeans(data, spec):
    xb, _ = data
    a = Codec.train(xb[:1000], spec, "l2", seed=3).encode(xb[:500])
    b = Codec.train(xb[:1000], spec, "l2", seed=4).encode(xb[:500])
    assert not np.array_equal(a, b)


def test_fast_scan_search_matches_plain_pq_adc(data):
    xb, xq = data
    codec = Codec.train(xb[:2000], "PQ32x4fs", "l2", seed=1)
    codes = codec.encode(xb)
    inner = faiss.downcast_index(codec.index)
    assert isinstance(inner, faiss.IndexPQFastScan)
    plain = faiss.IndexPQ(DIM, 32, 4)
    plain.pq = inner.pq
    plain.is_trained = True
    assert np.array_equal(plain.sa_encode(xb), codes), "fast-scan stores plain PQ codes"
    plain.add_sa_codes(codes)
    D_ref, I_ref = plain.search(xq, 10)
    D, I = codec.search_codes(xq, codes, 10)
    assert knn_recall(I_ref, I, 10) > 0.9
    # fast-scan quantises its lookup tables to 8 bits: distances agree within a few percent
    assert np.abs(D - D_ref).max() < 0.05 * D_ref.max()


# ---- binary -------------------------------------------------------------------------------

@pytest.mark.parametrize("metric", ["l2", "cosine"])
def test_binary_sign_codes_and_hamming(data, metric):
    xb, xq = data
    codec = Codec.train(xb[:2000], "BIN", metric)
    assert codec.is_binary and codec.code_size == DIM // 8 == check_codec_spec("BIN", DIM, metric, 10)
    codes = codec.encode(xb)
    expected = np.packbits(prepare_vectors(xb, metric) > 0, axis=1, bitorder="little")
    assert np.array_equal(codes, expected), "bit i of the code is x_i > 0"
    D, I = codec.search_codes(xq, codes, 10)
    ham = popcount_xor(codec.encode(xq), codes)
    assert np.array_equal(D, np.take_along_axis(ham, I, axis=1).astype(np.float32))
    assert np.array_equal(np.sort(ham, axis=1)[:, :10], D), "the k smallest Hamming distances"
    again = Codec.from_bytes(codec.to_bytes(), spec="BIN", metric=metric)
    assert again.is_binary and np.array_equal(again.encode(xb), codes)
    # decode is sign times the per-dimension mean magnitude: a usable reconstruction
    assert relative_error(prepare_vectors(xb, metric), again.decode(codes)) < 0.5


def test_binary_thresholds_are_training_medians(data):
    xb, _ = data
    codec = Codec.train(xb[:2001], "BINt", "l2")
    median = np.median(xb[:2001], axis=0)
    bits = np.unpackbits(codec.encode(xb), axis=1, bitorder="little")
    # only values at the threshold itself (one per dim in an odd sample) may round either way
    assert (bits != (xb > median)).mean() < 1e-3
    bits = bits[:2001]
    assert abs(bits.mean() - 0.5) < 0.01, "median thresholds balance the bits"


@pytest.mark.parametrize("spec", ["BIN", "BINt"])
def test_binary_scales_are_the_mean_distance_to_the_threshold_over_every_block(spec):
    """The scales are summed a block of rows at a time (no float64 copy of the sample): over
    more rows than a block they are the float64 mean |x - t| over all of them."""
    from vecpress.kernels.codecs import train

    x = ClusteredEmbeddings(16, seed=4, num_clusters=8).batch(0, 2 * train._BINARY_BLOCK + 123)
    codec = Codec.train(x, spec, "l2")
    x64 = x.astype(np.float64)
    t = np.median(x64, axis=0) if spec == "BINt" else np.zeros(16)
    scale = np.abs(x64 - t).mean(axis=0)
    decoded = codec.decode(codec.encode(x[:50]))
    assert np.allclose(decoded, t + scale * np.sign(x[:50] - t), rtol=1e-5, atol=1e-6)


def test_binary_pads_dims_not_divisible_by_8():
    x = ClusteredEmbeddings(36, seed=2, num_clusters=16).batch(0, 800)
    codec = Codec.train(x, "BIN", "l2")
    codes = codec.encode(x)
    assert codec.code_size == code_size_of("BIN", 36, "l2") == 5 and codes.shape == (800, 5)
    assert not (codes[:, -1] & 0xF0).any(), "padding bits are zero"
    assert codec.decode(codes).shape == (800, 36)
    D, I = codec.search_codes(x[:5], codes, 3)
    assert np.array_equal(D, np.take_along_axis(popcount_xor(codec.encode(x[:5]), codes), I, axis=1))


@pytest.mark.parametrize("spec,size", [("RR64,BIN", 8), ("PCA32,BINt", 4), ("MRL32,BIN", 4)])
def test_binary_after_transforms(data, spec, size):
    xb, xq = data
    codec = Codec.train(xb[:2000], spec, "cosine")
    codes = codec.encode(xb)
    assert codec.is_binary and codes.shape == (len(xb), size)
    assert Codec.from_bytes(codec.to_bytes(), spec=spec, metric="cosine").encode(xb).tobytes() == codes.tobytes()
    assert codec.decode(codes).shape == (len(xb), DIM)
    D, I = codec.search_codes(xq, codes, 5)
    assert np.array_equal(D, np.take_along_axis(popcount_xor(codec.encode(xq), codes), I, axis=1))


# ---- Matryoshka ---------------------------------------------------------------------------

@pytest.mark.parametrize("metric", ["cosine", "l2", "ip"])
def test_mrl_truncates_and_renormalises_for_cosine_only(data, metric):
    xb, xq = data
    codec = Codec.train(xb[:1000], "MRL24,SQfp16", metric)
    assert codec.code_size == 48 and codec.dim == DIM
    prefix = prepare_vectors(xb, metric)[:, :24]
    if metric == "cosine":
        prefix = prefix / np.linalg.norm(prefix, axis=1, keepdims=True)
    expected = np.zeros_like(xb)
    expected[:, :24] = prefix
    decoded = codec.decode(codec.encode(xb))
    np.testing.assert_allclose(decoded, expected, atol=2e-3)
    # search over the codes = exact search over the (renormalised) prefixes
    q = prepare_vectors(xq, metric)[:, :24]
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
    _, I = codec.search_codes(xq, codec.encode(xb), 10)
    assert knn_recall(brute_force(q, prefix, 10, "l2" if metric == "l2" else "ip"), I, 10) > 0.95


# ---- options ------------------------------------------------------------------------------

def test_calibrated_sq_ranges_resist_outliers(data):
    xb, _ = data
    x = xb.copy()
    x[:3] *= 40.0  # a few wild rows stretch min..max ranges
    plain = Codec.train(x, "SQ8", "l2")
    calibrated = Codec.train(x, "SQ8,calibrate=0.001", "l2")
    bulk = x[3:]
    e_plain = relative_error(bulk, plain.decode(plain.encode(bulk)))
    e_cal = relative_error(bulk, calibrated.decode(calibrated.encode(bulk)))
    assert e_cal < 0.2 * e_plain, (e_cal, e_plain)


def test_search_options_survive_serialisation(data):
    xb, _ = data
    rq = Codec.train(xb[:1000], "RQ4x8,beam=7", "l2")
    rq = Codec.from_bytes(rq.to_bytes(), spec="RQ4x8,beam=7", metric="l2")
    assert faiss.downcast_index(rq.index).rq.max_beam_size == 7
    lsq = Codec.from_bytes(Codec.train(xb[:600], "LSQ2x6,ils=3", "l2").to_bytes(), spec="LSQ2x6,ils=3", metric="l2")
    assert faiss.downcast_index(lsq.index).lsq.encode_ils_iters == 3
    rb = Codec.from_bytes(Codec.train(xb[:600], "RaBitQ,qb=2", "l2").to_bytes(), spec="RaBitQ,qb=2", metric="l2")
    assert faiss.downcast_index(rb.index).qb == 2


def test_pq_training_is_never_polysemous(data):
    codec = Codec.train(data[0][:1000], "MRL32,PQ8", "l2")
    chain_inner = faiss.downcast_index(faiss.downcast_index(codec.index).index)
    assert isinstance(chain_inner, faiss.IndexPQ) and not chain_inner.do_polysemous_training


# ---- rejections (before any data is read) ---------------------------------------------------

@pytest.mark.parametrize("spec,num_train,needle", [
    ("PQ7", 5000, r"m must divide dim=64: try one of \[2, 4, 8, 16, 32, 64\]"),
    ("MRL48,PQ32", 5000, r"dim=48 \(after MRL48\).*m must divide"),
    ("PRQ3x2x8", 5000, "m must divide dim=64"),
    ("PQ8x10", 500, "at least 1024 training vectors.*largest nbits this sample supports is 8"),
    ("RQ4x10", 500, "at least 1024 training vectors"),
    ("LSQ4x9", 300, "at least 512 training vectors"),
    ("PRQ2x2x10", 1000, "at least 1024 training vectors"),
    ("OPQ8,PQ8x4", 100, "at least 256 training vectors"),
    ("PQ8x13", 10**6, "at most 12"),
    ("NOPE", 5000, "could not parse"),
    ("IVF16,PQ8", 5000, "not a standalone codec"),
    ("PQ8,depth=3", 5000, "unknown option 'depth'.*known options: beam="),
    ("PQ8,beam=4", 5000, "beam= applies to RQ/PRQ codecs only"),
    ("LSQ4x8,beam=4", 5000, "LSQ has no beam: use ils=N"),
    ("SQfp16,calibrate=0.01", 5000, "calibrate= applies to SQ4/SQ6/SQ8"),
    ("SQ8,calibrate=0.7", 5000, "0 < q < 0.5"),
    ("RaBitQ,qb=9", 5000, "qb= must be 0"),
    ("RQ4x8,beam=x", 5000, "beam= needs a int"),
    ("MRL64,PQ8", 5000, "MRL64 must keep fewer dims than the input dim=64.*try MRL32"),
    ("PQ8,MRL32", 5000, "MRL<n> must be the first part"),
    ("MRL32", 5000, "no codec after its prefix"),
    ("LSH", 5000, "use BIN"),
    ("ITQ,BIN", 5000, "ITQ cannot be decoded"),
    ("BIN,PQ8", 5000, "BIN/BINt must be the last"),
    ("", 5000, "empty codec spec"),
    ("PQ16x5fs", 5000, "could not parse"),  # fast-scan is 4-bit only
    ("SQeden9", 5000, "EDEN takes 1 to 8 bits"),
    ("SQeden4,PQ8", 5000, "SQeden<b> must be the last"),
    ("SQeden4,calibrate=0.01", 5000, "calibrate= applies to SQ4/SQ6/SQ8"),
])
def test_impossible_specs_are_rejected(spec, num_train, needle):
    with pytest.raises(CodecSpecError, match=needle):
        check_codec_spec(spec, DIM, "l2", num_train)


@pytest.mark.parametrize("spec,dim,size", [
    ("BIN", 384, 48), ("MRL256,PQ32", 384, 32), ("PQ64x4fs", 384, 32), ("RaBitQ", 384, 56),
    ("SQ6", 384, 288), ("MRL128,BIN", 768, 16), ("PRQ2x4x8", 128, 8),
])
def test_code_sizes_without_data(spec, dim, size):
    assert code_size_of(spec, dim, "cosine") == size == check_codec_spec(spec, dim, "cosine", 20_000)


# ---- default grid -------------------------------------------------------------------------

@pytest.mark.parametrize("dim", [32, 64, 128, 384, 768])
@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_default_grid_is_valid_and_covers_the_range(dim, metric):
    grid = default_grid(dim, metric)
    assert len(grid) == len(set(grid)) and 8 <= len(grid) <= 32, grid  # (RQ lengths: cut from the longest)
    sizes = [check_codec_spec(s, dim, metric, 20_000) for s in grid]
    assert sizes == sorted(sizes) and all(8 <= b <= 256 for b in sizes)
    assert min(sizes) == 8 and max(sizes) >= 64, "both ends of the budget range"
    families = {next(f for f in ("MRL", "OPQ", "PCA64,RQ", "RQ", "PQ", "SQ", "BIN", "RaBitQ") if s.startswith(f))
                for s in grid}
    assert {"PQ", "RaBitQ"} <= families and ({"RQ", "PCA64,RQ"} & families)
    assert ("SQ" in families) and (("SQ4" in grid) == (dim <= 512)), "SQ4 is dim/2 bytes, SQeden1 dim/8"
    assert any(s.startswith("SQeden") for s in grid)
    assert any(s.startswith("SQtqmse" if metric == "cosine" else "SQtq") for s in grid)
    assert any(s.endswith("x4fs") for s in grid)
    assert ("MRL" in families) == (dim >= 256)
    if dim >= 64:
        assert "BIN" in grid
    if dim > 64:  # the residual family's best at every budget from 16 to 64 B
        assert [s for s in grid if s.startswith("RQ")] == [f"RQ{m}x8,beam=1" for m in (16, 24, 32, 48, 64)]


def test_default_grid_respects_a_narrow_budget():
    grid = default_grid(384, "cosine", min_bytes=16, max_bytes=48)
    sizes = [code_size_of(s, 384, "cosine") for s in grid]
    assert grid and min(sizes) == 16 and max(sizes) == 48


def test_default_grid_specs_all_train(data):
    x = ClusteredEmbeddings(32, seed=1, num_clusters=16).batch(0, 1500)
    for spec in default_grid(32, "cosine"):
        codec = Codec.train(x, spec, "cosine")
        assert codec.decode(codec.encode(x[:10])).shape == (10, 32), spec


def test_a_finer_one_of_the_family_holds_the_coarser():
    """Within a budget, a spec is held by the finest of its family there (the same prefix,
    method and options; more sub-quantizers or bits per dim), a residual quantizer on a PCA
    projection by the shortest of its family at the full dim with as many stages or more;
    other forms by none."""
    specs = ["PQ8", "PQ16", "PQ16x4fs", "PQ32x4fs", "PQ8x4", "SQ4", "SQ8", "SQ8,calibrate=0.001", "SQfp16", "SQeden1",
             "SQeden2", "SQeden4", "SQtqmse2", "SQtq2", "RaBitQ", "RaBitQ4", "RaBitQ2,qb=4", "PCA64,PQ8", "MRL192,SQ8",
             "MRL96,SQ8", "RQ16x8,beam=1", "RQ32x8,beam=1", "PCA64,RQ8x8,beam=1", "BIN", "BINt"]
    assert held_by_finer(specs) == {"PQ8": "PQ16", "PQ16x4fs": "PQ32x4fs", "SQ4": "SQ8", "SQeden1": "SQeden4",
                                    "SQeden2": "SQeden4", "RaBitQ": "RaBitQ4", "PCA64,RQ8x8,beam=1": "RQ16x8,beam=1"}
    assert held_by_finer(["PQ8"]) == {} and held_by_finer(["PQ16", "PQ8"]) == {"PQ8": "PQ16"}
    # (fewer stages at the full dim, other bits or options, or another prefix: not held)
    for others in (["RQ4x8,beam=1"], ["RQ16x4,beam=1"], ["RQ16x8,beam=4"], ["RR64,RQ16x8,beam=1"]):
        assert held_by_finer(["PCA64,RQ8x8,beam=1", *others]) == {}, others
    assert held_by_finer(["PCAR32,RQ8x8", "RQ8x8", "RQ32x8"]) == {"PCAR32,RQ8x8": "RQ8x8"}


def test_on_real_sift_data_no_coarser_one_of_a_family_beats_the_finer(sift5k):
    """What leaving the held ones out of a --max-bytes advice rests on, on real SIFT vectors:
    each held spec of the default grid within 64 B reaches no more recall@10 than its holder."""
    _, x = sift5k
    base, q = x[:4800], x[4800:]
    true = brute_force(q, base, 10, "l2")
    held = held_by_finer(default_grid(128, "l2", min_bytes=8, max_bytes=64))
    assert len(held) >= 4, held
    recall = {}
    for spec in set(held) | set(held.values()):
        codec = Codec.train(base, spec, "l2")
        recall[spec] = knn_recall(true, codec.search_codes(q, codec.encode(base), 10)[1], 10)
    assert all(recall[spec] <= recall[by] for spec, by in held.items()), recall


@pytest.mark.parametrize("spec,index_type,nsub,bytes_", [
    ("IVF64,PQ8", "IVF_PQ", 8, 8), ("IVF64,HNSW,PQ8", "IVF_HNSW_PQ", 8, 8), ("IVF64,SQ", "IVF_SQ", 0, 32),
    ("IVF64,HNSW,SQ", "IVF_HNSW_SQ", 0, 32), ("IVF64,FLAT", "IVF_FLAT", 0, 128),
    ("IVF64,HNSW,FLAT", "IVF_HNSW_FLAT", 0, 128), ("IVF64,RaBitQ", "IVF_RQ", 0, 4)])
def test_served_specs_name_lance_s_index_types(spec, index_type, nsub, bytes_):
    from vecpress.kernels.codecs.ivf import parse_served_spec

    p = parse_served_spec(spec, 32)
    assert (p.index_type, p.num_sub_vectors, p.index_bytes(32)) == (index_type, nsub, bytes_)


@pytest.mark.parametrize("spec,needle", [
    ("IVF64,HNSW,RaBitQ", "no HNSW form of RaBitQ"), ("IVF64,SQ4", "LanceDB serves"), ("IVF64,PQ5", "must divide"),
    ("IVF64,HNSW", "LanceDB serves")])
def test_served_specs_that_lance_cannot_build_are_refused(spec, needle):
    from vecpress.kernels.codecs.ivf import parse_served_spec

    with pytest.raises(CodecSpecError, match=needle):
        parse_served_spec(spec, 32)


def test_a_model_without_pq_codes_only_the_partition():
    from vecpress.kernels.codecs.ivf import IvfModel

    x = np.random.default_rng(0).standard_normal((2000, 16)).astype(np.float32)
    model = IvfModel.train(x, "IVF16,SQ", "l2", seed=0, ngpu=0)
    codes = model.encode(x[:10])
    assert codes.shape == (10, 4) and model.codebook is None and model.index_type == "IVF_SQ"
    parts, _ = IvfModel.split(codes)
    np.testing.assert_array_equal(model.decode(codes), model.centroids[parts])
    again = IvfModel.from_bytes(model.to_bytes(), spec="IVF16,SQ", metric="l2")
    np.testing.assert_array_equal(again.encode(x[:10]), codes)


@pytest.mark.parametrize("spec", ["SQeden2", "RR64,SQeden4"])
def test_eden_is_scale_invariant(data, spec):
    """faiss's EDEN levels assume unit-variance coordinates; vecpress scales them to the data."""
    xb, _ = data
    errors = []
    for scale in (1 / np.linalg.norm(xb, axis=1).mean(), 1.0, 100.0):  # unit vectors, raw, large
        x = (xb * scale).astype(np.float32)
        codec = Codec.train(x, spec, "l2")
        errors.append(relative_error(x, codec.decode(codec.encode(x))))
    assert max(errors) - min(errors) < 0.01, errors
    assert max(errors) < (0.2 if "eden2" in spec else 0.03), errors


@pytest.mark.parametrize("spec", ["SQeden2", "RQ8x8,beam=1", "PQ16"])
def test_cosine_codes_rank_by_l2_to_their_reconstruction(data, spec):
    """Under cosine a code ranks by the unit query's L2 distance d to its reconstruction,
    reported as d / 2 - 1, by faiss's route (few queries) and the decoded GEMM's (many) alike;
    the inner product with the reconstruction (as before) finds fewer true neighbours."""
    from vecpress.kernels.codecs.search import search_codes

    xb, xq = data
    codec = Codec.train(xb[:2000], spec, "cosine", seed=1)
    codes = codec.encode(xb)
    qp, decoded = prepare_vectors(xq, "cosine"), codec.decode(codes)
    D, I = codec.search_codes(xq, codes, 10)  # (40 queries: the decoded GEMM route)
    np.testing.assert_allclose(D, ((qp[:, None, :] - decoded[I]) ** 2).sum(-1) / 2 - 1, atol=1e-4)
    D1, I1 = codec.search_codes(xq[:3], codes, 10)  # (3: faiss's own search)
    assert np.array_equal(I1, I[:3]) and np.allclose(D1, D[:3], atol=1e-5)
    exact = brute_force(qp, prepare_vectors(xb, "cosine"), 10, "ip")
    _, by_ip = search_codes(codec.index, "ip", qp, codes, 10)
    assert knn_recall(exact, I, 10) > knn_recall(exact, by_ip, 10)


@pytest.mark.parametrize(("spec", "dim", "rows"), [
    ("PQ64", 768, 8 * 256 * 12),  # (8 rows per parameter of each k-means: 256 centroids of 12 dims)
    ("PQ16", 768, 256 * 256),  # (fewer than 8 per parameter: what faiss's k-means samples at most)
    ("PQ32", 768, 8 * 256 * 24),
    ("PQ8", 32, 39 * 256),  # (faiss's least: 39 per centroid)
    ("MRL384,PQ48", 768, 8 * 256 * 8), ("PQ128x4fs", 768, 8 * 16 * 6),
    ("PQ128x4fs", 256, 39 * 16), ("PQ32x4fs", 768, 8 * 16 * 24),
    ("PQ16x4fs", 768, 256 * 16), ("PQ4x6", 32, 8 * 64 * 8), ("PQ4x6", 128, 256 * 64),
    ("SQ8", 32, 0), ("SQeden2", 32, 0), ("BIN", 32, 0), ("MRL16,BIN", 32, 0), ("RaBitQ4", 32, 0), ("SQfp16", 32, 0),
    ("RQ4x8,beam=1", 32, None), ("PCA16,RQ2x6", 32, None), ("LSQ2x5", 32, None), ("PRQ2x2x7", 32, None),
    ("OPQ8,PQ8x4", 32, None), ("PCA16,PQ4", 32, None)])
def test_rows_to_train_is_where_more_rows_stop_paying(spec, dim, rows):
    """The training rows past which a codec comes out no better: a product quantizer's by its
    k-means' parameters (within faiss's sampling cap and minimum), none needed past a few for
    per-dimension statistics (0), every row for codebooks fit on what earlier ones leave and
    for trained rotations and projections (None)."""
    from vecpress.kernels.codecs import build

    assert build.PQ_ROWS_PER_PARAMETER == 8
    assert rows_to_train(spec, dim, "cosine") == rows


@pytest.mark.parametrize(("spec", "parameters"), [
    ("PQ8", 256 * 8), ("PQ8x4fs", 16 * 8), ("PQ4x6", 64 * 16), ("RQ4x8,beam=1", 256 * 64), ("PCA16,RQ2x6", 64 * 16),
    ("LSQ2x5", 32 * 64), ("PRQ2x2x7", 128 * 32), ("OPQ8,PQ16x4", 256 * 8), ("OPQ16,PQ4", 256 * 16),
    ("MRL16,PQ4", 256 * 4), ("SQ8", 0), ("BIN", 0), ("RaBitQ4", 0)])
def test_codebook_parameters_are_centroids_times_the_dims_each_spans(spec, parameters):
    """What the advisor's first stage weighs how roughly a codec is trained by: a residual
    quantizer's centroids span every dim, a product quantizer's a sub-vector's (OPQ's
    rotation trains an 8-bit PQ of its own sub-vectors)."""
    assert codebook_parameters(spec, DIM, "l2") == parameters


@pytest.mark.parametrize(("spec", "centroids"), [
    ("PQ8", 256), ("PQ8x4fs", 16), ("PQ4x6", 64), ("RQ4x8,beam=1", 256), ("PCA16,RQ2x6", 64), ("LSQ2x5", 32),
    ("PRQ2x2x7", 128), ("OPQ8,PQ8x4", 256), ("MRL16,PQ4", 256), ("SQ8", 0), ("SQeden2", 0), ("BIN", 0),
    ("RaBitQ4", 0)])
def test_centroids_per_codebook_are_what_the_most_centroids_k_means_fits(spec, centroids):
    """The most centroids one k-means of the training fits (OPQ's rotation trains an 8-bit PQ
    whatever the spec's nbits): what the advisor's first stage weighs rows per centroid by."""
    assert centroids_per_codebook(spec, DIM, "l2") == centroids
    assert check_codec_spec(spec, DIM, "l2", max(centroids, 1)) > 0  # (trainable on that many rows, no fewer)
    if centroids > 1:
        with pytest.raises(CodecSpecError, match="training vectors"):
            check_codec_spec(spec, DIM, "l2", centroids - 1)
