"""Trained vector codecs: a faiss standalone codec plus the metric it serves.

A codec is described by a spec: a faiss factory string, extended with a few vecpress words
where faiss has none. Every vector becomes a fixed number of bytes (`code_size`) that can be
stored, decoded and searched on its own, without a coarse quantizer. Search over stored codes
is faiss's asymmetric distance computation (ADC): queries stay float, the database stays
compressed -- except for binary codes, which are searched by Hamming distance between the
query's code and the stored codes (what LanceDB's `distance_type("hamming")` computes).

Spec grammar (comma-separated, `key=value` options anywhere after the first token):

- product quantizers: `PQ32` (8 bits), `PQ32x4`..`PQ32x12`, `OPQ32,PQ32`, `OPQ32_64,PQ32`,
  and the 4-bit fast-scan layout `PQ32x4fs` (codes stored as plain packed PQ codes, searched
  with faiss's IndexPQFastScan). Polysemous training is always off.
- additive quantizers: `RQ8x8`, `LSQ8x8`, `PRQ2x4x8`, `PLSQ2x4x8`. Options: `beam=N` (RQ/PRQ
  encoding beam, faiss max_beam_size: wider = better codes, slower encoding) and `ils=N`
  (LSQ/PLSQ local-search iterations per encoding, faiss encode_ils_iters, the LSQ analogue).
- scalar: `SQ4`, `SQ6`, `SQ8`, `SQfp16`, `SQbf16`. Option `calibrate=q` (SQ4/6/8 only): each
  dimension's range is the [q, 1-q] quantile range of the training sample instead of min..max,
  so a few outliers do not waste the levels (faiss RS_quantiles).
- RaBitQ: `RaBitQ` (1 bit per dim + 8 bytes of factors), `RaBitQ2`..`RaBitQ8` (multi-bit).
  Option `qb=N` (0..8): bits used to quantize queries during search (0 = float queries).
  faiss 1.15's decode() of a multi-bit RaBitQ code returns only the 1-bit reconstruction;
  search_codes uses all bits.
- binary sign quantization: `BIN` (bit i = x_i > 0) and `BINt` (bit i = x_i > median_i of the
  training sample); code size ceil(dim/8) bytes, the last byte zero-padded when dim is not a
  multiple of 8 (padding bits are 0 in every code, so Hamming distances are unaffected).
  Built as faiss IndexLSH behind a diagonal LinearTransform holding the thresholds and the
  per-dimension scale mean|x_i - t_i| that decode() uses (t_i +- scale_i).
  `is_binary` is True. Faiss transforms may come first (`RR64,BIN`, `PCA64,BINt`).
- Matryoshka truncation: `MRL256,<any of the above>` keeps the first 256 dims (renormalised
  to unit length for cosine only; ip and l2 use the raw prefix) and codes those. decode()
  returns the decoded prefix padded with zeros back to the input dim, so
  `relative_error(prepare_vectors(x), decode(encode(x)))` counts the dropped dims as error.
- faiss pre-transforms work as in the factory: `PCA64,PQ16`, `PCAR64,PQ16`, `RR64,PQ16`.

`check_codec_spec` rejects impossible specs before any data is read, saying what would fit.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from vecpress.kernels._faiss import faiss, num_gpus
from vecpress.kernels.pq_encode import encode_pq, pq_codebook
from vecpress.kernels.knn import TopK, as_distances, candidate_distances, exact_knn, faiss_metric, prepare_vectors


class CodecSpecError(ValueError):
    """A codec spec that cannot work for this data (raised before any data is read)."""


MAX_NBITS = 12  # more bits per sub-quantizer trains for hours and needs 2^nbits x 39 vectors

# option -> (what parses it, which codec families accept it, one-line description)
OPTIONS = {
    "beam": (int, "RQ/PRQ", "encoding beam width (faiss max_beam_size)"),
    "ils": (int, "LSQ/PLSQ", "local-search iterations per encoding (faiss encode_ils_iters)"),
    "calibrate": (float, "SQ4/SQ6/SQ8", "clip each dim's range to its [q, 1-q] quantiles"),
    "qb": (int, "RaBitQ", "bits per query component during search, 0 = float queries"),
}


def _divisors(n: int) -> list[int]:
    return [m for m in range(1, n + 1) if n % m == 0]


# ---- parsing ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ParsedSpec:
    """A spec split into its parts: Matryoshka prefix, faiss factory string, vecpress binary
    word and options."""

    spec: str
    mrl: int | None  # keep the first `mrl` dims
    factory: str  # faiss factory string of the codec (BIN/BINt replaced by LSH)
    binary: str | None  # "BIN" or "BINt"
    options: dict = field(default_factory=dict)


def parse_spec(spec: str, dim: int) -> ParsedSpec:
    """Split a spec into its parts; CodecSpecError for grammar errors (not faiss's)."""
    if not isinstance(spec, str) or not spec.strip():
        raise CodecSpecError("empty codec spec: try PQ32, SQ8, RQ8x8, BIN or MRL256,PQ32")
    tokens = [t.strip() for t in spec.strip().split(",")]
    if any(not t for t in tokens):
        raise CodecSpecError(f"codec {spec!r} has an empty part between commas")
    options: dict = {}
    body: list[str] = []
    for tok in tokens:
        if "=" not in tok:
            body.append(tok)
            continue
        key, _, raw = tok.partition("=")
        key = key.strip()
        if key not in OPTIONS:
            known = ", ".join(f"{k}= ({fam}: {desc})" for k, (_, fam, desc) in OPTIONS.items())
            raise CodecSpecError(f"codec {spec!r}: unknown option {key!r}; known options: {known}")
        if key in options:
            raise CodecSpecError(f"codec {spec!r}: option {key}= given twice")
        parse = OPTIONS[key][0]
        try:
            options[key] = parse(raw.strip())
        except ValueError:
            raise CodecSpecError(f"codec {spec!r}: option {key}= needs a {parse.__name__}, got {raw!r}") from None
    mrl = None
    if body and (m := re.fullmatch(r"MRL(\d+)", body[0])):
        mrl = int(m.group(1))
        body = body[1:]
        if not 1 <= mrl < dim:
            raise CodecSpecError(
                f"codec {spec!r}: MRL{mrl} must keep fewer dims than the input dim={dim} and at "
                f"least 1: try MRL{dim // 2} or MRL{dim // 4}, or drop the MRL prefix")
    if any(re.fullmatch(r"MRL\d*", t) for t in body):
        raise CodecSpecError(f"codec {spec!r}: MRL<n> must be the first part of the spec, e.g. MRL256,PQ32")
    if not body:
        raise CodecSpecError(f"codec {spec!r} has no codec after its prefix/options: add e.g. PQ32 or SQ8")
    binary = None
    if body[-1] in ("BIN", "BINt"):
        binary = body[-1]
        body = body[:-1] + ["LSH"]
    elif any(re.match(r"LSH", t) for t in body):
        raise CodecSpecError(f"codec {spec!r}: use BIN (sign of each dim) or BINt (per-dim median "
                             "thresholds) for binary codes instead of faiss's LSH")
    if any(re.match(r"ITQ", t) for t in body):
        raise CodecSpecError(f"codec {spec!r}: ITQ cannot be decoded (faiss has no inverse); use "
                             "RR<d> or PCAR<d> before BIN instead")
    if any(t in ("BIN", "BINt") for t in body[:-1]):
        raise CodecSpecError(f"codec {spec!r}: BIN/BINt must be the last codec part")
    return ParsedSpec(spec=spec.strip(), mrl=mrl, factory=",".join(body), binary=binary, options=options)


# ---- building ---------------------------------------------------------------------------------

def _innermost(index):
    """(chain of vector transforms, innermost codec index) of a possibly nested index."""
    index = faiss.downcast_index(index)
    chain = []
    while isinstance(index, faiss.IndexPreTransform):
        chain.extend(faiss.downcast_VectorTransform(index.chain.at(i)) for i in range(index.chain.size()))
        index = faiss.downcast_index(index.index)
    return chain, index


def _pretransform_levels(index) -> list:
    levels = []
    index = faiss.downcast_index(index)
    while isinstance(index, faiss.IndexPreTransform):
        levels.append(index)
        index = faiss.downcast_index(index.index)
    return levels


def _quantizer_nbits(inner) -> list[int]:
    """nbits of every sub-quantizer that k-means must train (2^nbits centroids each)."""
    if isinstance(inner, (faiss.IndexPQ, faiss.IndexPQFastScan)):
        return [int(inner.pq.nbits)]
    aq = getattr(inner, "aq", None)
    if isinstance(inner, faiss.IndexAdditiveQuantizer) and aq is not None:
        return [int(aq.nbits.at(i)) for i in range(aq.nbits.size())]
    return []


def _min_train(chain, inner) -> int:
    """The fewest training vectors the codec can be trained on at all."""
    need = max([1 << b for b in _quantizer_nbits(inner)], default=1)
    for vt in chain:
        if isinstance(vt, faiss.OPQMatrix):
            need = max(need, 256)  # OPQ trains an 8-bit PQ internally
    return need


def _leading_m(factory: str) -> int | None:
    match = re.search(r"(?:^|,)(?:PQ|RQ|LSQ|PRQ|PLSQ)(\d+)", factory)
    return int(match.group(1)) if match else None


def _faiss_index(spec: str, factory: str, dim: int, mt: int, what: str):
    try:
        return faiss.index_factory(dim, factory, mt)
    except RuntimeError as exc:
        text = str(exc).strip()
        reason = text.splitlines()[-1] if text else "rejected by faiss"
        reason = re.sub(r"^Error in .*?: ", "", reason)
        hint = ""
        m = _leading_m(factory)
        sub_dim = dim
        opq = re.match(r"OPQ\d+_(\d+),", factory)
        if opq:
            sub_dim = int(opq.group(1))
        if m == 0:
            hint = "; m (sub-quantizers) must be at least 1"
        elif m is not None and sub_dim % m:
            fits = [d for d in _divisors(sub_dim) if 1 < d <= 256]
            hint = f"; m must divide dim={sub_dim}{what}: try one of {fits}"
        raise CodecSpecError(f"codec {spec!r} does not work for dim={dim}{what}: {reason}{hint}") from None


def _own(parent, *children) -> None:
    """Hand `children` over to the C++ `parent` (it deletes them), so Python never frees them."""
    parent.own_fields = True
    for child in children:
        child.this.disown()


def build_index(spec: str, dim: int, metric: str):
    """An untrained faiss index for `spec`, or CodecSpecError saying what would fit."""
    mt = faiss_metric(metric)
    p = parse_spec(spec, dim)
    d_in = p.mrl or dim
    what = f" (after MRL{p.mrl})" if p.mrl else ""
    # binary codes are compared by Hamming distance whatever the metric; faiss's LSH is L2-only
    index = _faiss_index(p.spec, p.factory, d_in, faiss.METRIC_L2 if p.binary else mt, what)
    chain, inner = _innermost(index)
    if not isinstance(inner, (faiss.IndexFlatCodes, faiss.IndexPQFastScan)):
        raise CodecSpecError(
            f"codec {p.spec!r} builds a {type(inner).__name__}, not a standalone codec: use a "
            "flat-code spec such as PQ32, PQ32x4fs, OPQ32,PQ32, RQ8x8, SQ8, RaBitQ or BIN "
            "(IVF/HNSW indexes are search structures, not codecs)")
    if isinstance(inner, faiss.IndexPQFastScan) and inner.pq.nbits != 4:
        raise CodecSpecError(f"codec {p.spec!r}: fast-scan PQ is 4-bit only: use PQ{inner.pq.M}x4fs")
    nbits = _quantizer_nbits(inner)
    if nbits and max(nbits) > MAX_NBITS:
        raise CodecSpecError(f"codec {p.spec!r}: {max(nbits)} bits per sub-quantizer is too many: "
                             f"use at most {MAX_NBITS} (e.g. twice the m with half the bits)")
    _apply_options(p, inner)
    if p.binary:
        index = _add_binary_scaling(index, inner)
    if p.mrl:
        index = _add_mrl(index, dim, p.mrl, metric)
    return index


def _add_binary_scaling(index, lsh):
    """Put an (untrained) per-dimension affine map z = (x - t) / s in front of IndexLSH: the
    sign of z is the code, t + s * sign is the decoded vector."""
    d = int(lsh.d)
    lt = faiss.LinearTransform(d, d, True)
    lt.is_trained = False
    if isinstance(index, faiss.IndexPreTransform):
        index.chain.push_back(lt)  # factory-built: owns its chain
        lt.this.disown()
        index.is_trained = False
        return index
    outer = faiss.IndexPreTransform(lt, index)
    _own(outer, lt, index)
    outer.is_trained = False
    return outer


def _add_mrl(index, dim: int, keep: int, metric: str):
    """Matryoshka prefix: keep the first `keep` dims (renormalised for cosine), then `index`."""
    remap = faiss.RemapDimensionsTransform(dim, keep, False)
    trained = bool(index.is_trained)
    outer = faiss.IndexPreTransform(remap, index)
    children = [remap, index]
    if metric == "cosine":
        norm = faiss.NormalizationTransform(keep, 2.0)
        outer.chain.push_back(norm)
        children.append(norm)
    _own(outer, *children)
    outer.is_trained = trained
    return outer


def _apply_options(p: ParsedSpec, inner) -> None:
    def refuse(key):
        fam = OPTIONS[key][1]
        extra = " (LSQ has no beam: use ils=N)" if key == "beam" and isinstance(
            inner, (faiss.IndexLocalSearchQuantizer, faiss.IndexProductLocalSearchQuantizer)) else ""
        raise CodecSpecError(f"codec {p.spec!r}: option {key}= applies to {fam} codecs only, "
                             f"not to {type(inner).__name__}{extra}")

    # additive-quantizer knobs: option -> (single index, its quantizer, product index, its
    # product quantizer, attribute set on every (sub)quantizer, faiss default)
    additive = {
        "beam": (faiss.IndexResidualQuantizer, "rq", faiss.IndexProductResidualQuantizer, "prq",
                 "max_beam_size", 5),
        "ils": (faiss.IndexLocalSearchQuantizer, "lsq", faiss.IndexProductLocalSearchQuantizer, "plsq",
                "encode_ils_iters", 16),
    }
    for key, value in p.options.items():
        if key in additive:
            single, q_attr, product, pq_attr, knob, default = additive[key]
            if isinstance(inner, single):
                qs = [getattr(inner, q_attr)]
            elif isinstance(inner, product):
                pq_ = getattr(inner, pq_attr)
                qs = [faiss.downcast_AdditiveQuantizer(pq_.subquantizer(i)) for i in range(pq_.nsplits)]
            else:
                refuse(key)
            if value < 1:
                raise CodecSpecError(f"codec {p.spec!r}: {key}= must be >= 1 (faiss default {default})")
            for q in qs:
                setattr(q, knob, value)
        elif key == "calibrate":
            sq_types = (faiss.ScalarQuantizer.QT_4bit, faiss.ScalarQuantizer.QT_6bit, faiss.ScalarQuantizer.QT_8bit)
            if not (isinstance(inner, faiss.IndexScalarQuantizer) and inner.sq.qtype in sq_types):
                refuse(key)
            if not 0 < value < 0.5:
                raise CodecSpecError(f"codec {p.spec!r}: calibrate= is the share clipped at each end, "
                                     f"0 < q < 0.5 (e.g. 0.001), got {value}")
            inner.sq.rangestat = faiss.ScalarQuantizer.RS_quantiles
            inner.sq.rangestat_arg = value
        elif key == "qb":
            if not isinstance(inner, faiss.IndexRaBitQ):
                refuse(key)
            if not 0 <= value <= 8:
                raise CodecSpecError(f"codec {p.spec!r}: qb= must be 0 (float queries) to 8, got {value}")
            inner.qb = value


def code_size_of(spec: str, dim: int, metric: str) -> int:
    """Bytes per vector of `spec` for this dim and metric (no training-size check)."""
    return int(build_index(spec, dim, metric).sa_code_size())


def check_codec_spec(spec: str, dim: int, metric: str, num_train: int) -> int:
    """Validate a spec against the data's dim and the training-sample size, before any data
    is read. Returns the code size in bytes per vector."""
    index = build_index(spec, dim, metric)
    chain, inner = _innermost(index)
    need = _min_train(chain, inner)
    if num_train < need:
        fits = int(math.floor(math.log2(max(num_train, 1))))
        raise CodecSpecError(
            f"codec {spec!r} needs at least {need} training vectors (2^nbits centroids), "
            f"only {num_train} available: the largest nbits this sample supports is {fits} "
            f"(e.g. PQmx{max(min(fits, MAX_NBITS), 1)}), or sample a larger corpus")
    return int(index.sa_code_size())


# ---- the codec --------------------------------------------------------------------------------

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

    @property
    def is_binary(self) -> bool:
        """Bit-packed codes searched by Hamming distance (popcount of xor over the bytes)."""
        return isinstance(_innermost(self.index)[1], faiss.IndexLSH)

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
        need = _min_train(chain, inner)
        if xt.shape[0] < need:
            raise CodecSpecError(f"codec {spec!r} needs at least {need} training vectors, got {xt.shape[0]}")
        if isinstance(inner, faiss.IndexLSH):
            _train_binary(index, chain, inner, xt, binary=parse_spec(spec, dim).binary)
            return cls(spec=spec, metric=metric, dim=dim, index=index)
        keep_alive = _configure_training(chain, inner, seed=seed, ngpu=ngpu)
        if keep_alive is None and _trains_pq_in_parallel(inner):
            _train_pq_in_parallel(index, chain, inner, xt)
        else:
            index.train(xt)
        _release_gpu(inner)
        del keep_alive
        return cls(spec=spec, metric=metric, dim=dim, index=index)

    # ---- coding ---------------------------------------------------------------------------
    @property
    def is_pq(self) -> bool:
        """Plain or fast-scan PQ (behind any pre-transforms): encodable by kernels.pq_encode."""
        return isinstance(_innermost(self.index)[1], (faiss.IndexPQ, faiss.IndexPQFastScan))

    def encode(self, x: np.ndarray, *, device: str = "cpu") -> np.ndarray:
        """(n, dim) float -> (n, code_size) uint8.

        device="cuda" (or "cuda:N"): PQ, scalar (8/4-bit, fp16) and binary codecs encode on
        that GPU through kernels.gpu_encode, pre-transforms included (faiss's codes for >= 99.9%
        of PQ sub-vectors, the same bytes for the others). Codecs without a GPU path, or a
        machine where CuPy sees no GPU, use faiss on the CPU: `encode_device` says which ran.
        """
        if device != "cpu":
            encoder = self.gpu_encoder(device)
            if encoder is not None:
                return encoder.encode(np.asarray(x, dtype=np.float32))
        x = prepare_vectors(x, self.metric)
        if x.shape[0] == 0:
            return np.zeros((0, self.code_size), np.uint8)
        cb = self.numpy_pq_codebook()
        if cb is not None:
            return encode_pq(cb.prepare(x), cb.centroids, cb.nbits)
        return self.index.sa_encode(x)

    def numpy_pq_codebook(self):
        """The PQ codebook when CPU encoding should use kernels.pq_encode's blocked GEMM +
        arg-min instead of faiss's `sa_encode`, else None.

        faiss encodes PQ one vector at a time with SIMD kernels for 4- and 8-wide sub-vectors
        (and fewer), and through BLAS only from 16 wide. Measured (BENCHMARKS.md), the blocked
        numpy encoder is 2.4-4.7x faster at every other width, and faiss is faster at 4 and 8.
        Codes are faiss's, near-ties aside (tests/test_pq_encode.py)."""
        return self._numpy_pq

    @functools.cached_property
    def _numpy_pq(self):
        if not self.is_pq:
            return None
        cb = pq_codebook(self.index)
        dsub = cb.centroids.shape[2]
        return None if dsub <= 4 or dsub == 8 else cb

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

        Returns (D, I): D smaller-is-better, I row indexes into `codes` (-1 when fewer than k).
        """
        codes = np.ascontiguousarray(codes, dtype=np.uint8)
        nq = np.asarray(xq).shape[0]
        if codes.shape[0] == 0 or k == 0:
            return np.full((nq, k), np.inf, np.float32), np.full((nq, k), -1, np.int64)
        if self.is_binary:
            searcher = faiss.IndexBinaryFlat(8 * self.code_size)
            searcher.add(codes)
            D, I = searcher.search(self.encode(xq), k)
            D = D.astype(np.float32)
        else:
            xq = prepare_vectors(xq, self.metric)
            chain, inner = _innermost(self.index)
            for vt in chain:
                xq = vt.apply(xq)
            on_gpu = _searches_on_gpu(inner, ngpu)
            if on_gpu or _decoded_search_pays(inner, nq):
                return _search_decoded(inner, xq, codes, k, self.metric, ngpu=ngpu if on_gpu else 0, device=device)
            searcher = _code_searcher(inner, codes)
            D, I = searcher.search(xq, k)
            D = as_distances(D, self.metric).astype(np.float32)
            if _reconstruction_search(inner) is not None:  # as _search_decoded's, to the bit
                D = _code_distances(inner, xq, codes, I, "l2" if self.metric == "l2" else "ip")
        D[I < 0] = np.inf
        # faiss's heaps keep the first rows among equal distances, but list them last row
        # first for inner products and Hamming: ties rank by row here, as in TopK's merges
        D, I = _by_distance_then_row(D, I)
        return D, I.astype(np.int64)

    def search_device(self, ngpu: int = 0) -> str:
        """Where search_codes(..., ngpu=ngpu) searches: "faiss-gpu" (decoded codes, GPU brute
        force) or "faiss-cpu"."""
        return "faiss-gpu" if _searches_on_gpu(_innermost(self.index)[1], ngpu) else "faiss-cpu"

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


# search_codes decodes codes and runs a GEMM from this many queries on: always for codecs that
# faiss searches by decoding each pair, and from TABLE_GEMM_MIN_QUERIES for look-up tables
GEMM_MIN_QUERIES = 32
TABLE_GEMM_MIN_QUERIES = 256
DECODE_BLOCK_BYTES = 32 << 20  # decoded float32 rows per GEMM block


def _reconstruction_search(inner) -> str | None:
    """How faiss's search over this index's codes works where it ranks by the exact distance
    to each code's reconstruction, so that a search over the decoded codes ranks the same:
    "decode" (faiss decodes each (query, code) pair: scalar codes, ST_decompress additive
    codes) or "tables" (look-up tables: PQ, additive codes with exact norms). None for the
    others: fast-scan PQ and RaBitQ rank by quantized tables or estimates, and additive codes
    with quantized norms (ST_norm_qint8, ...) by an approximate norm."""
    if isinstance(inner, faiss.IndexScalarQuantizer):
        return "decode"
    if isinstance(inner, faiss.IndexPQFastScan):
        return None
    if isinstance(inner, faiss.IndexPQ):
        return "tables"
    if isinstance(inner, faiss.IndexAdditiveQuantizer):
        st = int(inner.aq.search_type)
        if st == faiss.AdditiveQuantizer.ST_decompress:
            return "decode"
        exact_tables = {faiss.AdditiveQuantizer.ST_norm_float, faiss.AdditiveQuantizer.ST_norm_from_LUT}
        if inner.metric_type == faiss.METRIC_INNER_PRODUCT:
            exact_tables.add(faiss.AdditiveQuantizer.ST_LUT_nonorm)  # IP needs no norm
        return "tables" if st in exact_tables else None
    return None


def _searches_on_gpu(inner, ngpu: int) -> bool:
    """Whether search_codes(..., ngpu) searches these codes on a GPU: GPUs asked for and seen,
    and a codec whose decoded codes rank as faiss's search ranks them."""
    return ngpu != 0 and num_gpus(ngpu) > 0 and _reconstruction_search(inner) is not None


def _decoded_search_pays(inner, nq: int) -> bool:
    """Whether search_codes should decode the codes and run a GEMM over them for `nq` queries
    on the CPU: faiss's search must rank by the exact distance to each reconstruction
    (`_reconstruction_search`, so both compute the same thing), and the GEMM must be the faster.

    Measured on one core (benchmarks/search_codes.py, BENCHMARKS.md): faiss decodes scalar
    codes and ST_decompress additive codes once per (query, row) pair, which a GEMM beats by
    1.5-3x and 30-190x from 32 queries on. Look-up-table search costs about 0.5 ns per table
    per pair against the GEMM's 0.026 ns per dimension plus a decode per row, so tables win
    below one table per 16 dimensions (RQ4x8 at 384-d) or below a few hundred queries."""
    how = _reconstruction_search(inner)
    if how is None or nq < GEMM_MIN_QUERIES:
        return False
    if how == "decode":
        return True
    tables = int(inner.pq.M) if isinstance(inner, faiss.IndexPQ) else int(inner.aq.M)
    return nq >= TABLE_GEMM_MIN_QUERIES and 16 * tables >= int(inner.d)


def _search_decoded(inner, xq: np.ndarray, codes: np.ndarray, k: int, metric: str, *, ngpu: int = 0,
                    device: int = -1):
    """Top-k of transformed queries over the codes' reconstructions, decoded in blocks (on
    the CPU) and searched by brute force (on `ngpu` GPUs, else the CPU's BLAS).

    Each distinct code is decoded and searched once, the distances of the codes found are
    computed again a pair at a time, and each code's rows follow it in row order: equal codes
    get equal distances, in this batch or another, on the CPU or a GPU, and rank by row, as in
    faiss's own search over the codes. Searched row by row by GEMM, a distance's rounding
    depended on the row's place in its block, and a GPU's selection orders ties as it likes:
    the evaluation's search differed between devices and batchings wherever codes repeat
    (coarse codes, duplicate vectors)."""
    uniq, inverse = _distinct_rows(codes)
    block = max(1024, DECODE_BLOCK_BYTES // (4 * int(inner.d)))
    if ngpu:
        block *= 8  # fewer, larger copies to the GPU
    space = "l2" if metric == "l2" else "ip"  # cosine queries are already unit (ADC does not renormalise codes)
    top = TopK(xq.shape[0], min(k, uniq.shape[0]))
    for start in range(0, uniq.shape[0], block):
        decoded = inner.sa_decode(uniq[start:start + block])
        D, I = exact_knn(xq, decoded, top.k, space, ngpu=ngpu, device=device)
        top.add(D, np.where(I >= 0, I + start, -1))
    # the found codes' distances again, a pair at a time: a GEMM's (CPU or GPU) depend on the
    # code's place in its block, and would rank equal codes of two batches by that place
    if uniq.shape[0] > block:
        D = _code_distances(inner, xq, uniq, top.I, space)
    else:  # (one block: its decoded codes are still in hand)
        D = candidate_distances(xq, decoded, top.I, space)
    if inverse is None:  # no code repeats: rank by (distance, row)
        return _widen(*_by_distance_then_row(D, top.I), k)
    return _rows_of_codes(D, top.I, inverse, k)


#: rows hashed at a time by _distinct_rows (its temporaries stay this size, whatever the codes')
HASH_BLOCK_ROWS = 65_536


def _code_distances(inner, xq: np.ndarray, codes: np.ndarray, I: np.ndarray, space: str) -> np.ndarray:
    """Distances of transformed queries to the codes I (rows of `codes`, -1 = none), a pair at
    a time on the decoded codes: a (query, code) pair gets the same distance whichever search
    found it (GEMM on a CPU or a GPU, faiss's look-up tables), so equal codes tie exactly."""
    is_found = np.zeros(codes.shape[0], bool)
    is_found[I[I >= 0]] = True
    decoded = inner.sa_decode(codes[is_found])
    return candidate_distances(xq, decoded, np.where(I >= 0, np.cumsum(is_found)[np.maximum(I, 0)] - 1, -1), space)


def _distinct_rows(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """(distinct codes in the order of their first rows, each row's index among them), or
    (codes, None) when no code repeats. Rows are told apart by a 64-bit hash, in blocks of
    HASH_BLOCK_ROWS (about 4 ms per block where np.unique over whole rows takes 13-50), and
    checked byte for byte; np.unique over whole rows decides if two codes collide."""
    n, size = codes.shape
    if n < 2:
        return codes, None
    width = -(-size // 8) * 8
    weights = np.random.default_rng(size).integers(1, 1 << 63, width // 8, dtype=np.uint64) | np.uint64(1)
    hashes = np.empty(n, np.uint64)
    for lo in range(0, n, HASH_BLOCK_ROWS):
        block = codes[lo:lo + HASH_BLOCK_ROWS]
        if width != size:
            block = np.pad(block, ((0, 0), (0, width - size)))
        hashes[lo:lo + len(block)] = (np.ascontiguousarray(block).view(np.uint64) * weights).sum(axis=1,
                                                                                                 dtype=np.uint64)
    _, first, inverse = np.unique(hashes, return_index=True, return_inverse=True)
    if len(first) == n:
        return codes, None
    inverse = inverse.ravel()
    if any(not np.array_equal(codes[first[inverse[lo:lo + HASH_BLOCK_ROWS]]], codes[lo:lo + HASH_BLOCK_ROWS])
           for lo in range(0, n, HASH_BLOCK_ROWS)):  # a collision: compare whole rows
        _, first, inverse = np.unique(codes.view(np.dtype((np.void, size))).ravel(), return_index=True,
                                      return_inverse=True)
        inverse = inverse.ravel()
    order = np.argsort(first, kind="stable")  # by first row: equal distances then rank as rows do
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    return np.ascontiguousarray(codes[first[order]]), rank[inverse]


def _rows_of_codes(D: np.ndarray, I: np.ndarray, inverse: np.ndarray, k: int):
    """Top-k rows from the top distinct codes (D, I; I indexes the distinct codes, `inverse`
    maps rows to them): each code's rows in row order, ranked by (distance, row). Codes are
    expanded in distance order while fewer than k rows come before them (or while they tie
    with the code that makes k), each by at most k rows."""
    nq, kc = I.shape
    if nq == 0 or kc == 0:
        return np.full((nq, k), np.inf, np.float32), np.full((nq, k), -1, np.int64)
    D, I = _by_distance_then_row(D, I)  # (distinct codes are numbered by first row)
    counts = np.bincount(inverse)
    by_code = np.argsort(inverse, kind="stable")  # rows grouped by code, in row order
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    code = np.where(I >= 0, I, 0)
    take = np.where(I >= 0, np.minimum(counts[code], k), 0)
    before = np.cumsum(take, axis=1) - take
    # the distance of the code that brings the rows to k (inf where they never get there)
    reach = np.argmax(before + take >= k, axis=1)
    bound = np.where((before + take)[:, -1] >= k, D[np.arange(nq), reach], np.inf)
    take[(before >= k) & (D > bound[:, None])] = 0
    take = take.ravel()
    total = int(take.sum())
    within = np.arange(total) - np.repeat(np.cumsum(take) - take, take)
    rows = by_code[np.repeat(starts[code.ravel()], take) + within]
    dist = np.repeat(D.ravel(), take)
    query = np.repeat(np.repeat(np.arange(nq), kc), take)
    order = np.lexsort((rows, dist, query))
    rows, dist, query = rows[order], dist[order], query[order]
    rank = np.arange(total) - np.searchsorted(query, np.arange(nq))[query]
    keep = rank < k
    outD = np.full((nq, k), np.inf, np.float32)
    outI = np.full((nq, k), -1, np.int64)
    outD[query[keep], rank[keep]] = dist[keep]
    outI[query[keep], rank[keep]] = rows[keep]
    return outD, outI


def _by_distance_then_row(D: np.ndarray, I: np.ndarray):
    """Each query's (D, I) sorted by distance, equal distances by id."""
    order = np.lexsort((I, D), axis=1)
    return np.take_along_axis(D, order, axis=1), np.take_along_axis(I, order, axis=1)


def _widen(D: np.ndarray, I: np.ndarray, k: int):
    """(D, I) padded to k columns with (inf, -1)."""
    pad = ((0, 0), (0, k - D.shape[1]))
    return np.pad(D, pad, constant_values=np.inf), np.pad(I, pad, constant_values=-1)


def _code_searcher(inner, codes: np.ndarray):
    """An index holding `codes` that searches them with faiss's ADC."""
    if isinstance(inner, faiss.IndexPQFastScan):
        # fast-scan stores codes in blocked SIMD layout: load plain PQ codes, then convert
        plain = faiss.IndexPQ(int(inner.d), int(inner.pq.M), int(inner.pq.nbits), inner.metric_type)
        plain.pq = inner.pq
        plain.is_trained = True
        plain.add_sa_codes(codes)
        return faiss.IndexPQFastScan(plain)
    searcher = faiss.clone_index(inner)
    searcher.reset()
    searcher.add_sa_codes(codes)
    return searcher


def _binary_scale_shift(scaling) -> tuple[np.ndarray, np.ndarray]:
    """(s, t) of the binary codec's map z = (x - t) / s, read back from its LinearTransform."""
    d = int(scaling.d_out)
    a = faiss.vector_to_array(scaling.A).reshape(d, d).diagonal().astype(np.float64)
    b = faiss.vector_to_array(scaling.b).astype(np.float64)
    scale = 1.0 / a
    return scale.astype(np.float32), (-b * scale).astype(np.float32)


def _train_chain(chain, x: np.ndarray) -> np.ndarray:
    """Train the untrained transforms of `chain` in order, each on the previous one's output,
    as IndexPreTransform.train does; returns `x` through all of them."""
    for vt in chain:
        if not vt.is_trained:
            vt.train(x)
        x = vt.apply(x)
    return x


def _train_binary(index, chain, lsh, xt: np.ndarray, *, binary: str | None) -> None:
    """Train the transforms before the sign step, then set thresholds t (0 for BIN, the
    per-dimension median for BINt) and scales s = mean |x - t| (the best reconstruction
    t + s * sign(x - t) in the least-squares sense)."""
    x = _train_chain(chain[:-1], xt).astype(np.float64)
    t = np.median(x, axis=0) if binary == "BINt" else np.zeros(x.shape[1])
    s = np.abs(x - t).mean(axis=0)
    s = np.where(s > 1e-12, s, 1.0)
    scaling = chain[-1]
    faiss.copy_array_to_vector(np.diag(1.0 / s).astype(np.float32).ravel(), scaling.A)
    faiss.copy_array_to_vector((-t / s).astype(np.float32), scaling.b)
    scaling.is_trained = True
    for level in _pretransform_levels(index):
        level.is_trained = True


def _trains_pq_in_parallel(inner) -> bool:
    """A plain or fast-scan PQ with faiss's default training: its sub-quantizers' k-means are
    independent, so _train_pq_in_parallel can run them side by side."""
    return isinstance(inner, (faiss.IndexPQ, faiss.IndexPQFastScan)) and not inner.is_trained \
        and int(inner.pq.train_type) == faiss.ProductQuantizer.Train_default and int(inner.pq.M) > 1


def _train_pq_in_parallel(index, chain, inner, xt: np.ndarray) -> None:
    """Train the pre-transforms as faiss does (IndexPreTransform.train), then the PQ's M
    sub-quantizers side by side, one k-means per CPU thread, each on one thread.

    faiss's ProductQuantizer.train runs them one after another, each on every thread. A PQ
    k-means is small (2^nbits centroids in dsub dimensions) and uses threads poorly: the
    assignment is a GEMM with dsub-deep products. The centroids are the same, byte for byte:
    faiss seeds every sub-quantizer's k-means with the same ClusteringParameters, and k-means
    gives the same result on any number of threads (tests/test_codecs.py compares the trained
    bytes). Measured (benchmarks/train.py): PQ48 on 50k x 384-d, 4.70 s -> 2.54 s on 2 cores."""
    x = _train_chain(chain, xt)
    pq = inner.pq
    M, dsub, ksub = int(pq.M), int(pq.dsub), int(pq.ksub)
    x = np.ascontiguousarray(x, dtype=np.float32)

    def sub_quantizer(m: int) -> np.ndarray:
        faiss.omp_set_num_threads(1)  # this thread's OpenMP regions only
        clustering = faiss.Clustering(dsub, ksub, pq.cp)
        clustering.train(np.ascontiguousarray(x[:, m * dsub:(m + 1) * dsub]), faiss.IndexFlatL2(dsub))
        return faiss.vector_to_array(clustering.centroids)

    with ThreadPoolExecutor(max(1, min(M, faiss.omp_get_max_threads()))) as pool:
        centroids = list(pool.map(sub_quantizer, range(M)))
    faiss.copy_array_to_vector(np.concatenate(centroids).astype(np.float32), pq.centroids)
    inner.is_trained = True
    for level in _pretransform_levels(index):
        level.is_trained = True


def _configure_training(chain, inner, *, seed: int, ngpu: int):
    """Seed every k-means the codec runs; route k-means assignment to the GPU if present."""
    if isinstance(inner, faiss.IndexPQ):
        inner.do_polysemous_training = False  # 6-8x slower training, no benefit for codes
    if isinstance(inner, (faiss.IndexPQ, faiss.IndexPQFastScan)):
        inner.pq.cp.seed = seed
    for q in (getattr(inner, "rq", None), getattr(inner, "lsq", None)):
        if q is not None and hasattr(q, "cp"):
            q.cp.seed = seed
    if isinstance(inner, faiss.IndexLocalSearchQuantizer):
        inner.lsq.random_seed = seed
    for name in ("prq", "plsq"):
        paq = getattr(inner, name, None)
        if paq is None:
            continue
        for i in range(paq.nsplits):
            sub = faiss.downcast_AdditiveQuantizer(paq.subquantizer(i))
            if hasattr(sub, "cp"):
                sub.cp.seed = seed + i
            if hasattr(sub, "random_seed"):
                sub.random_seed = seed + i
    # OPQ's rotation and inner k-means use faiss's fixed internal seeds: deterministic as is
    if num_gpus(ngpu) == 0:
        return None
    res = faiss.StandardGpuResources()
    if isinstance(inner, (faiss.IndexPQ, faiss.IndexPQFastScan)):
        inner.pq.assign_index = faiss.GpuIndexFlatL2(res, inner.pq.dsub)
        return res, inner.pq.assign_index
    if isinstance(inner, faiss.IndexResidualQuantizer) and hasattr(faiss, "GpuProgressiveDimIndexFactory"):
        factory = faiss.GpuProgressiveDimIndexFactory(num_gpus(ngpu))
        inner.rq.assign_index_factory = factory
        return res, factory
    return res


def _release_gpu(inner) -> None:
    """Drop GPU helpers so the trained index serialises as a plain CPU codec."""
    if isinstance(inner, (faiss.IndexPQ, faiss.IndexPQFastScan)):
        inner.pq.assign_index = None
    if isinstance(inner, faiss.IndexResidualQuantizer) and hasattr(inner.rq, "assign_index_factory"):
        inner.rq.assign_index_factory = None


# ---- default candidates -----------------------------------------------------------------------

def default_grid(dim: int, metric: str, *, min_bytes: int = 8, max_bytes: int = 256) -> list[str]:
    """Candidate codec specs for the advisor's sweep, sorted by code size then spec.

    One or two of each family at budgets from `min_bytes` to `max_bytes` bytes per vector,
    keeping only specs valid for `dim` whose code size falls in the range. Chosen to train in
    a few seconds each on 20k x 384 vectors on 2 cores: 8-bit PQ only with >= 8 dims per
    sub-vector (or m <= 8), one RQ with beam 1 (on a PCA64 projection above dim 64), OPQ only
    at dim <= 64 with >= 8 dims per sub-vector, no LSQ, MRL prefixes only at dim >= 256 (they
    only pay off on Matryoshka-trained embeddings).
    """
    faiss_metric(metric)
    cands: list[str] = []
    # 8-bit PQ: k-means on sub-vectors of < 8 dims is ~10x slower per sub-quantizer in faiss
    # 1.15 on 2 cores (PQ96 at dim 384: 26 s, PQ48: 1.4 s), so those only with m <= 8
    cands += [f"PQ{m}" for m in (8, 16, 24, 32, 48, 64, 96, 128)
              if dim % m == 0 and dim // m >= 2 and (dim // m >= 8 or m <= 8)]
    # 4-bit fast-scan PQ: 16 centroids per sub-quantizer train fast at any sub-vector size
    cands += [f"PQ{m}x4fs" for m in (16, 32, 64, 128) if dim % m == 0 and dim // m >= 2]
    if dim <= 64:  # OPQ's 50 rotation iterations: 3 s at dim 64, 10 s at 128, minutes at 384
        cands += [f"OPQ{m},PQ{m}" for m in (8, 16) if dim % m == 0 and dim // m >= 8][:1]
    # RQ: beam 1 (beam 4 is 5x slower to train); above dim 64 on a 64-dim PCA projection
    cands += ["RQ8x8,beam=1" if dim <= 64 else "PCA64,RQ8x8,beam=1"]
    cands += ["SQ4", "SQ6", "SQ8", "SQfp16", "SQbf16", "SQ8,calibrate=0.001"]
    cands += ["BIN", "BINt", "RaBitQ", "RaBitQ4"]
    if dim >= 256:
        half, quarter = dim // 2, dim // 4
        cands += [f"MRL{half},BIN", f"MRL{half},SQ8", f"MRL{quarter},SQ8"]
        cands += [f"MRL{half},PQ{m}" for m in (half // 8,) if half % 8 == 0]
    sized = {}
    for spec in cands:
        try:
            size = code_size_of(spec, dim, metric)
        except CodecSpecError:
            continue
        if min_bytes <= size <= max_bytes:
            sized[spec] = size
    return sorted(sized, key=lambda s: (sized[s], s))
