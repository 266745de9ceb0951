"""The GPU routes of the searches, on the CPU: faiss's GPU brute force is replaced by a
stand-in that checks its arguments and answers as a GPU does (tests/fake_gpu.py). These run
in CI; the `gpu`-marked tests run the same routes on a real GPU."""

from __future__ import annotations

import numpy as np
import pytest

from vecpress.kernels._faiss import faiss
from vecpress.kernels.codecs.codec import Codec
from vecpress.kernels.knn import GPU_MAX_K, exact_knn
from vecpress.kernels.synthetic import ClusteredEmbeddings
from vecpress.pipeline.executor import LocalExecutor
from vecpress.pipeline.evaluate import evaluate_version
from tests import fake_gpu
from tests.conftest import assert_same_evaluation
from tests.pipeline.test_nightly import part, run

DIM = 32


@pytest.fixture(scope="module")
def data():
    gen = ClusteredEmbeddings(DIM, seed=7, num_clusters=32)
    return gen.batch(0, 3000), gen.batch(50_000, 40)


@pytest.mark.parametrize("spec,metric", [("PQ1", "l2"), ("PQ2", "cosine"), ("SQ4", "ip"), ("RQ2x6", "l2")])
def test_gpu_route_of_the_code_search_equals_the_cpu_route(data, monkeypatch, spec, metric):
    """The search over codes that a GPU actor runs (ngpu=1: decoded codes, GPU brute force)
    returns exactly the CPU's decoded search, ties included: every code repeats twice, and the
    stand-in rounds each distance by its row's place and lists ties last row first."""
    import vecpress.kernels.codecs.search as ks

    xb, xq = data
    codec = Codec.train(xb[:1000], spec, metric, seed=1, ngpu=0)
    codes = np.concatenate([codec.encode(xb)] * 2)
    monkeypatch.setattr(ks, "_decoded_search_pays", lambda inner, nq: True)
    D_cpu, I_cpu = codec.search_codes(xq, codes, 50)
    gpu = fake_gpu.install(monkeypatch)
    assert codec.search_device(1) == "faiss-gpu"
    D, I = codec.search_codes(xq, codes, 50, ngpu=1, device=0)
    assert gpu.calls and all(c[3] == 0 for c in gpu.calls)
    assert np.array_equal(I, I_cpu) and np.array_equal(D, D_cpu)


def test_gpu_route_of_exact_neighbours_stays_within_faiss_gpu_k(data, monkeypatch):
    """k up to GPU_MAX_K goes to the GPU, k past it stays on the CPU (faiss-gpu refuses it)."""
    xb, xq = data
    gpu = fake_gpu.install(monkeypatch)
    exact_knn(xq, xb, GPU_MAX_K, "l2", ngpu=1)
    assert [c[2] for c in gpu.calls] == [GPU_MAX_K]
    D, I = exact_knn(xq, xb, GPU_MAX_K + 1, "l2", ngpu=1)
    assert len(gpu.calls) == 1 and I.shape == (len(xq), GPU_MAX_K + 1)


def test_gpu_route_of_the_incremental_evaluation_equals_a_search_of_the_stored_codes(tmp_path, monkeypatch):
    """An incremental run on a machine where faiss sees a GPU: training assigns on the 'GPU',
    and the kept rows' exact neighbours and search over their stored codes run there. PQ1
    codes tie all the time; the in-pass evaluation still equals evaluate's search of the
    stored codes on the CPU (0.05 against 0.04 recall@1 when ties ranked by GPU order)."""
    src = tmp_path / "src"
    for i, name in enumerate("abc"):
        part(src, f"{name}.parquet", i * 1000, (i + 1) * 1000)
    out = tmp_path / "out"
    gpu = fake_gpu.install(monkeypatch)
    ex = LocalExecutor()
    run(src, out, ex, codec="PQ1")
    for record in out.glob("_vecpress/t/runs/*/units.json"):  # as a version from before them: kept rows are read
        record.unlink()
    part(src, "d.parquet", 3000, 4000)
    calls = len(gpu.calls)
    night = run(src, out, ex, codec="PQ1", gate_max_drop=1.0)
    assert night.mode == "incremental" and len(gpu.calls) > calls  # the kept rows went through the 'GPU'
    assert_same_evaluation(night.eval, evaluate_version(str(out), "t", night.version, ex, recompute=True))


@pytest.mark.parametrize("spec", ["PQ8", "OPQ8,PQ8", "PQ16x4fs"])
def test_gpu_route_of_training_gives_a_plain_cpu_codec(data, monkeypatch, spec):
    """Training where faiss sees a GPU routes k-means assignment to a GpuIndexFlatL2 (here a
    CPU stand-in that assigns exactly as the CPU does) and releases it afterwards: the codec
    serialises as a plain CPU codec, byte for byte the CPU-trained one. On a real GPU the
    assignments round differently, and the `gpu` test compares quality instead."""
    xb, _ = data
    cpu = Codec.train(xb, spec, "l2", seed=1, ngpu=0)
    fake_gpu.install(monkeypatch)
    gpu = Codec.train(xb, spec, "l2", seed=1, ngpu=1)
    assert gpu.to_bytes() == cpu.to_bytes()
    assert Codec.from_bytes(gpu.to_bytes(), spec=spec, metric="l2").code_size == cpu.code_size


def test_gpu_route_of_the_served_model_gives_the_cpu_model(data, monkeypatch):
    """IvfModel.train where faiss sees a GPU clusters partitions and sub-quantizers through
    GpuIndexFlatL2 (the stand-in assigns exactly as the CPU does), one k-means iteration of
    the partitions at a time, reported as on the CPU, and releases it: the model is byte for
    byte the CPU-trained one, and serialises as a plain CPU index."""
    from vecpress.kernels.codecs.ivf import IvfModel

    xb, _ = data
    cpu = IvfModel.train(xb, "IVF16,PQ8", "l2", seed=1, ngpu=0)
    created = []
    fake_gpu.install(monkeypatch)
    make = fake_gpu.gpu_index_flat_l2
    monkeypatch.setattr(fake_gpu.faiss, "GpuIndexFlatL2", lambda res, d: created.append(make(res, d)) or created[-1])
    seen = []
    gpu = IvfModel.train(xb, "IVF16,PQ8", "l2", seed=1, ngpu=1, progress=lambda done, total: seen.append((done, total)))
    # partitions, and sub-quantizers: each assigned with (holding the centroids of its last iteration)
    assert [(int(i.d), int(i.ntotal)) for i in created] == [(xb.shape[1], 16), (xb.shape[1] // 8, 256)]
    assert seen == [(i, 11) for i in range(1, 12)]  # (faiss's 10 iterations, then the PQ)
    assert gpu.to_bytes() == cpu.to_bytes()
    assert IvfModel.from_bytes(gpu.to_bytes(), spec="IVF16,PQ8", metric="l2").num_sub_vectors == 8


def test_gpu_route_of_residual_training_assigns_on_the_gpu_stage_by_stage(data, monkeypatch):
    """On a GPU a residual quantizer trains stage by stage as on the CPU (a subsample, beam 1,
    each stage reported), with GPU flat indexes assigning: each step of each stage's
    progressive-dimension k-means, and each stage's nearest centroids. The codec is byte for
    byte the CPU-trained one; PRQ's sub-quantizers take the same route."""
    xb, _ = data
    for spec, metric, stages, d in [("RQ3x6", "cosine", 3, DIM), ("PRQ2x2x6", "l2", 4, DIM // 2)]:
        cpu = Codec.train(xb, spec, metric, seed=1, ngpu=0)
        created = []
        fake_gpu.install(monkeypatch)
        make = fake_gpu.gpu_index_flat_l2
        monkeypatch.setattr(fake_gpu.faiss, "GpuIndexFlatL2",
                            lambda res, d: created.append(make(res, d)) or created[-1])
        seen = []
        gpu = Codec.train(xb, spec, metric, seed=1, ngpu=1, progress=lambda done, total: seen.append((done, total)))
        monkeypatch.undo()
        assert seen == [(i, stages) for i in range(1, stages + 1)]
        steps = [int(d ** (i / 4)) for i in range(1, 5)]  # (4 steps of 5 iterations: 39+ rows a centroid)
        assert [(int(i.d), int(i.ntotal)) for i in created] == [(di, 64) for di in steps + [d]] * stages
        assert gpu.to_bytes() == cpu.to_bytes()


def test_gpu_route_of_lsq_training_encodes_on_the_gpu_and_releases_it(data, monkeypatch):
    """An LSQ trains with faiss's GPU ICM encoder where faiss has one (the stand-in: the CPU's
    encoder factory, so the codec is the CPU's), and the trained codec holds no GPU helper."""
    import vecpress.kernels.codecs.train as train_module

    xb, _ = data
    cpu = Codec.train(xb[:1000], "LSQ2x4", "l2", seed=1, ngpu=0)
    fake_gpu.install(monkeypatch)
    made, kept = [], []
    monkeypatch.setattr(fake_gpu.faiss, "GpuIcmEncoderFactory", lambda n: made.append(n) or faiss.IcmEncoderFactory(),
                        raising=False)
    release = train_module._release_gpu
    monkeypatch.setattr(train_module, "_release_gpu", lambda inner: kept.append(inner.lsq.icm_encoder_factory)
                        or release(inner))
    gpu = Codec.train(xb[:1000], "LSQ2x4", "l2", seed=1, ngpu=1)
    assert made == [1] and kept[0] is not None
    assert gpu.to_bytes() == cpu.to_bytes()
    assert train_module._innermost(gpu.index)[1].lsq.icm_encoder_factory is None


@pytest.mark.parametrize("spec,metric", [("IVF16,PQ8", "l2"), ("IVF16,SQ", "cosine"), ("IVF16,PQ4", "ip")])
def test_gpu_route_of_the_served_encode_gives_the_cpu_partitions(data, monkeypatch, spec, metric):
    """The encode pass of a served table on a GPU actor (device cuda:0) searches the partitions
    with faiss's GPU brute force; the partitions, and so the residual codes, are the CPU's."""
    from vecpress.kernels.codecs.ivf import IvfModel

    xb, _ = data
    model = IvfModel.train(xb, spec, metric, seed=1, ngpu=0)
    cpu = model.encode(xb)
    assert model.encode_device("cuda:0") == "cpu"  # (no GPU: the CPU route)
    gpu = fake_gpu.install(monkeypatch)
    assert model.encode_device("cuda:0") == "cuda:0" and model.encode_device("cpu") == "cpu"
    on_gpu = model.encode(xb, device="cuda:0")
    assert gpu.calls and gpu.calls[0][1:] == (16, 1, 0)  # the 16 centroids, top-1, GPU 0
    assert np.array_equal(on_gpu, cpu)
