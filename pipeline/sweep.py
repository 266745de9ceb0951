"""The codec sweep and the compression advisor.

A sweep trains every candidate codec on one shared training sample, then makes ONE streaming
pass over the corpus. For each record batch it computes the exact neighbours of the held-out
queries and, for every codec, encodes the batch, searches the fresh codes (ADC) for the
queries and notes the exact distance of each candidate while the raw vectors are at hand. No
codes are kept and no vector is read twice, so a sweep over a corpus larger than memory holds
one batch per worker plus, per codec, C candidates per query. Recall with and without exact
re-ranking of r x k candidates follows from the candidates' ADC order and exact distances.

With the same seed a sweep samples, trains and encodes exactly as `compress` does, so its
numbers for a codec are those a full run with that codec reports.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np

from vecpress.kernels.codecs.build import check_codec_spec
from vecpress.kernels.codecs.codec import Codec
from vecpress.kernels.codecs.ivf import IvfModel, check_served_spec, is_served_spec, parse_served_spec, served_grid
from vecpress.kernels.codecs.grid import default_grid
from vecpress.kernels.codecs.nested import encode_all, nesting, residual_prefix, slice_sources, train_on
from vecpress.kernels.codecs.spec import CodecSpecError
from vecpress.kernels.codecs.train import Iterations
from vecpress.kernels.knn import TopK, candidate_distances, prepare_vectors
from vecpress.kernels.metrics import query_recalls, recall_table, relative_error
from vecpress.pipeline.errors import ConfigError, VecpressError
from vecpress.pipeline.executor import Executor
from vecpress.pipeline.heartbeat import Heartbeat, train_logged
from vecpress.pipeline.options import CompressOptions
from vecpress.pipeline.layout import Shard, group_shards, merge_shards, spread_rows
from vecpress.pipeline.sampling import sample_subset
from vecpress.pipeline.scan import Columns, Exact, Gather, ScanBatch, batch_rows, run_scan

log = logging.getLogger("vecpress")

#: ADC candidates kept per query and codec: enough for recall@100 and for re-ranking 10 x 10
NUM_CANDIDATES = 100
#: a PQ's k-means iterations where it is trained only to be judged (train_candidates' `judging`),
#: not faiss's 25: recall@10 came out within seed noise at 2.2-2.4x less training (PQ48 on 32,768
#: and PQ64 on 24,576 rows at 768-d, power-law; PQ48 on 16,384 at 384-d, clustered; 2-3 seeds
#: each: means 0.7876 against 0.7896, 0.8060 against 0.8041, 0.6619 against 0.6612, the seeds'
#: spread 0.001-0.013; BENCHMARKS.md)
JUDGING_PQ_ITERATIONS = 10
#: the iterations of the last step (all the dims) of a residual quantizer's per-stage k-means
#: where it is trained only to be judged, not RQ_PROGRESSIVE's 5: the steps before it start it
#: close. RQ16x8 on 10,000 rows judged as the first stage does (20,000 base rows, 300 queries):
#: mean recall@10 from 0.0014 below to 0.0034 above 5 iterations' on 5 corpora (128- to 768-d,
#: power-law and clustered; 3 to 9 seeds each, the seeds' spread 0.005-0.012), training 20-29% faster;
#: RQ32x8, 3 seeds: -0.002 at 384-d (power-law), +0.006 at 768-d (clustered) (BENCHMARKS.md)
JUDGING_RQ_LAST_ITERATIONS = 2
#: the steps of a residual quantizer's per-stage progressive k-means where it is trained only to
#: be judged, not RQ_PROGRESSIVE's 4 (on d^(1/2) principal axes, then all d: 4 steps add d^(1/4)
#: and d^(3/4), 86 of 384, whose 5 iterations cost more than the last step's 2). Judged as the
#: first stage does, with JUDGING_RQ_LAST_ITERATIONS: RQ16x8 on 6 corpora (128- to 768-d,
#: power-law and clustered, 3 seeds each) mean recall@10 from 0.002 below to 0.007 above 4
#: steps', training 29-44% faster; RQ32x8 on 3, +0.002 to +0.005, 34% faster (BENCHMARKS.md).
#: (The kept codec keeps 4: trained on the whole sample, 2 steps came out 0.007 lower at 384-d)
JUDGING_RQ_STEPS = 2
#: the k-means schedule of a codec trained only to be judged (train_candidates' `judging`)
JUDGING = Iterations(pq=JUDGING_PQ_ITERATIONS, rq_last=JUDGING_RQ_LAST_ITERATIONS, rq_steps=JUDGING_RQ_STEPS)


@dataclass(frozen=True)
class TrainedCodec:
    spec: str
    blob: bytes
    sha256: str
    code_size: int
    train_seconds: float
    #: the longer residual quantizer whose first stages this one is (kernels.codecs.nested), or None
    cut_from: str | None = None
    #: the training rows it was trained on (None: not said)
    train_rows: int | None = None


def codec_kind(spec: str):
    """The class of a spec's trained form: IvfModel for a LanceDB index (IVF<n>,PQ<m>), else Codec."""
    return IvfModel if is_served_spec(spec) else Codec


def spec_bytes(spec: str, dim: int, metric: str, num_train: int) -> int:
    """Bytes per vector of a spec (a LanceDB index: its PQ bytes), checked against the data;
    CodecSpecError where it cannot work."""
    return check_served_spec(spec, dim, num_train) if is_served_spec(spec) else \
        check_codec_spec(spec, dim, metric, num_train)


@functools.lru_cache(maxsize=64)
def _codec(sha256: str, blob: bytes, spec: str, metric: str) -> Codec | IvfModel:
    return codec_kind(spec).from_bytes(blob, spec=spec, metric=metric, sha256=sha256)


def load_trained(tc: "TrainedCodec", metric: str) -> Codec | IvfModel:
    """A candidate train_candidates trained, as a codec again."""
    return _codec(tc.sha256, tc.blob, tc.spec, metric)


@dataclass(frozen=True)
class SweepJob:
    columns: Columns
    metric: str
    codecs: tuple[TrainedCodec, ...]
    eval_k: int = 100
    #: rows per record batch (0 = scan.batch_rows's choice for the CPU)
    batch_size: int = 0


@dataclass
class SweepPart:
    truth_D: np.ndarray
    truth_I: np.ndarray
    #: per codec: (ADC distances, positions, exact distances) of its best candidates
    candidates: list[tuple[np.ndarray, np.ndarray, np.ndarray]]
    encode_seconds: list[float]
    num_rows: int


class SweepCodecs:
    """Observer: encodes each batch with every codec (timed), searches the queries over the
    fresh codes and keeps each codec's candidates with their exact distances."""

    def __init__(self, codecs: list[Codec], queries: np.ndarray, xq: np.ndarray, query_positions: np.ndarray,
                 num_candidates: int, metric: str):
        self.codecs, self.queries, self.xq, self.metric = codecs, queries, xq, metric
        self.num_candidates = num_candidates
        self.found = [TopK(len(xq), num_candidates, exclude=query_positions, with_extra=True) for _ in codecs]
        self.seconds = [0.0] * len(codecs)
        self.sources = slice_sources(codecs)  # (which codes are sliced from which: once, not per batch)

    def observe(self, batch: ScanBatch) -> None:
        x = batch.prepared(self.metric)
        for i, (codec, (codes, seconds)) in enumerate(zip(self.codecs, encode_all(self.codecs, batch.x,
                                                                                  self.sources))):
            self.seconds[i] += seconds or 0.0  # (None: sliced from a longer RQ's codes, encode rate not measured)
            D, I = codec.search_codes(self.queries, codes, min(self.num_candidates + 1, len(x)))
            self.found[i].add(D, I, candidate_distances(self.xq, x, I, self.metric), offset=batch.position)


def sweep_shard(shard: Shard, *, job: SweepJob, queries: np.ndarray, query_positions: np.ndarray) -> SweepPart:
    """One shard of the sweep pass: exact top-k, and per codec the ADC candidates over freshly
    encoded batches with their exact distances."""
    xq = prepare_vectors(queries, job.metric)
    truth = Gather("exact", len(xq), job.eval_k, query_positions)
    codecs = SweepCodecs([load_trained(c, job.metric) for c in job.codecs], queries, xq,
                         query_positions, max(NUM_CANDIDATES, job.eval_k), job.metric)
    num_rows = run_scan(shard, job.columns, [Exact(xq, job.eval_k, job.metric), truth, codecs],
                        batch_size=batch_rows(job.batch_size, job.columns.dim, gpu=False))
    return SweepPart(truth.top.D, truth.top.I, [(f.D, f.I, f.E) for f in codecs.found], codecs.seconds, num_rows)


# ---- driver ---------------------------------------------------------------------------------

@dataclass
class SweepResult:
    metric: str
    dim: int
    num_rows: int
    num_train: int
    num_queries: int
    seed: int
    source_bytes: int
    rows: list[dict] = field(default_factory=list)
    failed: list[dict] = field(default_factory=list)
    #: the corpus's rows, of which the pass read num_rows (fewer with run_sweep's max_rows)
    corpus_rows: int | None = None
    #: why the pass read only the first half of its rows (run_sweep's `enough`), or None
    stopped_at_half: dict | None = None
    trained: list[TrainedCodec] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "trained"}
        return {**d, "pareto": [r["codec"] for r in self.rows if r["pareto"]]}


def train_candidates(specs: list[str], xt: np.ndarray, metric: str, *, seed: int, ngpu: int,
                     failed: list[dict], grown_from: dict[str, TrainedCodec] | None = None,
                     judging: bool = False) -> list[TrainedCodec]:
    """Each spec trained on xt, in the order given (those that fail noted in `failed`;
    VecpressError when all do). A residual quantizer that a longer one of its family holds
    (kernels.codecs.nested) is cut from that one's training instead of trained again.
    `grown_from`: {spec: a shorter residual quantizer of its family trained here on the same
    xt}, whose stages the spec's training takes instead of training them again. `judging`:
    trained to be judged, never kept (on fewer rows than the sample's: the train stage trains
    a pick anew), with the k-means schedule JUDGING (fewer iterations and steps)."""
    nested = nesting(specs, xt.shape[1], greedy=True)  # (training is greedy, on a GPU too)
    iterations = JUDGING if judging else None
    done: dict[str, TrainedCodec] = {}
    for spec in sorted(specs, key=lambda s: s in nested):  # (the longest of each family first)
        start = time.perf_counter()
        source = nested.get(spec) if nested.get(spec) in done else None
        grown = (grown_from or {}).get(spec)
        try:
            if source:
                codec = residual_prefix(load_trained(done[source], metric), spec)
            elif grown:
                with Heartbeat(f"sweep: train {spec} on {len(xt):,} vectors from {grown.spec}'s stages") as beat:
                    codec = train_on(load_trained(grown, metric), spec, xt, seed=seed, ngpu=ngpu, progress=beat,
                                     iterations=iterations)
            else:
                kind = codec_kind(spec)
                codec = train_logged(kind, xt, spec, metric, seed=seed, ngpu=ngpu, what="sweep: train ",
                                     **({"iterations": iterations} if kind is Codec else {}))
        except (CodecSpecError, RuntimeError, ValueError) as exc:
            failed.append({"codec": spec, "error": str(exc).strip().splitlines()[-1]})
            log.warning("sweep: %s failed to train: %s", spec, failed[-1]["error"])
            continue
        blob = codec.to_bytes()
        size = codec.served.index_bytes(codec.dim) if isinstance(codec, IvfModel) else codec.code_size
        done[spec] = TrainedCodec(spec, blob, hashlib.sha256(blob).hexdigest(), size, time.perf_counter() - start,
                                  source, len(xt))
        how = f"cut from {source}:" if source else f"trained on from {grown.spec}:" if grown else "trained"
        log.info("sweep: %s %s (%d B) in %.1fs", how, spec, size, done[spec].train_seconds)
    if not done:
        raise _none_trained(failed)
    return [done[s] for s in specs if s in done]


def _none_trained(failed: list[dict]) -> VecpressError:
    return VecpressError("no candidate codec could be trained: " + "; ".join(f"{f['codec']}: {f['error']}"
                                                                            for f in failed))


def candidate_specs(dim: int, metric: str, num_train: int, *, codecs: list[str] | None,
                    budgets: list[int] | None, served_rows: int | None = None) -> list[str]:
    """The specs to sweep: `codecs` as given (each validated), else the default grid, cut to
    the budgets' range. `served_rows` (a LanceDB-served table of that many rows): the grid
    of its index forms (served_grid), and only those."""
    if codecs:
        for spec in codecs:
            if (served_rows is not None) != is_served_spec(spec):
                raise ConfigError(f"{spec}: " + ("--serve lancedb sweeps LanceDB index forms (IVF<n>,PQ<m>)"
                                                 if served_rows is not None else "an index form needs --serve lancedb"))
            try:
                spec_bytes(spec, dim, metric, num_train)
                if served_rows is not None and not parse_served_spec(spec, dim).num_sub_vectors:
                    raise ConfigError(f"{spec}: the advisor judges the PQ forms (IVF<n>,PQ<m>, IVF<n>,HNSW,PQ<m>), "
                                      "whose codes vecpress computes; Lance encodes this one itself: build it with "
                                      "compress --serve lancedb --codec " + spec + " and read its served recall")
            except CodecSpecError as exc:
                raise ConfigError(str(exc)) from None
        specs = list(dict.fromkeys(codecs))
    else:
        lo, hi = (min(8, min(budgets)), max(budgets)) if budgets else (8, 256)
        specs = served_grid(dim, served_rows, min_bytes=min(lo, 4), max_bytes=hi) if served_rows is not None \
            else default_grid(dim, metric, min_bytes=lo, max_bytes=hi)
    if budgets:
        specs = [s for s in specs if spec_bytes(s, dim, metric, num_train) <= max(budgets)]
    specs = [s for s in specs if _fits(s, dim, metric, num_train)]
    if not specs:
        raise ConfigError(f"no codec to sweep within budgets {budgets} for dim={dim}")
    return specs


def _fits(spec: str, dim: int, metric: str, num_train: int) -> bool:
    try:
        spec_bytes(spec, dim, metric, num_train)
        return True
    except CodecSpecError as exc:
        log.info("sweep: skipping %s: %s", spec, exc)
        return False


def run_sweep(plan, xt: np.ndarray, xq: np.ndarray, query_positions: np.ndarray, specs: list[str],
              opts: CompressOptions, *, executor: Executor, max_rows: int | None = None,
              train_rows: dict[str, int] | None = None, trained: dict[str, TrainedCodec] | None = None,
              enough: Callable[[dict[str, np.ndarray]], dict | None] | None = None) -> SweepResult:
    """Train `specs` on xt, make the one streaming pass, and tabulate (opts: the metric, seed,
    eval_k, batch_size and ngpu). `max_rows`: the pass reads about that many rows, in stretches
    spread over the corpus (layout.spread_rows), and the queries' exact neighbours are theirs
    among those rows; None: every row. `train_rows`: {spec: rows}, trained on that many of
    xt's rows (sampling.sample_subset) instead; `trained`: {spec: as trained already}, swept as
    it is (the advisor's first stage's training where that is as good). `enough`: asked once
    the pass has read the first half of its rows (`_halves`: every other batch, spread over
    the corpus as the whole is) with {spec: each query's recall@10 among those rows}; where it
    answers (a dict saying why: `stopped_at_half`), the pass ends there and the table is over
    the rows read (the advisor's second stage: a front-runner ahead of the others for good)."""
    metric, seed, eval_k = opts.metric, opts.seed, opts.eval_k
    shards = spread_rows(plan, max_rows) if max_rows else plan.shards
    num_rows = sum(s.num_rows for s in shards)
    result = SweepResult(metric=metric, dim=plan.dim, num_rows=num_rows, num_train=len(xt),
                         num_queries=len(xq), seed=seed, source_bytes=plan.source_bytes_per_vector,
                         corpus_rows=plan.num_rows)
    trained = result.trained = _train_sweep(specs, xt, metric, seed=seed, ngpu=opts.ngpu, failed=result.failed,
                                            train_rows=train_rows or {}, trained=trained or {})
    job = SweepJob(columns=Columns.of(plan, metric), metric=metric, codecs=tuple(trained), eval_k=eval_k,
                   batch_size=opts.batch_size)
    truth = TopK(len(xq), eval_k, exclude=query_positions)
    found = [TopK(len(xq), max(NUM_CANDIDATES, eval_k), exclude=query_positions, with_extra=True) for _ in trained]
    encode_seconds = [0.0] * len(trained)
    groups = [merge_shards(g) for g in group_shards(shards, batch_rows(opts.batch_size, plan.dim, gpu=False))]
    halves = _halves(groups) if enough is not None and len(groups) > 1 and eval_k >= 10 else [groups]
    shared = {"job": job, "queries": xq, "query_positions": query_positions}
    for half, part_groups in enumerate(halves):
        for _, part in executor.imap(sweep_shard, part_groups, desc="sweep" if len(halves) == 1 else
                                     f"sweep, {('first', 'second')[half]} half", shared=shared):
            truth.add(part.truth_D, part.truth_I)
            for i, candidates in enumerate(part.candidates):
                found[i].add(*candidates)
                encode_seconds[i] += part.encode_seconds[i]
        if half == 0 and len(halves) > 1:
            read = sum(g.num_rows for g in part_groups)
            recalls = {tc.spec: query_recalls(truth.I, found[i].I, 10) for i, tc in enumerate(trained)}
            result.stopped_at_half = enough(recalls) or None
            if result.stopped_at_half:
                log.info("sweep: the first half of the pass (%d of %d rows) settles it: %s; the rest is not read",
                         read, num_rows, result.stopped_at_half.get("reason", ""))
                result.num_rows = num_rows = read
                break
    xp = prepare_vectors(xq, metric)
    for i, tc in enumerate(trained):
        codec = load_trained(tc, metric)
        encode_s = encode_seconds[i]
        ev = recall_table(truth.I, found[i].I[:, :eval_k], num_rows, None)
        ev["rerank"] = recall_table(truth.I, found[i].I, num_rows, found[i].E)["rerank"]
        result.rows.append({
            "codec": tc.spec, "code_bytes": tc.code_size, **ev,
            "relative_error": relative_error(xp, codec.decode(codec.encode(xq))),
            "train_seconds": round(tc.train_seconds, 3), "train_rows": tc.train_rows, "cut_from": tc.cut_from,
            "encode_rows_per_second": round(num_rows / encode_s) if encode_s > 0 else None,
            "sha256": tc.sha256,
        })
    result.rows.sort(key=lambda r: (r["code_bytes"], -(r["recall_at_10"] or 0)))
    mark_pareto(result.rows)
    return result


def _halves(groups: list[Shard]) -> list[list[Shard]]:
    """The pass's batches of rows in two halves, each spread over the corpus as the whole is:
    every other batch, the first half the larger by one where they are odd. By batches, not
    rows: the tasks run in waves of as many as there are workers, and at 768-d and 64 B on 2
    cores 4 batches of 8,192 rows (2 waves) took 6.7 s where 3 of a balanced split took 6.9 s."""
    return [groups[0::2], groups[1::2]]


def _train_sweep(specs: list[str], xt: np.ndarray, metric: str, *, seed: int, ngpu: int, failed: list[dict],
                 train_rows: dict[str, int], trained: dict[str, TrainedCodec]) -> list[TrainedCodec]:
    """train_candidates over `specs`, but those in `trained` (taken as they are) and those in
    `train_rows` (each trained on that many of xt's rows, sampling.sample_subset); in the
    order given (VecpressError when none is trained)."""
    done = {s: trained[s] for s in specs if s in trained}
    by_rows: dict[int, list[str]] = {}
    for spec in (s for s in specs if s not in done):
        by_rows.setdefault(min(train_rows.get(spec, len(xt)), len(xt)), []).append(spec)
    for rows, group in sorted(by_rows.items()):
        part = xt if rows == len(xt) else xt[sample_subset(len(xt), rows, seed)]
        with contextlib.suppress(VecpressError):  # (each failure noted in `failed`; on fewer rows, never kept)
            done.update((c.spec, c) for c in train_candidates(group, part, metric, seed=seed, ngpu=ngpu, failed=failed,
                                                              judging=rows < len(xt)))
    if not done:
        raise _none_trained(failed)
    return [done[s] for s in specs if s in done]


def mark_pareto(rows: list[dict], key: str = "recall_at_10") -> None:
    """A codec is on the Pareto front when no other has fewer-or-equal bytes and higher recall
    (or equal recall and fewer bytes)."""
    for r in rows:
        r["pareto"] = not any(
            o is not r and o["code_bytes"] <= r["code_bytes"] and (o[key] or 0) >= (r[key] or 0)
            and (o["code_bytes"] < r["code_bytes"] or (o[key] or 0) > (r[key] or 0))
            for o in rows)


def score(row: dict, rerank: int = 0) -> float:
    """recall@10 of a sweep row, after re-ranking rerank x 10 candidates when rerank > 1."""
    if rerank > 1:
        v = row["rerank"].get(str(rerank), {}).get("recall_at_10")
        if v is None:
            raise ConfigError(f"re-rank factor {rerank} was not measured: use one of 1, 2, 4, 10")
        return v
    return row["recall_at_10"] or 0.0


def choose(rows: list[dict], *, max_bytes: int | None = None, min_recall: float | None = None,
           rerank: int = 0) -> dict:
    """The advisor: with max_bytes, the best recall@10 within that many bytes per vector (ties:
    fewer bytes); with min_recall, the fewest bytes reaching it (ties: higher recall)."""
    if (max_bytes is None) == (min_recall is None):
        raise ConfigError("the advisor needs exactly one of max_bytes or min_recall")
    if max_bytes is not None:
        ok = [r for r in rows if r["code_bytes"] <= max_bytes]
        if not ok:
            raise ConfigError(f"no swept codec fits in {max_bytes} bytes per vector; the smallest has "
                              f"{min(r['code_bytes'] for r in rows)} bytes")
        return max(ok, key=lambda r: (score(r, rerank), -r["code_bytes"]))
    ok = [r for r in rows if score(r, rerank) >= min_recall]
    if not ok:
        best = max(rows, key=lambda r: score(r, rerank))
        raise ConfigError(f"no swept codec reaches recall@10 {min_recall}"
                          f"{f' with re-rank x{rerank}' if rerank > 1 else ''}; the best is {best['codec']} "
                          f"with {score(best, rerank):.3f} ({best['code_bytes']} B): allow more bytes, re-ranking, "
                          "or a lower target")
    return min(ok, key=lambda r: (r["code_bytes"], -score(r, rerank)))


def best_per_budget(rows: list[dict], budgets: list[int], rerank: int = 0) -> dict[int, str | None]:
    out = {}
    for b in budgets:
        try:
            out[b] = choose(rows, max_bytes=b, rerank=rerank)["codec"]
        except ConfigError:
            out[b] = None
    return out
