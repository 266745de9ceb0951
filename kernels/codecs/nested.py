"""Residual quantizers that nest: trained greedily, the first m stages of `RQ<M>x<b>` are the
codec `RQ<m>x<b>` (m < M), so one training serves every length of a family.

A residual quantizer trains stage after stage, each stage's k-means on the residuals the
earlier stages leave, and nothing of a stage depends on how many stages follow. With a beam
of 1 in training (as `train_index` always trains a residual quantizer, on a GPU too) the
trained codebooks of the shorter codec are the longer one's first ones, and
greedy encoding with them gives the longer codes' first bytes. The sweep and the advisor train
the longest of each family and cut the others from it (`nesting`, `residual_prefix`), and
where both encode greedily (beam=1) slice the shorter codes from the longer (`cut_codes`,
`encode_all`). The other way round, a longer codec trains on from a shorter one's stages
(`train_on`): the advisor judges the shorter one before it pays for the rest.
tests/kernels/test_nested.py compares the cut codec with the codec trained on its own: the
same codebooks, beam, codes and search, and the same serialised bytes but for the range of
reconstruction norms faiss notes at the end of training (`norm_min`, `norm_max`: the longer
codec's here), which codecs that store no norm, as these, never read.
"""

from __future__ import annotations

import re
import time

import numpy as np

from vecpress.kernels._faiss import faiss
from vecpress.kernels.codecs.build import _innermost, build_index
from vecpress.kernels.codecs.codec import Codec
from vecpress.kernels.codecs.residual import load_index
from vecpress.kernels.codecs.spec import CodecSpecError, parse_spec
from vecpress.kernels.codecs.train import Iterations

_RQ = re.compile(r"(^|,)RQ(\d+)x(\d+)$")
#: the same in a spec, options after it (`RQ16x8,beam=1`)
_RQ_IN_SPEC = re.compile(r"(^|,)RQ(\d+)x(\d+)(?=,|$)")


def _family(spec: str, dim: int) -> tuple[tuple, int, int | None] | None:
    """(what the codec is apart from its length, its number of stages, its beam option) of an
    RQ spec, or None for any other codec."""
    try:
        p = parse_spec(spec, dim)
    except CodecSpecError:
        return None
    m = _RQ.search(p.factory)
    if m is None or p.binary or p.sq_type:
        return None
    rest = tuple(sorted((k, v) for k, v in p.options.items() if k != "beam"))
    return (p.mrl, p.factory[:m.start()] + m.group(1), int(m.group(3)), rest), int(m.group(2)), p.options.get("beam")


def stages(spec: str, dim: int) -> int:
    """The number of stages of an RQ spec (0 for any other codec)."""
    fam = _family(spec, dim)
    return 0 if fam is None else fam[1]


def first_half(spec: str, dim: int) -> str | None:
    """The spec of the first half of RQ spec `spec`'s stages (RQ32x8,beam=1 -> RQ16x8,beam=1),
    or None for any other codec and one of a single stage."""
    m = stages(spec, dim)
    if m < 2:
        return None
    short = _RQ_IN_SPEC.sub(lambda g: f"{g.group(1)}RQ{m // 2}x{g.group(3)}", spec, count=1)
    return short if _holds(spec, short, dim) else None


def _holds(long: str, short: str, dim: int) -> bool:
    """Whether `short` is the first stages of `long`: the same RQ family, fewer stages."""
    fam, long_fam = _family(short, dim), _family(long, dim)
    return fam is not None and long_fam is not None and fam[0] == long_fam[0] and fam[1] < long_fam[1]


def nesting(specs: list[str], dim: int, *, greedy: bool) -> dict[str, str]:
    """{spec: the longest spec of `specs` whose trained codec holds it} for every RQ spec
    that a longer one of the same family holds. `greedy`: training is greedy whatever the
    specs' beams (train_index's); otherwise only specs with beam=1 count (as encoding: greedy
    with beam=1 alone)."""
    parts = {s: f for s in specs if (f := _family(s, dim)) is not None and (greedy or f[2] == 1)}
    out = {}
    for spec in parts:
        longer = [t for t in parts if _holds(t, spec, dim)]
        if longer:
            out[spec] = max(longer, key=lambda t: (parts[t][1], t))
    return out


def residual_prefix(codec: Codec, spec: str) -> Codec:
    """The codec `spec`, cut from the trained `codec` that nests it (`nesting`): its first
    stages, with the beam `spec` encodes with."""
    if not _holds(codec.spec, spec, codec.dim):
        raise CodecSpecError(f"codec {spec!r} is not the first stages of {codec.spec!r}")
    stages = _family(spec, codec.dim)[1]
    index = load_index(faiss.serialize_index(codec.index))  # (tables: as ST_norm_from_LUT needs them)
    _, inner = _innermost(index)
    rq = inner.rq
    ksub, d = 1 << int(rq.nbits.at(0)), int(rq.d)
    codebooks = faiss.vector_to_array(rq.codebooks)[: stages * ksub * d]
    rq.M = stages
    rq.nbits.resize(stages)
    faiss.copy_array_to_vector(np.ascontiguousarray(codebooks), rq.codebooks)
    rq.set_derived_values()
    fresh = build_index(spec, codec.dim, codec.metric)
    rq.max_beam_size = int(_innermost(fresh)[1].rq.max_beam_size)
    if rq.centroid_norms.size() or rq.codebook_cross_products.size():
        rq.compute_codebook_tables()
    inner.code_size = int(rq.code_size)
    return Codec(spec=spec, metric=codec.metric, dim=codec.dim, index=index)


def train_on(codec: Codec, spec: str, xt: np.ndarray, *, seed: int, ngpu: int, progress=None,
             iterations: Iterations | None = None) -> Codec:
    """The codec `spec`, a longer residual quantizer of `codec`'s family, trained on `xt` (the
    rows, seed and `iterations` `codec` was trained with) from `codec`'s stages: only the
    stages after them are trained, and the codec is the one training `spec` from nothing gives."""
    if not _holds(spec, codec.spec, codec.dim):
        raise CodecSpecError(f"codec {spec!r} does not hold {codec.spec!r}'s stages")
    return Codec.train(xt, spec, codec.metric, seed=seed, ngpu=ngpu, progress=progress, start=codec,
                       iterations=iterations)


def _sliceable(long: Codec, short: Codec) -> bool:
    """Whether `short`'s codes are the first bytes of `long`'s: `short` is `long`'s first
    stages, both encode greedily (beam 1), and the short codes end on a byte (greedy encoding
    stage after stage writes the short codes' bits first)."""
    if not _holds(long.spec, short.spec, short.dim):
        return False
    rq, long_rq = _innermost(short.index)[1].rq, _innermost(long.index)[1].rq
    return int(rq.max_beam_size) == 1 and int(long_rq.max_beam_size) == 1 and int(rq.tot_bits) % 8 == 0


def cut_codes(codes: np.ndarray, long: Codec, short: Codec) -> np.ndarray | None:
    """`short`'s codes sliced from `long`'s codes of the same rows where they can be
    (`_sliceable`), else None (encode with `short` itself)."""
    return np.ascontiguousarray(codes[:, :short.code_size]) if _sliceable(long, short) else None


def slice_sources(codecs: list[Codec]) -> list[int | None]:
    """Per codec, the index of the codec in `codecs` whose codes hold its own (`_sliceable`),
    or None: what encode_all slices, worked out once for a list of codecs."""
    if not codecs:
        return []
    index = {c.spec: i for i, c in enumerate(codecs)}
    pairs = nesting([c.spec for c in codecs], codecs[0].dim, greedy=False)
    out: list[int | None] = [index.get(pairs.get(c.spec)) for c in codecs]
    return [j if j is not None and _sliceable(codecs[j], c) else None for c, j in zip(codecs, out)]


def encode_all(codecs: list[Codec], x: np.ndarray, sources: list[int | None] | None = None,
               shorter: dict[int, tuple[Codec, np.ndarray]] | None = None) -> list[tuple[np.ndarray, float | None]]:
    """Each codec's codes of `x`, with the seconds its encoding took; None for codes sliced
    from a longer codec's (`sources`: slice_sources(codecs), computed here when not given),
    which cost no encoding. `shorter`: {i: (a shorter codec of codecs[i]'s family, its codes of
    `x`)}: where those codes are codecs[i]'s first bytes (`_sliceable`), only its stages after
    them are encoded (Codec.encode's `first`; the same codes): a codec trained on from a
    shorter one (`train_on`), as the advisor's first stage judges the family."""
    sources = slice_sources(codecs) if sources is None else sources
    out: list = [None] * len(codecs)
    for i in sorted(range(len(codecs)), key=lambda i: sources[i] is not None):  # (the longest first)
        if (j := sources[i]) is not None:
            out[i] = (np.ascontiguousarray(out[j][0][:, :codecs[i].code_size]), None)
            continue
        short, first = (shorter or {}).get(i, (None, None))
        start = time.perf_counter()
        # (raw vectors: the codec prepares them, as compress encodes)
        codes = codecs[i].encode(x, first=first) if short is not None and _sliceable(codecs[i], short) \
            else codecs[i].encode(x)
        out[i] = (codes, time.perf_counter() - start)
    return out
