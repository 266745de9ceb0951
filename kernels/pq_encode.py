"""Blocked product-quantizer encoding outside faiss, on the CPU: faiss's PQ codes, byte for
byte, up to ties and float rounding.

For each sub-quantizer m the nearest centroid of a sub-vector x_m is

    argmin_k ||x_m - c_mk||^2 = argmin_k (||c_mk||^2 - 2 x_m . c_mk)

(||x_m||^2 is the same for every k, so it is left out: one rounding fewer). Rows are taken a
block at a time, so the distances held at once are block_rows x M x 2^nbits floats, never
n x M x 2^nbits: `block_rows` bounds the working memory, not n.

Codes are packed as faiss packs them (PQEncoderGeneric): the M codes of nbits each form one
little-endian bit stream, code 0 in the lowest bits of byte 0; ceil(M * nbits / 8) bytes per
vector. nbits = 8 is one byte per code, nbits = 4 two codes per byte (low nibble first).

`Codec.encode` runs it for PQ codecs whose sub-vectors are not 4 or 8 wide (or narrower),
where it beats faiss's `sa_encode` (BENCHMARKS.md). On GPUs, kernels.gpu_encode's fused CUDA
kernel encodes (benchmarks/torch_pq.py keeps a naive torch GEMM + argmin as its baseline).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

import numpy as np

from vecpress.kernels._faiss import faiss

#: distance bytes held at once per block (block_rows x M x 2^nbits float32): 32 MiB
DEFAULT_BLOCK_BYTES = 32 << 20


@dataclass(frozen=True)
class PQCodebook:
    """A trained product quantizer as plain arrays, plus the faiss vector transforms (OPQ, PCA,
    random rotation, MRL remap...) that the index applies before it.

    `centroids` is (M, 2^nbits, dsub) float32. `index` keeps the faiss objects that own the
    transforms alive.
    """

    centroids: np.ndarray
    nbits: int
    transforms: tuple
    index: object

    @property
    def M(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def code_size(self) -> int:
        return (self.M * self.nbits + 7) // 8

    def prepare(self, x: np.ndarray) -> np.ndarray:
        """Apply the index's pre-transforms: the vectors the PQ itself sees."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        for vt in self.transforms:
            x = vt.apply(x)
        return x


def pq_codebook(index) -> PQCodebook:
    """The product quantizer inside a trained IndexPQ / IndexPQFastScan, possibly wrapped in
    IndexPreTransform levels; ValueError for any other codec."""
    inner = faiss.downcast_index(index)
    chain = []
    while isinstance(inner, faiss.IndexPreTransform):
        chain.extend(faiss.downcast_VectorTransform(inner.chain.at(i)) for i in range(inner.chain.size()))
        inner = faiss.downcast_index(inner.index)
    if not isinstance(inner, (faiss.IndexPQ, faiss.IndexPQFastScan)):
        raise ValueError(f"not a product-quantizer codec: innermost index is {type(inner).__name__}")
    if not inner.is_trained:
        raise ValueError("the product quantizer is not trained")
    pq = inner.pq
    centroids = faiss.vector_to_array(pq.centroids).reshape(int(pq.M), int(pq.ksub), int(pq.dsub))
    return PQCodebook(centroids=np.ascontiguousarray(centroids, np.float32), nbits=int(pq.nbits),
                      transforms=tuple(chain), index=index)


def default_block_rows(M: int, nbits: int, *, block_bytes: int = DEFAULT_BLOCK_BYTES) -> int:
    """Rows per block so that one block's distances (rows x M x 2^nbits float32) fit `block_bytes`."""
    per_row = M * (1 << nbits) * 4
    return max(64, min(1 << 16, block_bytes // per_row))


def _check(x, centroids: np.ndarray, nbits: int) -> tuple[int, int, int]:
    if centroids.ndim != 3:
        raise ValueError(f"centroids must be (M, 2^nbits, dsub), got shape {centroids.shape}")
    M, ksub, dsub = centroids.shape
    if ksub != 1 << nbits:
        raise ValueError(f"centroids have {ksub} per sub-quantizer, nbits={nbits} needs {1 << nbits}")
    if not 1 <= nbits <= 16:
        raise ValueError(f"nbits must be 1..16, got {nbits}")
    if len(x.shape) != 2 or x.shape[1] != M * dsub:
        raise ValueError(f"vectors must be (n, {M * dsub}) for M={M} x dsub={dsub}, got {tuple(x.shape)}")
    return M, ksub, dsub


def pack_bits(xp, bits, nbits_per_row: int):
    """(n, d) 0/1 uint8 -> (n, ceil(d / 8)) uint8, bit j of byte i = element 8 i + j (faiss's
    bit-stream order, numpy's bitorder="little"). `xp` is numpy or cupy."""
    n = bits.shape[0]
    nbytes = (nbits_per_row + 7) // 8
    pad = nbytes * 8 - nbits_per_row
    if pad:
        bits = xp.concatenate([bits, xp.zeros((n, pad), xp.uint8)], axis=1)
    weights = (1 << xp.arange(8, dtype=xp.uint32)).astype(xp.uint8)
    return (bits.reshape(n, nbytes, 8) * weights).sum(axis=2, dtype=xp.uint32).astype(xp.uint8)


def pack_codes(assign, nbits: int, xp=np):
    """(n, M) integer centroid ids -> (n, ceil(M * nbits / 8)) uint8 in faiss's PQ layout, with
    array module `xp` (numpy, or cupy for codes still on the GPU)."""
    n, M = assign.shape
    if nbits == 8:
        return assign.astype(xp.uint8, copy=False)
    if nbits == 4 and M % 2 == 0:
        a = assign.astype(xp.uint8)
        return (a[:, 0::2] | (a[:, 1::2] << 4)).astype(xp.uint8)
    bits = ((assign.astype(xp.uint32)[:, :, None] >> xp.arange(nbits, dtype=xp.uint32)) & 1).astype(xp.uint8)
    return pack_bits(xp, bits.reshape(n, M * nbits), M * nbits)


def encode_pq(x, centroids: np.ndarray, nbits: int, *, block_rows: int | None = None) -> np.ndarray:
    """PQ codes of (already pre-transformed) vectors on the CPU: (n, M * dsub) -> (n, code_size)
    uint8. `block_rows` (default: 4 MiB of distances per sub-quantizer) bounds memory."""
    centroids = np.ascontiguousarray(centroids, dtype=np.float32)
    return _encode_numpy(np.ascontiguousarray(x, dtype=np.float32), centroids, nbits, block_rows)


# ---- numpy reference --------------------------------------------------------------------------

def _encode_numpy(x: np.ndarray, centroids: np.ndarray, nbits: int, block_rows: int | None) -> np.ndarray:
    M, ksub, dsub = _check(x, centroids, nbits)
    n = x.shape[0]
    # per sub-quantizer one GEMM of the block against its codebook: the block's distances for
    # one m at a time, so block_rows x 2^nbits floats are live (x M is the bound we promise)
    rows = block_rows or default_block_rows(1, nbits, block_bytes=4 << 20)
    ct2 = np.ascontiguousarray(centroids.transpose(0, 2, 1)) * np.float32(-2)  # (M, dsub, ksub), exact
    cnorm = (centroids ** 2).sum(axis=2, dtype=np.float32)  # (M, ksub)
    assign = np.empty((n, M), np.int32 if nbits > 8 else np.uint8)
    dist = np.empty((min(rows, max(n, 1)), ksub), np.float32)
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        xb = np.ascontiguousarray(x[lo:hi].reshape(hi - lo, M, dsub).transpose(1, 0, 2))  # (M, b, dsub)
        d = dist[: hi - lo]
        for m in range(M):
            np.matmul(xb[m], ct2[m], out=d)
            d += cnorm[m]
            assign[lo:hi, m] = d.argmin(axis=1)
    return pack_codes(assign, nbits)


# ---- optional dependencies ---------------------------------------------------------------------

def optional_module(name: str, hint: str):
    """An optional dependency, imported on first use, or ImportError saying `hint`."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(hint) from exc
