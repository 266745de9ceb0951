"""Trained vector codecs: a faiss standalone codec plus the metric it serves.

A codec is described by a faiss factory string (`PQ32`, `PQ16x4`, `OPQ32,PQ32`, `RQ8x8`,
`SQ8`, `SQfp16`, ...). Only "flat-code" indexes are accepted: every vector becomes a fixed
number of bytes (`code_size`) that can be stored, decoded and searched on its own, without a
coarse quantizer. Search over stored codes is faiss's asymmetric distance computation (ADC):
queries stay float, the database stays compressed.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

from kernels._faiss import faiss, num_gpus
from kernels.knn import as_distances, faiss_metric, prepare_vectors


class CodecSpecError(ValueError):
    """A codec spec that cannot work for this data (raised before any data is read)."""


def _divisors(n: int) -> list[int]:
    return [m for m in range(1, n + 1) if n % m == 0]


def _innermost(index):
    """(chain of vector transforms, innermost flat-code index) of a factory-built index."""
    index = faiss.downcast_index(index)
    chain = []
    while isinstance(index, faiss.IndexPreTransform):
        chain.extend(faiss.downcast_VectorTransform(index.chain.at(i)) for i in range(index.chain.size()))
        index = faiss.downcast_index(index.index)
    return chain, index


def _min_train(inner) -> int:
    """The fewest training vectors the codec can be trained on at all."""
    if isinstance(inner, faiss.IndexPQ):
        return 1 << inner.pq.nbits
    if isinstance(inner, faiss.IndexResidualQuantizer):
        return max(1 << int(inner.rq.nbits.at(i)) for i in range(inner.rq.nbits.size()))
    if isinstance(inner, faiss.IndexLocalSearchQuantizer):
        return 1 << int(inner.lsq.nbits.at(0))
    return 1


def build_index(spec: str, dim: int, metric: str):
    """An untrained faiss index for `spec`, or CodecSpecError saying what would fit."""
    mt = faiss_metric(metric)
    spec = spec.strip()
    try:
        index = faiss.index_factory(dim, spec, mt)
    except RuntimeError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else "rejected by faiss"
        hint = ""
        m = _leading_m(spec)
        if m is not None and dim % m:
            fits = [d for d in _divisors(dim) if d <= 256 and d > 1]
            hint = f"; m must divide dim={dim}: try one of {fits}"
        raise CodecSpecError(f"codec {spec!r} does not work for dim={dim}: {reason}{hint}") from None
    _, inner = _innermost(index)
    if not isinstance(inner, faiss.IndexFlatCodes):
        raise CodecSpecError(
            f"codec {spec!r} builds a {type(inner).__name__}, not a standalone codec: use a "
            "flat-code spec such as PQ32, PQ32x4, OPQ32,PQ32, RQ8x8, SQ8 or SQfp16 "
            "(IVF/HNSW indexes are search structures, not codecs)"
        )
    return index


def _leading_m(spec: str) -> int | None:
    match = re.search(r"(?:^|,)(?:PQ|RQ|LSQ)(\d+)", spec)
    return int(match.group(1)) if match else None


def check_codec_spec(spec: str, dim: int, metric: str, num_train: int) -> int:
    """Validate a spec against the data's dim and the training-sample size, before any data
    is read. Returns the code size in bytes per vector."""
    index = build_index(spec, dim, metric)
    _, inner = _innermost(index)
    need = _min_train(inner)
    if num_train < need:
        raise CodecSpecError(
            f"codec {spec!r} needs at least {need} training vectors (2^nbits centroids), "
            f"only {num_train} available: use fewer bits (e.g. PQmx4) or a larger corpus"
        )
    return int(index.sa_code_size())


@dataclass
class Codec:
    """A trained codec. `index` is the trained, empty faiss index; it is never pickled:
    `to_bytes()` uses faiss.serialize_index."""

    spec: str
    metric: str
    dim: int
    index: object

    @property
    def code_size(self) -> int:
        return int(self.index.sa_code_size())

    # ---- training -------------------------------------------------------------------------
    @classmethod
    def train(cls, xt: np.ndarray, spec: str, metric: str, *, seed: int = 0, ngpu: int = -1) -> "Codec":
        """Train on `xt` (raw vectors; normalised here for cosine). Deterministic for a given
        seed and sample. Uses faiss's GPU k-means assignment when faiss sees a GPU."""
        xt = prepare_vectors(xt, metric)
        if not np.isfinite(xt).all():
            raise ValueError("training vectors contain NaN or Inf")
        dim = xt.shape[1]
        index = build_index(spec, dim, metric)
        chain, inner = _innermost(index)
        need = _min_train(inner)
        if xt.shape[0] < need:
            raise CodecSpecError(f"codec {spec!r} needs at least {need} training vectors, got {xt.shape[0]}")
        keep_alive = _configure_training(chain, inner, seed=seed, ngpu=ngpu)
        index.train(xt)
        _release_gpu(inner)
        del keep_alive
        return cls(spec=spec, metric=metric, dim=dim, index=index)

    # ---- coding ---------------------------------------------------------------------------
    def encode(self, x: np.ndarray) -> np.ndarray:
        """(n, dim) float -> (n, code_size) uint8."""
        x = prepare_vectors(x, self.metric)
        if x.shape[0] == 0:
            return np.zeros((0, self.code_size), np.uint8)
        return self.index.sa_encode(x)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """(n, code_size) uint8 -> (n, dim) float32 reconstructions (of the normalised vectors
        for cosine)."""
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        if codes.shape[0] == 0:
            return np.zeros((0, self.dim), np.float32)
        return self.index.sa_decode(codes)

    def search_codes(self, xq: np.ndarray, codes: np.ndarray, k: int):
        """Asymmetric search of raw queries over stored codes.

        Returns (D, I): D smaller-is-better, I row indexes into `codes` (-1 when fewer than k).
        """
        xq = prepare_vectors(xq, self.metric)
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        nq = xq.shape[0]
        if codes.shape[0] == 0 or k == 0:
            return np.full((nq, k), np.inf, np.float32), np.full((nq, k), -1, np.int64)
        chain, inner = _innermost(self.index)
        for vt in chain:
            xq = vt.apply(xq)
        searcher = faiss.clone_index(inner)
        searcher.reset()
        searcher.add_sa_codes(codes)
        D, I = searcher.search(xq, k)
        D = as_distances(D, self.metric).astype(np.float32)
        D[I < 0] = np.inf
        return D, I.astype(np.int64)

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
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        if not index.is_trained:
            raise ValueError("codec index is not trained")
        return cls(spec=spec, metric=metric, dim=int(index.d), index=index)


def _configure_training(chain, inner, *, seed: int, ngpu: int):
    """Seed every k-means the codec runs; route k-means assignment to the GPU if present."""
    if isinstance(inner, faiss.IndexPQ):
        inner.do_polysemous_training = False  # 6-8x slower training, no benefit for codes
        inner.pq.cp.seed = seed
    for q in (getattr(inner, "rq", None), getattr(inner, "lsq", None)):
        if q is not None and hasattr(q, "cp"):
            q.cp.seed = seed
    if isinstance(inner, faiss.IndexLocalSearchQuantizer):
        inner.lsq.random_seed = seed
    # OPQ's rotation and inner k-means use faiss's fixed internal seeds: deterministic as is
    if num_gpus(ngpu) == 0:
        return None
    res = faiss.StandardGpuResources()
    if isinstance(inner, faiss.IndexPQ):
        inner.pq.assign_index = faiss.GpuIndexFlatL2(res, inner.pq.dsub)
        return res, inner.pq.assign_index
    if isinstance(inner, faiss.IndexResidualQuantizer) and hasattr(faiss, "GpuProgressiveDimIndexFactory"):
        factory = faiss.GpuProgressiveDimIndexFactory(num_gpus(ngpu))
        inner.rq.assign_index_factory = factory
        return res, factory
    return res


def _release_gpu(inner) -> None:
    """Drop GPU helpers so the trained index serialises as a plain CPU codec."""
    if isinstance(inner, faiss.IndexPQ):
        inner.pq.assign_index = None
    if isinstance(inner, faiss.IndexResidualQuantizer) and hasattr(inner.rq, "assign_index_factory"):
        inner.rq.assign_index_factory = None
