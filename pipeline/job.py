"""The compress job as six stage functions -- plan, sample, train, encode, commit, evaluate --
and `run_compress`, which runs them in order without Prefect. The Prefect flow in `flows/`
calls the same functions as tasks. Stage results are small: URIs, manifests, fragment
metadata; arrays travel through files under the run folder.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from vecpress.kernels.codecs.build import check_codec_spec
from vecpress.kernels.codecs.codec import Codec
from vecpress.kernels.codecs.spec import CodecSpecError, is_binary_spec
from vecpress.kernels.knn import TopK, prepare_vectors
from vecpress.kernels.metrics import RECALL_KS, recall_table, relative_error
from vecpress import __version__
from vecpress.pipeline import storage
from vecpress.pipeline.codec_store import CodecRef, load_codec, save_codec
from vecpress.pipeline.errors import ConfigError, VecpressError
from vecpress.pipeline.options import check_sizes
from vecpress.pipeline.executor import Executor, LocalExecutor
from vecpress.pipeline.lance_io import (
    check_compatible, commit_overwrite, fragment_offsets, require_dataset, sidecar_uri, table_uri, version_manifest,
)
from vecpress.pipeline.incremental import (
    ADVICE_OPTIONS, KeptSearch, QualityGateError, SourceDiff, apply_retention, diff_sources, drift_decision,
    gate_version, knn_shard, layout_after, probe_quality,
)
from vecpress.pipeline.rerank import column_distances, source_distances
from vecpress.pipeline.schema import MANIFEST_METADATA_KEY, codes_schema
from vecpress.pipeline.source import SourcePlan, SourceSpec, plan_sources
from vecpress.pipeline.stages import CodeSearch, Columns, EncodeJob, check_device, encode_shard, search_fragment
from vecpress.pipeline.sampling import (SAMPLE_ROW_GROUPS, choose_positions, file_rows, layout_positions,  # noqa: F401 (re-exported)
                               read_sample, sample_sizes)
from vecpress.pipeline.sweep import candidate_specs, choose, run_sweep, score, write_reports

log = logging.getLogger("vecpress")

@dataclass(frozen=True)
class CompressOptions:
    """Knobs of one compress run. Each trades something; defaults suit 10^5..10^9 vectors."""

    #: faiss factory string (PQ32, PQ32x4, OPQ32,PQ32, RQ8x8, SQ8, SQfp16...); None = PQm with
    #: m = dim/4 capped at 64 (m bytes per vector)
    codec: str | None = None
    #: l2, ip, or cosine (= normalise, then inner product)
    metric: str = "l2"
    #: training-sample size: more trains better codebooks, slower and with more memory
    num_train: int = 100_000
    #: held-out queries for evaluation, disjoint from the training sample (capped at 10% of rows)
    num_queries: int = 1_000
    #: seeds sampling and training: same inputs and seed give identical codes
    seed: int = 0
    #: most row groups the sample reads (0 = no limit: rows exactly uniform, but once the sample
    #: outnumbers the row groups that reads nearly all of them, a second full read of the corpus)
    sample_row_groups: int = SAMPLE_ROW_GROUPS
    #: neighbours computed exactly per query (recall@k is reported for k in 1, 10, 100 up to it)
    eval_k: int = 100
    #: rows per record batch in workers: bounds worker memory (batch_size x dim x 4 bytes);
    #: 0 = about 24 MiB of vectors on CPUs, 65,536 rows for GPU encoders (stages.batch_rows)
    batch_size: int = 0
    #: rows per shard (whole row groups): the unit of parallelism and of retry
    shard_rows: int = 500_000
    #: GPUs to use (-1 = all; 0 = none, as device="cpu"): faiss training, and on a Ray cluster
    #: with GPUs one encoder actor per GPU
    ngpu: int = -1
    #: where workers encode and compute exact neighbours when there are no GPU actors: "auto"
    #: (a GPU when CuPy sees one), "cuda" or "cpu" ("cpu" also turns the GPU actors off)
    device: str = "auto"
    #: allow a run to replace an existing table that has another schema
    allow_schema_change: bool = False
    #: warm column codec (e.g. SQ8, SQfp16) stored beside the codes for re-ranking without the
    #: source; costs its bytes per vector. None = re-rank against the source Parquet
    rerank_codec: str | None = None
    #: also measure recall after exact re-ranking of r x k candidates (r in 1, 2, 4, 10); reads
    #: the candidates' vectors back from the warm column or the source
    eval_rerank: bool = True
    #: codec="auto": the best recall@10 within this many bytes per vector (sweep, then choose)
    max_bytes: int | None = None
    #: codec="auto": the fewest bytes per vector reaching this recall@10
    min_recall: float | None = None
    #: codec="auto": judge candidates by recall@10 after exact re-ranking of this many x 10
    advise_rerank: int = 0
    #: codec="auto": the candidates to sweep (default: the default grid within the budget)
    advise_codecs: tuple[str, ...] | None = None
    #: "auto": extend the table's latest version when it can (new/rewritten files encoded,
    #: deleted ones dropped, unchanged rows untouched); "full": always rebuild everything
    mode: str = "auto"
    #: retrain when the reconstruction error on a fresh sample grew by more than this fraction
    #: over the error measured when the codec was trained
    drift_threshold: float = 0.10
    #: retrain (and re-encode everything) even without drift
    force_retrain: bool = False
    #: quality gate: tag the new version `production` only if recall@10 >= this (None = no floor)
    gate_min_recall: float | None = None
    #: quality gate: ... and recall@10 is at most this much below the current production version's
    gate_max_drop: float = 0.02
    #: versions kept by the retention rule (tagged versions are never removed; 0 = keep all)
    keep_versions: int = 20

    @property
    def encode_device(self) -> str:
        """Where encoding may run: `device`, except that ngpu=0 means no GPU at all."""
        return "cpu" if self.ngpu == 0 else self.device

    def __post_init__(self):
        check_sizes(metric=self.metric, num_train=self.num_train, num_queries=self.num_queries, eval_k=self.eval_k,
                    shard_rows=self.shard_rows, batch_size=self.batch_size, sample_row_groups=self.sample_row_groups,
                    ngpu=self.ngpu)
        wants_advice = self.max_bytes is not None or self.min_recall is not None
        if self.codec is None and wants_advice:
            object.__setattr__(self, "codec", "auto")
        if self.codec == "auto" and not wants_advice:
            raise ConfigError("--codec auto needs a target: --max-bytes B (best recall within B bytes per vector) "
                              "or --min-recall R (fewest bytes reaching recall@10 R)")
        if wants_advice and self.codec != "auto":
            raise ConfigError(f"--max-bytes/--min-recall choose the codec; they cannot be combined with --codec {self.codec}")
        if self.max_bytes is not None and self.min_recall is not None:
            raise ConfigError("give either --max-bytes or --min-recall, not both")
        if self.min_recall is not None and not 0 < self.min_recall <= 1:
            raise ConfigError(f"--min-recall must be in (0, 1], got {self.min_recall}")
        if self.advise_rerank not in (0, 1, 2, 4, 10):
            raise ConfigError(f"advise_rerank must be one of 0, 1, 2, 4, 10 (the measured factors), got {self.advise_rerank}")
        if self.advise_codecs is not None:
            object.__setattr__(self, "advise_codecs", tuple(self.advise_codecs))
        if self.mode not in ("auto", "full"):
            raise ConfigError(f"mode must be auto or full, got {self.mode!r}")
        try:
            check_device(self.device)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if self.drift_threshold < 0 or self.gate_max_drop < 0 or self.keep_versions < 0:
            raise ConfigError("drift_threshold, gate_max_drop and keep_versions must not be negative")
        if self.gate_min_recall is not None and not 0 <= self.gate_min_recall <= 1:
            raise ConfigError(f"--gate-min-recall must be in [0, 1], got {self.gate_min_recall}")


def specs_from_params(params: dict) -> tuple[SourceSpec, CompressOptions]:
    """The flow's flat, JSON-able parameters as the pipeline's validated specs."""
    source = SourceSpec(uris=tuple(params["inputs"]), vector_column=params.get("vector_column"),
                        id_column=params.get("id_column", "id"), keep=tuple(params.get("keep") or ()))
    fields = set(CompressOptions.__dataclass_fields__)
    return source, CompressOptions(**{k: v for k, v in params.items() if k in fields})


def check_rerank_codec(spec: str | None, dim: int, metric: str, num_train: int) -> int | None:
    """The warm column's bytes per vector (None without one). Its codes re-rank by the distance
    to their reconstruction, so Hamming codes (BIN...) are refused: CodecSpecError."""
    if not spec:
        return None
    size = check_codec_spec(spec, dim, metric, num_train)
    if is_binary_spec(spec, dim):
        raise CodecSpecError(f"--rerank-codec {spec} gives binary (Hamming) codes, which cannot re-rank by distance: "
                             "use a scalar codec such as SQ8, SQfp16 or SQbf16")
    return size


def output_schema(plan: SourcePlan, code_size: int, *, binary: bool, rerank_size: int | None,
                  metadata: dict | None = None):
    out_fields = plan.output_fields
    return codes_schema(out_fields.field(0), code_size, list(out_fields)[1:], metadata, binary=binary,
                        rerank_size=rerank_size)


def default_codec(dim: int) -> str:
    m = max(d for d in range(1, min(64, dim) + 1) if dim % d == 0 and (dim // d >= 4 or d == 1))
    return f"PQ{m}"


@dataclass(frozen=True)
class RunContext:
    out: str
    table: str
    run_id: str

    @classmethod
    def new(cls, out: str, table: str, run_id: str | None = None) -> "RunContext":
        if storage.is_file(out):
            raise ConfigError(f"{out}: the output must be a folder (a LanceDB database), and this is a file")
        return cls(storage.normalize(out), table, run_id or dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ-")
                   + uuid.uuid4().hex[:8])

    @property
    def table_uri(self) -> str:
        return table_uri(self.out, self.table)

    @property
    def sidecar(self) -> str:
        return sidecar_uri(self.out, self.table)

    def run_file(self, name: str) -> str:
        return storage.join(self.sidecar, "runs", self.run_id, name)


def relative_to_out(ctx: RunContext, uri: str) -> str:
    """A path under OUT relative to it (query strings of object-store URIs dropped), so the
    manifest stays valid if OUT moves and never records endpoints or options."""
    base, path = ctx.out.split("?", 1)[0].rstrip("/"), uri.split("?", 1)[0]
    if not path.startswith(base + "/"):
        raise VecpressError(f"{path} is not under the output {base}")
    return path[len(base) + 1:]


def save_array(uri: str, a: np.ndarray) -> str:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    storage.write_bytes(uri, buf.getvalue())
    return uri


def load_array(uri: str) -> np.ndarray:
    return np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False)


def save_arrays(uri: str, arrays: dict[str, np.ndarray]) -> str:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    storage.write_bytes(uri, buf.getvalue())
    return uri


def load_arrays(uri: str) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(storage.read_bytes(uri)), allow_pickle=False) as z:
        return {name: z[name] for name in z.files}


# ---- plan -----------------------------------------------------------------------------------

@dataclass
class Planned:
    plan: SourcePlan
    codec_spec: str | None  # None until the advisor chooses (codec="auto")
    code_size: int | None
    num_train: int
    num_queries: int
    read_version: int | None
    seconds: float = 0.0
    #: codec="auto": the advisor's decision and the sweep table behind it
    advisor: dict | None = None
    #: codec="auto": the chosen codec as the sweep trained it (same sample and seed)
    pretrained: CodecRef | None = None
    advise_seconds: float = 0.0
    #: incremental run: what changed since the latest version (None = full build)
    diff: SourceDiff | None = None
    #: the current source snapshot (plan is the new layout when incremental)
    snapshot: SourcePlan | None = None
    drift: dict | None = None
    drift_seconds: float = 0.0


def resolve_codec(ctx: RunContext, planned: Planned, spec: str, opts: CompressOptions) -> Planned:
    """Check the codec (and warm codec) against the data and the output table's schema."""
    plan = planned.plan
    try:
        code_size = check_codec_spec(spec, plan.dim, opts.metric, planned.num_train)
        rerank_size = check_rerank_codec(opts.rerank_codec, plan.dim, opts.metric, planned.num_train)
        binary = is_binary_spec(spec, plan.dim)
    except CodecSpecError as exc:
        raise ConfigError(str(exc)) from None
    schema = output_schema(plan, code_size, binary=binary, rerank_size=rerank_size)
    planned.read_version = check_compatible(ctx.out, ctx.table, schema, allow_schema_change=opts.allow_schema_change)
    planned.codec_spec, planned.code_size = spec, code_size
    return planned


def plan_run(ctx: RunContext, source: SourceSpec, opts: CompressOptions) -> Planned:
    """Validate every source file and the codec, fix the shard plan, check the output, and
    compare the sources with the table's latest version (incremental runs)."""
    start = time.perf_counter()
    plan = plan_sources(source, shard_rows=opts.shard_rows)
    num_train, num_queries = sample_sizes(plan.num_rows, opts.num_train, opts.num_queries)
    planned = Planned(plan, None, None, num_train, num_queries, None, snapshot=plan)
    diff = None
    if opts.mode == "auto":
        auto = opts.codec == "auto"
        diff = diff_sources(ctx.out, ctx.table, plan, metric=opts.metric, codec=None if auto else opts.codec,
                            rerank_codec=opts.rerank_codec,
                            advice={name: getattr(opts, name) for name in ADVICE_OPTIONS} if auto else None)
        if diff is not None and diff.layout_lost and opts.force_retrain:
            diff = None  # nothing to extend: the retrain is a full rebuild
    if diff is not None:
        planned.diff, planned.plan = diff, layout_after(plan, diff)
        planned.num_train = diff.previous_manifest["sample"]["num_train"]
        resolve_codec(ctx, planned, diff.previous_manifest["codec"]["spec"], opts)
        s = diff.summary()
        what = (f"incremental on version {diff.previous_version}: {s['files_added']} new, {s['files_rewritten']} "
                f"rewritten, {s['files_removed']} deleted, {s['files_unchanged']} unchanged files; codec "
                f"{planned.codec_spec} kept unless it drifted")
    elif opts.codec == "auto":
        candidate_specs(plan.dim, opts.metric, num_train, codecs=list(opts.advise_codecs or []) or None,
                        budgets=[opts.max_bytes] if opts.max_bytes else None)  # fail before reading data
        try:
            check_rerank_codec(opts.rerank_codec, plan.dim, opts.metric, num_train)
        except CodecSpecError as exc:
            raise ConfigError(str(exc)) from None
        what = "full build; codec chosen after sampling"
    else:
        resolve_codec(ctx, planned, opts.codec or default_codec(plan.dim), opts)
        what = f"full build; codec {planned.codec_spec} = {planned.code_size} bytes/vector"
    storage.write_bytes(ctx.run_file("plan.json"), json.dumps(planned.plan.to_dict(), indent=1).encode())
    log.info("plan: %d rows in %d files, %d shards, dim %d (%s); %s", plan.num_rows, len(plan.files),
             len(plan.shards), plan.dim, plan.vector_type, what)
    planned.seconds = time.perf_counter() - start
    return planned


# ---- drift (incremental runs) -------------------------------------------------------------------

def drift_run(ctx: RunContext, planned: Planned, opts: CompressOptions, executor: Executor):
    """Measure the table's codec on a fresh uniform sample of the current corpus and decide:
    keep it (incremental run continues) or retrain (the run becomes a full rebuild).

    Returns (planned, sampled or None, drift decision); the sample's vectors are the held-out
    queries of the incremental run's evaluation."""
    start = time.perf_counter()
    diff = planned.diff
    prev = diff.previous_manifest
    seed = opts.seed * 1_000_003 + diff.previous_version + 1  # fresh, yet deterministic per night
    # held out from the rows the kept codec was trained on (they would flatter its error)
    train_rows = kept_training_rows(ctx, prev)
    probe = read_sample(planned.plan, 0, planned.num_queries, seed, executor, max_row_groups=opts.sample_row_groups,
                        exclude=layout_positions(planned.plan, load_arrays(train_rows)) if train_rows else None)
    xq, qpos = probe.queries, probe.query_positions
    codec = load_codec(manifest_codec(ctx.out, prev["codec"]))
    current = probe_quality(codec, xq)
    drift = drift_decision(prev.get("drift_baseline"), current, threshold=opts.drift_threshold,
                           force=opts.force_retrain)
    planned.drift = drift
    log.info("drift: relative error %.4f (at training %s), probe recall@10 %.3f: %s", current["relative_error"],
             _fmt(drift["baseline_relative_error"], 4), current["recall_at_10"], drift["reason"])
    if drift["retrain"]:  # a full rebuild on the current snapshot
        planned.diff, planned.plan = None, planned.snapshot
        planned.num_train, planned.num_queries = sample_sizes(planned.plan.num_rows, opts.num_train, opts.num_queries)
        if opts.codec == "auto":
            planned.codec_spec = planned.code_size = None
        else:
            resolve_codec(ctx, planned, opts.codec or prev["codec"]["spec"], opts)
        storage.write_bytes(ctx.run_file("plan.json"), json.dumps(planned.plan.to_dict(), indent=1).encode())
        planned.drift_seconds = time.perf_counter() - start
        return planned, None, drift
    sampled = Sampled(train_uri="", queries_uri=save_array(ctx.run_file("queries.npy"), xq),
                      query_positions_uri=save_array(ctx.run_file("query_positions.npy"), qpos),
                      num_train=prev["sample"]["num_train"], num_queries=len(xq), train_rows_uri=train_rows)
    planned.drift_seconds = sampled.seconds = time.perf_counter() - start
    return planned, sampled, drift


def kept_training_rows(ctx: RunContext, manifest: dict) -> str | None:
    """Where the rows that trained a version's codec are (sampling.file_rows), or None: for
    versions made before they were kept, or (with a warning) when their run folder is gone."""
    uri = manifest["sample"].get("train_rows_uri")
    if not uri:
        return None
    uri = storage.join(ctx.out, uri)
    if storage.exists(uri):
        return uri
    log.warning("drift: %s is gone (its run folder removed?): the held-out queries may include rows the kept codec "
                "was trained on", uri)
    return None


def carried_codec(ctx: RunContext, planned: Planned) -> Trained:
    """An incremental run keeps the previous version's codec (and warm codec) as they are."""
    prev = planned.diff.previous_manifest
    return Trained(manifest_codec(ctx.out, prev["codec"]), manifest_codec(ctx.out, prev.get("rerank_codec")),
                   baseline=prev.get("drift_baseline"))


# ---- sample ---------------------------------------------------------------------------------

@dataclass
class Sampled:
    train_uri: str
    queries_uri: str
    query_positions_uri: str
    num_train: int
    num_queries: int
    seconds: float = 0.0
    row_groups_read: int | None = None
    #: where the training rows are (sampling.file_rows), for later incremental runs' queries
    train_rows_uri: str | None = None


def sample_run(ctx: RunContext, planned: Planned, opts: CompressOptions, executor: Executor) -> Sampled:
    """Read the training sample and held-out queries, uniformly across the whole corpus."""
    start = time.perf_counter()
    s = read_sample(planned.plan, planned.num_train, planned.num_queries, opts.seed, executor,
                    max_row_groups=opts.sample_row_groups)
    sampled = Sampled(
        train_uri=save_array(ctx.run_file("train.npy"), s.train),
        queries_uri=save_array(ctx.run_file("queries.npy"), s.queries),
        query_positions_uri=save_array(ctx.run_file("query_positions.npy"), s.query_positions),
        num_train=len(s.train), num_queries=len(s.queries), row_groups_read=s.row_groups_read,
        train_rows_uri=save_arrays(ctx.run_file("train_rows.npz"), file_rows(planned.plan, s.train_positions)),
    )
    sampled.seconds = time.perf_counter() - start
    log.info("sample: %d training vectors, %d held-out queries (seed %d)", sampled.num_train,
             sampled.num_queries, opts.seed)
    return sampled


# ---- advise ---------------------------------------------------------------------------------

def advise_run(ctx: RunContext, planned: Planned, sampled: Sampled, opts: CompressOptions,
               executor: Executor) -> Planned:
    """codec="auto": sweep the candidates on this run's own sample and choose (a no-op otherwise).
    The decision and the table behind it go into the manifest; the sweep's reports into the run
    folder."""
    if planned.codec_spec is not None:
        return planned
    start = time.perf_counter()
    plan = planned.plan
    budgets = [opts.max_bytes] if opts.max_bytes else None
    specs = candidate_specs(plan.dim, opts.metric, planned.num_train,
                            codecs=list(opts.advise_codecs or []) or None, budgets=budgets)
    log.info("advise: sweeping %d candidate codecs: %s", len(specs), ", ".join(specs))
    result = run_sweep(plan, load_array(sampled.train_uri), load_array(sampled.queries_uri),
                       load_array(sampled.query_positions_uri), specs, metric=opts.metric, seed=opts.seed,
                       eval_k=opts.eval_k, batch_size=opts.batch_size, ngpu=opts.ngpu, executor=executor)
    pick = choose(result.rows, max_bytes=opts.max_bytes, min_recall=opts.min_recall, rerank=opts.advise_rerank)
    reports = write_reports(result, ctx.run_file("sweep"), budgets)
    resolve_codec(ctx, planned, pick["codec"], opts)
    tc = next(c for c in result.trained if c.spec == pick["codec"])
    planned.pretrained = save_codec(Codec.from_bytes(tc.blob, spec=tc.spec, metric=opts.metric, sha256=tc.sha256),
                                    ctx.sidecar)
    planned.advisor = {
        "criterion": {"max_bytes": opts.max_bytes, "min_recall": opts.min_recall, "rerank": opts.advise_rerank},
        "chosen": pick["codec"], "chosen_recall_at_10": score(pick, opts.advise_rerank),
        "code_bytes": pick["code_bytes"], "table": result.rows, "failed": result.failed,
        "report_uri": relative_to_out(ctx, reports["md"]),
    }
    planned.advise_seconds = time.perf_counter() - start
    log.info("advise: chose %s (%d B, recall@10 %.3f%s)", pick["codec"], pick["code_bytes"],
             score(pick, opts.advise_rerank), f" after re-rank x{opts.advise_rerank}" if opts.advise_rerank > 1 else "")
    return planned


# ---- train ----------------------------------------------------------------------------------

@dataclass
class Trained:
    codec: CodecRef
    rerank_codec: CodecRef | None = None
    seconds: float = 0.0
    #: the codec's fit on held-out data when trained: the reference for drift checks
    baseline: dict | None = None


def train_run(ctx: RunContext, planned: Planned, sampled: Sampled, opts: CompressOptions) -> Trained:
    """Train the codec on the sample and store it content-addressed."""
    start = time.perf_counter()
    xt = load_array(sampled.train_uri)
    if planned.pretrained is not None and planned.pretrained.spec == planned.codec_spec:
        ref = planned.pretrained  # trained by the advisor's sweep on this same sample and seed
    else:
        ref = save_codec(Codec.train(xt, planned.codec_spec, opts.metric, seed=opts.seed, ngpu=opts.ngpu), ctx.sidecar)
    warm = None
    if opts.rerank_codec:
        warm = save_codec(Codec.train(xt, opts.rerank_codec, opts.metric, seed=opts.seed, ngpu=opts.ngpu), ctx.sidecar)
    baseline = probe_quality(load_codec(ref), load_array(sampled.queries_uri))  # held out: never trained on
    log.info("train: %s on %d vectors in %.1fs -> %s", ref.spec, xt.shape[0], time.perf_counter() - start, ref.uri)
    return Trained(ref, warm, time.perf_counter() - start, baseline)


# ---- encode ---------------------------------------------------------------------------------

@dataclass
class Encoded:
    fragments: list[dict]
    num_rows: int
    ground_truth_uri: str
    seconds: float = 0.0
    #: which processes read the shards and which devices computed them (`device_report`)
    devices: dict | None = None
    #: the held-out queries' top-k over the codes found in the encode pass (ids), and their
    #: candidates' exact distances (None without re-ranking); None when not searched in the pass
    search_ids_uri: str | None = None
    search_exact_uri: str | None = None


def device_report(results: list, actors: list[dict] | None = None, startup_seconds: float | None = None) -> dict:
    """Which processes read shards, and where codes, exact neighbours and the evaluation's
    search over the codes were computed."""
    computes: dict = {}
    readers: dict = {}
    for r in results:
        c = r.compute or {}
        key = (c.get("host"), c.get("pid"))
        row = computes.setdefault(key, {**c, "shards": 0, "rows": 0, "seconds": 0.0})
        row["shards"] += 1
        row["rows"] += r.num_rows
        row["seconds"] = round(row["seconds"] + r.compute_seconds, 3)
        rd = r.reader or {}
        rrow = readers.setdefault((rd.get("host"), rd.get("pid")), {**rd, "shards": 0, "rows": 0})
        rrow["shards"] += 1
        rrow["rows"] += r.num_rows
    gpu = any(str(c.get("encode", "cpu")).startswith("cuda") for c in computes.values())
    return {"placement": "gpu actors" if actors else ("workers on their GPU" if gpu else "cpu workers"),
            "readers": sorted(readers.values(), key=lambda r: (str(r["host"]), r["pid"] or 0)),
            "compute": sorted(computes.values(), key=lambda r: (str(r.get("host")), r.get("pid") or 0)),
            "actors": actors or [], "actor_startup_seconds": startup_seconds}


def encode_run(ctx: RunContext, planned: Planned, sampled: Sampled, trained: Trained, opts: CompressOptions,
               executor: Executor) -> Encoded:
    """Encode the shards into uncommitted Lance fragments; exact neighbours of the held-out
    queries come from the same pass over the source. An incremental run encodes only its new
    shards, keeps the other fragments as they are, and reads the kept shards' vectors once for
    the exact neighbours. Every shard's pass also searches the queries over its codes (new, or
    stored for kept shards) for the evaluation (EncodeJob.eval_search)."""
    start = time.perf_counter()
    plan = planned.plan
    diff = planned.diff
    job = EncodeJob(table_uri=ctx.table_uri, codec=trained.codec, columns=Columns.of(plan),
                    batch_size=opts.batch_size, eval_k=opts.eval_k, checkpoint_uri=ctx.run_file("shards"),
                    rerank_codec=trained.rerank_codec, device=opts.encode_device,
                    eval_search=True, eval_rerank=opts.eval_rerank)
    xq, qpos = load_array(sampled.queries_uri), load_array(sampled.query_positions_uri)
    num_kept = len(diff.kept_shards) if diff else 0
    pool = None
    gpu_compute = getattr(executor, "gpu_compute", None)  # optional in the Executor protocol
    if gpu_compute is not None and opts.encode_device != "cpu" and len(plan.shards) > num_kept:
        pool = gpu_compute(job, xq, ngpu=opts.ngpu)
    actors = None
    try:
        if pool is not None:
            log.info("encode: %s, ready in %.1fs", pool.placement.describe(), pool.startup_seconds)
            job = dataclasses.replace(job, remote=pool)
        results = executor.map(encode_shard, plan.shards[num_kept:], desc="encode",
                               shared={"job": job, "queries": xq, "query_positions": qpos})
        if pool is not None:
            actors = pool.totals()
            if any(a.get("lost") for a in actors):
                log.warning("encode: %d of %d GPU encoder actors were lost during the stage; their batches went to "
                            "the others, or to the read tasks", sum(bool(a.get("lost")) for a in actors), len(actors))
    finally:
        if pool is not None:
            pool.close()
    devices = device_report(results, actors, pool.startup_seconds if pool is not None else None)
    for c in devices["compute"]:
        log.info("encode: %s pid %s encoded %d rows of %d shards on %s%s, exact neighbours on %s, "
                 "search over the codes on %s", c.get("host"), c.get("pid"), c["rows"], c["shards"], c.get("encode"),
                 f" ({c['gpu_name']})" if c.get("gpu_name") else "", c.get("exact_knn"), c.get("code_search"))
    # per shard (its index in the layout): exact (D, I), search (D, I, E)
    parts = [(r.shard_index, (r.knn_D, r.knn_I), (r.search_D, r.search_I, r.search_E)) for r in results]
    if num_kept:  # one read of the kept rows: their exact neighbours, and the search over their stored codes
        kept = KeptSearch(ctx.table_uri, diff.previous_version, trained.codec, trained.rerank_codec, opts.eval_rerank)
        for i, (D, I, found) in enumerate(executor.map(
                knn_shard, list(zip(plan.shards[:num_kept], diff.kept_fragment_ids)),
                desc="exact neighbours and search (kept rows)",
                shared={"columns": Columns.of(plan), "metric": opts.metric, "k": opts.eval_k, "queries": xq,
                        "query_positions": qpos, "search": kept, "batch_size": opts.batch_size,
                        "ngpu": 0 if opts.encode_device == "cpu" else opts.ngpu})):
            parts.append((plan.shards[i].index, (D, I), found))
    # merged in layout order: among equal distances the first row wins, as in a search of the
    # stored codes (evaluate --recompute), whatever order the shards finished in
    parts.sort(key=lambda p: p[0])
    truth = TopK(len(qpos), opts.eval_k, exclude=qpos)
    for _, knn, _ in parts:
        truth.add(*knn)
    searched = [found for _, _, found in parts]
    gt_uri = save_array(ctx.run_file("ground_truth.npy"), truth.I)
    search_ids_uri = search_exact_uri = None
    if all(s is not None and s[1] is not None for s in searched):  # (checkpoints of older runs lack it)
        found = TopK(len(qpos), opts.eval_k, exclude=qpos, with_extra=opts.eval_rerank)
        for D, I, E in searched:
            found.add(D, I, E)
        search_ids_uri = save_array(ctx.run_file("search_ids.npy"), found.I)
        if opts.eval_rerank:
            search_exact_uri = save_array(ctx.run_file("search_exact.npy"), found.E)
    fragments = (diff.kept_fragments if diff else []) + [
        f for r in sorted(results, key=lambda r: r.shard_index) for f in r.fragments]
    num_rows = sum(r.num_rows for r in results)
    seconds = time.perf_counter() - start
    log.info("encode: %d rows in %d new fragments (%d kept), %.1fs (%.0f rows/s)", num_rows,
             len(fragments) - (len(diff.kept_fragments) if diff else 0), len(diff.kept_fragments) if diff else 0,
             seconds, num_rows / max(seconds, 1e-9))
    return Encoded(fragments, plan.num_rows, gt_uri, seconds, devices, search_ids_uri, search_exact_uri)


# ---- commit ---------------------------------------------------------------------------------

@dataclass
class Committed:
    version: int
    manifest: dict
    seconds: float = 0.0


def build_manifest(ctx: RunContext, planned: Planned, sampled: Sampled, trained: Trained, encoded: Encoded,
                   opts: CompressOptions, stage_seconds: dict) -> dict:
    plan = planned.plan
    return {
        "format": 1,
        "vecpress_version": __version__,
        "run_id": ctx.run_id,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "table": ctx.table,
        "num_rows": encoded.num_rows,
        "dim": plan.dim,
        "metric": opts.metric,
        "codec": {**trained.codec.to_dict(), "uri": relative_to_out(ctx, trained.codec.uri)},
        "codec_binary": is_binary_spec(trained.codec.spec, plan.dim),
        "rerank_codec": None if trained.rerank_codec is None else {
            **trained.rerank_codec.to_dict(), "uri": relative_to_out(ctx, trained.rerank_codec.uri)},
        "source": {
            "uris": sorted({f.uri for f in plan.files}) if len(plan.files) <= 20 else None,
            "num_files": len(plan.files),
            "vector_column": plan.vector_column, "id_column": plan.id_column, "keep": plan.keep,
            "vector_type": plan.vector_type, "bytes_per_vector": plan.source_bytes_per_vector,
            "plan_uri": relative_to_out(ctx, ctx.run_file("plan.json")),
        },
        "sample": {
            "seed": opts.seed, "num_train": sampled.num_train, "num_queries": sampled.num_queries,
            "row_groups_read": sampled.row_groups_read, "max_row_groups": opts.sample_row_groups,
            "queries_uri": relative_to_out(ctx, sampled.queries_uri),
            "query_positions_uri": relative_to_out(ctx, sampled.query_positions_uri),
            "train_rows_uri": relative_to_out(ctx, sampled.train_rows_uri) if sampled.train_rows_uri else None,
            "ground_truth_uri": relative_to_out(ctx, encoded.ground_truth_uri),
            **{name: relative_to_out(ctx, uri) for name, uri in (("search_ids_uri", encoded.search_ids_uri),
                                                                  ("search_exact_uri", encoded.search_exact_uri)) if uri},
        },
        "code_bytes": trained.codec.code_size,
        "rerank_bytes": None if trained.rerank_codec is None else trained.rerank_codec.code_size,
        "source_bytes": plan.source_bytes_per_vector,
        "options": dataclasses.asdict(opts),
        "advisor": planned.advisor,
        "mode": "incremental" if planned.diff else "full",
        "incremental": planned.diff.summary() if planned.diff else None,
        "drift": planned.drift,
        "drift_baseline": trained.baseline,
        "stage_seconds": stage_seconds,
        "devices": encoded.devices,
    }


def commit_run(ctx: RunContext, planned: Planned, sampled: Sampled, trained: Trained, encoded: Encoded,
               opts: CompressOptions, stage_seconds: dict) -> Committed:
    """One atomic Lance commit: the new version appears whole or not at all, once per run id."""
    start = time.perf_counter()
    manifest = build_manifest(ctx, planned, sampled, trained, encoded, opts, stage_seconds)
    schema = output_schema(planned.plan, trained.codec.code_size, binary=manifest["codec_binary"],
                           rerank_size=manifest["rerank_bytes"],
                           metadata={MANIFEST_METADATA_KEY: json.dumps(manifest).encode()})
    version = commit_overwrite(ctx.out, ctx.table, schema, encoded.fragments, run_id=ctx.run_id,
                               read_version=planned.read_version)
    manifest["version"] = version
    storage.write_bytes(ctx.run_file("manifest.json"), json.dumps(manifest, indent=1).encode())
    log.info("commit: %s version %d (%d rows)", ctx.table_uri, version, encoded.num_rows)
    return Committed(version, manifest, time.perf_counter() - start)


# ---- evaluate -------------------------------------------------------------------------------

def manifest_codec(out: str, entry: dict | None) -> CodecRef | None:
    """A codec entry of a version's manifest (uri relative to OUT) as a loadable CodecRef."""
    if entry is None:
        return None
    return CodecRef(**{**entry, "uri": storage.join(storage.normalize(out), entry["uri"])})


def evaluate_version(out: str, table: str, version: int, executor: Executor, *, k: int | None = None,
                     rerank: bool = True, recompute: bool = False) -> dict:
    """Recall of search over the version's codes against the exact neighbours recorded for its
    held-out queries (and after exact re-ranking of r x k candidates), and the codec's relative
    reconstruction error.

    A run searches the queries over the codes while it holds them: new shards in the encode
    pass (EncodeJob.eval_search), kept shards of an incremental run in the read that finds
    their exact neighbours (incremental.knn_shard). It records the results in the manifest.
    Those are used unless `recompute`, or a different k, asks for a search over the stored
    codes (one read of every fragment's codes, and of the re-rank candidates' source rows)."""
    ds = require_dataset(out, table, version)
    manifest = version_manifest(ds)
    base = storage.normalize(out)
    codec_ref = manifest_codec(out, manifest["codec"])
    sample = manifest["sample"]
    xq = load_array(storage.join(base, sample["queries_uri"]))
    qpos = load_array(storage.join(base, sample["query_positions_uri"]))
    truth = load_array(storage.join(base, sample["ground_truth_uri"]))
    if k is not None and not 1 <= k <= truth.shape[1]:
        raise ConfigError(f"k must be from 1 to {truth.shape[1]} (the neighbours version {version}'s run recorded, "
                          f"its --eval-k), got {k}")
    k = k or truth.shape[1]
    codec = load_codec(codec_ref)
    xp = prepare_vectors(xq, codec.metric)
    warm = manifest_codec(out, manifest.get("rerank_codec"))
    in_pass = sample.get("search_ids_uri")
    if in_pass and not recompute and k == truth.shape[1] and (sample.get("search_exact_uri") or not rerank):
        I = load_array(storage.join(base, in_pass))
        E = load_array(storage.join(base, sample["search_exact_uri"])) if rerank else None
        return evaluation(truth, I, E, num_rows=ds.count_rows(), rerank_from=rerank and ("column" if warm else "source"),
                          codec=codec, xq=xq, xp=xp, searched="encode pass")
    job = CodeSearch(table_uri=table_uri(out, table), version=version, codec=codec_ref, k=k)
    items = [(fid, off) for fid, off, _ in fragment_offsets(ds)]
    found = TopK(len(qpos), k, exclude=qpos)
    for D, I in executor.map(search_fragment, items, desc="evaluate",
                             shared={"job": job, "queries": xq, "query_positions": qpos}):
        found.add(D, I)
    E, rerank_from = None, None
    if rerank:
        if warm is not None:
            E, rerank_from = column_distances(ds, warm, xp, found.I, codec.metric), "column"
        else:
            plan = SourcePlan.from_dict(json.loads(storage.read_bytes(storage.join(base, manifest["source"]["plan_uri"]))))
            E, rerank_from = source_distances(plan, xp, found.I, codec.metric, executor), "source"
    return evaluation(truth, found.I, E, num_rows=ds.count_rows(), rerank_from=rerank_from, codec=codec, xq=xq,
                      xp=xp, searched="stored codes")


def evaluation(truth: np.ndarray, I: np.ndarray, E: np.ndarray | None, *, num_rows: int, rerank_from: str | None,
               codec, xq: np.ndarray, xp: np.ndarray, searched: str) -> dict:
    """The evaluation record of a version: recall (and re-ranked recall) of the search results I
    against the exact neighbours, and the codec's relative error on the held-out queries (raw
    `xq`, prepared for the metric `xp`)."""
    return {
        "num_queries": int(len(I)), "k": int(I.shape[1]), "exclude_self": True,
        **recall_table(truth, I, num_rows, E), "rerank_from": rerank_from or None,
        "searched": searched,
        "relative_error": relative_error(xp, codec.decode(codec.encode(xq))),
    }


def evaluate_run(ctx: RunContext, committed: Committed, executor: Executor, stage_seconds: dict) -> dict:
    """Evaluate the committed version and store the result beside it (JSON + LanceDB table)."""
    from vecpress.pipeline.report import store_eval

    start = time.perf_counter()
    ev = evaluate_version(ctx.out, ctx.table, committed.version, executor,
                          rerank=committed.manifest["options"]["eval_rerank"])
    seconds = {**stage_seconds, "evaluate": round(time.perf_counter() - start, 3)}
    ev = store_eval(ctx.out, ctx.table, committed.version, committed.manifest, ev, seconds)
    log.info("evaluate: recall@1 %s recall@10 %s recall@100 %s relative error %.4f", *(
        _fmt(ev.get(f"recall_at_{k}")) for k in RECALL_KS), ev["relative_error"])
    return ev


def _fmt(v, digits: int = 3):
    return "n/a" if v is None else f"{v:.{digits}f}"


# ---- all stages -----------------------------------------------------------------------------

@dataclass
class RunResult:
    run_id: str
    version: int | None
    manifest: dict | None
    eval: dict | None
    stage_seconds: dict = field(default_factory=dict)
    #: False when the run had nothing to do (no source change) and committed nothing
    committed: bool = True
    reason: str = ""
    mode: str = "full"
    incremental: dict | None = None
    drift: dict | None = None
    gate: dict | None = None
    retention: dict | None = None

    def summary(self) -> dict:
        """The `run` section of a run report."""
        inc = self.incremental or {}
        return {"run_id": self.run_id, "committed": self.committed, "version": self.version, "reason": self.reason,
                "mode": self.mode, "rows_added": inc.get("rows_added"), "rows_removed": inc.get("rows_removed"),
                "files_added": inc.get("files_added"), "files_removed": inc.get("files_removed"),
                "files_rewritten": inc.get("files_rewritten"), "files_unchanged": inc.get("files_unchanged"),
                "drift": self.drift, "gate": self.gate, "retention": self.retention,
                "stage_seconds": self.stage_seconds, "devices": (self.manifest or {}).get("devices")}


def gate_run(ctx: RunContext, committed: Committed, ev: dict, opts: CompressOptions) -> dict:
    """Tag the new version `production` if it passes the quality gate; then apply retention.
    The decision is added to the version's evaluation JSON."""
    from vecpress.pipeline.report import load_eval, store_gate

    gate = gate_version(ctx.out, ctx.table, committed.version, ev.get("recall_at_10"), floor=opts.gate_min_recall,
                        max_drop=opts.gate_max_drop, load_eval=load_eval)
    store_gate(ctx.out, ctx.table, committed.version, gate)
    gate["retention"] = apply_retention(ctx.out, ctx.table, opts.keep_versions)
    (log.info if gate["passed"] else log.warning)("gate: %s", gate["reason"])
    return gate


@dataclass(frozen=True)
class Stages:
    """The stage functions a run calls; the Prefect flow passes the same functions wrapped as
    tasks, so both paths run exactly the same sequence."""

    plan: Callable = plan_run
    drift: Callable = drift_run
    sample: Callable = sample_run
    advise: Callable = advise_run
    train: Callable = train_run
    encode: Callable = encode_run
    commit: Callable = commit_run
    evaluate: Callable = evaluate_run
    gate: Callable = gate_run


def run_stages(ctx: RunContext, source: SourceSpec, opts: CompressOptions, executor: Executor,
               stages: Stages = Stages()) -> RunResult:
    """plan -> [drift] -> sample -> [advise] -> train -> encode -> commit -> evaluate -> gate.

    With a previous version to extend, an unchanged source commits nothing; otherwise the drift
    check decides between an incremental run (codec kept, only changed files encoded) and a
    full rebuild (retrain, re-encode everything)."""
    planned = stages.plan(ctx, source, opts)
    sampled = None
    if planned.diff is not None:
        if planned.diff.no_change and not opts.force_retrain:
            prev = planned.diff.previous_version
            log.info("no change since version %d: nothing to commit", prev)
            result = RunResult(ctx.run_id, prev, None, None, committed=False, reason=f"no change since version {prev}",
                               mode="none", incremental=planned.diff.summary())
            return finish_stopped_run(ctx, planned.diff, result, opts, executor, stages)
        planned, sampled, _ = stages.drift(ctx, planned, opts, executor)
    prestart = getattr(executor, "prestart_gpu", None)  # GPU actors warm up while we sample and train
    if prestart is not None and opts.encode_device != "cpu":
        prestart(ngpu=opts.ngpu)
    if planned.diff is None:
        sampled = stages.sample(ctx, planned, opts, executor)
        planned = stages.advise(ctx, planned, sampled, opts, executor)
        trained = stages.train(ctx, planned, sampled, opts)
    else:
        trained = carried_codec(ctx, planned)
    encoded = stages.encode(ctx, planned, sampled, trained, opts, executor)
    times = stage_times(planned, sampled, trained, encoded)
    committed = stages.commit(ctx, planned, sampled, trained, encoded, opts, times)
    times["commit"] = round(committed.seconds, 3)
    ev = stages.evaluate(ctx, committed, executor, times)
    gate = stages.gate(ctx, committed, ev, opts)
    return RunResult(ctx.run_id, committed.version, committed.manifest, ev, ev["stage_seconds"],
                     reason="committed" if gate["passed"] else gate["reason"],
                     mode="incremental" if planned.diff else "full",
                     incremental=planned.diff.summary() if planned.diff else None, drift=planned.drift,
                     **gate_fields(gate))


def gate_fields(gate: dict) -> dict:
    """gate_run's result as RunResult's `gate` and `retention` fields."""
    return {"gate": {k: v for k, v in gate.items() if k != "retention"}, "retention": gate["retention"]}


def finish_stopped_run(ctx: RunContext, diff: SourceDiff, result: RunResult, opts: CompressOptions,
                       executor: Executor, stages: Stages) -> RunResult:
    """A run with nothing to commit first finishes the run that committed the latest version,
    if that one stopped after its commit (a lost worker, a killed flow): it evaluates and gates
    that version, which would otherwise never be evaluated nor tagged. Else `result` as is."""
    from vecpress.pipeline.report import load_eval

    manifest = diff.previous_manifest
    ev = load_eval(ctx.out, ctx.table, diff.previous_version)
    if ev is not None and "gate" in ev:
        return result
    if ev is None and diff.layout_lost:  # a compacted copy of an evaluated version, not a stopped run's
        return result
    committed = Committed(diff.previous_version, manifest)
    if ev is None:
        log.warning("version %d was committed by run %s, which stopped before evaluating it: evaluating it now",
                    diff.previous_version, manifest["run_id"])
        ev = stages.evaluate(ctx, committed, executor, manifest.get("stage_seconds") or {})
    gate = stages.gate(ctx, committed, ev, opts)
    return dataclasses.replace(result, manifest=manifest, eval=ev, reason=f"{result.reason}; evaluated and gated it "
                               f"(its run stopped after the commit)" + ("" if gate["passed"] else f": {gate['reason']}"),
                               **gate_fields(gate))


def check_gate(result: RunResult) -> RunResult:
    """Raise QualityGateError when the run's version failed the gate (it stays committed, untagged)."""
    if result.gate is not None and not result.gate["passed"]:
        raise QualityGateError(f"version {result.version} of {result.manifest['table']} failed the quality gate: "
                               f"{result.gate['reason']}")
    return result


def run_compress(source: SourceSpec, out: str, table: str, opts: CompressOptions = CompressOptions(), *,
                 executor: Executor | None = None, run_id: str | None = None) -> RunResult:
    """The whole job, in this process, without Prefect (the flow in `flows/` does the same).
    Raises QualityGateError after a version that failed the gate was committed and evaluated."""
    return check_gate(run_stages(RunContext.new(out, table, run_id), source, opts, executor or LocalExecutor()))


def stage_times(planned: Planned, sampled, trained, encoded) -> dict:
    times = {"plan": round(planned.seconds, 3)}
    if planned.drift is not None:
        times["drift"] = round(planned.drift_seconds, 3)
    if planned.diff is None:
        times["sample"] = round(sampled.seconds, 3)
        if planned.advisor is not None:
            times["advise"] = round(planned.advise_seconds, 3)
        times["train"] = round(trained.seconds, 3)
    times["encode"] = round(encoded.seconds, 3)
    return times
