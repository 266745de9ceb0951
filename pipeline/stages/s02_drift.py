"""Stage 2 of an incremental run, drift: measure the table's codec on a fresh uniform sample
of the current corpus, and keep it (the run stays incremental) or retrain (the run becomes a
full rebuild of the current snapshot)."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

from vecpress.pipeline import storage
from vecpress.pipeline.codec_store import load_codec
from vecpress.pipeline.context import RunContext, load_arrays, manifest_codec, save_array
from vecpress.pipeline.executor import Executor
from vecpress.pipeline.incremental import drift_decision, probe_quality
from vecpress.pipeline.options import CompressOptions
from vecpress.pipeline.sampling import layout_positions, read_sample, sample_sizes
from vecpress.pipeline.stages.s01_plan import Planned, resolve_codec, write_plan
from vecpress.pipeline.stages.s03_sample import Sampled

log = logging.getLogger("vecpress")


@dataclass(frozen=True)
class Drifted:
    #: the incremental plan as it was (codec kept), or a full rebuild's (retrain)
    planned: Planned
    #: the decision and its numbers (manifest `drift`)
    decision: dict
    #: codec kept: the probe's rows, which are the incremental run's held-out queries
    sampled: Sampled | None
    seconds: float = 0.0


def drift(ctx: RunContext, planned: Planned, opts: CompressOptions, executor: Executor) -> Drifted:
    """Measure the table's codec on a fresh uniform sample of the current corpus and decide:
    keep it (the incremental run continues, its held-out queries the probe's rows) or retrain
    (the run becomes a full rebuild)."""
    start = time.perf_counter()
    diff = planned.diff
    prev = diff.previous_manifest
    seed = opts.seed * 1_000_003 + diff.previous_version + 1  # fresh, yet deterministic per night
    # held out from the rows the kept codec was trained on (they would flatter its error)
    train_rows = kept_training_rows(ctx, prev)
    probe = read_sample(planned.plan, 0, planned.num_queries, seed, executor, max_row_groups=opts.sample_row_groups,
                        exclude=layout_positions(planned.plan, load_arrays(train_rows)) if train_rows else None,
                        metric=opts.metric)
    xq, qpos = probe.queries, probe.query_positions
    codec = load_codec(manifest_codec(ctx.out, prev["codec"]))
    current = probe_quality(codec, xq)
    decision = drift_decision(prev.get("drift_baseline"), current, threshold=opts.drift_threshold,
                              force=opts.force_retrain)
    baseline = decision["baseline_relative_error"]
    log.info("drift: relative error %.4f (at training %s), probe recall@10 %.3f: %s", current["relative_error"],
             "n/a" if baseline is None else f"{baseline:.4f}", current["recall_at_10"], decision["reason"])
    if decision["retrain"]:  # a full rebuild on the current snapshot
        num_train, num_queries = sample_sizes(planned.snapshot.num_rows, opts.num_train, opts.num_queries)
        rebuild = dataclasses.replace(planned, diff=None, plan=planned.snapshot, num_train=num_train,
                                      num_queries=num_queries, codec_spec=None, code_size=None)
        if opts.codec != "auto":
            rebuild = resolve_codec(ctx, rebuild, opts.codec or prev["codec"]["spec"], opts)
        write_plan(ctx, rebuild.plan)
        return Drifted(rebuild, decision, None, time.perf_counter() - start)
    seconds = time.perf_counter() - start
    sampled = Sampled(train_uri="", queries_uri=save_array(ctx.run_file("queries.npy"), xq),
                      query_positions_uri=save_array(ctx.run_file("query_positions.npy"), qpos),
                      num_train=prev["sample"]["num_train"], num_queries=len(xq), train_rows_uri=train_rows,
                      seconds=seconds)
    return Drifted(planned, decision, sampled, seconds)


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
