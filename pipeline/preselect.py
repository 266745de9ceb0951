"""The advisor's first stage: every candidate of the default grid trained on a small part of
the sample and judged there, so that only the front-runners are trained further (on the rows
their kind of codec needs, `second_stage_rows`) and swept over the corpus, or with --max-bytes
over SECOND_STAGE_ROWS of it (successive halving: a round more where the first half of those
rows settles it).

The first stage trains each candidate on STAGE1_TRAIN_ROWS rows of the training sample and
searches its codes of STAGE1_BASE_ROWS other rows for STAGE1_QUERIES of the held-out queries,
against their exact neighbours among those rows (each a seeded subset spread over the
sample, sampling.sample_subset: the sample is in corpus order). That costs seconds per
candidate where training on the whole sample and a pass over the corpus cost minutes for
the costly families (residual and additive quantizers), and it ranks candidates the way the
full sweep does closely enough to keep the best among the front-runners (tests compare the
pick with a full sweep's): at most FRONT_RUNNERS, and with --max-bytes only those the best
is not ahead of for good, so that a clear leader is chosen here (stages/s04_advise.py). Ahead
for good (`_settled_by`) is by more than LEAD_MARGIN, or, where the leader's k-means fits more
parameters than the rival's (kernels.codecs.build.codebook_parameters: centroids times the
dims each spans; RQ16x8 at 384-d 98,304, PQ48 2,048, PQ128x4fs 48, a scalar code none), by
more than ROUGH_LEAD_Z standard errors of the per-query difference: the first stage's
training rows are fewest per parameter for it, so it is judged the more roughly of the two.
Beyond 3 standard errors such leads kept their sign at full size in 383 of 391 pairs, 42 of
43 within LEAD_MARGIN (benchmarks/first_stage.py, every pair within 64 B at 128 to 768 dims,
clustered and power-law rows; the one, RQ16x8 over PQ64x4fs at 768-d on power-law rows, 0.038
ahead, 0.027 behind at full size: over the first stage's 20,000 rows recall@10 rewards finding
a query's cluster more than ranking within it); with the rival the rougher, a lead of 3
standard errors came out 0.002 at full size. The rules
need the first stage's full STAGE1_TRAIN_ROWS (a sample of 20,000 or more): on fewer
rows an 8-bit quantizer's k-means has under faiss's 39 points per centroid, residual
quantizers come out well below their full-sample recall, and the best FRONT_RUNNERS go on.
Residual quantizers of one family are trained once and their codes sliced
(kernels.codecs.nested). With --max-bytes the family is judged by its shortest before the
rest of it is trained, then by lengths doubling (`_judging_order`): RQ16x8, what the first
16 stages of RQ24x8 ... RQ64x8 are, is trained and judged with the others first; ahead of
all but its own family for good (`_settled_by`), the longest within the budget (which holds
it and lowers its error further) leads as well and is chosen without its other stages
trained here (the train stage trains it whole); otherwise RQ32x8 is trained on from
RQ16x8's stages (kernels.codecs.nested.train_on), to the codec trained whole, RQ24x8 cut
from it, and judged the same way, then RQ64x8 from RQ32x8's. At 768-d and 32 B that halves
the first stage where RQ32x8 leads; at 64 B it is a quarter or a half of it. A length whose
next length, projected PROJECTED_SHARE of what this one gained over the length before it
above it, is not behind for good and has a front-runner's place whatever its further stages
add, ends the chain too where the next length is not expected to lead for good: that would
take more than CHAIN_GAIN_SHARE of what this one gained (`_goes_on_as_it_is`). For the
shortest the length before it is its first half, cut from it and judged as a yardstick, not
a candidate (RQ8x8 from RQ16x8: its codes sliced, no training). The longest goes on to the
second stage, judged by it and ranked by the projection (`front_runners`), and the second
stage trains it whole (at 768-d and 48 or 64 B on power-law rows, RQ48x8 and RQ64x8 go on
after RQ16x8, and RQ32x8's stages, a third of the first stage, are not trained here).

The second stage trains each front-runner on the rows past which its kind of codec comes out
no better (`second_stage_rows`): the whole sample for residual and additive quantizers,
8 rows per parameter of a product quantizer's k-means, and as the first stage trained it
where that is as many (4-bit PQ, scalar and binary codes); a pick trained on fewer rows than
the sample's is trained on them all by the train stage, as a named codec is. Its pass over
SECOND_STAGE_ROWS rows of the corpus reads them in two halves, each spread over the corpus,
and ends after the first where one front-runner is ahead of every other there by more than
HALF_PASS_LEAD_Z standard errors and MIN_LEAD (`settled_at_half`): the second half would
only measure a settled lead more finely, and a pass over the corpus is most of the second
stage's cost (at 768-d and 64 B, RQ64x8's encoding alone 6-8 s of 50,000 rows).

The first-stage record keeps each candidate's centroids per codebook and parameters and, when
one is chosen there, its lead over the best of the rest (`lead`: by how much, in standard
errors, and the training rows per centroid and per parameter of each), which the advisor's
reason states.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import time

import numpy as np

from vecpress.kernels.codecs.build import centroids_per_codebook, codebook_parameters, kmeans_sample_cap, rows_to_train
from vecpress.kernels.codecs.nested import encode_all, first_half, nesting, stages
from vecpress.kernels.knn import exact_knn, prepare_vectors
from vecpress.kernels.metrics import difference_standard_error, knn_hits
from vecpress.pipeline.errors import VecpressError
from vecpress.pipeline.sampling import sample_subset
from vecpress.pipeline.sweep import TrainedCodec, load_trained, spec_bytes, train_candidates

log = logging.getLogger("vecpress")

STAGE1_TRAIN_ROWS = 10_000
STAGE1_BASE_ROWS = 20_000
STAGE1_QUERIES = 300
#: candidates the second stage trains on the whole sample and sweeps over the corpus, at most
FRONT_RUNNERS = 4
#: --max-bytes: first-stage candidates within this recall@10 of the first stage's best go on to
#: the second stage. A leader further ahead than this is chosen in the first stage: the second
#: would only train it on the whole sample, which the train stage does anyway
LEAD_MARGIN = 0.05
#: --max-bytes: a first-stage leader whose k-means fits more parameters than a rival's (RQ's
#: 256 centroids of every dim against PQ's 256 of a sub-vector's or 4-bit PQ's 16, or k-means
#: against none) trains on fewer rows per parameter, so the first stage judges it the more
#: roughly of the two; ahead there by more than this many standard errors of the per-query
#: difference (and MIN_LEAD), however far within LEAD_MARGIN, it stayed ahead at full size in
#: 42 of 43 such pairs measured within LEAD_MARGIN (benchmarks/first_stage.py, 128 to 768 dims)
ROUGH_LEAD_Z = 3.0
MIN_LEAD = 0.01
#: --max-bytes: the first stage trains a residual family's next length (twice the stages) only
#: where it is expected to lead every other candidate for good: where that takes at most this
#: share of what the last length gained over the one before it. A doubling gained 0.54-1.0 of
#: the one before it in every family measured (benchmarks/first_stage_chain.py: 0.54, 0.62 and
#: 0.64 at 128, 384 and 768 dims on power-law rows, 0.59-1.0 on clustered rows; RQ16x8 to RQ32x8
#: against RQ8x8 to RQ16x8 0.35-0.93, about a half in the middle); the next length
#: trained on 10,000 rows costs about what the second stage does (at 768-d and 64 B, RQ64x8 on
#: from RQ32x8 10 s, against 14 s)
CHAIN_GAIN_SHARE = 0.5
#: --max-bytes: the least share of what a length of a residual family gained over the one
#: before it (half its stages) that the next length gains over it, as measured: 0.35 (the
#: least of 18 doublings from RQ4x8 to RQ64x8, 128 to 768 dims, clustered and power-law rows;
#: benchmarks/first_stage_chain.py). The next length's recall@10 is projected at least that
#: much above the last one's, which decides whether the family's longest has a front-runner's
#: place whatever the rest of it adds (`_goes_on_as_it_is`)
PROJECTED_SHARE = 0.35
#: --min-recall: first-stage candidates within this of the target still run in the second
MIN_RECALL_MARGIN = 0.05
#: --max-bytes: the second stage sweeps about this many rows of a larger corpus, in stretches
#: spread over it (layout.spread_rows), not all of it: it ranks the front-runners, and the
#: evaluate stage measures the pick over every row. A sweep of every row would cost
#: `--codec auto` a pass over the corpus, encoding it once per front-runner. Trained on the
#: whole sample, the default grid's best over this many rows was the best over 200,000 in 7 of
#: 8 grids at 128 to 768 dims, and 0.003 recall@10 below it in a near tie (benchmarks/
#: second_stage.py; leads grew with the rows); this many halves the encoding of RQ64x8 against
#: 100,000 (3.4 s at 128-d on 2 cores). (--min-recall
#: sweeps every row: its target is a recall over the whole corpus, which a part overstates.)
SECOND_STAGE_ROWS = 50_000
#: --max-bytes: the second stage's pass reads the second half of its rows only where, over the
#: first half, no front-runner is ahead of every other by more than this many standard errors of
#: the per-query difference of recall@10 (and MIN_LEAD): `settled_at_half`
HALF_PASS_LEAD_Z = 3.0


def preselect(specs: list[str], xt: np.ndarray, xq: np.ndarray, *, metric: str, seed: int, ngpu: int,
              max_bytes: int | None, min_recall: float | None
              ) -> tuple[list[str], dict | None, dict[str, TrainedCodec]]:
    """(the front-runners among `specs`, the first stage's record, {front-runner: as the first
    stage trained it}), or (specs, None, {}) when the sample is too small to split, or there
    are no more than FRONT_RUNNERS of them and no leader can be chosen here (without
    --max-bytes, or on fewer than STAGE1_TRAIN_ROWS rows). The first stage's training and
    base rows are a seeded subset of the sample (sampling.sample_subset: its first n1 rows in
    one seeded order, then the next STAGE1_BASE_ROWS), as are its queries."""
    n1 = min(STAGE1_TRAIN_ROWS, len(xt) // 2)
    # (on fewer rows an 8-bit quantizer gets under faiss's 39 per centroid: judged too roughly to cut by margin)
    margin = LEAD_MARGIN if n1 >= STAGE1_TRAIN_ROWS else None
    chooses = max_bytes is not None and margin is not None and len(specs) > 1
    if (len(specs) <= FRONT_RUNNERS and not chooses) or n1 < 1000:
        return specs, None, {}
    start = time.perf_counter()
    nb = min(STAGE1_BASE_ROWS, len(xt) - n1)
    ours = sample_subset(len(xt), n1 + nb, seed)  # (the training rows: the first n1 of that order)
    train_at = sample_subset(len(xt), n1, seed)
    xt, base = xt[train_at], xt[np.setdiff1d(ours, train_at, assume_unique=True)]
    q = xq[sample_subset(len(xq), min(STAGE1_QUERIES, len(xq)), seed, stream=1)]
    _, exact = exact_knn(prepare_vectors(q, metric), prepare_vectors(base, metric), 10, metric)
    hits: dict[str, np.ndarray] = {}  # (per query, for the standard error of a lead)
    judge = functools.partial(_judge, xt=xt, base=base, q=q, exact=exact, metric=metric, seed=seed, ngpu=ngpu,
                              hits=hits, seen={}, encoded={})
    dim = xt.shape[1]
    nested = nesting(specs, dim, greedy=True)  # (training is greedy, on a GPU too)
    # --max-bytes: a residual quantizer family judged by its shortest first, then by lengths doubling
    heads = _judging_order(nested, dim) if max_bytes is not None and margin is not None else {}
    later = {s for s, h in nested.items() if h in heads and s != heads[h][0]} | set(heads)
    # (the first half of each family's shortest, cut from it: what the shortest gained over it)
    halves = {head: half for head, chain in heads.items() if (half := first_half(chain[0], dim)) not in (None, *specs)}
    rows, trained = judge([s for s in specs if s not in later] + list(halves.values()))
    for half in halves.values():  # (a yardstick, not a candidate)
        if half in rows:
            rows[half]["yardstick"] = True
    leader = None
    for i, (head, chain) in enumerate(heads.items()):
        family = {head} | {s for s, h in nested.items() if h == head}
        size, below, before = spec_bytes(head, dim, metric, n1), chain[0], halves.get(head)
        for longer in chain[1:]:
            last = i == len(heads) - 1 and below in trained and size <= max_bytes
            rivals = _rivals(rows, family, max_bytes) if last else []
            if last and all(_settled_by(rows[below], r, hits, margin) for r in rivals):
                # (more stages only lower the reconstruction error: the longest holds `below` and more)
                rows[head] = _judged_by(rows[below], head, size)
                leader = head
                break
            stop = _goes_on_as_it_is(rows, below, before, rivals, family, hits, margin, max_bytes) \
                if last and before in trained else None
            if stop:
                rows[head] = {**_judged_by(rows[below], head, size), "projected_recall_at_10": stop["projected"],
                              "chain_stopped": stop}
                hits[head] = hits[below]
                for spec in family & set(rows) - {head}:  # (what the second stage cuts from it)
                    rows[spec]["cut_from"] = head
                log.info("advise: first stage: %s goes on judged by its first stages, %s (recall@10 %.3f, %.3f "
                         "%s %s, not for good; the next length projected at %.3f or more): to lead every other for "
                         "good it would need %.3f more, over %.0f%% of the %.3f %s gained over %s; the rest of it is "
                         "not trained here", head, below, rows[below]["recall_at_10"], stop["by"],
                         "behind" if "behind" in stop else "ahead of", stop.get("behind") or stop["ahead_of"],
                         stop["projected"], stop["needs"], 100 * CHAIN_GAIN_SHARE, stop["gained"], below, before)
                break
            # `longer` trained on from the stages of `below`, the lengths between cut from it
            between = [s for s in specs if s in family - set(rows) and stages(s, dim) < stages(longer, dim)]
            more, grown = judge([longer] + between, grown_from={longer: trained[below]} if below in trained else None,
                                failed=True)
            rows.update(more)
            trained.update(grown)
            for spec in family & set(rows) - {longer}:  # (what the second stage cuts from the longest)
                rows[spec]["cut_from"] = longer
            before, below = below, longer
        if leader:
            break
    rows = [rows[s] for s in specs if s in rows]
    judged = [r for r in rows if _contends(r)]
    settled = functools.partial(_settled_by, hits=hits, margin=margin) if margin is not None else None
    kept = [leader] if leader else front_runners(judged, max_bytes=max_bytes, min_recall=min_recall, margin=margin,
                                                 settled=settled)
    record = {"train_rows": n1, "base_rows": len(base), "queries": len(q), "rows": rows, "kept": kept,
              "lead_margin": margin, "rough_lead_z": ROUGH_LEAD_Z if margin is not None else None,
              "seconds": round(time.perf_counter() - start, 3)}
    if max_bytes is not None and margin is not None and len(kept) == 1:
        record["lead"] = _lead(kept[0], {r["codec"]: r for r in judged}, hits, n1, max_bytes, margin)
    log.info("advise: first stage: %d candidates trained on %d vectors and judged on %d others in %.1fs; "
             "front-runners: %s", len(rows), n1, len(base), record["seconds"], ", ".join(kept))
    return kept, record, {s: trained[s] for s in kept if s in trained}


def second_stage_rows(spec: str, dim: int, metric: str, first_rows: int, sample_rows: int) -> int:
    """The sample rows the second stage trains front-runner `spec` on: the rows past which its
    codec comes out no better (kernels.codecs.build.rows_to_train: every row for residual and
    additive quantizers, PQ64 at 768-d 24,576), at least the first stage's `first_rows` (where
    that many do, the first stage's training serves as it is) and at most the sample's; the
    whole sample where those rows are all faiss's k-means takes of it anyway (8-bit PQ with
    sub-vectors of 32 dims or more: 65,536), which costs no more and gives the train stage the
    codec it would train. Trained on all 100,000 rows of a sample instead, the codecs so
    judged came out within training noise of these (benchmarks/train_rows.py), at a fraction
    of the time: PQ64 at 768-d trains in 2.5-3.6 s on its 24,576 rows against 9.5-11.3 s on
    the sample (of which faiss's k-means takes 65,536)."""
    need = rows_to_train(spec, dim, metric)
    if need is None or need > first_rows and need == kmeans_sample_cap(spec, dim, metric):
        return sample_rows  # (every row counts, or faiss's k-means takes as many of the whole sample at the same cost)
    return min(sample_rows, max(need, first_rows))


def settled_at_half(recalls: dict[str, np.ndarray]) -> dict | None:
    """run_sweep's `enough` for the second stage (one round more of successive halving): where,
    over the first half of the pass, one front-runner's recall@10 is ahead of every other's by
    more than HALF_PASS_LEAD_Z standard errors of the per-query difference and MIN_LEAD, the
    rest of the pass would only measure the lead more finely: why (the leader, the nearest
    other, by how much, in standard errors); else None. `recalls`: {front-runner: each query's
    recall@10 over the rows read}. Each half is spread over the corpus as the whole pass is
    (every other batch of its stretches), and the evaluate stage measures the pick over every
    row."""
    if len(recalls) < 2:
        return None
    means = {spec: float(r.mean()) for spec, r in recalls.items()}
    best = max(means, key=means.get)
    leads = []
    for spec in (s for s in recalls if s != best):
        lead, se = means[best] - means[spec], difference_standard_error(recalls[best], recalls[spec])
        if lead <= max(MIN_LEAD, HALF_PASS_LEAD_Z * se):
            return None
        leads.append((lead, se, spec))
    lead, se, over = min(leads)
    z = lead / max(se, 1e-9)
    return {"leader": best, "over": over, "by": round(lead, 4), "standard_errors": round(z, 1),
            "reason": f"{best} ahead of {over}, the nearest, by {lead:.3f} recall@10 ({z:.1f} standard errors)"}


def _judge(specs: list[str], *, xt: np.ndarray, base: np.ndarray, q: np.ndarray, exact: np.ndarray, metric: str,
           seed: int, ngpu: int, hits: dict, seen: dict, encoded: dict, grown_from: dict | None = None,
           failed: bool = False) -> tuple[dict[str, dict], dict[str, TrainedCodec]]:
    """({spec: its first-stage row}, {spec: trained}): each of `specs` trained on `xt` and its
    codes of `base` searched for `q`, against their `exact` neighbours there (each query's
    recall@10 into `hits`). A spec that fails to train gets a row saying why (`failed`: even
    when none trains). A spec whose codes and neighbours found are those of one judged before
    (`seen`: their digests, over the calls of one first stage) is the same codec here, and its
    row says which (`same_codes_as`): it takes no front-runner's place (under cosine EDEN's
    scaled levels and TurboQuant-MSE's give the same codes at 1, 2 and 4 bits). A residual
    quantizer trained on from a shorter one (`grown_from`) encodes `base` on from the shorter
    one's codes (`encoded`: {spec: (codec, codes of `base`)} of the residual quantizers judged
    before): RQ64x8 searches 32 stages, not 64, after RQ32x8."""
    out: list[dict] = []
    try:
        trained = train_candidates(specs, xt, metric, seed=seed, ngpu=ngpu, failed=out, grown_from=grown_from,
                                   judging=True)
    except VecpressError:
        if not failed:
            raise
        trained = []
    codecs = [load_trained(tc, metric) for tc in trained]
    shorter = {i: encoded[grown_from[tc.spec].spec] for i, tc in enumerate(trained)
               if tc.spec in (grown_from or {}) and grown_from[tc.spec].spec in encoded}
    for tc, codec, (codes, encode_s) in zip(trained, codecs, encode_all(codecs, base, shorter=shorter)):
        if stages(tc.spec, xt.shape[1]):
            encoded[tc.spec] = (codec, codes)
        began = time.perf_counter()
        _, found = codec.search_codes(q, codes, 10)
        found_, true = knn_hits(exact, found, 10)
        hits[tc.spec] = found_ / np.maximum(true, 1)
        digest = hashlib.sha256(np.ascontiguousarray(codes))
        digest.update(np.ascontiguousarray(found))
        same = seen.setdefault(digest.digest(), tc.spec)
        out.append({"codec": tc.spec, "code_bytes": tc.code_size,
                    "recall_at_10": round(float(found_.sum() / true.sum()), 4),
                    "centroids_per_codebook": centroids_per_codebook(tc.spec, xt.shape[1], metric),
                    "codebook_parameters": codebook_parameters(tc.spec, xt.shape[1], metric),
                    "seconds": round(tc.train_seconds + (encode_s or 0.0) + time.perf_counter() - began, 3),
                    **({"cut_from": tc.cut_from} if tc.cut_from else {}),
                    **({"same_codes_as": same} if same != tc.spec else {}),
                    **({"trained_on_from": grown_from[tc.spec].spec} if tc.spec in (grown_from or {}) else {})})
    return {r["codec"]: r for r in out}, {tc.spec: tc for tc in trained}


def _judged_by(row: dict, head: str, size: int) -> dict:
    """The first-stage row of the longest of a residual family `head` (of `size` bytes) not
    trained there, judged by `row`, its first stages': its recall@10 there is a floor."""
    return {"codec": head, "code_bytes": size, "recall_at_10": row["recall_at_10"],
            "centroids_per_codebook": row["centroids_per_codebook"], "codebook_parameters": row["codebook_parameters"],
            "seconds": 0.0, "judged_by": row["codec"]}


def _goes_on_as_it_is(rows: dict[str, dict], below: str, before: str, rivals: list[dict], family: set[str],
                      hits: dict, margin: float, max_bytes: int) -> dict | None:
    """Why the longest of a residual family goes on to the second stage judged by `below`
    (`behind` or `ahead_of` the best of `rivals`, _rivals' rows, `by` so much; the next length
    `projected` at so much or more; it `needs` more than CHAIN_GAIN_SHARE of what it `gained`),
    or None where it does not. It goes on judged by `below`, its first stages, without the next
    length trained here, where the next length, projected at PROJECTED_SHARE of what `below`
    gained over `before` (the length before it, half its stages) above `below`, is not behind
    the best of the rest within the budget for good and has fewer than FRONT_RUNNERS others at
    or above it (so the longest, which holds it and more, is a front-runner whatever its other
    stages add), and the next length is not expected to lead them all for good: that would
    take more recall@10 over `below` than CHAIN_GAIN_SHARE of that gain. Training the next
    length here is a bet that it settles the rest, which would spare the second stage; where
    it is not expected to, the second stage judges the whole codec instead, and the pick is the
    same either way. At 768-d and 48 or 64 B that spares RQ32x8's stages after RQ16x8's (a
    third of the first stage): RQ16x8's first 8 stages (RQ8x8, cut from it) are `before`."""
    row, recall = rows[below], rows[below]["recall_at_10"]
    gained = recall - rows[before]["recall_at_10"]
    projected = {**row, "recall_at_10": recall + PROJECTED_SHARE * max(gained, 0.0)}
    if not rivals or _settled_by(rivals[0], projected, hits, margin):
        return None
    # (what front_runners would rank at or above it: the rivals the best does not settle, and any
    # shorter one of the family ahead of it)
    close = [r for r in rivals if r is rivals[0] or not _settled_by(rivals[0], r, hits, margin)]
    shorter = [r for c, r in rows.items() if c in family - {below} and _contends(r) and r["code_bytes"] <= max_bytes]
    if sum(r["recall_at_10"] >= projected["recall_at_10"] for r in close + shorter) >= FRONT_RUNNERS:
        return None
    needs = max(r["recall_at_10"] - recall + _lead_to_settle(row, r, hits, margin) for r in rivals)
    if needs <= CHAIN_GAIN_SHARE * gained:
        return None
    best = rivals[0]
    return {"ahead_of" if recall > best["recall_at_10"] else "behind": best["codec"],
            "by": round(abs(best["recall_at_10"] - recall), 4), "projected": round(projected["recall_at_10"], 4),
            "needs": round(needs, 4), "gained": round(gained, 4)}


def _lead_to_settle(a: dict, b: dict, hits: dict, margin: float) -> float:
    """The least lead over `b` that settles it (`_settled_by`) for a codec judged as `a` is:
    LEAD_MARGIN, or where `a`'s k-means fits more parameters (codebook_parameters: centroids
    times the dims each spans), ROUGH_LEAD_Z standard errors of the per-query difference
    (`a`'s) and MIN_LEAD, if less."""
    if a["codebook_parameters"] <= b["codebook_parameters"]:
        return margin
    return min(margin, max(MIN_LEAD, ROUGH_LEAD_Z * difference_standard_error(hits[a["codec"]], hits[b["codec"]])))


def _judging_order(nested: dict[str, str], dim: int) -> dict[str, list[str]]:
    """{the longest residual quantizer of a family: the lengths it is judged by, in order}
    from nesting()'s pairs: the shortest of the family, each next one of at least twice the
    stages of the last (RQ16x8, RQ32x8 ...), and the longest."""
    members: dict[str, list[str]] = {}
    for spec, head in nested.items():
        members.setdefault(head, []).append(spec)
    out: dict[str, list[str]] = {}
    for head, specs in members.items():
        chain = []
        for spec in sorted(specs, key=lambda s: stages(s, dim)):
            if not chain or stages(spec, dim) >= 2 * stages(chain[-1], dim):
                chain.append(spec)
        out[head] = chain + [head]
    return out


def _rivals(rows: dict[str, dict], family: set[str], max_bytes: int) -> list[dict]:
    """The judged rows within `max_bytes` outside `family`, best first."""
    return sorted((r for r in rows.values() if _contends(r) and r["codec"] not in family
                   and r["code_bytes"] <= max_bytes), key=lambda r: -r["recall_at_10"])


def _contends(row: dict) -> bool:
    """Whether a first-stage row is a candidate in its own right: trained, not another's codes,
    and not a residual family's yardstick (the first half of its shortest)."""
    return "error" not in row and "same_codes_as" not in row and "yardstick" not in row


def _settled_by(a: dict, b: dict, hits: dict, margin: float) -> str | None:
    """How first-stage row `a` is ahead of `b` for good: "margin" (by more than `margin`),
    "rougher" (its k-means fitting more parameters than `b`'s, so judged the more roughly of the
    two, by more than ROUGH_LEAD_Z standard errors of the per-query difference and MIN_LEAD),
    or None (it is not): truthy where it is."""
    lead = a["recall_at_10"] - b["recall_at_10"]
    if lead > margin:
        return "margin"
    return "rougher" if lead > _lead_to_settle(a, b, hits, margin) else None


def _lead(spec: str, rows: dict[str, dict], hits: dict, n: int, max_bytes: int, margin: float) -> dict | None:
    """How the first stage's one front-runner `spec` leads the best of the others within the
    budget outside its family (its reason): by how much, in standard errors, the training rows
    per centroid and per parameter of the k-means of each, and by which rule (`_settled_by`);
    None when there is no other."""
    row = rows[spec]
    by = row.get("judged_by")
    heads = {spec, by} - {None}
    family = heads | {c for c, r in rows.items() if r.get("cut_from") in heads}
    rivals = _rivals(rows, family, max_bytes)
    if not rivals:
        return None
    judged, rival = rows[by] if by else row, rivals[0]
    lead = judged["recall_at_10"] - rival["recall_at_10"]
    se = difference_standard_error(hits[judged["codec"]], hits[rival["codec"]])
    return {"over": rival["codec"], "recall_at_10": rival["recall_at_10"], "by": round(lead, 4),
            "rule": _settled_by(judged, rival, hits, margin), "standard_errors": round(lead / max(se, 1e-9), 1),
            "rows_per_centroid": [n // r["centroids_per_codebook"] if r["centroids_per_codebook"] else None
                                  for r in (judged, rival)],
            "rows_per_parameter": [float(f"{n / r['codebook_parameters']:.3g}") if r["codebook_parameters"] else None
                                   for r in (judged, rival)]}


def front_runners(rows: list[dict], *, max_bytes: int | None, min_recall: float | None,
                  keep: int = FRONT_RUNNERS, margin: float | None = LEAD_MARGIN, settled=None) -> list[str]:
    """With max_bytes: the `keep` best recalls within the budget, of those the best is not
    ahead of for good (`settled(best, row)`; by default: by more than `margin`; so one alone
    when it leads all; margin None: no cut), less residual quantizers cut from a longer one
    ranked ahead of them (`cut_from`). With min_recall: the cheapest that come within
    MIN_RECALL_MARGIN of it, and the best recall of all (so that a target no candidate
    reaches still gets the closest)."""
    if max_bytes is not None:
        # (a tie: the longest of a family judged by its first stages ahead of them: it holds them; one that went on
        # as it is ranked by its next length's projected recall, which it holds too, and never the one that settles)
        ok = sorted(({**r, "recall_at_10": r.get("projected_recall_at_10", r["recall_at_10"])} for r in rows
                     if r["code_bytes"] <= max_bytes),
                    key=lambda r: (-r["recall_at_10"], "judged_by" not in r, r["code_bytes"]))
        best = next((r for r in ok if "projected_recall_at_10" not in r), ok[0]) if ok else None
        ahead = settled or (lambda a, b: a["recall_at_10"] - b["recall_at_10"] > margin)
        close = [r for r in ok if margin is None or r is best or not ahead(best, r)] if ok else rows
        # a residual quantizer cut from a longer one ahead of it goes no further: the same
        # codebooks, fewer stages (RQ16x8 behind RQ32x8 at 32 B)
        close = [r for i, r in enumerate(close) if r.get("cut_from") not in {o["codec"] for o in close[:i]}]
        return [r["codec"] for r in close[:keep]]
    near = sorted((r for r in rows if r["recall_at_10"] >= (min_recall or 0) - MIN_RECALL_MARGIN),
                  key=lambda r: (r["code_bytes"], -r["recall_at_10"]))
    best = max(rows, key=lambda r: r["recall_at_10"])
    return list(dict.fromkeys([r["codec"] for r in near[:keep - 1]] + [best["codec"]]))
