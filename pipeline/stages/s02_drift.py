"""Stage 2 of an incremental run, drift: measure the table's codec on a fresh sample (of the
rows this run encodes, or uniform over the current corpus), and keep it (the run stays
incremental) or retrain (the run becomes a full rebuild of the current snapshot)."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

from vecpress.pipeline import storage
from vecpress.pipeline.codec_store import load_codec
from vecpress.pipeline.context import RunContext, load_array, load_arrays, manifest_codec, save_array
from vecpress.pipeline.executor import Executor
from vecpress.pipeline.incremental import drift_decision, previous_layout, probe_quality
from vecpress.pipeline.layout import SourcePlan
from vecpress.pipeline.lists import version_lists
from vecpress.pipeline.reuse import query_positions_in, recorded_units
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
    """Measure the table's codec on a fresh sample and decide: keep it (the incremental run
    continues) or retrain (the run becomes a full rebuild).

    Where the previous run recorded its units' results (pipeline.reuse), the sample is of the
    rows this run encodes anyway (new and rewritten files), and the incremental run keeps the
    previous version's held-out queries, so that kept files need not be read at all. Else the
    sample is uniform over the whole current corpus, and it becomes the held-out queries."""
    start = time.perf_counter()
    diff = planned.diff
    prev = diff.previous_manifest
    seed = opts.seed * 1_000_003 + diff.previous_version + 1  # fresh, yet deterministic per night
    units, lists = previous_record(ctx, prev, opts)
    probed = new_rows_plan(planned.plan, len(diff.kept_shards)) if units is not None else planned.plan
    codec = load_codec(manifest_codec(ctx.out, prev["codec"]))
    # held out from the rows the kept codec was trained on (they would flatter its error)
    train_rows = kept_training_rows(ctx, prev)
    probe = None
    if probed.num_rows >= 2:
        probe = read_sample(probed, 0, min(planned.num_queries, probed.num_rows), seed, executor,
                            max_row_groups=opts.sample_row_groups, metric=opts.metric,
                            exclude=layout_positions(probed, load_arrays(train_rows)) if train_rows else None)
        current = probe_quality(codec, probe.queries)
        decision = drift_decision(prev.get("drift_baseline"), current, threshold=opts.drift_threshold,
                                  force=opts.force_retrain)
        baseline = decision["baseline_relative_error"]
        log.info("drift: relative error %.4f (at training %s), probe recall@10 %.3f on %d %s rows: %s",
                 current["relative_error"], "n/a" if baseline is None else f"{baseline:.4f}",
                 current["recall_at_10"], len(probe.queries), "new" if units is not None else "sampled",
                 decision["reason"])
    else:
        decision = {"measured": False, "retrain": opts.force_retrain,
                    "reason": "retraining forced" if opts.force_retrain else "no new rows to measure: codec kept"}
        log.info("drift: %s", decision["reason"])
    if decision["retrain"]:  # a full rebuild on the current snapshot
        num_train, num_queries = sample_sizes(planned.snapshot.num_rows, opts.num_train, opts.num_queries)
        rebuild = dataclasses.replace(planned, diff=None, plan=planned.snapshot, num_train=num_train,
                                      num_queries=num_queries, codec_spec=None, code_size=None)
        if opts.codec != "auto":
            rebuild = resolve_codec(ctx, rebuild, opts.codec or prev["codec"]["spec"], opts)
        write_plan(ctx, rebuild.plan)
        return Drifted(rebuild, decision, None, time.perf_counter() - start)
    if units is not None:  # the previous version's queries, their own rows where they are now
        base = storage.normalize(ctx.out)
        xq = load_array(storage.join(base, prev["sample"]["queries_uri"]))
        qpos = query_positions_in(previous_layout(ctx.out, prev), planned.plan,
                                  load_array(storage.join(base, prev["sample"]["query_positions_uri"])))
    else:
        xq, qpos = probe.queries, probe.query_positions
    seconds = time.perf_counter() - start
    sampled = Sampled(train_uri="", queries_uri=save_array(ctx.run_file("queries.npy"), xq),
                      query_positions_uri=save_array(ctx.run_file("query_positions.npy"), qpos),
                      num_train=prev["sample"]["num_train"], num_queries=len(xq),
                      train_rows_uri=train_rows, seconds=seconds,
                      previous_units=units, previous_lists=lists)
    return Drifted(planned, decision, sampled, seconds)


def previous_record(ctx: RunContext, prev: dict, opts: CompressOptions) -> tuple[list | None, object | None]:
    """(the units the previous version's run recorded, its lists' spec or None), or (None,
    None) where an incremental run cannot reuse them: a LanceDB-served table, another
    --num-queries, a version from before they were recorded, a run folder gone."""
    same_queries = (prev.get("options") or {}).get("num_queries") == opts.num_queries
    units = recorded_units(ctx.out, prev) if opts.serve != "lancedb" and same_queries else None
    base = storage.normalize(ctx.out)
    if units is None or not all(storage.exists(storage.join(base, prev["sample"][name]))
                                for name in ("queries_uri", "query_positions_uri")):
        return None, None
    lists = version_lists(ctx.out, prev)  # (None without partitions)
    if lists is not None and not all(storage.exists(lists.spec.group_uri(g)) for g in range(lists.spec.num_groups)):
        return None, None
    return units, lists and lists.spec


def new_rows_plan(plan: SourcePlan, num_kept: int) -> SourcePlan:
    """The layout of an incremental run's encoded shards alone (kept shards left out)."""
    shards, offset = [], 0
    for s in plan.shards[num_kept:]:
        shards.append(dataclasses.replace(s, index=len(shards), row_offset=offset))
        offset += s.num_rows
    return dataclasses.replace(plan, shards=tuple(shards), num_rows=offset)


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
