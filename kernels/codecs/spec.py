"""Codec specs: the grammar that describes a trained vector codec, and its parser.

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
- faiss 1.15's rotation-based scalar types, trained by no k-means at all: `SQeden1`..`SQeden8`
  (EDEN: b bits per dim after a random rotation, scaled per vector; built as faiss's
  QT_<b>bit_eden, which its factory has no word for), and TurboQuant `SQtq2`..`SQtq5` (b bits
  per dim and a per-vector correction) and `SQtqmse1`..`SQtqmse8` (b bits per dim, MSE-optimal
  for unit vectors: for cosine).
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

`codecs.build.check_codec_spec` rejects impossible specs before any data is read, saying what
would fit. `is_binary_spec` says from the spec alone whether the codes are binary.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field


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


@dataclass(frozen=True)
class ParsedSpec:
    """A spec split into its parts: Matryoshka prefix, faiss factory string, vecpress binary
    word and options."""

    spec: str
    mrl: int | None  # keep the first `mrl` dims
    factory: str  # faiss factory string of the codec (BIN/BINt replaced by LSH)
    binary: str | None  # "BIN" or "BINt"
    options: dict = field(default_factory=dict)
    #: a faiss ScalarQuantizer type the factory cannot name (`SQeden4` -> "QT_4bit_eden"): the
    #: factory builds an SQ8 in its place and codecs.build swaps the type in
    sq_type: str | None = None


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
    sq_type = None
    for i, tok in enumerate(body):
        if m := re.fullmatch(r"SQeden(\d*)", tok):
            bits = int(m.group(1) or 0)
            if not 1 <= bits <= 8:
                raise CodecSpecError(f"codec {spec!r}: EDEN takes 1 to 8 bits per dim (SQeden1..SQeden8), got {tok}")
            if sq_type is not None or i != len(body) - 1:
                raise CodecSpecError(f"codec {spec!r}: SQeden<b> must be the last codec part, and only once")
            sq_type, body[i] = f"QT_{bits}bit_eden", "SQ8"
    return ParsedSpec(spec=spec.strip(), mrl=mrl, factory=",".join(body), binary=binary, options=options,
                      sq_type=sq_type)


def is_binary_spec(spec: str, dim: int) -> bool:
    """Whether a spec's codes are bit-packed Hamming codes (stored as fixed_size_list<uint8>):
    the spec ends in BIN or BINt, as `Codec.is_binary` of its trained codec says, read from
    the spec alone (no faiss index is built). CodecSpecError for grammar errors."""
    return parse_spec(spec, dim).binary is not None
