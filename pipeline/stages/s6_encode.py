"""Stage 6, encode: every new shard into uncommitted Lance fragments, in parallel. The same
pass over the source finds the held-out queries' exact neighbours and their search over the
new codes (the evaluation); an incremental run reads its kept shards' vectors and stored
codes once for the same two searches, and keeps their fragments as they are."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

from vecpress.kernels.knn import TopK
from vecpress.pipeline.context import RunContext, load_array, save_array
from vecpress.pipeline.executor import Executor
from vecpress.pipeline.incremental import KeptSearch, knn_shard
from vecpress.pipeline.options import CompressOptions
from vecpress.pipeline.scan import Columns, EncodeJob, encode_shard
from vecpress.pipeline.stages.s1_plan import Planned
from vecpress.pipeline.stages.s3_sample import Sampled
from vecpress.pipeline.stages.s5_train import Trained

log = logging.getLogger("vecpress")


@dataclass(frozen=True)
class Encoded:
    fragments: tuple[dict, ...]
    num_rows: int
    ground_truth_uri: str
    seconds: float = 0.0
    #: which processes read the shards and which devices computed them (`device_report`)
    devices: dict | None = None
    #: the held-out queries' top-k over the codes found in the encode pass (ids), and their
    #: candidates' exact distances (None without re-ranking); None when not searched in the pass
    search_ids_uri: str | None = None
    search_exact_uri: str | None = None
    #: the folder of the shards' checkpoints (removed once the commit that used them lands)
    checkpoints_uri: str | None = None


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


def encode(ctx: RunContext, planned: Planned, sampled: Sampled, trained: Trained, opts: CompressOptions,
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
                    rerank_codec=trained.rerank_codec, device=opts.device,
                    eval_search=True, eval_rerank=opts.eval_rerank)
    xq, qpos = load_array(sampled.queries_uri), load_array(sampled.query_positions_uri)
    num_kept = len(diff.kept_shards) if diff else 0
    pool = None
    gpu_compute = getattr(executor, "gpu_compute", None)  # optional in the Executor protocol
    if gpu_compute is not None and opts.device != "cpu" and len(plan.shards) > num_kept:
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
                        "ngpu": opts.ngpu})):
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
    return Encoded(tuple(fragments), plan.num_rows, gt_uri, seconds, devices, search_ids_uri, search_exact_uri,
                   checkpoints_uri=job.checkpoint_uri)
