"""Served forms: the parts of a vector index that LanceDB searches, trained and computed here.

A served spec names the index LanceDB builds over the output's vector column: `IVF<n>,PQ<m>`
is Lance's IVF_PQ with n partitions and m 8-bit sub-quantizers of the residual to the
partition's centroid. vecpress trains the coarse centroids and the PQ codebook (faiss, as
`IVF<n>,PQ<m>np`), assigns every row to its partition and encodes its residual; Lance stores
them as they are (its partitions and codes equal faiss's for the same model, ../shared/
PITFALLS.md), so LanceDB's search is that of this model.

Metrics as Lance applies them: "l2"; "cosine" (vectors normalised, then L2 partitions and
residuals: Lance normalises stored vectors and queries for a cosine index); "ip" (Lance's
"dot").

`IvfPq` offers what a vecpress codec offers where the pipeline needs it: `encode` gives each
row's partition (4 bytes, little-endian) followed by its m PQ bytes, `decode` the centroid
plus the decoded residual, `search_codes` an exhaustive search over such codes (for drift
probes on a sample, not a query path).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

import numpy as np

from vecpress.kernels._faiss import faiss, num_gpus
from vecpress.kernels.codecs.spec import CodecSpecError
from vecpress.kernels.knn import exact_knn, faiss_metric, prepare_vectors

#: Lance's distance type for each vecpress metric
LANCE_METRICS = {"l2": "l2", "cosine": "cosine", "ip": "dot"}
#: training vectors k-means wants per centroid before it warns (faiss's rule)
POINTS_PER_CENTROID = 39


@dataclass(frozen=True)
class ServedSpec:
    spec: str
    num_partitions: int
    num_sub_vectors: int


def is_served_spec(spec: str | None) -> bool:
    return bool(spec) and spec.strip().upper().startswith("IVF")


def parse_served_spec(spec: str, dim: int) -> ServedSpec:
    """`IVF<n>,PQ<m>` for this dim, or CodecSpecError saying what would fit."""
    m = re.fullmatch(r"IVF(\d+),PQ(\d+)", spec.strip())
    if not m:
        raise CodecSpecError(f"served form {spec!r}: LanceDB serves IVF<n>,PQ<m> (Lance's IVF_PQ, 8-bit codes), "
                             f"e.g. IVF256,PQ{max(1, dim // 8)}")
    nlist, nsub = int(m.group(1)), int(m.group(2))
    if nlist < 1:
        raise CodecSpecError(f"served form {spec!r}: at least one partition")
    if nsub < 1 or dim % nsub:
        fits = [d for d in range(1, min(dim, 256) + 1) if dim % d == 0]
        raise CodecSpecError(f"served form {spec!r}: PQ{nsub} must divide dim={dim}: try one of {fits}")
    return ServedSpec(spec.strip(), nlist, nsub)


def default_served_spec(dim: int, num_rows: int) -> str:
    """IVF with about sqrt(rows) partitions (a power of two, 1 to 65,536; at least 39 rows
    each: faiss's k-means rule) and PQ with sub-vectors of 8 dims or more where dim allows,
    at most 64 bytes: LanceDB's own defaults, near enough."""
    nlist = 1 << max(0, int(round(math.log2(max(1.0, math.sqrt(num_rows))))))
    while nlist > 1 and num_rows < nlist * POINTS_PER_CENTROID:
        nlist //= 2
    nsub = max(d for d in range(1, min(64, dim) + 1) if dim % d == 0 and (dim // d >= 8 or d == 1))
    return f"IVF{min(nlist, 65_536)},PQ{nsub}"


def served_grid(dim: int, num_rows: int, *, min_bytes: int = 8, max_bytes: int = 256) -> list[str]:
    """The advisor's candidates for a LanceDB-served table: the default partitions, and PQ
    with every usual sub-vector count that divides dim and falls within the bytes (each
    sub-vector one byte)."""
    nlist = parse_served_spec(default_served_spec(dim, num_rows), dim).num_partitions
    return [f"IVF{nlist},PQ{m}" for m in (4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
            if dim % m == 0 and min_bytes <= m <= max_bytes]


def check_served_spec(spec: str, dim: int, num_train: int) -> int:
    """Validate against the data and the training sample; returns the bytes per row in the
    index (m PQ bytes)."""
    p = parse_served_spec(spec, dim)
    need = max(p.num_partitions, 256)
    if num_train < need:
        raise CodecSpecError(f"served form {spec!r} needs at least {need} training vectors "
                             f"({p.num_partitions} partitions, 256 centroids per sub-quantizer), only {num_train} "
                             "available: fewer partitions, or sample a larger corpus")
    return p.num_sub_vectors


class IvfPq:
    """A trained IVF-PQ model (faiss IndexIVFPQ, empty), its metric and spec."""

    is_binary = False
    is_pq = False

    def __init__(self, spec: str, metric: str, index):
        self.spec, self.metric = spec, metric
        self._owner = index  # (the downcast wrapper does not own the C++ index: keep its owner alive)
        self.index = faiss.downcast_index(index)
        self.dim = int(self.index.d)
        self.centroids = self.index.quantizer.reconstruct_n(0, self.index.nlist)
        pq = self.index.pq
        self.codebook = faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub)
        self.num_sub_vectors = int(pq.M)

    @property
    def code_size(self) -> int:
        return 4 + self.num_sub_vectors

    @property
    def lance_metric(self) -> str:
        return LANCE_METRICS[self.metric]

    @classmethod
    def train(cls, xt: np.ndarray, spec: str, metric: str, *, seed: int = 0, ngpu: int = -1) -> "IvfPq":
        """Train on raw vectors (normalised here for cosine), deterministic for a seed; k-means
        assigns on a GPU where faiss sees one (`ngpu`: -1 all, 0 none)."""
        p = parse_served_spec(spec, xt.shape[1])
        xt = prepare_vectors(xt, metric)
        mt = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
        index = faiss.index_factory(xt.shape[1], f"IVF{p.num_partitions},PQ{p.num_sub_vectors}np", mt)
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        ivf.cp.seed = seed
        ivf.pq.cp.seed = seed
        helpers = None
        if num_gpus(ngpu) > 0:  # k-means assignment (partitions, then sub-quantizers) on the GPU
            res = faiss.StandardGpuResources()
            helpers = (res, faiss.GpuIndexFlatL2(res, xt.shape[1]), faiss.GpuIndexFlatL2(res, int(ivf.pq.dsub)))
            if metric != "ip":  # (an inner-product IVF clusters with its own flat IP index)
                ivf.clustering_index = helpers[1]
            ivf.pq.assign_index = helpers[2]
        try:
            index.train(xt)
        finally:
            if helpers is not None:  # released: the model serialises as a plain CPU index
                ivf.clustering_index = None
                ivf.pq.assign_index = None
        return cls(p.spec, metric, index)

    def assign(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(partition uint32, PQ code of the residual (n, m) uint8) of raw vectors."""
        xp = prepare_vectors(x, self.metric)
        if xp.shape[0] == 0:
            return np.zeros(0, np.uint32), np.zeros((0, self.num_sub_vectors), np.uint8)
        _, part = self.index.quantizer.search(xp, 1)
        part = part[:, 0]
        return part.astype(np.uint32), self.index.pq.compute_codes(np.ascontiguousarray(xp - self.centroids[part]))

    def encode(self, x: np.ndarray, *, device: str = "cpu") -> np.ndarray:
        part, codes = self.assign(x)
        return np.hstack([part.astype("<u4").view(np.uint8).reshape(-1, 4), codes])

    @staticmethod
    def split(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """encode's rows -> (partitions, PQ codes)."""
        codes = np.ascontiguousarray(codes, np.uint8)
        return codes[:, :4].copy().view("<u4").ravel().astype(np.uint32), codes[:, 4:]

    def decode(self, codes: np.ndarray) -> np.ndarray:
        part, pq_codes = self.split(codes)
        return self.centroids[part] + self.index.pq.decode(np.ascontiguousarray(pq_codes))

    def search_codes(self, xq: np.ndarray, codes: np.ndarray, k: int, *, ngpu: int = 0, device: int = -1):
        """Exhaustive search over the codes' reconstructions (a probe, not a query path)."""
        space = "l2" if self.metric in ("l2", "cosine") else "ip"
        return exact_knn(prepare_vectors(xq, self.metric), self.decode(codes), k, space)

    def search_device(self, ngpu: int = 0) -> str:
        return "faiss-cpu"

    def encode_device(self, device: str = "cuda") -> str:
        return "cpu"

    def gpu_encoder(self, device: str = "cuda"):
        return None

    def to_bytes(self) -> bytes:
        return faiss.serialize_index(self.index).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, *, spec: str, metric: str, sha256: str | None = None) -> "IvfPq":
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise ValueError(f"model bytes do not match their checksum {sha256}")
        faiss_metric(metric)
        return cls(spec, metric, faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8)))
