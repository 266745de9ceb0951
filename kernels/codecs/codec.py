"""Trained vector codecs: a faiss standalone codec plus the metric it serves.

A `Codec` is trained from a spec (grammar: codecs.spec) and turns every vector into a fixed
number of bytes (`code_size`) that can be stored, decoded and searched on its own, without a
coarse quantizer. Its index is built by codecs.build, trained by codecs.train, and its codes
are searched by codecs.search.
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass

import numpy as np

from vecpress.kernels._faiss import faiss
from vecpress.kernels.codecs.build import _innermost
from vecpress.kernels.codecs.residual import (
    codebook_norms, drop_cross_products, encode_greedy, greedy_codebooks, load_index,
)
from vecpress.kernels.codecs.search import (
    search_codes as _search_codes, search_device as _search_device, searched_index,
)
from vecpress.kernels.codecs.train import Iterations, train_index
from vecpress.kernels.pq_encode import encode_pq, pq_codebook
from vecpress.kernels.knn import prepare_vectors


#: bytes of rows Codec.encode prepares (normalises, transforms) and encodes at a time on the CPU
ENCODE_BLOCK_BYTES = 16 << 20


def encode_block_rows(dim: int) -> int:
    """Rows Codec.encode takes at a time on the CPU: at most ENCODE_BLOCK_BYTES of float32
    rows, a power of two (16,384 at 256-d, 4,096 at 768-d, 1,024 from 3,072-d), so that the
    greedy residual encoder's blocks of 1,024 stay whole. Every codec encodes each row on its
    own, so the codes are those of one call over all the rows; its
    temporaries (the normalised rows, a pre-transform's output, the residuals) stay this size
    whatever the batch, instead of a copy of the batch or more each: under cosine a 65,536-row
    batch at 3,072-d was 805 MB of normalised rows alone. Arrays that size come back from the
    allocator reused instead of mapped afresh: the advisor's first stage encodes its 20,000
    base rows once per candidate, and at 768-d mapping and touching each fresh copy took 0.15 s
    here, against 0.02 s to normalise them."""
    return max(1024, 1 << (ENCODE_BLOCK_BYTES // (4 * dim)).bit_length() - 1)


@dataclass
class Codec:
    """A trained codec. `index` is the trained, empty faiss index; it is never pickled:
    `to_bytes()` uses faiss.serialize_index."""

    spec: str
    metric: str
    dim: int
    index: object

    def __post_init__(self):
        drop_cross_products(self.index)  # (tables no search or encoding of this codec reads)

    @property
    def code_size(self) -> int:
        return int(self.index.sa_code_size())

    @property
    def is_binary(self) -> bool:
        """Bit-packed codes searched by Hamming distance (popcount of xor over the bytes)."""
        return isinstance(_innermost(self.index)[1], faiss.IndexLSH)

    # ---- training -------------------------------------------------------------------------
    @classmethod
    def train(cls, xt: np.ndarray, spec: str, metric: str, *, seed: int = 0, ngpu: int = -1,
              progress=None, start: "Codec | None" = None, iterations: Iterations | None = None) -> "Codec":
        """Train on `xt` (raw vectors; normalised here for cosine). Deterministic for a given
        seed and sample. Uses faiss's GPU k-means assignment when faiss sees a GPU.
        `progress(done, total)`, if given, hears of each step finished where the training has
        steps of its own (a PQ's sub-quantizers); where faiss runs them in one call (LSQ, the
        GPU), only if `progress` also reads faiss's verbose lines (`progress.faiss_lines`:
        pipeline.heartbeat.Heartbeat). `start`: a shorter residual quantizer of
        this one's family trained on the same `xt` and seed, whose stages are taken instead of
        trained again (kernels.codecs.nested.train_on). `iterations`: k-means iterations for a
        codec trained to be judged, not kept (train_index)."""
        index = train_index(xt, spec, metric, seed=seed, ngpu=ngpu, progress=progress,
                            start=None if start is None else start.index, iterations=iterations)
        return cls(spec=spec, metric=metric, dim=int(index.d), index=index)

    # ---- coding ---------------------------------------------------------------------------
    @property
    def is_pq(self) -> bool:
        """Plain or fast-scan PQ (behind any pre-transforms): encodable by kernels.pq_encode."""
        return isinstance(_innermost(self.index)[1], (faiss.IndexPQ, faiss.IndexPQFastScan))

    def encode(self, x: np.ndarray, *, device: str = "cpu", first: np.ndarray | None = None) -> np.ndarray:
        """(n, dim) float -> (n, code_size) uint8.

        device="cuda" (or "cuda:N"): PQ, scalar (8/4-bit, fp16) and binary codecs encode on
        that GPU through kernels.gpu_encode, pre-transforms included (faiss's codes for >= 99.9%
        of PQ sub-vectors, the same bytes for the others). Codecs without a GPU path, or a
        machine where CuPy sees no GPU, use faiss on the CPU: `encode_device` says which ran.

        `first` (a residual quantizer of beam 1 only): this codec's first bytes of the codes of
        `x`, as a shorter codec of its family encodes them (kernels.codecs.nested): only the
        stages after them are searched, and the codes are the same bytes.

        On the CPU the rows go `encode_block_rows(dim)` at a time (about 16 MB), each prepared
        and encoded on its own: the same codes, with temporaries of that size whatever `x`'s.
        """
        if first is not None and self._greedy_rq is None:
            raise ValueError(f"{self.spec} does not encode greedily stage by stage: it takes no first stages' codes")
        if device != "cpu" and first is None:
            encoder = self.gpu_encoder(device)
            if encoder is not None:
                return encoder.encode(np.asarray(x, dtype=np.float32))
        n = len(x)
        if first is not None and len(first) != n:
            raise ValueError(f"first stages' codes {np.shape(first)} do not fit {n} rows")
        rows = encode_block_rows(self.dim)
        if n <= rows:
            return self._encode_cpu(prepare_vectors(x, self.metric), first)
        codes = np.empty((n, self.code_size), np.uint8)
        for i in range(0, n, rows):
            codes[i:i + rows] = self._encode_cpu(prepare_vectors(x[i:i + rows], self.metric),
                                                 None if first is None else first[i:i + rows])
        return codes

    def _encode_cpu(self, x: np.ndarray, first: np.ndarray | None) -> np.ndarray:
        """Codes of prepared rows `x` on the CPU."""
        if x.shape[0] == 0:
            return np.zeros((0, self.code_size), np.uint8)
        cb = self.numpy_pq_codebook()
        if cb is not None:
            return encode_pq(cb.prepare(x), cb.centroids, cb.nbits)
        if self._greedy_rq is not None:  # (a residual quantizer of beam 1: one matrix product per stage)
            chain, books, norms = self._greedy_rq
            for vt in chain:
                x = vt.apply(x)
            return encode_greedy(books, x, first=first, norms=norms)
        return self.index.sa_encode(x)

    def numpy_pq_codebook(self):
        """The PQ codebook when CPU encoding should use kernels.pq_encode's blocked GEMM +
        arg-min instead of faiss's `sa_encode`, else None.

        faiss encodes PQ one vector at a time with SIMD kernels for 4- and 8-wide sub-vectors
        (and fewer), and through BLAS only from 16 wide. Measured (BENCHMARKS.md), the blocked
        numpy encoder is 2.4-4.7x faster at every other width, and faiss is faster at 4 and 8.
        Codes are faiss's, near-ties aside (tests/kernels/test_pq_encode.py)."""
        return self._numpy_pq

    @functools.cached_property
    def _numpy_pq(self):
        if not self.is_pq:
            return None
        cb = pq_codebook(self.index)
        dsub = cb.centroids.shape[2]
        return None if dsub <= 4 or dsub == 8 else cb

    @functools.cached_property
    def _greedy_rq(self):
        chain, inner = _innermost(self.index)
        books = greedy_codebooks(inner)  # (with their norms: computed once, not per block of rows encoded)
        return None if books is None else (chain, books, codebook_norms(books))

    def gpu_encoder(self, device: str = "cuda"):
        """The GpuEncoder of this codec on `device` ("cuda" = "cuda:0"), built once; None when
        the codec has no GPU path or no GPU is usable here."""
        from vecpress.kernels.gpu_encode import GpuEncoder, gpu_count, plan_codec

        device_id = int(device.split(":", 1)[1]) if ":" in device else 0
        cache = self._gpu_encoders
        if device_id not in cache:
            plan = plan_codec(self.index, self.metric) if gpu_count() > device_id else None
            cache[device_id] = None if plan is None else GpuEncoder(plan, device_id=device_id)
        return cache[device_id]

    @functools.cached_property
    def _gpu_encoders(self) -> dict:
        return {}  # device id -> GpuEncoder or None, built on first use

    def encode_device(self, device: str = "cuda") -> str:
        """Where `encode(x, device=device)` runs: "cuda:N" or "cpu"."""
        encoder = None if device == "cpu" else self.gpu_encoder(device)
        return "cpu" if encoder is None else f"cuda:{encoder.device_id}"

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """(n, code_size) uint8 -> (n, dim) float32 reconstructions (of the normalised vectors
        for cosine; MRL codecs pad the decoded prefix with zeros back to dim)."""
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        if codes.shape[0] == 0:
            return np.zeros((0, self.dim), np.float32)
        chain, inner = _innermost(self.index)
        if not isinstance(inner, faiss.IndexLSH):
            return self.index.sa_decode(codes)
        scaling = chain[-1]
        d = int(inner.nbits)
        signs = np.unpackbits(codes, axis=1, count=d, bitorder="little").astype(np.float32) * 2 - 1
        scale, shift = _binary_scale_shift(scaling)
        y = np.ascontiguousarray(signs * scale + shift, dtype=np.float32)
        for vt in reversed(chain[:-1]):
            y = vt.reverse_transform(y)
        return y

    def search_codes(self, xq: np.ndarray, codes: np.ndarray, k: int, *, ngpu: int = 0, device: int = -1):
        """Search of raw queries over stored codes: ADC for quantizers, Hamming distance
        between the query's code and the stored codes for binary codecs.

        For PQ, scalar and additive quantizers, ADC's distance is the exact distance from the
        (transformed) query to the code's reconstruction. Where it pays for this many
        queries (`_decoded_search_pays`: e.g. SQ from 32 queries, PQ from 256), the codes are
        decoded block by block and searched by a brute-force BLAS GEMM. It computes the same
        distances 2-3x (PQ, SQ) to 100x (RQ with L2) faster than faiss's per-pair search on the
        CPU (BENCHMARKS.md); results equal ADC's up to float rounding among near-ties. Fewer
        queries, fast-scan PQ, RaBitQ and few-table additive codes use faiss's own search.

        `ngpu` > 0 (and faiss sees a GPU): those codecs' decoded blocks are searched by faiss's
        GPU brute force instead (on GPU number `device`; -1: the current CUDA device), for any
        number of queries (and k up to knn.GPU_MAX_K); the others search on the CPU as above.
        `search_device(ngpu)` says which.

        Under cosine, codes rank by the unit query's L2 distance d to their reconstruction
        (not by the inner product with it, whose norm varies: codecs.search), and D is the
        negated similarity that estimates, d / 2 - 1. RaBitQ keeps its own estimator.

        Returns (D, I): D smaller-is-better, I row indexes into `codes` (-1 when fewer than k).
        """
        return _search_codes(self._searched, self.metric, xq, codes, k, ngpu=ngpu, device=device)

    def search_device(self, ngpu: int = 0) -> str:
        """Where search_codes(..., ngpu=ngpu) searches: "faiss-gpu" (decoded codes, GPU brute
        force) or "faiss-cpu"."""
        return _search_device(self._searched, ngpu)

    @functools.cached_property
    def _searched(self):
        return searched_index(self.index, self.metric)  # (cosine: ranked by L2 to the reconstruction)

    # ---- persistence ----------------------------------------------------------------------
    def to_bytes(self) -> bytes:
        return faiss.serialize_index(self.index).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, *, spec: str, metric: str, sha256: str | None = None) -> "Codec":
        """Rebuild from `to_bytes()` output; verifies the sha256 when given."""
        if sha256 is not None:
            got = hashlib.sha256(data).hexdigest()
            if got != sha256:
                raise ValueError(f"codec bytes do not match their checksum: expected {sha256}, got {got}")
        index = load_index(data)
        if not index.is_trained:
            raise ValueError("codec index is not trained")
        return cls(spec=spec, metric=metric, dim=int(index.d), index=index)


def _binary_scale_shift(scaling) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) of the binary codec's map z = (x - t) / s, read back from its LinearTransform."""
    d = int(scaling.d_out)
    a = faiss.vector_to_array(scaling.A).reshape(d, d).diagonal().astype(np.float64)
    b = faiss.vector_to_array(scaling.b).astype(np.float64)
    scale = 1.0 / a
    return scale.astype(np.float32), (-b * scale).astype(np.float32)
