"""Served forms: the parts of a vector index that LanceDB searches, trained and computed here.

A served spec names the index LanceDB builds over the output's vector column, and which of its
parts vecpress supplies:

- `IVF<n>,PQ<m>`: Lance's IVF_PQ, n partitions, m 8-bit sub-quantizers of the residual to the
  partition's centroid. vecpress trains the centroids and the PQ codebook (faiss, as
  `IVF<n>,PQ<m>np`), assigns every row to its partition and encodes its residual; Lance stores
  them as they are (its partitions and codes equal faiss's for the same model, ../shared/
  PITFALLS.md), so LanceDB's search is that of this model.
- `IVF<n>,HNSW,PQ<m>`: Lance's IVF_HNSW_PQ, the same parts, plus an HNSW graph over each
  partition's codes that Lance builds.
- `IVF<n>,SQ`, `IVF<n>,HNSW,SQ`, `IVF<n>,FLAT`, `IVF<n>,HNSW,FLAT`, `IVF<n>,RaBitQ`: Lance's
  IVF_SQ (8-bit), IVF_HNSW_SQ, IVF_FLAT, IVF_HNSW_FLAT and IVF_RQ (RaBitQ). vecpress trains the
  centroids and assigns every row to its partition (the per-row work that dominates a build);
  Lance's formats take no trained scalar-quantizer bounds or rotation, so Lance fits those
  (each segment on its own rows) and encodes the vectors of each partition itself.

Metrics as Lance applies them: "l2"; "cosine" (vectors normalised, then L2 partitions and
residuals: Lance normalises stored vectors and queries for a cosine index); "ip" (Lance's
"dot").

`IvfModel` offers what a vecpress codec offers where the pipeline needs it: `encode` gives each
row's partition (4 bytes, little-endian) followed by its m PQ bytes (none for the forms whose
codes Lance computes), `decode` the centroid plus the decoded residual (the centroid alone
without PQ), `search_codes` an exhaustive search over such reconstructions (for drift probes on
a sample, not a query path).
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass

import numpy as np

from vecpress.kernels._faiss import faiss, num_gpus
from vecpress.kernels.codecs.kmeans import iterates, kmeans_by_iteration
from vecpress.kernels.codecs.spec import CodecSpecError
from vecpress.kernels.knn import exact_knn, faiss_metric, prepare_vectors

#: Lance's distance type for each vecpress metric
LANCE_METRICS = {"l2": "l2", "cosine": "cosine", "ip": "dot"}
#: training vectors k-means wants per centroid before it warns (faiss's rule)
POINTS_PER_CENTROID = 39


#: spec word -> (Lance index type without HNSW, with HNSW)
FORMS = {"PQ": ("IVF_PQ", "IVF_HNSW_PQ"), "SQ": ("IVF_SQ", "IVF_HNSW_SQ"), "FLAT": ("IVF_FLAT", "IVF_HNSW_FLAT"),
         "RaBitQ": ("IVF_RQ", None)}
SERVED_GRAMMAR = ("IVF<n>,PQ<m>, IVF<n>,HNSW,PQ<m>, IVF<n>,SQ, IVF<n>,HNSW,SQ, IVF<n>,FLAT, IVF<n>,HNSW,FLAT "
                  "or IVF<n>,RaBitQ")


@dataclass(frozen=True)
class ServedSpec:
    spec: str
    num_partitions: int
    num_sub_vectors: int  # PQ bytes per row; 0 where Lance computes the codes (SQ, FLAT, RaBitQ)
    form: str = "PQ"  # "PQ", "SQ", "FLAT" or "RaBitQ"
    hnsw: bool = False

    @property
    def index_type(self) -> str:
        """Lance's name of the index type."""
        return FORMS[self.form][self.hnsw]

    def index_bytes(self, dim: int) -> int:
        """Bytes per row the index stores for the row's vector: PQ m; SQ one per dim; FLAT the
        float32 vector; RaBitQ one bit per dim (Lance adds a few bytes of factors)."""
        return {"PQ": self.num_sub_vectors, "SQ": dim, "FLAT": 4 * dim, "RaBitQ": -(-dim // 8)}[self.form]


def is_served_spec(spec: str | None) -> bool:
    return bool(spec) and spec.strip().upper().startswith("IVF")


def parse_served_spec(spec: str, dim: int) -> ServedSpec:
    """A served spec for this dim, or CodecSpecError saying what would fit."""
    m = re.fullmatch(r"IVF(\d+)(,HNSW)?,(?:PQ(\d+)|(SQ|FLAT|RaBitQ))", spec.strip())
    if not m:
        raise CodecSpecError(f"served form {spec!r}: LanceDB serves {SERVED_GRAMMAR} (Lance's IVF_PQ, IVF_HNSW_PQ, "
                             f"IVF_SQ, IVF_HNSW_SQ, IVF_FLAT, IVF_HNSW_FLAT, IVF_RQ), e.g. IVF256,PQ{max(1, dim // 8)}")
    nlist, hnsw = int(m.group(1)), m.group(2) is not None
    form = m.group(4) or "PQ"
    nsub = int(m.group(3)) if form == "PQ" else 0
    if nlist < 1:
        raise CodecSpecError(f"served form {spec!r}: at least one partition")
    if form == "PQ" and (nsub < 1 or dim % nsub):
        fits = [d for d in range(1, min(dim, 256) + 1) if dim % d == 0]
        raise CodecSpecError(f"served form {spec!r}: PQ{nsub} must divide dim={dim}: try one of {fits}")
    if hnsw and FORMS[form][1] is None:
        raise CodecSpecError(f"served form {spec!r}: Lance has no HNSW form of {form}: use IVF{nlist},{form}")
    return ServedSpec(spec.strip(), nlist, nsub, form, hnsw)


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
    """Validate against the data and the training sample; returns the bytes per row the index
    stores for a row's vector (ServedSpec.index_bytes)."""
    p = parse_served_spec(spec, dim)
    need = max(p.num_partitions, 256 if p.num_sub_vectors else 1)
    if num_train < need:
        what = f"{p.num_partitions} partitions" + (", 256 centroids per sub-quantizer" if p.num_sub_vectors else "")
        raise CodecSpecError(f"served form {spec!r} needs at least {need} training vectors ({what}), only "
                             f"{num_train} available: fewer partitions, or sample a larger corpus")
    return p.index_bytes(dim)


class IvfModel:
    """A trained served model (faiss IndexIVFPQ, or IndexIVFFlat for the forms whose codes Lance
    computes; empty), its metric and spec."""

    is_binary = False
    is_pq = False

    def __init__(self, spec: str, metric: str, index):
        self.spec, self.metric = spec, metric
        self._owner = index  # (the downcast wrapper does not own the C++ index: keep its owner alive)
        self.index = faiss.downcast_index(index)
        self.dim = int(self.index.d)
        self.served = parse_served_spec(spec, self.dim)
        self.centroids = self.index.quantizer.reconstruct_n(0, self.index.nlist)
        pq = getattr(self.index, "pq", None) if self.served.num_sub_vectors else None
        self._pq = pq
        self.codebook = None if pq is None else faiss.vector_to_array(pq.centroids).reshape(pq.M, pq.ksub, pq.dsub)
        self.num_sub_vectors = 0 if pq is None else int(pq.M)

    @property
    def index_type(self) -> str:
        return self.served.index_type

    @property
    def code_size(self) -> int:
        return 4 + self.num_sub_vectors

    @property
    def lance_metric(self) -> str:
        return LANCE_METRICS[self.metric]

    @classmethod
    def train(cls, xt: np.ndarray, spec: str, metric: str, *, seed: int = 0, ngpu: int = -1,
              progress=None) -> "IvfModel":
        """Train on raw vectors (normalised here for cosine), deterministic for a seed; k-means
        assigns on a GPU where faiss sees one (`ngpu`: -1 all, 0 none). `progress`: as
        Codec.train's; it hears of each k-means iteration of the partitions (and of
        the PQ's training, one step more), the same model as faiss's one call
        (kernels/codecs/kmeans.py), and so it does on a GPU (the GPU's index assigning)."""
        p = parse_served_spec(spec, xt.shape[1])
        xt = prepare_vectors(xt, metric)
        mt = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
        body = f"PQ{p.num_sub_vectors}np" if p.num_sub_vectors else "Flat"
        index = faiss.index_factory(xt.shape[1], f"IVF{p.num_partitions},{body}", mt)
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        ivf.cp.seed = seed
        pq = ivf.pq if p.num_sub_vectors else None
        if pq is not None:
            pq.cp.seed = seed
        helpers, assign = None, None  # (assign: the partitions' k-means assignment, a GPU's flat index)
        if num_gpus(ngpu) > 0:  # k-means assignment (partitions, then sub-quantizers) on the GPU
            res = faiss.StandardGpuResources()
            helpers = (res, faiss.GpuIndexFlatL2(res, xt.shape[1]),
                       None if pq is None else faiss.GpuIndexFlatL2(res, int(pq.dsub)))
            if metric != "ip":  # (an inner-product IVF clusters with its own flat IP index)
                ivf.clustering_index = assign = helpers[1]
            if pq is not None:
                pq.assign_index = helpers[2]
        try:
            if iterates(ivf.cp) and not ivf.quantizer.ntotal:  # iteration by iteration
                steps = int(ivf.cp.niter) + (pq is not None)
                step = None if progress is None else (lambda done, _: progress(done, steps))
                ivf.quantizer.add(kmeans_by_iteration(xt, int(ivf.nlist), ivf.cp, ivf.quantizer.metric_type, step,
                                                      assign=assign))
                index.train(xt)  # (the partitions are trained: faiss trains the PQ alone, on a GPU its assign_index)
                if progress is not None and pq is not None:
                    progress(steps, steps)
            else:
                index.train(xt)
        finally:
            if helpers is not None:  # released: the model serialises as a plain CPU index
                ivf.clustering_index = None
                if pq is not None:
                    pq.assign_index = None
        return cls(p.spec, metric, index)

    def assign(self, x: np.ndarray, *, device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
        """(partition uint32, PQ code of the residual (n, m) uint8; m = 0 without PQ) of raw
        vectors. The partition search (the per-row cost that grows with the partitions) runs
        on GPU `device` ("cuda:N") where faiss sees one, else on the CPU; the codes on the CPU."""
        xp = prepare_vectors(x, self.metric)
        if xp.shape[0] == 0:
            return np.zeros(0, np.uint32), np.zeros((0, self.num_sub_vectors), np.uint8)
        if self.encode_device(device) != "cpu":
            space = "ip" if self.metric == "ip" else "l2"
            _, part = exact_knn(xp, self.centroids, 1, space, ngpu=1, device=int(device.partition(":")[2] or 0))
        else:
            _, part = self.index.quantizer.search(xp, 1)
        part = part[:, 0]
        if self._pq is None:
            return part.astype(np.uint32), np.zeros((len(part), 0), np.uint8)
        return part.astype(np.uint32), self._pq.compute_codes(np.ascontiguousarray(xp - self.centroids[part]))

    def probe(self, xq: np.ndarray, nprobes: int) -> np.ndarray:
        """The `nprobes` partitions nearest each raw query (n, nprobes) int64, nearest first
        (the coarse search of an IVF query; -1 where there are fewer partitions)."""
        _, part = self.index.quantizer.search(prepare_vectors(np.atleast_2d(xq), self.metric),
                                              int(min(nprobes, self.index.nlist)))
        return part

    def residuals(self, x: np.ndarray, partitions: np.ndarray) -> np.ndarray:
        """Raw vectors' residuals to their partitions' centroids (vectors prepared for the
        metric first: normalised for cosine), float32."""
        return np.ascontiguousarray(prepare_vectors(x, self.metric) - self.centroids[np.asarray(partitions)])

    @property
    def num_partitions(self) -> int:
        return int(self.index.nlist)

    def encode(self, x: np.ndarray, *, device: str = "cpu") -> np.ndarray:
        part, codes = self.assign(x, device=device)
        return np.hstack([part.astype("<u4").view(np.uint8).reshape(-1, 4), codes])

    @staticmethod
    def split(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """encode's rows -> (partitions, PQ codes)."""
        codes = np.ascontiguousarray(codes, np.uint8)
        return codes[:, :4].copy().view("<u4").ravel().astype(np.uint32), codes[:, 4:]

    def decode(self, codes: np.ndarray) -> np.ndarray:
        part, pq_codes = self.split(codes)
        if self._pq is None:  # (Lance's own codes of the residual are not known here: the centroid)
            return self.centroids[part]
        return self.centroids[part] + self._pq.decode(np.ascontiguousarray(pq_codes))

    def search_codes(self, xq: np.ndarray, codes: np.ndarray, k: int, *, ngpu: int = 0, device: int = -1):
        """Exhaustive search over the codes' reconstructions (a probe, not a query path)."""
        space = "l2" if self.metric in ("l2", "cosine") else "ip"
        return exact_knn(prepare_vectors(xq, self.metric), self.decode(codes), k, space)

    def search_device(self, ngpu: int = 0) -> str:
        return "faiss-cpu"

    def encode_device(self, device: str = "cuda") -> str:
        """Where `encode(x, device=device)` assigns partitions: "cuda:N" or "cpu"."""
        if device == "cpu" or num_gpus(-1) == 0:
            return "cpu"
        return f"cuda:{int(device.partition(':')[2] or 0)}"

    def gpu_encoder(self, device: str = "cuda"):
        return None

    def to_bytes(self) -> bytes:
        return faiss.serialize_index(self.index).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, *, spec: str, metric: str, sha256: str | None = None) -> "IvfModel":
        if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
            raise ValueError(f"model bytes do not match their checksum {sha256}")
        faiss_metric(metric)
        return cls(spec, metric, faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8)))
