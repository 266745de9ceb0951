"""A stand-in for faiss's GPU brute force, so that the GPU routes of the search code run on a
machine without a GPU (CI). `install(monkeypatch)` makes faiss report one GPU, and:

- `faiss.knn_gpu` checks its arguments as faiss-gpu's bfKnn does (float32, C-contiguous,
  rows on both sides, 0 < k <= 2048, a device number) and answers with faiss.knn, altered
  the way a GPU's answer differs from the CPU's: each distance rounded a little differently
  by the row's place (GEMM tiles), and rows of equal distance selected and listed in
  reverse order (a GPU's k-selection keeps no order among ties);
- `StandardGpuResources` and `GpuIndexFlatL2` (GPU k-means assignment) are CPU objects.

Only the faiss side is faked: CuPy still sees no GPU, so encoding stays on the CPU. The real
GPU runs the same routes through the `gpu`-marked tests (benchmarks/gpu_suite.sh).
"""

from __future__ import annotations

import numpy as np

from vecpress.kernels._faiss import faiss


class FakeGpuResources:
    pass


class FakeGpu:
    def __init__(self):
        #: (queries, rows, k, device) of every knn_gpu call
        self.calls: list[tuple[int, int, int, int]] = []

    def knn_gpu(self, res, xq, xb, k, D=None, I=None, metric=faiss.METRIC_L2, device=-1, use_cuvs=False,
                vectorsMemoryLimit=0, queriesMemoryLimit=0):
        assert isinstance(res, FakeGpuResources), res
        assert isinstance(device, int) and device >= -1, device
        for a in (xq, xb):
            assert a.dtype == np.float32 and a.ndim == 2 and a.flags.c_contiguous, (a.dtype, a.shape)
        assert xq.shape[0] > 0 and xb.shape[0] > 0, "bfKnn: no queries or no vectors"
        assert xq.shape[1] == xb.shape[1] and 0 < k <= 2048, (xq.shape, xb.shape, k)
        self.calls.append((xq.shape[0], xb.shape[0], k, device))
        Dc, Ic = faiss.knn(xq, xb, min(k + 8, xb.shape[0]), metric=metric)
        # a distance's rounding by the row's place: a few units of float32's last bits
        Dc = (Dc * (1 + np.float32(2.0 ** -22) * ((Ic * 40503) % 7 - 3))).astype(np.float32)
        key = Dc if metric == faiss.METRIC_L2 else -Dc
        order = np.lexsort((-Ic, key), axis=1)[:, :k]  # ties: last row first
        return np.take_along_axis(Dc, order, axis=1), np.take_along_axis(Ic, order, axis=1)


def gpu_index_flat_l2(res, d):
    assert isinstance(res, FakeGpuResources) and int(d) > 0, (res, d)
    return faiss.IndexFlatL2(int(d))


def install(monkeypatch) -> FakeGpu:
    import vecpress.kernels.knn

    fake = FakeGpu()
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1, raising=False)
    monkeypatch.setattr(faiss, "knn_gpu", fake.knn_gpu, raising=False)
    monkeypatch.setattr(faiss, "StandardGpuResources", FakeGpuResources, raising=False)
    monkeypatch.setattr(faiss, "GpuIndexFlatL2", gpu_index_flat_l2, raising=False)
    monkeypatch.setattr(vecpress.kernels.knn, "_gpu_resources", lambda: FakeGpuResources())
    return fake
