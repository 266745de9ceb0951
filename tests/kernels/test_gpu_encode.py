"""The GPU encoders (kernels.gpu_encode).

Everywhere: each codec's GPU plan (pre-transforms + quantizer, as array operations) run with
numpy gives faiss's codes, so the plan extraction and the scalar/binary formulas are checked
on every machine. On a GPU machine (`gpu` tests): the fused PQ kernel gives faiss CPU's codes
for >= 99.9% of sub-vectors, the scalar and binary kernels the same bytes, the pinned
double-buffered host pipeline puts every block in its place, GPU training matches CPU
training in quality, and faiss's GPU brute force matches the CPU's neighbours (a compress run on the GPU:
tests/pipeline/distributed/test_gpu_pool.py)."""

from __future__ import annotations

import numpy as np
import pytest

from vecpress.kernels.codecs.codec import Codec
from vecpress.kernels.gpu_encode import gpu_count, plan_codec, run_plan
from vecpress.kernels.synthetic import ClusteredEmbeddings
from tests.kernels.test_pq_encode import MIN_AGREEMENT, agreement, unpack

# (dim, metric, spec): every family with a GPU path, each pre-transform kind, odd dims
PLANNED = [
    (64, "l2", "PQ16"), (64, "l2", "PQ8x4fs"), (64, "l2", "PQ16x6"), (64, "l2", "OPQ8,PQ8"),
    (64, "l2", "PCA32,PQ8"), (64, "l2", "RR,PQ8"), (64, "l2", "SQ8"), (64, "l2", "SQ4"),
    (64, "l2", "SQfp16"), (64, "l2", "BIN"), (64, "l2", "BINt"), (64, "l2", "SQ8,calibrate=0.01"),
    (63, "l2", "SQ4"), (63, "l2", "SQ8"), (63, "l2", "BIN"),
    (128, "cosine", "MRL64,PQ16"), (128, "cosine", "PQ32"), (128, "cosine", "SQ8"), (128, "cosine", "BIN"),
    (128, "cosine", "MRL32,SQ4"), (128, "cosine", "OPQ16,PQ16"), (128, "ip", "SQ8"),
]
NO_GPU_PATH = ["SQ6", "SQbf16", "RaBitQ", "RQ4x8"]


def _data(dim: int, n: int = 6000, seed: int = 1):
    x = ClusteredEmbeddings(dim, seed=seed).batch(0, n)
    x[:, 3] = 0.5  # a constant dimension: vdiff = 0 for the scalar quantizers
    xt, xe = x[:5000], x[5000:]
    return xt, np.vstack([xe, xe[:10] * 50])  # and rows far outside the trained range


@pytest.fixture(scope="module")
def codecs():
    out = {}
    for dim, metric, spec in PLANNED:
        xt, xe = _data(dim)
        out[(dim, metric, spec)] = (Codec.train(xt, spec, metric, seed=0), xe)
    return out


def _check(codec: Codec, got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape and got.dtype == np.uint8
    plan = plan_codec(codec.index, codec.metric)
    if plan.kind == "pq":
        M, _, _ = plan.centroids.shape
        assert agreement(got, want, M, plan.nbits) >= MIN_AGREEMENT
    elif plan.qtype == "QT_fp16":  # faiss's own fp16 rounding differs from IEEE on rare values
        assert (got == want).mean() >= 0.9999
    else:
        assert np.array_equal(got, want)


@pytest.mark.parametrize("case", PLANNED, ids=[f"{d}-{m}-{s}" for d, m, s in PLANNED])
def test_gpu_plan_run_with_numpy_gives_faiss_codes(codecs, case):
    codec, xe = codecs[case]
    plan = plan_codec(codec.index, codec.metric)
    assert plan is not None and plan.code_size == codec.code_size
    _check(codec, run_plan(np, plan, xe.copy()), codec.encode(xe))


@pytest.mark.parametrize("spec", NO_GPU_PATH)
def test_codecs_without_a_gpu_path_stay_on_faiss(spec):
    xt, xe = _data(32)
    codec = Codec.train(xt, spec, "l2", seed=0)
    assert plan_codec(codec.index, "l2") is None
    assert codec.encode_device("cuda") == "cpu"
    assert np.array_equal(codec.encode(xe, device="cuda"), codec.encode(xe))


def test_no_gpu_means_faiss_on_the_cpu(codecs):
    if gpu_count():
        pytest.skip("a GPU is visible here")
    codec, xe = codecs[(64, "l2", "PQ16")]
    assert codec.encode_device("cuda") == "cpu"
    assert np.array_equal(codec.encode(xe, device="cuda"), codec.encode(xe))


# ---- on a GPU ---------------------------------------------------------------------------------

def _cupy():
    if gpu_count() == 0:
        pytest.skip("CuPy sees no GPU")
    import cupy

    return cupy


@pytest.mark.gpu
@pytest.mark.parametrize("case", PLANNED, ids=[f"{d}-{m}-{s}" for d, m, s in PLANNED])
def test_gpu_codes_equal_faiss_cpu(codecs, case):
    _cupy()
    codec, xe = codecs[case]
    assert codec.encode_device("cuda") == "cuda:0"
    _check(codec, codec.encode(xe, device="cuda"), codec.encode(xe))


@pytest.mark.gpu
@pytest.mark.parametrize("d,m", [(384, 32), (384, 96), (768, 64), (768, 96), (1536, 96), (1536, 32)])
def test_fused_pq_kernel_matches_faiss_at_product_sizes(d, m):
    _cupy()
    gen = ClusteredEmbeddings(d, seed=d + m)
    codec = Codec.train(gen.batch(0, 20_000), f"PQ{m}", "l2", seed=0)
    x = gen.batch(50_000, 30_000)
    got, want = codec.encode(x, device="cuda"), codec.encode(x)
    assert agreement(got, want, m, 8) >= MIN_AGREEMENT


@pytest.mark.gpu
def test_host_pipeline_puts_every_block_in_its_place():
    """~800 MB in many blocks, from pageable and from pinned memory, against the kernel on data
    already on the device; a buffer reused too early would show as wrong codes."""
    cp = _cupy()
    import cupyx

    from vecpress.kernels.gpu_encode import GpuEncoder

    d, n = 768, 260_000
    gen = ClusteredEmbeddings(d, seed=7)
    codec = Codec.train(gen.batch(0, 20_000), "PQ96", "l2", seed=0)
    x = np.concatenate([gen.batch(100_000 + i, 65_000) for i in range(0, n, 65_000)])
    enc = GpuEncoder(plan_codec(codec.index, "l2"), block_rows=9_999)
    want = cp.asnumpy(enc.encode_device(cp.asarray(x)))
    assert np.array_equal(enc.encode(x), want)
    pinned = cupyx.empty_pinned(x.shape, np.float32)
    pinned[:] = x
    assert np.array_equal(enc.encode(pinned), want)
    sample = slice(0, n, 13)
    assert agreement(want[sample], codec.encode(x[sample]), 96, 8) >= MIN_AGREEMENT


@pytest.mark.gpu
@pytest.mark.parametrize("spec", ["PQ32", "OPQ16,PQ16", "RQ4x8"])
def test_gpu_training_matches_cpu_quality(spec):
    gen = ClusteredEmbeddings(128, seed=5)
    xt, xe = gen.batch(0, 20_000), gen.batch(100_000, 5000)

    def rel_error(codec):
        return float(((codec.decode(codec.encode(xe)) - xe) ** 2).sum() / (xe ** 2).sum())

    cpu, gpu = (Codec.train(xt, spec, "l2", seed=0, ngpu=n) for n in (0, 1))
    assert rel_error(gpu) <= rel_error(cpu) * 1.05 + 1e-6


@pytest.mark.gpu
def test_gpu_exact_neighbours_equal_cpu():
    from vecpress.kernels.knn import exact_knn

    gen = ClusteredEmbeddings(96, seed=9)
    xq, xb = gen.batch(0, 500), gen.batch(10_000, 50_000)
    Dc, Ic = exact_knn(xq, xb, 100, "l2", ngpu=0)
    Dg, Ig = exact_knn(xq, xb, 100, "l2", ngpu=1)
    same = np.mean([len(set(a) & set(b)) / 100 for a, b in zip(Ic, Ig)])
    assert same >= 0.999
    np.testing.assert_allclose(Dg, Dc, rtol=1e-3, atol=1e-3)


def test_unpack_helper_roundtrip():
    """The agreement helper itself: unpacking faiss-packed codes gives the ids packed."""
    from vecpress.kernels.pq_encode import pack_codes

    ids = np.random.default_rng(0).integers(0, 64, size=(50, 7))
    assert np.array_equal(unpack(pack_codes(ids, 6), 7, 6), ids)
