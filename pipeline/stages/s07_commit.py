"""Stage 7, commit: one atomic Lance commit makes the new version appear whole or not at all,
once per run id, and only while the run still holds the table's lease. Its manifest (what was
built, from what, how) rides in the version's schema metadata and in the run's folder. A
LanceDB-served table's version is first a detached candidate, which the index stage indexes,
gates and promotes (pipeline.gated)."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import time
from dataclasses import dataclass


from vecpress import __version__
from vecpress.kernels.codecs.ivf import parse_served_spec
from vecpress.kernels.codecs.spec import is_binary_spec
from vecpress.pipeline import storage
from vecpress.pipeline.context import RunContext
from vecpress.pipeline.evaluate import in_pass_evaluation
from vecpress.pipeline.gated import commit_candidate, commit_failed, commit_overwrite
from vecpress.pipeline.incremental import gate_decision
from vecpress.pipeline.locking import check_lease
from vecpress.pipeline.options import CompressOptions
from vecpress.pipeline.report import load_eval
from vecpress.pipeline.schema import MANIFEST_METADATA_KEY
from vecpress.pipeline.stages.s01_plan import Planned, output_schema
from vecpress.pipeline.stages.s03_sample import Sampled
from vecpress.pipeline.stages.s05_train import Trained
from vecpress.pipeline.stages.s06_encode import Encoded

log = logging.getLogger("vecpress")

#: links (and second names of a file) a manifest names; the plan has them all
MANIFEST_LINKS = 20


@dataclass(frozen=True)
class Committed:
    version: int
    manifest: dict
    seconds: float = 0.0
    #: the gate's decision when it was taken before the evaluation (a codes table's before its
    #: commit, a LanceDB-served table's once its index is built: pipeline.gated), else None
    #: (decided by the gate stage: a version whose run stopped after its commit)
    gate: dict | None = None
    #: how to open the version: its number (a served run's candidate: a detached version's,
    #: until the index stage gates it), or the tag `failed-<run id>` of a version that failed
    #: the gate and was committed on that branch
    ref: int | str | None = None

    @property
    def at(self) -> int | str:
        return self.version if self.ref is None else self.ref


def build_manifest(ctx: RunContext, planned: Planned, sampled: Sampled, trained: Trained, encoded: Encoded,
                   opts: CompressOptions, *, advisor: dict | None, drift: dict | None, stage_seconds: dict) -> dict:
    plan = planned.plan
    rel = ctx.relative
    served = opts.serve == "lancedb"
    return {
        "format": 1,
        "vecpress_version": __version__,
        "run_id": ctx.run_id,
        "created_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "table": ctx.table,
        "num_rows": encoded.num_rows,
        "dim": plan.dim,
        "metric": opts.metric,
        "codec": {**trained.codec.to_dict(), "uri": rel(trained.codec.uri)},
        "codec_binary": opts.serve == "codes" and is_binary_spec(trained.codec.spec, plan.dim),
        "serve": opts.serve,
        "rerank_codec": None if trained.rerank_codec is None else {
            **trained.rerank_codec.to_dict(), "uri": rel(trained.rerank_codec.uri)},
        "source": {
            "uris": sorted({f.uri for f in plan.files}) if len(plan.files) <= 20 else None,
            "num_files": len(plan.files),
            "vector_column": plan.vector_column, "id_column": plan.id_column, "keep": list(plan.keep),
            "vector_type": plan.vector_type, "bytes_per_vector": plan.source_bytes_per_vector,
            "plan_uri": rel(ctx.run_file("plan.json")),
            # (the plan lists every file read; these name the ones read through a link, or not read twice)
            "links_followed": len(plan.links), "links": [list(p) for p in plan.links[:MANIFEST_LINKS]],
            "aliases_skipped": len(plan.aliases), "aliases": [list(p) for p in plan.aliases[:MANIFEST_LINKS]],
        },
        "sample": {
            "seed": opts.seed, "num_train": sampled.num_train, "num_queries": sampled.num_queries,
            "row_groups_read": sampled.row_groups_read, "max_row_groups": opts.sample_row_groups,
            "queries_uri": rel(sampled.queries_uri),
            "query_positions_uri": rel(sampled.query_positions_uri),
            "train_rows_uri": rel(sampled.train_rows_uri) if sampled.train_rows_uri else None,
            "ground_truth_uri": rel(encoded.ground_truth_uri),
            **{name: rel(uri) for name, uri in (("search_ids_uri", encoded.search_ids_uri),
                                                ("search_exact_uri", encoded.search_exact_uri),
                                                ("units_uri", encoded.units_uri)) if uri},
            "kept_rows": encoded.kept_rows,
        },
        # --serve lancedb: the index's bytes per row (PQ m, SQ dim...), and the stored vectors' beside them
        "code_bytes": parse_served_spec(trained.codec.spec, plan.dim).index_bytes(plan.dim) if served
        else trained.codec.code_size,
        "vector_bytes": plan.dim * (2 if opts.vector_dtype == "float16" else 4) if served else None,
        "rerank_bytes": None if trained.rerank_codec is None else trained.rerank_codec.code_size,
        "source_bytes": plan.source_bytes_per_vector,
        "options": dataclasses.asdict(opts),
        "advisor": advisor,
        "mode": "incremental" if planned.diff else "full",
        "incremental": planned.diff.summary() if planned.diff else None,
        "drift": drift,
        "drift_baseline": trained.baseline,
        "stage_seconds": stage_seconds,
        "devices": encoded.devices,
        "id_check": _id_check(encoded.id_check, rel),
        # a codes table's inverted lists (pipeline.lists), or None: every query scores every code
        "partitions": encoded.partitions,
    }


def _id_check(check: dict | None, rel) -> dict | None:
    """The id check's record, its file of dropped positions (pipeline.rowmap) relative to OUT."""
    if not check or not check.get("dropped_uri"):
        return check
    return {**check, "dropped_uri": rel(check["dropped_uri"])}


def commit(ctx: RunContext, planned: Planned, sampled: Sampled, trained: Trained, encoded: Encoded,
           opts: CompressOptions, *, advisor: dict | None = None, drift: dict | None = None,
           stage_seconds: dict) -> Committed:
    """One atomic Lance commit: the new version appears whole or not at all, once per run id.
    Right before it, the run checks that it still holds the table's lease (LeaseLostError:
    nothing committed). Once it lands, the shards' checkpoints are removed."""
    start = time.perf_counter()
    manifest = build_manifest(ctx, planned, sampled, trained, encoded, opts, advisor=advisor, drift=drift,
                              stage_seconds=stage_seconds)
    schema = output_schema(planned.plan, opts, trained.codec.code_size, binary=manifest["codec_binary"],
                           rerank_size=manifest["rerank_bytes"],
                           metadata={MANIFEST_METADATA_KEY: json.dumps(manifest).encode()})
    decided = precommit_gate(ctx, manifest, encoded.num_rows, opts)
    if ctx.lease is not None:
        check_lease(ctx.lease)
    ref = None
    if decided is not None and not decided["passed"]:  # never the table's latest: on a branch of its own
        ref, version = commit_failed(ctx.out, ctx.table, schema, list(encoded.fragments), run_id=ctx.run_id,
                                     read_version=planned.read_version,
                                     num_kept=len(planned.diff.kept_fragments) if planned.diff else 0)
        decided = {**decided, "failed_tag": ref}
    elif opts.serve == "lancedb":  # a detached candidate: gated once its index is built (pipeline.gated)
        version = commit_candidate(ctx.out, ctx.table, schema, list(encoded.fragments), run_id=ctx.run_id,
                                   read_version=planned.read_version)
    else:
        version = commit_overwrite(ctx.out, ctx.table, schema, list(encoded.fragments), run_id=ctx.run_id,
                                   read_version=planned.read_version)
    manifest = {**manifest, "version": version, **({"branch": ref} if ref else {})}
    storage.write_bytes(ctx.run_file("manifest.json"), json.dumps(manifest, indent=1).encode())
    if encoded.checkpoints_uri:
        storage.remove_tree(encoded.checkpoints_uri)  # (they hold the shards' results, now in the version)
    if encoded.ids_uri:
        storage.remove_tree(encoded.ids_uri)  # (checked for duplicates before the commit)
    for uri in encoded.replaced_files:  # (fragments written again without dropped duplicated rows)
        storage.remove_file(uri)
    log.info("commit: %s version %d%s (%d rows)", ctx.table_uri, version, f" of branch {ref}" if ref else "",
             encoded.num_rows)
    return Committed(version, manifest, time.perf_counter() - start, gate=decided, ref=ref)


def precommit_gate(ctx: RunContext, manifest: dict, num_rows: int, opts: CompressOptions) -> dict | None:
    """A codes table's gate decision from the encode pass's search, before anything is
    committed; None when the run cannot decide yet (a LanceDB-served table: its recall is
    LanceDB's search over the committed index)."""
    ev = in_pass_evaluation(ctx.out, manifest, num_rows, rerank=opts.eval_rerank)
    if ev is None:
        return None
    return gate_decision(ctx.out, ctx.table, ev.get("recall_at_10"), floor=opts.gate_min_recall,
                         max_drop=opts.gate_max_drop, load_eval=load_eval)
