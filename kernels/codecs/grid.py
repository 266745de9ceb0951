"""The advisor's default grid: candidate codec specs for its sweep (`default_grid`)."""

from __future__ import annotations

import re

from vecpress.kernels.codecs.build import code_size_of
from vecpress.kernels.codecs.spec import CodecSpecError
from vecpress.kernels.knn import faiss_metric

#: the residual quantizers' lengths (8-bit stages: bytes) above dim 64, so that each budget from
#: 16 to 64 B has the family's best within it: one family, trained once at its longest and cut
#: (kernels.codecs.nested), and judged by its shortest first (pipeline.preselect). At 64 B on
#: 384-d text-like embeddings RQ64x8 reaches recall@10 0.923, RQ32x8 0.870, the best of the
#: rest 0.765 (PQ64; BENCHMARKS.md, "Codec families"). Longer ones are left out: training
#: grows with the stages (RQ64x8 at 384-d: 29 s on 30,000 rows, 2 cores), and from 96 B on
#: the 1-bit scalar and RaBitQ codes fit at up to 768 dims
RQ_STAGES = (16, 24, 32, 48, 64)


def default_grid(dim: int, metric: str, *, min_bytes: int = 8, max_bytes: int = 256) -> list[str]:
    """Candidate codec specs for the advisor's sweep, sorted by code size then spec.

    One or two of each family at budgets from `min_bytes` to `max_bytes` bytes per vector,
    keeping only specs valid for `dim` whose code size falls in the range. Chosen to train in
    a few seconds each on 20k x 384 vectors on 2 cores: 8-bit PQ only with >= 8 dims per
    sub-vector (or m <= 8), RQ with beam 1 (above dim 64 on a PCA64 projection, and the
    RQ_STAGES lengths, one family trained once), OPQ only at dim <= 64 with >= 8 dims per
    sub-vector, no LSQ, MRL prefixes only at dim >= 256 (they only pay off on
    Matryoshka-trained embeddings). faiss 1.15's EDEN and TurboQuant scalar
    types need no k-means: they cost the sweep their encoding only.
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
    # RQ: beam 1 (beam 4 is 5x slower to train); above dim 64 on a 64-dim PCA projection too.
    # The best codecs per byte (BENCHMARKS.md: codec families) and the costliest to train:
    # the advisor's first stage (pipeline.preselect) judges them on a small sample
    cands += ["RQ8x8,beam=1" if dim <= 64 else "PCA64,RQ8x8,beam=1"]
    cands += [f"RQ{m}x8,beam=1" for m in RQ_STAGES if dim > 64]
    cands += ["SQ4", "SQ6", "SQ8", "SQfp16", "SQbf16", "SQ8,calibrate=0.001"]
    # faiss 1.15's rotation-based scalar types: no k-means, seconds to train at any size.
    # EDEN at 1, 2 and 4 bits per dim; TurboQuant's MSE-optimal types assume unit vectors
    # (cosine), its plain ones carry a per-vector correction (any metric)
    cands += ["SQeden1", "SQeden2", "SQeden4"]
    cands += ["SQtqmse1", "SQtqmse2", "SQtqmse4"] if metric == "cosine" else ["SQtq2", "SQtq4"]
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


#: the last part of a spec that sets how finely its family quantizes: the sub-quantizers of a
#: PQ (the same bits each), the bits per dim of a scalar or RaBitQ code (RaBitQ: 1)
_FINENESS = re.compile(r"(PQ|SQeden|SQtqmse|SQtq|SQ|RaBitQ)(\d*)((?:x\d+)?(?:fs)?)")


def held_by_finer(specs: list[str]) -> dict[str, str]:
    """{spec: the finest of its family among `specs`} for each spec with a finer one of its
    family there: the same prefix (PCA, OPQ, MRL ...), method, bits per sub-quantizer and
    options, with more sub-quantizers (PQ8 under PQ16, PQ16x4fs under PQ32x4fs) or more bits
    per dim (SQ4 under SQ8, SQeden1 under SQeden4, RaBitQ under RaBitQ4). The finer quantizes
    the same vectors more closely, in more bytes: within a --max-bytes budget that fits both,
    the coarser is not the best (every such pair measured, 49 in 8 grids at 128 to 768 dims,
    BENCHMARKS.md "Fewer candidates tried, fewer rows swept"). Residual quantizers are judged
    as one family instead (kernels.codecs.nested), and one on a PCA projection is held by the
    shortest of that family at the full dim with at least its stages (`_projected_residuals`);
    specs of other forms (SQfp16, BIN ...) are held by none."""
    families: dict[tuple, list[tuple[int, str]]] = {}
    for spec in specs:
        body, options = _split(spec)
        if m := _FINENESS.fullmatch(body[-1]):
            key = (tuple(body[:-1]), m.group(1), m.group(3), options)
            families.setdefault(key, []).append((int(m.group(2) or 1), spec))
    finest = {spec: max(members)[1] for members in families.values() for _, spec in members}
    return {spec: by for spec, by in finest.items() if by != spec} | _projected_residuals(specs)


_RESIDUAL = re.compile(r"RQ(\d+)x(\d+)")


def _split(spec: str) -> tuple[list[str], tuple[str, ...]]:
    """(a spec's parts but its options, its options sorted)."""
    parts = spec.split(",")
    return [p for p in parts if "=" not in p], tuple(sorted(p for p in parts if "=" in p))


def _projected_residuals(specs: list[str]) -> dict[str, str]:
    """{PCA<p>,RQ<m>x<b>: the shortest RQ<M>x<b> at the full dim with M >= m and the same
    options} among `specs`. k-means over all the dims does at least as well as over p of
    them plus the variance the projection drops (the projection's centroids, lifted with the
    mean, are among its solutions), stage after stage; so M >= m full-dim stages quantize at
    least as closely. Measured, RQ16x8 against PCA64,RQ8x8 in every grid: 384-d text-like
    0.822 against 0.716, clustered 0.800-0.818 against 0.732-0.736, power-law 0.788-0.817
    against 0.548-0.586 (BENCHMARKS.md, "Codec families"; benchmarks/results/first_stage_chain_*)."""
    full: dict[tuple, list[tuple[int, str]]] = {}
    projected = []
    for spec in specs:
        body, options = _split(spec)
        if not (m := _RESIDUAL.fullmatch(body[-1])):
            continue
        if len(body) == 1:
            full.setdefault((m.group(2), options), []).append((int(m.group(1)), spec))
        elif all(re.fullmatch(r"PCAR?\d+", p) for p in body[:-1]):
            projected.append((spec, int(m.group(1)), (m.group(2), options)))
    held = {}
    for spec, stages, key in projected:
        if longer := [member for member in full.get(key, []) if member[0] >= stages]:
            held[spec] = min(longer)[1]
    return held
