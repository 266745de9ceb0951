"""Stage 1, plan: validate every source file and the codec, fix the shard layout, check the
output table, and compare the sources with its latest version (what an incremental run
extends). Nothing is read but Parquet footers."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass

from vecpress.kernels.codecs.build import check_codec_spec
from vecpress.kernels.codecs.ivf import default_served_spec
from vecpress.kernels.codecs.spec import CodecSpecError, is_binary_spec
from vecpress.pipeline import storage
from vecpress.pipeline.context import RunContext
from vecpress.pipeline.errors import ConfigError, OutputConflictError, VecpressError
from vecpress.pipeline.incremental import ADVICE_OPTIONS, SourceDiff, diff_sources, layout_after
from vecpress.pipeline.lance_io import check_compatible, open_dataset, table_uri, version_manifest
from vecpress.pipeline.options import CompressOptions
from vecpress.pipeline.sampling import sample_sizes
from vecpress.pipeline.schema import codes_schema, served_schema
from vecpress.pipeline.layout import SourcePlan
from vecpress.pipeline.source import SourceSpec, plan_sources
from vecpress.pipeline.sweep import candidate_specs, spec_bytes

log = logging.getLogger("vecpress")


@dataclass(frozen=True)
class Planned:
    """The run's plan. A stage that changes it (drift's retrain, the advisor's choice) returns
    a new one (`dataclasses.replace`), so a retried stage sees what its first try saw."""

    #: the layout the new version will have (incremental: the kept shards, then the new ones)
    plan: SourcePlan
    #: the current source files, as planned from scratch (a full build's layout)
    snapshot: SourcePlan
    #: None until the advisor chooses (codec="auto")
    codec_spec: str | None
    code_size: int | None
    num_train: int
    num_queries: int
    #: the table's latest version when the run started (the commit's read version), or None
    read_version: int | None
    #: incremental run: what changed since the latest version (None = full build)
    diff: SourceDiff | None = None
    seconds: float = 0.0


def default_codec(dim: int) -> str:
    """PQm with m = dim/4 (sub-vectors of at least 4 dims) at most 64: m bytes per vector."""
    m = max(d for d in range(1, min(64, dim) + 1) if dim % d == 0 and (dim // d >= 4 or d == 1))
    return f"PQ{m}"


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


def output_schema(plan: SourcePlan, opts: CompressOptions, code_size: int, *, binary: bool = False,
                  rerank_size: int | None = None, metadata: dict | None = None):
    """The output table's schema: a codes table, or (--serve lancedb) the vectors LanceDB indexes."""
    out_fields = plan.output_fields
    if opts.serve == "lancedb":
        return served_schema(out_fields.field(0), plan.vector_column, plan.dim, opts.vector_dtype,
                             list(out_fields)[1:], metadata)
    return codes_schema(out_fields.field(0), code_size, list(out_fields)[1:], metadata, binary=binary,
                        rerank_size=rerank_size)


def resolve_codec(ctx: RunContext, planned: Planned, spec: str, opts: CompressOptions) -> Planned:
    """`planned` with the codec `spec`, checked (and the warm codec) against the data and the
    output table's schema."""
    plan = planned.plan
    try:
        code_size = spec_bytes(spec, plan.dim, opts.metric, planned.num_train)
        rerank_size = check_rerank_codec(opts.rerank_codec, plan.dim, opts.metric, planned.num_train)
        binary = opts.serve == "codes" and is_binary_spec(spec, plan.dim)
    except CodecSpecError as exc:
        raise ConfigError(str(exc)) from None
    schema = output_schema(plan, opts, code_size, binary=binary, rerank_size=rerank_size)
    read_version = check_compatible(ctx.out, ctx.table, schema, allow_schema_change=opts.allow_schema_change)
    return dataclasses.replace(planned, codec_spec=spec, code_size=code_size, read_version=read_version)


def check_dimension(out: str, table: str, plan: SourcePlan, *, allow_schema_change: bool = False) -> None:
    """OutputConflictError when the table's latest version holds vectors of another dimension
    than the input's (a codes table's schema need not show it: PQ8 codes are 8 bytes at any
    dimension), unless `allow_schema_change` (the run then replaces the table)."""
    ds = open_dataset(out, table)
    if ds is None or allow_schema_change:
        return
    try:
        dim = version_manifest(ds).get("dim")
    except VecpressError:  # not vecpress's: check_compatible compares the schemas
        return
    if dim is not None and dim != plan.dim:
        raise OutputConflictError(
            f"{table_uri(out, table)}: the input's vectors ({plan.vector_column!r}, {plan.num_rows} rows in "
            f"{len(plan.files)} files) have dimension {plan.dim}, table has {dim} ({ds.count_rows()} rows, version "
            f"{ds.version}); choose another --table or pass --allow-schema-change to replace it")


def write_plan(ctx: RunContext, plan: SourcePlan) -> None:
    """The layout the run writes, in its folder (a version's manifest points at it)."""
    storage.write_bytes(ctx.run_file("plan.json"), json.dumps(plan.to_dict(), indent=1).encode())


def plan(ctx: RunContext, source: SourceSpec, opts: CompressOptions) -> Planned:
    """Validate every source file and the codec, fix the shard plan, check the output, and
    compare the sources with the table's latest version (incremental runs)."""
    start = time.perf_counter()
    snapshot = plan_sources(source, shard_rows=opts.shard_rows)
    check_dimension(ctx.out, ctx.table, snapshot, allow_schema_change=opts.allow_schema_change)
    num_train, num_queries = sample_sizes(snapshot.num_rows, opts.num_train, opts.num_queries)
    planned = Planned(snapshot, snapshot, None, None, num_train, num_queries, None)
    diff = None
    if opts.mode == "auto":
        auto = opts.codec == "auto"
        diff = diff_sources(ctx.out, ctx.table, snapshot, metric=opts.metric, codec=None if auto else opts.codec,
                            rerank_codec=opts.rerank_codec,
                            advice={name: getattr(opts, name) for name in ADVICE_OPTIONS} if auto else None,
                            serving={"serve": opts.serve, "vector_dtype": opts.vector_dtype})
        if diff is not None and diff.layout_lost and opts.force_retrain:
            diff = None  # nothing to extend: the retrain is a full rebuild
    if diff is not None:
        planned = dataclasses.replace(planned, diff=diff, plan=layout_after(snapshot, diff),
                                      num_train=diff.previous_manifest["sample"]["num_train"])
        planned = resolve_codec(ctx, planned, diff.previous_manifest["codec"]["spec"], opts)
        s = diff.summary()
        what = (f"incremental on version {diff.previous_version}: {s['files_added']} new, {s['files_rewritten']} "
                f"rewritten, {s['files_removed']} deleted, {s['files_unchanged']} unchanged files; codec "
                f"{planned.codec_spec} kept unless it drifted")
    elif opts.codec == "auto":
        candidate_specs(snapshot.dim, opts.metric, num_train, codecs=list(opts.advise_codecs or []) or None,
                        budgets=[opts.max_bytes] if opts.max_bytes else None,
                        served_rows=snapshot.num_rows if opts.serve == "lancedb" else None)  # fail before reading
        try:
            check_rerank_codec(opts.rerank_codec, snapshot.dim, opts.metric, num_train)
        except CodecSpecError as exc:
            raise ConfigError(str(exc)) from None
        what = "full build; codec chosen after sampling"
    else:
        default = default_served_spec(snapshot.dim, snapshot.num_rows) if opts.serve == "lancedb" else \
            default_codec(snapshot.dim)
        planned = resolve_codec(ctx, planned, opts.codec or default, opts)
        what = f"full build; codec {planned.codec_spec} = {planned.code_size} bytes/vector"
    write_plan(ctx, planned.plan)
    log.info("plan: %d rows in %d files, %d shards, dim %d (%s); %s", snapshot.num_rows, len(snapshot.files),
             len(snapshot.shards), snapshot.dim, snapshot.vector_type, what)
    return dataclasses.replace(planned, seconds=time.perf_counter() - start)
