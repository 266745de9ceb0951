"""Building a codec's untrained faiss index from its spec (`build_index`), and checking a
spec against the data's dim and training-sample size before any data is read
(`check_codec_spec`, `code_size_of`). The grammar itself is in codecs.spec."""

from __future__ import annotations

import math
import re

from vecpress.kernels._faiss import faiss
from vecpress.kernels.codecs.spec import MAX_NBITS, OPTIONS, CodecSpecError, ParsedSpec, parse_spec
from vecpress.kernels.knn import faiss_metric


def _divisors(n: int) -> list[int]:
    return [m for m in range(1, n + 1) if n % m == 0]


def _innermost(index):
    """(chain of vector transforms, innermost codec index) of a possibly nested index."""
    index = faiss.downcast_index(index)
    chain = []
    while isinstance(index, faiss.IndexPreTransform):
        chain.extend(faiss.downcast_VectorTransform(index.chain.at(i)) for i in range(index.chain.size()))
        index = faiss.downcast_index(index.index)
    return chain, index


def _quantizer_nbits(inner) -> list[int]:
    """nbits of every sub-quantizer that k-means must train (2^nbits centroids each)."""
    if isinstance(inner, (faiss.IndexPQ, faiss.IndexPQFastScan)):
        return [int(inner.pq.nbits)]
    aq = getattr(inner, "aq", None)
    if isinstance(inner, faiss.IndexAdditiveQuantizer) and aq is not None:
        return [int(aq.nbits.at(i)) for i in range(aq.nbits.size())]
    return []


def _centroids(chain, inner) -> int:
    """The most centroids one k-means of the codec's training fits (0: trained without k-means)."""
    need = max([1 << b for b in _quantizer_nbits(inner)], default=0)
    for vt in chain:
        if isinstance(vt, faiss.OPQMatrix):
            need = max(need, 256)  # OPQ trains an 8-bit PQ internally
    return need


def _parameters(chain, inner) -> int:
    """The most parameters one k-means of the codec's training fits: its centroids times the
    dims each spans (0: trained without k-means)."""
    most = 0
    if isinstance(inner, (faiss.IndexPQ, faiss.IndexPQFastScan)):
        most = int(inner.pq.ksub) * int(inner.pq.dsub)
    elif isinstance(inner, faiss.IndexAdditiveQuantizer) and getattr(inner, "aq", None) is not None:
        split = getattr(inner, "prq", None) or getattr(inner, "plsq", None)  # (product forms: each over d / nsplits)
        most = _centroids(chain, inner) * int(inner.aq.d) // (int(split.nsplits) if split is not None else 1)
    for vt in chain:
        if isinstance(vt, faiss.OPQMatrix):  # (its 8-bit PQ over the rotated dims)
            most = max(most, 256 * int(vt.d_out) // int(vt.M))
    return most


def _min_train(chain, inner) -> int:
    """The fewest training vectors the codec can be trained on at all."""
    return max(_centroids(chain, inner), 1)


def centroids_per_codebook(spec: str, dim: int, metric: str) -> int:
    """The most centroids one k-means of `spec`'s training fits: 2^nbits for product and
    additive quantizers (PQ32: 256, PQ64x4fs: 16, RQ16x8: 256), 0 for codecs trained without
    k-means (scalar, binary, RaBitQ). On n training rows each centroid gets n / that of them."""
    index = build_index(spec, dim, metric)  # (held: the inner index is a view of it)
    return _centroids(*_innermost(index))


def codebook_parameters(spec: str, dim: int, metric: str) -> int:
    """The most parameters one k-means of `spec`'s training fits, centroids times the dims
    each spans: PQ48 at 384-d 2,048 (256 x 8), PQ128x4fs 48, RQ16x8 98,304 (256 x 384),
    PCA64,RQ8x8 16,384; 0 without k-means (scalar, binary, RaBitQ). On n training rows the
    more of them, the more roughly a codec is trained: residual quantizers gain from every
    row, a product quantizer from none past PQ_ROWS_PER_PARAMETER per parameter."""
    index = build_index(spec, dim, metric)  # (held: the inner index is a view of it)
    return _parameters(*_innermost(index))


#: a product quantizer's k-means (2^nbits centroids of dsub dims each) trained on more rows than this
#: many per parameter it fits (centroids x dsub) came out no better: recall@10 within the training
#: noise of the whole sample's (benchmarks/train_rows.py). Fewer fell short: PQ8 at 128-d on
#: power-law rows 0.013 below on 4 per parameter (0.004 on 8), PQ8 at 384-d 0.048 on 0.8
PQ_ROWS_PER_PARAMETER = 8


def rows_to_train(spec: str, dim: int, metric: str) -> int | None:
    """The training rows past which `spec`'s codec comes out no better, or None where every row
    given counts. A product quantizer: PQ_ROWS_PER_PARAMETER per parameter of its k-means, or
    the rows faiss's k-means samples at most (max_points_per_centroid each) where fewer, and at
    least faiss's minimum (PQ64 at 768-d: 24,576; 4-bit: at most 4,096). 0 where training fits
    no centroids (scalar, binary, RaBitQ: per-dimension statistics, the same on any few
    thousand rows). None for codebooks trained on what earlier ones leave (residual and
    additive quantizers) and trained rotations or projections (OPQ, PCA, ITQ)."""
    index = build_index(spec, dim, metric)  # (held: the inner index is a view of it)
    chain, inner = _innermost(index)
    if any(isinstance(vt, (faiss.OPQMatrix, faiss.PCAMatrix, faiss.ITQTransform, faiss.ITQMatrix)) for vt in chain):
        return None
    if isinstance(inner, (faiss.IndexPQ, faiss.IndexPQFastScan)):
        pq = inner.pq
        k, cp = int(pq.ksub), pq.cp
        return max(int(cp.min_points_per_centroid) * k,
                   min(int(cp.max_points_per_centroid) * k, PQ_ROWS_PER_PARAMETER * k * int(pq.dsub)))
    statistics = (faiss.IndexScalarQuantizer, faiss.IndexLSH, faiss.IndexRaBitQ, faiss.IndexRaBitQFastScan)
    return 0 if isinstance(inner, statistics) else None


def kmeans_sample_cap(spec: str, dim: int, metric: str) -> int | None:
    """The most rows one k-means of `spec`'s training takes of any larger sample (faiss's
    max_points_per_centroid per centroid: 65,536 for 8 bits), or None where it fits none."""
    centroids = centroids_per_codebook(spec, dim, metric)
    return int(faiss.ClusteringParameters().max_points_per_centroid) * centroids if centroids else None


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
    if p.sq_type:  # (a type faiss's factory has no word for: built as SQ8, its type swapped in)
        inner.sq.qtype = getattr(faiss.ScalarQuantizer, p.sq_type)
        inner.sq.set_derived_sizes()
        inner.code_size = inner.sq.code_size
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
