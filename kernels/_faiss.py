"""Import faiss once, with an error that says how to install it."""

from __future__ import annotations

try:
    import faiss  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "vecpress needs faiss: install `vecpress[cpu]` (faiss-cpu) or, on a GPU machine, "
        "`vecpress[gpu]` (faiss-gpu) -- not both, they provide the same `faiss` module"
    ) from exc

# Brute-force kNN (faiss.knn, IndexFlat search) switches from a one-query-at-a-time SIMD loop to
# BLAS GEMM when (number of queries x dim) reaches this threshold. faiss 1.15's default, 128000,
# keeps e.g. 300 queries at 384-d on the loop, which measured 7x slower than BLAS there (13 vs
# 100 GFLOP/s on one core, BENCHMARKS.md); BLAS wins from about 4 queries on. vecpress's
# searches are batches (held-out queries, decoded-code search), so BLAS from 1024 = 4 x 256.
BLAS_THRESHOLD = 1024
faiss.cvar.distance_compute_blas_threshold = BLAS_THRESHOLD


def num_gpus(ngpu: int = -1) -> int:
    """GPUs to use: `ngpu=-1` means all that faiss sees; a CPU build sees 0."""
    get = getattr(faiss, "get_num_gpus", None)
    available = int(get()) if get is not None else 0
    return available if ngpu < 0 else min(ngpu, available)
